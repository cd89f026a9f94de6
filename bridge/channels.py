"""Which Asterisk channel is behind each AudioSocket UUID, learnt from AMI events.

AudioSocket carries only a UUID; AMI actions (Redirect, Hangup, PlayDTMF) need the channel.
Sources, most authoritative first:

1. ``Newexten`` with ``Application: AudioSocket`` (AppData ``<uuid>,host:port``) or
   ``Application: Dial`` (AppData ``AudioSocket/host:port/<uuid>/c(slin16)``): the channel that
   runs the app is the caller's. (With Local channels both halves may carry ``AS_UUID``, e.g.
   when an Originate sets it: only this tells them apart.)
2. ``VarSet`` of ``AS_UUID``, and ``ChanVariable: AS_UUID=…`` on any channel event (manager.conf
   ``channelvars``): a candidate until (1) arrives; also refreshes the snapshot.
3. After every (re)connect, ``CoreShowChannels``: channels whose Application is AudioSocket
   (or Dial into AudioSocket) rebuild the map, so events missed during a gap do not matter.

``Hangup`` drops a channel. Sessions ask with :meth:`ChannelTracker.wait_for`, which waits
briefly for a late event.
"""

from __future__ import annotations

import asyncio
import logging
import re

from tools.base import ChannelInfo

from .ami import AmiClient, AmiMessage

log = logging.getLogger("voxbridge.channels")

UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
VARIABLE = "AS_UUID"
#: How long a call found only through its ``AS_UUID`` variable waits for the event naming the
#: channel that runs AudioSocket (which wins: see :meth:`ChannelTracker.wait_for`).
VARIABLE_ONLY_GRACE_S = 0.3


def uuid_from_app(application: str | None, data: str | None) -> str | None:
    """The AudioSocket UUID in an AudioSocket() or Dial(AudioSocket/…) application call."""
    if not application or not data:
        return None
    app = application.lower()
    if app == "audiosocket" or (app == "dial" and "audiosocket/" in data.lower()):
        m = UUID_RE.search(data)
        return m.group(0).lower() if m else None
    return None


def snapshot(msg: AmiMessage) -> ChannelInfo:
    return ChannelInfo(
        name=msg.get("Channel", "") or "",
        uniqueid=msg.get("Uniqueid", "") or "",
        linkedid=msg.get("Linkedid", "") or "",
        caller_num=msg.get("CallerIDNum", "") or "",
        caller_name=msg.get("CallerIDName", "") or "",
        context=msg.get("Context", "") or "",
        exten=msg.get("Exten", "") or "",
        variables=msg.chan_variables(),
    )


class ChannelTracker:
    def __init__(self) -> None:
        self._by_uuid: dict[str, ChannelInfo] = {}
        self._authoritative: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[ChannelInfo]]] = {}
        self.resyncs = 0

    def __len__(self) -> int:
        return len(self._by_uuid)

    def get(self, call_uuid: str) -> ChannelInfo | None:
        return self._by_uuid.get(call_uuid.lower())

    def attach(self, ami: AmiClient) -> None:
        ami.add_listener(self.on_event)
        ami.on_connect(self.resync)

    async def wait_for(self, call_uuid: str, timeout: float) -> ChannelInfo | None:
        """The channel behind ``call_uuid``: the one running AudioSocket as soon as an event says
        so; a channel known only by its ``AS_UUID`` variable after up to ``VARIABLE_ONLY_GRACE_S``
        more (the other half of a Local pair carries the variable too, and its event can come
        first: a call correlated to it would transfer or hang up the wrong half)."""
        key = call_uuid.lower()
        if key in self._authoritative:
            return self._by_uuid[key]
        if key in self._by_uuid:
            timeout = min(timeout, VARIABLE_ONLY_GRACE_S)
        fut: asyncio.Future[ChannelInfo] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(fut)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            return self._by_uuid.get(key)  # known by its variable only (or not at all: None)
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                if fut in waiters:
                    waiters.remove(fut)
                if not waiters:
                    self._waiters.pop(key, None)

    def _record(self, key: str, info: ChannelInfo, authoritative: bool) -> None:
        known = self._by_uuid.get(key)
        if known is not None and key in self._authoritative and not authoritative and known.name != info.name:
            return  # the other half of a Local pair also carries AS_UUID: not the caller
        if known is not None and known.name == info.name:
            # Same channel: keep the variables we knew if this event carried none.
            merged = {**known.variables, **info.variables}
            info.variables = merged
        self._by_uuid[key] = info
        if authoritative:
            self._authoritative.add(key)
        elif self._waiters.get(key):
            # Known by the variable only: give the channel running AudioSocket a moment to show up.
            asyncio.get_running_loop().call_later(VARIABLE_ONLY_GRACE_S, self._settle, key)
            return
        self._settle(key)

    def _settle(self, key: str) -> None:
        info = self._by_uuid.get(key)
        if info is None:
            return
        for fut in self._waiters.pop(key, []):
            if not fut.done():
                fut.set_result(info)

    def on_event(self, msg: AmiMessage) -> None:
        event = msg.event or ""
        if event == "Hangup":
            uid = msg.get("Uniqueid")
            for gone, info in list(self._by_uuid.items()):
                if info.uniqueid == uid:
                    del self._by_uuid[gone]
                    self._authoritative.discard(gone)
            return
        if event == "Newexten":
            key: str | None = uuid_from_app(msg.get("Application"), msg.get("AppData"))
            if key:
                self._record(key, snapshot(msg), authoritative=True)
                return
        key = None
        if event == "VarSet" and msg.get("Variable") == VARIABLE:
            key = (msg.get("Value") or "").lower()
        else:
            key = (msg.chan_variables().get(VARIABLE) or "").lower() or None
        if key and UUID_RE.fullmatch(key):
            known = self._by_uuid.get(key)
            info = snapshot(msg)
            if known is None or known.name == info.name or key not in self._authoritative:
                self._record(key, info, authoritative=False)

    async def resync(self, ami: AmiClient) -> None:
        """Rebuild from CoreShowChannels (after every AMI connect).

        Only a completed list replaces the map. If Asterisk answers Error (the AMI account lacks
        the ``reporting`` write class, say) or the list does not arrive, AmiError propagates and
        the map is left as it was: an empty map would make every call in progress lose its
        channel (no transfer, no hangup), while the old entries are still mostly right and events
        keep correcting them.
        """
        events = await ami.action_list("CoreShowChannels", "CoreShowChannelsComplete", timeout=10)
        fresh: dict[str, ChannelInfo] = {}
        for ev in events:
            if ev.event != "CoreShowChannel":
                continue
            key = uuid_from_app(ev.get("Application"), ev.get("ApplicationData"))
            if key:
                fresh[key] = snapshot(ev)
        # Keep variables learnt from events for channels that are still there.
        for key, info in fresh.items():
            old = self._by_uuid.get(key)
            if old is not None and old.name == info.name:
                info.variables = {**old.variables, **info.variables}
        self._by_uuid = fresh
        self._authoritative = set(fresh)
        for key, info in fresh.items():
            for fut in self._waiters.pop(key, []):
                if not fut.done():
                    fut.set_result(info)
        self.resyncs += 1
        log.info("channel map rebuilt from CoreShowChannels: %d AudioSocket call(s)", len(fresh))
