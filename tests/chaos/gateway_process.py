"""The reference gateway in a process of its own, driven over stdin/stdout (JSON lines).

A flood (1500 tool calls, thousands of transcripts) costs the sender real work. In the
bridge's process that work would be billed to the bridge as lost pacing — even from another
thread, which holds the GIL half the time — so the chaos tests that measure pacing under a
flood run the gateway here, in its own process, as a real gateway would be.

Protocol: the child prints ``{"url": ...}`` once listening; then each request line
``{"id": n, "op": ..., ...}`` is handled in its own task and answered with ``{"id": n,
"ok": value}`` or ``{"id": n, "error": "..."}`` (answers may come out of order). Operations
(``session`` is the 0-based index of accepted sessions, in connect order):

* ``accepted`` → the index of the next session once its config is accepted;
* ``burst`` (``session``, ``tool``, ``ids``) → every ``tool_call`` sent back to back; its
  results are collected as they come;
* ``results`` (``session``, ``n``) → waits until ``n`` burst results arrived: ``{call_id: result}``;
* ``call_tool`` (``session``, ``tool``, ``call_id``) → the result of one tool call;
* ``transcripts`` (``session``, ``n``) → ``n`` final assistant transcripts sent back to back;
* ``wire`` (``session``) → ``{"counts": {call_id: tool_result messages}, "violations": [...]}``.

:class:`GatewayProcess` is the test side.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import sys
from typing import Any

# `python -m tests.chaos.gateway_process` is started from the repository root.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def _serve() -> None:
    from bridge.devtools.gateway_sim import GatewaySim

    sim = GatewaySim(accepted_keys={os.environ["CHAOS_GATEWAY_KEY"]})
    await sim.start()
    sessions: list[Any] = []
    bursts: dict[int, dict[str, Any]] = {}
    changed = asyncio.Event()
    out = sys.stdout

    def reply(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    async def accepted() -> int:
        session = await sim.next_session(10)
        await session.wait_accepted()
        sessions.append(session)
        return len(sessions) - 1

    async def burst(session: int, tool: str, ids: list[str]) -> int:
        s = sessions[session]
        state = bursts.setdefault(session, {"results": {}, "futures": []})

        def done(cid: str, fut: asyncio.Future[str]) -> None:
            state["results"][cid] = fut.result() if not fut.cancelled() and fut.exception() is None else None
            changed.set()

        for cid in ids:
            fut = asyncio.ensure_future(s.call_tool(tool, {}, call_id=cid, timeout=30))
            fut.add_done_callback(lambda f, cid=cid: done(cid, f))
            state["futures"].append(fut)
        await asyncio.sleep(0)
        return len(ids)

    async def results(session: int, n: int) -> dict[str, Any]:
        state = bursts[session]
        while len(state["results"]) < n:
            changed.clear()
            await changed.wait()
        return dict(state["results"])

    async def call_tool(session: int, tool: str, call_id: str) -> str:
        return await sessions[session].call_tool(tool, {}, call_id=call_id, timeout=10)

    async def transcripts(session: int, n: int) -> int:
        s = sessions[session]
        for i in range(n):
            await s.transcript("assistant", f"line {i}", final=True)
        return n

    async def wire(session: int) -> dict[str, Any]:
        s = sessions[session]
        counts = collections.Counter(m.get("call_id") for m in s.messages if m.get("type") == "tool_result")
        return {"counts": dict(counts), "violations": list(s.violations)}

    ops = {"accepted": accepted, "burst": burst, "results": results, "call_tool": call_tool,
           "transcripts": transcripts, "wire": wire}

    async def handle(req: dict[str, Any]) -> None:
        rid = req.pop("id")
        try:
            value = await ops[req.pop("op")](**req)
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
            reply({"id": rid, "error": f"{type(exc).__name__}: {exc}"})
        else:
            reply({"id": rid, "ok": value})

    reply({"url": sim.url})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks: set[asyncio.Task[None]] = set()
    while line := await reader.readline():
        task = asyncio.create_task(handle(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for t in tasks:
        t.cancel()
    await sim.stop()


class GatewayProcess:
    """Test side: start the child, send requests, await their answers."""

    def __init__(self, api_key: str) -> None:
        self._key = api_key
        self._proc: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.url = ""

    async def start(self) -> None:
        env = {**os.environ, "CHAOS_GATEWAY_KEY": self._key}
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.chaos.gateway_process", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env, cwd=_REPO_ROOT, limit=16 * 1024 * 1024)
        assert self._proc.stdout is not None
        first = await asyncio.wait_for(self._proc.stdout.readline(), 20)
        if not first:
            raise RuntimeError(f"the gateway process exited ({await self._proc.wait()}) before listening")
        self.url = json.loads(first)["url"]
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            msg = json.loads(line)
            fut = self._waiting.pop(msg["id"], None)
            if fut is None or fut.done():
                continue
            if "error" in msg:
                fut.set_exception(RuntimeError(f"gateway process: {msg['error']}"))
            else:
                fut.set_result(msg["ok"])
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(RuntimeError("the gateway process exited"))

    async def request(self, op: str, timeout: float = 30, **args: Any) -> Any:
        assert self._proc is not None and self._proc.stdin is not None
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        self._proc.stdin.write((json.dumps({"id": rid, "op": op, **args}) + "\n").encode())
        await self._proc.stdin.drain()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(rid, None)

    async def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), 10)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        if self._reader is not None:
            await self._reader


if __name__ == "__main__":
    asyncio.run(_serve())
