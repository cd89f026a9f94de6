"""Asterisk REST Interface: the REST requests (httpx) and the event stream (websockets) of one
Stasis application.

:class:`AriClient` is I/O only and knows nothing of calls (bridge/ari_ingress.py does):

* :meth:`AriClient.request` sends one REST request with a deadline and returns the decoded JSON;
  any failure is an :class:`AriError` naming the request and what Asterisk said (its
  ``{"message": ...}`` body), never an httpx exception. Nothing is ever re-sent: a request that
  timed out may have run, and answering or bridging a channel twice is worse than failing once.
* :meth:`AriClient.run` keeps the application's event WebSocket open: connect (Basic auth in a
  header, so the password is in no URL and no log), hand every event to the listener in arrival
  order, and when the stream drops (Asterisk restarted, the network hiccuped) reconnect with
  exponential back-off and call the ``on_connect`` hook, where the ingress resyncs its calls.
  Asterisk registers the application while the socket is open: a call sent to ``Stasis()`` while
  it is not fails at once in the dialplan (``STASISSTATUS=FAILED``), so no event is lost to a
  reconnect that the resync must invent; what it must find out is which channels went away.

A malformed event (not JSON, not an object, no ``type``) is logged and counted, and the stream
goes on: one bad message must not drop every call's control.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .retry import Backoff

__all__ = ["AriClient", "AriError"]

log = logging.getLogger("voxbridge.ari")

EventListener = Callable[[dict[str, Any]], None]
ConnectHook = Callable[[], Awaitable[None]]

#: Longest an ARI error body is quoted in an error message.
_MAX_MESSAGE = 200


class AriError(Exception):
    """A REST request failed: ``status`` is the HTTP status (None: no answer at all)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def gone(self) -> bool:
        """The channel or bridge no longer exists, or has left the application (404, 409, 422)."""
        return self.status in (404, 409, 422)


class AriClient:
    """One Stasis application's REST client and event stream."""

    def __init__(self, url: str, username: str, password: str, app: str, *, action_timeout: float = 5.0,
                 connect_timeout: float = 5.0, backoff_min: float = 0.5, backoff_max: float = 10.0,
                 on_fault: Callable[[BaseException], None] | None = None) -> None:
        self.url = url.rstrip("/")
        self.app = app
        self.action_timeout = action_timeout
        self.connect_timeout = connect_timeout
        self.backoff = Backoff(backoff_min, backoff_max, jitter=0.2)
        self._auth = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self._http = httpx.AsyncClient(base_url=self.url + "/ari", headers={"Authorization": self._auth},
                                       timeout=httpx.Timeout(action_timeout))
        self._listeners: list[EventListener] = []
        self._hooks: list[ConnectHook] = []
        self._on_fault = on_fault
        self._ws: ClientConnection | None = None
        self.connected = asyncio.Event()
        self.connects = 0
        self.last_error: str | None = None
        self.malformed_events = 0
        self.faults = 0

    # ------------------------------------------------------------------ wiring

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    def on_connect(self, hook: ConnectHook) -> None:
        """Awaited after every (re)connection of the event stream, before its first event is handed on."""
        self._hooks.append(hook)

    @property
    def events_url(self) -> str:
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        query = f"app={quote(self.app)}&subscribeAll=false"
        return urlunsplit((scheme, parts.netloc, parts.path + "/ari/events", query, ""))

    # ------------------------------------------------------------------ REST

    async def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                      json_body: Any = None, timeout: float | None = None) -> Any:
        """One REST request (``path`` under /ari); the decoded JSON answer, or None for 204."""
        what = f"{method} {path}"
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            resp = await self._http.request(method, path, params=clean, json=json_body,
                                            timeout=timeout or self.action_timeout)
        except httpx.TimeoutException:
            raise AriError(f"ARI {what}: no answer within {timeout or self.action_timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise AriError(f"ARI {what}: {type(exc).__name__}: {exc or 'connection failed'}") from None
        if resp.status_code >= 400:
            detail = ""
            with contextlib.suppress(ValueError, AttributeError):
                detail = str(resp.json().get("message") or "")
            detail = (detail or resp.text or resp.reason_phrase)[:_MAX_MESSAGE]
            raise AriError(f"ARI {what}: {resp.status_code} {detail}".rstrip(), resp.status_code)
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise AriError(f"ARI {what}: the answer is not JSON") from None

    async def close(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------ the event stream

    async def run(self) -> None:
        """Connect, stay connected, reconnect with back-off; ends only when cancelled."""
        attempt = 0
        while True:
            connected_before = self.connects
            try:
                await self._connect_once()
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                self.last_error = _describe(exc)
            except Exception as exc:  # noqa: BLE001 - a bug: logged, counted, and the loop goes on
                self.last_error = f"unexpected {exc!r}"
                self._fault(exc, "ARI event stream failed")
            finally:
                self.connected.clear()
                self._ws = None
            attempt = 1 if self.connects != connected_before else attempt + 1
            delay = self.backoff.delay(attempt)
            log.warning("ARI %s: %s; reconnecting in %.1f s", self.events_url, self.last_error, delay)
            await asyncio.sleep(delay)

    async def _connect_once(self) -> None:
        async with asyncio.timeout(self.connect_timeout):
            ws = await connect(self.events_url, additional_headers={"Authorization": self._auth},
                               open_timeout=None, ping_interval=5, ping_timeout=10, max_size=1 << 20,
                               compression=None)
        self._ws = ws
        try:
            self.connects += 1
            self.last_error = None
            log.info("ARI event stream connected (application %s)", self.app)
            for hook in self._hooks:
                try:
                    await hook()
                except Exception as exc:  # noqa: BLE001 - a failed resync must not take ARI down
                    self._fault(exc, "ARI on_connect hook failed")
            self.connected.set()
            async for message in ws:
                self._dispatch(message)
            self.last_error = f"event stream closed ({_close_reason(ws)})"
        finally:
            await ws.close()

    def _dispatch(self, message: str | bytes) -> None:
        try:
            event = json.loads(message)
        except ValueError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self.malformed_events += 1
            log.warning("ARI sent an event that is not a JSON object with a type: %.120r", message)
            return
        for listener in self._listeners:
            try:
                listener(event)
            except Exception as exc:  # noqa: BLE001 - one listener must not drop the stream
                self._fault(exc, f"ARI event listener failed on {event['type']}")

    def _fault(self, exc: BaseException, what: str) -> None:
        self.faults += 1
        log.error("%s: %r", what, exc, exc_info=exc)
        if self._on_fault is not None:
            try:
                self._on_fault(exc)
            except Exception:  # deliberately broad: counting must not become a second failure
                log.exception("ARI on_fault callback failed")

    async def drop_connection(self) -> None:
        """Close the event stream (tests: the next one is opened by :meth:`run`)."""
        if self._ws is not None:
            await self._ws.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, InvalidStatus):
        code = exc.response.status_code
        if code == 401:
            return "401: Asterisk refused the ARI user name or password (ari.conf)"
        if code == 404:
            return "404: no ARI here (http.conf enabled, res_ari loaded?)"
        return f"the event stream was refused: HTTP {code}"
    if isinstance(exc, TimeoutError):
        return "connection timed out"
    return f"{type(exc).__name__}: {exc}"


def _close_reason(ws: ClientConnection) -> str:
    rcvd = ws.close_code
    return f"code {rcvd}" if rcvd is not None else "no close frame"
