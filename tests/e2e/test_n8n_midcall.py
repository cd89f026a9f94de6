"""Mid-call control from a real n8n, and the Trigger's dedupe of a real redelivery.

* n8n → bridge: a workflow runs the package's Voxbridge node operations "Call: Say" and "Call: Tag"
  (declarative routing, executed by n8n 1.123) on a live call whose AI backend is the OpenAI
  Realtime simulator: the say arrives on the simulator's wire and is spoken; the tag lands in the
  call's metadata.
* bridge → n8n, at least once: the Voxbridge Trigger (events: call.tagged) registers with the
  bridge through a loopback proxy that passes the first delivery on to n8n but loses n8n's answer
  (the bridge sees a 503). The bridge delivers the same event again; the Trigger acknowledges the
  retry and the workflow runs once (one file written per execution).

Needs root and the n8n sandbox, like tests/e2e/test_n8n.py (whose fixtures it uses).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.requests import Request
from starlette.responses import Response

from tests.ports import free_port

from .n8n import N8nSandbox
from .test_n8n import PACKAGE_DIR, n8n_root  # noqa: F401 - the session fixture (sandbox.sh n8n)

pytestmark = pytest.mark.timeout(1500)

KEY = "e2e-openai-key"
API_TOKEN = "e2e-midcall-token-" + uuid.uuid4().hex
CRED = {"id": "vbMidcallApi1", "name": "voxbridge API (mid-call)"}


class ProxiedN8n(N8nSandbox):
    """n8n advertising its webhook URLs on ``public_port`` (the proxy) instead of its own."""

    def __init__(self, *args: Any, public_port: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.public_port = public_port

    def env(self) -> dict[str, str]:
        return {**super().env(), "WEBHOOK_URL": f"http://127.0.0.1:{self.public_port}/"}


class LossyProxy:
    """Forwards every request to n8n; for the first delivery whose path contains ``lose_once_in``
    it forwards, lets n8n answer, then answers 503 itself: the answer is lost, not the delivery."""

    def __init__(self, target_port: int, lose_once_in: str) -> None:
        self.target = f"http://127.0.0.1:{target_port}"
        self.lose_once_in = lose_once_in
        self.deliveries: list[tuple[str, int, bytes]] = []  # (path, n8n's status, n8n's body)
        self._lost = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with httpx.AsyncClient(timeout=30) as client:
            upstream = await client.request(request.method, self.target + request.url.path, content=body,
                                            headers=headers, params=request.query_params)
        self.deliveries.append((request.url.path, upstream.status_code, upstream.content))
        if self.lose_once_in in request.url.path and request.method == "POST" and not self._lost:
            self._lost = True
            await Response(b"answer lost on the way", status_code=503)(scope, receive, send)
            return
        await Response(upstream.content, status_code=upstream.status_code,
                       media_type=upstream.headers.get("content-type"))(scope, receive, send)


def node(name: str, type: str, position: int, parameters: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "name": name, "type": type, "typeVersion": extra.pop("typeVersion", 1),
            "position": [position * 240, 0], "parameters": parameters, **extra}


def chain(*names: str) -> dict[str, Any]:
    return {a: {"main": [[{"node": b, "type": "main", "index": 0}]]} for a, b in itertools.pairwise(names)}


async def test_n8n_says_and_tags_on_a_live_call_and_the_trigger_runs_once_per_event(n8n_root: Path,  # noqa: F811
                                                                                   tmp_path: Path):
    from bridge.app import Bridge
    from bridge.config import Config
    from bridge.devtools.dial import AudioSocketCaller
    from bridge.devtools.sim_openai import OpenAIRealtimeSim

    sim = OpenAIRealtimeSim(accepted_keys={KEY})
    await sim.start()
    api_port, n8n_port, proxy_port = free_port(), free_port(), free_port()
    bridge = Bridge(Config.model_validate({
        "audiosocket": {"listen": "127.0.0.1:0"},
        "api": {"enabled": True, "listen": f"127.0.0.1:{api_port}", "token": API_TOKEN},
        "store": {"path": str(tmp_path / "calls.db")},
        "gateways": {"ai": {"protocol": "openai-realtime", "url": sim.url, "api_key": KEY}},
        "profiles": {"default": {"gateway": "ai", "first_message": None}},
    }))
    await bridge.start()
    n8n = ProxiedN8n(n8n_root, tmp_path / "n8n", n8n_port, PACKAGE_DIR, public_port=proxy_port)
    trigger_hook = str(uuid.uuid4())
    proxy = LossyProxy(n8n_port, trigger_hook)
    server = uvicorn.Server(uvicorn.Config(proxy, host="127.0.0.1", port=proxy_port, log_level="warning",
                                           lifespan="off"))
    server_task = asyncio.create_task(server.serve())
    caller: AudioSocketCaller | None = None
    tagged: Any = None
    api = f"http://127.0.0.1:{api_port}"
    try:
        n8n.import_credentials([{**CRED, "type": "voxbridgeApi",
                                 "data": {"baseUrl": api + "/", "apiToken": API_TOKEN}}])
        creds = {"voxbridgeApi": CRED}
        n8n.import_workflow({
            "id": "vbMidcall1", "name": "say and tag", "settings": {"executionOrder": "v1"},
            "nodes": [
                node("Ask", "n8n-nodes-base.webhook", 0, {"httpMethod": "POST", "path": "vb-midcall",
                                                          "responseMode": "lastNode",
                                                          "responseData": "firstEntryJson", "options": {}},
                     typeVersion=2, webhookId=str(uuid.uuid4())),
                node("Say", "n8n-nodes-voxbridge.voxbridge", 1, {
                    "resource": "call", "operation": "say", "callId": "={{ $json.body.call_id }}",
                    "text": "={{ $json.body.text }}"}, credentials=creds),
                node("Tag", "n8n-nodes-voxbridge.voxbridge", 2, {
                    "resource": "call", "operation": "tag", "callId": "={{ $('Ask').item.json.body.call_id }}",
                    "tags": {"tag": [{"name": "handled_by", "value": "n8n"}]}}, credentials=creds),
            ],
            "connections": chain("Ask", "Say", "Tag"),
        })
        n8n.import_workflow({
            "id": "vbTagged1", "name": "on call.tagged", "settings": {"executionOrder": "v1"},
            "nodes": [
                node("Tagged", "n8n-nodes-voxbridge.voxbridgeTrigger", 0, {"events": ["call.tagged"], "options": {}},
                     webhookId=trigger_hook, credentials=creds),
                node("To file", "n8n-nodes-base.convertToFile", 1, {
                    "operation": "toJson", "mode": "each",
                    "options": {"fileName": "={{ $json.id }}.json"}}, typeVersion=1.1),
                node("Write", "n8n-nodes-base.readWriteFile", 2, {
                    "operation": "write", "dataPropertyName": "data", "options": {},
                    "fileName": "=/tmp/vb-tagged-{{ $execution.id }}-{{ $binary.data.fileName }}"}),
            ],
            "connections": chain("Tagged", "To file", "Write"),
        })
        await asyncio.to_thread(n8n.start)

        async with httpx.AsyncClient(base_url=api, headers={"Authorization": f"Bearer {API_TOKEN}"},
                                     timeout=10) as client:
            hooks = (await client.get("/v1/webhooks")).json()["webhooks"]
            assert [h["events"] for h in hooks] == [["call.tagged"]], hooks
            assert hooks[0]["url"].startswith(f"http://127.0.0.1:{proxy_port}/webhook/{trigger_hook}/"), hooks

            caller = AudioSocketCaller()
            await caller.connect(*bridge.audiosocket_address)
            call_id = str(caller.uuid)
            session = await sim.next_session(10)
            await session.wait_accepted(10)
            events = bridge.events.subscribe(maxsize=1000)
            deadline = time.monotonic() + 10
            while call_id not in bridge.sessions or bridge.sessions[call_id].gateway is None:
                assert time.monotonic() < deadline, "the call was not answered"
                await asyncio.sleep(0.05)

            # n8n runs Say then Tag against the live call.
            async with httpx.AsyncClient(timeout=30) as plain:
                r = await plain.post(n8n.webhook_url("vb-midcall"),
                                     json={"call_id": call_id, "text": "Your refund is on its way."})
            assert r.status_code == 200, f"{r.status_code} {r.text}\n{n8n.log_tail()}"
            answer = r.json()
            assert answer["command"] == "tag" and answer["ok"] is True
            assert answer["metadata"] == {"handled_by": "n8n"}
            assert session.instructed and session.instructed[-1].endswith(": Your refund is on its way.")
            async with asyncio.timeout(10):
                while tagged is None:
                    e = await events.get()
                    if e.type == "call.tagged" and e.call_id == call_id:
                        tagged = e
            events.close()

            # The bridge delivered call.tagged; the proxy lost n8n's first answer, so it was
            # delivered again. One execution of the workflow, whatever the number of deliveries.
            deadline = time.monotonic() + 30
            while sum(1 for p, *_ in proxy.deliveries if trigger_hook in p) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
            to_trigger = [(status, body) for p, status, body in proxy.deliveries if trigger_hook in p]
            assert len(to_trigger) >= 2, f"no redelivery: {proxy.deliveries}\n{n8n.log_tail()}"
            assert all(status == 200 for status, _ in to_trigger), to_trigger
            with contextlib.suppress(ValueError):
                assert json.loads(to_trigger[1][1]).get("status") == "duplicate", to_trigger[1]
            await asyncio.sleep(3)  # room for a second execution, if the dedupe failed
            tmp = n8n.host_path("/tmp")
            written = sorted(tmp.glob(f"vb-tagged-*-{tagged.id}.json"))
            assert len(written) == 1, (written, n8n.log_tail())
            record = json.loads(written[0].read_text())
            record = record[0] if isinstance(record, list) else record
            assert record["id"] == tagged.id and record["data"]["tags"] == {"handled_by": "n8n"}
    finally:
        if tagged is not None:
            for f in n8n.host_path("/tmp").glob(f"vb-tagged-*-{tagged.id}.json"):
                f.unlink()
        if caller is not None:
            await caller.aclose()
        n8n.stop()
        n8n.cleanup()
        server.should_exit = True
        await server_task
        await bridge.stop()
        await sim.stop()
