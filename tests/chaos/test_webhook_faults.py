"""Webhook subscribers that hang or fail cost the calls nothing.

Webhook delivery is off the media path (bridge/webhooks.py): each subscription has its own
bounded queue and delivery task. Here one subscriber accepts TCP and never answers, another
answers every request with 500, and a chatty call floods events (more than a subscription's
queue holds). The calls must not notice: the bystander call keeps its 20 ms pacing, a new call
is still accepted; each subscription's queue stays within its bound, and what was dropped is
counted in ``/metrics`` (``voxbridge_webhook_events_dropped_total``), read over the real API.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from .conftest import HangingHttpServer, StatusHttpServer, assert_paced, metric_total

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(60)]

TOKEN = "chaos-api-token-0123456789"
TRANSCRIPTS = 1300  # more than a subscription's queue (bridge.webhooks.queue_size, 1000) holds


async def test_hanging_and_failing_webhook_subscribers_cost_calls_nothing(gateway_process, make_bridge, dial):
    gw = gateway_process
    hanging = await HangingHttpServer().start()
    failing = await StatusHttpServer(500).start()
    try:
        bridge = await make_bridge(gateway={"url": gw.url}, profile={"first_message": None},
                                   api={"enabled": True, "listen": "127.0.0.1:0", "token": TOKEN})
        api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{bridge.api.port}",
                                headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        async with api:
            hooks = []
            for url in (hanging.url, failing.url):
                r = await api.post("/v1/webhooks", json={"url": url})
                assert r.status_code == 201, r.text
                hooks.append(r.json()["id"])

            bystander = await dial(bridge)
            await gw.request("accepted")
            chatty = await dial(bridge)
            chatty_session = await gw.request("accepted")
            assert await bystander.wait_audio(320 * 10, timeout=5)
            seen = bridge.events.subscribe(maxsize=TRANSCRIPTS + 100,
                                           filter=lambda e: e.type == "transcript" and e.call_id == str(chatty.uuid))

            flood_at = time.monotonic()
            await gw.request("transcripts", session=chatty_session, n=TRANSCRIPTS)
            async with asyncio.timeout(15):
                for _ in range(TRANSCRIPTS):  # the bridge has published every one of them
                    await seen.get()

            # Each subscription holds at most its queue (plus the one event in flight).
            bound = bridge.webhooks.queue_size + 1
            for hook_id, stats in bridge.webhooks.stats().items():
                assert stats["pending"] <= bound, f"webhook {hook_id}: {stats['pending']} events held (bound {bound})"
            # ...and both subscribers really were tried: the failures are theirs, not an idle dispatcher.
            async with asyncio.timeout(5):
                await hanging.reached.wait()
                await failing.reached.wait()

            # The overflow is counted where an operator looks.
            r = await api.get("/metrics")
            assert r.status_code == 200
            dropped = metric_total(r.text, "voxbridge_webhook_events_dropped_total")
            expected = 2 * (TRANSCRIPTS - bound)
            assert dropped >= expected, f"{dropped:g} webhook events counted as dropped, expected >= {expected}"

            # The calls did not notice: the bystander kept its pacing through the flood (and
            # half a second after it), and a new call is accepted and hears audio.
            assert await bystander.wait_audio(bystander.received_audio_bytes + 320 * 25, timeout=3)
            assert_paced(bystander, flood_at, what="the bystander call")
            assert not bystander.ended.is_set() and not chatty.ended.is_set()
            newcomer = await dial(bridge)
            await gw.request("accepted")
            assert await newcomer.wait_audio(320 * 10, timeout=3)
            assert not newcomer.ended.is_set()
    finally:
        await hanging.close()
        await failing.close()
