"""``voxbridge bench``: the load benchmark.

N simulated Asterisk callers stream 20 ms AudioSocket frames in real time into the bridge,
which runs in its own process(es) against the reference gateway in another process, set to
echo every frame back at once (``GatewaySim(bench_echo=True)``). Everything is on loopback,
bounded in count and duration, and stops by itself. Per N it measures:

* relay latency each way, per frame: every caller frame carries a 64-byte marker in its PCM
  (magic ``VXBM``, caller, seq, send time) that the bridge relays untouched (caller and gateway
  both at 8 kHz: no resampling) and the gateway stamps with its receive and send times.
  ``uplink`` = gateway receive - caller send. ``downlink_added`` = caller receive - the playout
  slot the frame was due in (the bridge reports its clock's phase), i.e. what the bridge adds on
  top of pacing; ``downlink_total`` = caller receive - gateway send (includes the wait for the
  next 20 ms slot, 0-20 ms by design, and any queue).
* playout jitter: |inter-arrival gap - 20 ms| of every frame each caller receives.
* late frames: 20 ms slots in which a caller received nothing (a frame later than one period);
  lost frames: caller frames the gateway echoed that never came back — not those it held back
  during a barge-in burst, nor those its ``playback_clear_buffer`` rightly cleared from the
  playout queue (``barge_in_cleared_frames``, see :func:`_cleared_by_barge_in`).
* barge-in flush: gateway sends ``playback_clear_buffer`` → the caller stops hearing the old audio.
* tool round trip: gateway sends a ``tool_call`` of a no-op tool → receives the ``tool_result``.
* the bridge's CPU (``/proc/<pid>/stat``) and RSS (``/proc/<pid>/status``) per call, and the
  callers' own timer lateness (a late load generator is reported, not blamed on the bridge).

In the same run, a **bare relay baseline** (:func:`_relay_main`: an asyncio TCP proxy, same loop,
no protocol work, in front of a TCP echo server) carries the same callers' bytes, and the
bridge's CPU per call is reported as a ratio to it — a ratio survives machine noise.

Two verdicts per step:

* **absolute**: the service levels (``SERVICE_LEVELS``) as measured, which include whatever the
  machine adds (a 2-core machine shared with the load generator and the gateway simulator adds
  a lot);
* **relative**: the bridge judged against the bare relay's own figures from the same run, on the
  same machine and load generator (``RELATIVE_LEVELS``): jitter it adds (its p99 minus the
  relay's), latency it adds (uplink + downlink-added p99 minus the relay's round-trip p99, both
  being two loopback hops through one Python process), late frames beyond the relay's (per
  1000 frames received, as the two run for different durations), no lost frames and ≤ 1 MB per
  call. Noise that hits both cancels out; what is left is the bridge's.

N ramps through ``--calls`` and stops at the first step that breaks (the relative verdict when
the baseline runs, else the absolute one); the largest N that held is reported for each.
Output: ``bench.json`` and ``bench.png`` (needs matplotlib) in ``--out``.

Processes (all started here, stopped by PID): ``python -m bridge.devtools.gateway_sim --bench-echo``,
``python -m bridge.devtools.bench _bridge`` × ``--workers`` (a ``Bridge`` with the no-op bench tool,
sharing the AudioSocket port with SO_REUSEPORT when > 1), ``python -m bridge.devtools.bench _callers``
× ``--caller-procs``, and for the baseline ``_echo`` and ``_relay``. With ``--cluster``, also one
``redis-server`` per step (loopback, a free port, nothing persisted), and every worker is a node
(``w0``, ``w1``, …) of one cluster on it (bridge/cluster.py), as production runs several bridges.

**Several workers** (``--workers`` > 1, or ``--cluster``): the step's bridge figures are the
workers' together (CPU and RSS summed, the worst worker's clock), and ``workers`` has each one on
its own: its calls (its sessions at the end of the window — the kernel's SO_REUSEPORT hash
decides the spread, ``calls_per_worker``), its CPU and CPU per call over the window, RSS, playout
clock and dropped frames, and with ``--cluster`` its node id and the calls it sees in the
cluster's registry (every node's). The Redis server's CPU is ``redis_cpu_pct``, outside
``bridge_cpu_pct`` and the ratio to the relay; ``cluster_cpu_pct_per_call`` is workers + Redis
per call (``cluster_cpu_ratio_to_baseline`` against the relay).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import uuid as _uuid
from pathlib import Path
from typing import Any

import numpy as np

FRAME_S = 0.020
RATE = 8000
PAYLOAD = RATE * 20 // 1000 * 2  # 320 bytes
MAGIC = b"VXBM"
MARK = struct.Struct("<4sB3xIIIIddddd")  # see bridge/devtools/gateway_sim.py, "Bench echo mode"
KIND_CALLER, KIND_BURST = 1, 2
UUID_BASE = 0xB3 << 120  # caller i connects as UUID(int=UUID_BASE | i)

#: The directory holding the ``bridge`` package this file belongs to (the bench's processes start there).
_SOURCE_ROOT = Path(__file__).resolve().parents[2]

#: The aims of the issue. Media service levels decide whether a step "held".
SERVICE_LEVELS = {
    "lost_frames": 0,
    "late_frames": 0,
    "jitter_p99_ms": 2.0,
    "uplink_p99_ms": 5.0,
    "downlink_added_p99_ms": 5.0,
    "rss_per_call_mb": 1.0,
}
#: The bridge against the bare relay of the same run (see the module doc).
RELATIVE_LEVELS = {
    "lost_frames": 0,
    "added_late_per_1000": 0.2,
    "added_jitter_p99_ms": 2.0,
    "added_latency_p99_ms": 5.0,
    "rss_per_call_mb": 1.0,
}
CPU_RATIO_AIM = 2.0
#: A load generator whose own 20 ms timer is later than this at p99 cannot judge the bridge.
CALLER_LATE_P99_MS = 5.0
DEFAULT_STEPS = "50,100,200,400,700,1000"
#: ``--cluster``: the server the bench starts for its workers (Debian's package of the same name).
REDIS_SERVER = "redis-server"
_NO_REDIS_SERVER = ("--cluster starts its own Redis server, and redis-server is not on PATH: install the Debian "
                    "package redis-server (apt-get install redis-server)")


# =========================================================================== bridge worker


def _noop_tool():
    from tools.base import Tool

    class BenchNoop(Tool):
        """Does nothing: the bench measures the router and gateway round trip around it."""

        name = "bench_noop"
        description = "Benchmark no-op tool."
        parameters = {"type": "object", "properties": {}, "additionalProperties": False}

        async def run(self, call: Any, args: dict[str, Any]) -> str:
            return "ok"

    return BenchNoop()


async def _bridge_main(args: argparse.Namespace) -> int:
    """One bridge process: what ``voxbridge serve`` runs, plus the no-op tool and a stats dump
    on SIGUSR1 (clock phase and counters, for the analysis)."""
    from ..app import Bridge
    from ..cli import freeze_startup_heap, setup_logging
    from ..config import load_config

    cfg = load_config(args.config, env={})
    setup_logging(cfg.log_level)
    bridge = Bridge(cfg, tools=[_noop_tool()])
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: _on_stats_signal(bridge, args.stats))
    await bridge.start()
    freeze_startup_heap()  # as `voxbridge serve` does
    if args.stalls:
        from .stalls import install

        _SAMPLERS.append(install(args.stalls))
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        await bridge.stop(grace=2.0)
    return 0


#: This bridge process's stall sampler (``--stalls``), if any.
_SAMPLERS: list[Any] = []


#: Stats dumps under way (a task must be referenced until it is done).
_DUMPS: set[asyncio.Task[None]] = set()


def _on_stats_signal(bridge: Any, path: str) -> None:
    """SIGUSR1: the bridge's figures as they are at the signal (the end of the measured window),
    written to ``path`` once the cluster's registry, if any, has been read."""
    task = asyncio.ensure_future(_dump_bridge_stats(bridge, path, _bridge_stats(bridge)))
    _DUMPS.add(task)
    task.add_done_callback(_DUMPS.discard)


def _bridge_stats(bridge: Any) -> dict[str, Any]:
    clock = bridge.clock
    dropped = sum(s.stats["frames_out_dropped"] for s in bridge.sessions.values())
    stats = {
        "pid": os.getpid(),
        "node_id": bridge.cluster.node_id if bridge.cluster is not None else None,
        "period": clock.period,
        # Each call is served on its own phase (the clock spreads calls over phase groups):
        # loop.time() is CLOCK_MONOTONIC, the same clock the callers stamp arrivals with.
        "call_phases": {str(int(_uuid.UUID(cid)) & 0xFFFFFFFF): clock.phase_of(s)
                        for cid, s in bridge.sessions.items()},
        "clock": clock.stats(),
        "sessions": len(bridge.sessions),
        "frames_out_dropped": dropped,
        "calls": [int(_uuid.UUID(cid)) & 0xFFFFFFFF for cid in bridge.sessions],
    }
    if _SAMPLERS:
        stats["stalls"] = _SAMPLERS[0].report()
    return stats


async def _cluster_view(node: Any) -> dict[str, Any]:
    """What this node sees of the cluster: the registry's live calls, by owning node. A node that
    joined the cluster sees every node's calls there, not only its own sessions."""
    view: dict[str, Any] = {"node_id": node.node_id, "claimed": len(node.claimed),
                            "events_dropped": node.events_dropped}
    try:
        live = await node.live_calls()  # bounded by the cluster's own Redis deadline
    except Exception as exc:  # noqa: BLE001 - reported in the dump, never fatal to the bridge
        view["registry_error"] = f"{type(exc).__name__}: {exc}"
        return view
    by_node: dict[str, int] = {}
    for owner in live.values():
        by_node[owner] = by_node.get(owner, 0) + 1
    view.update(registry_calls=len(live), registry_by_node=by_node)
    return view


async def _dump_bridge_stats(bridge: Any, path: str, stats: dict[str, Any]) -> None:
    if bridge.cluster is not None:
        stats["cluster"] = await _cluster_view(bridge.cluster)
    tmp = path + ".tmp"
    # A few kB, once per step after the measured window: blocking is fine.
    with open(tmp, "w") as f:  # noqa: ASYNC230
        json.dump(stats, f)
    os.replace(tmp, path)


# =========================================================================== bare relay baseline


class _EchoProto(asyncio.Protocol):
    """Baseline 'gateway': echoes every byte after the 19-byte AudioSocket UUID frame."""

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.skip = 19

    def data_received(self, data: bytes) -> None:
        if self.skip:
            cut = min(self.skip, len(data))
            self.skip -= cut
            data = data[cut:]
        if data:
            self.t.write(data)


class _RelayUp(asyncio.Protocol):
    """Baseline relay, caller side: every byte to the upstream as it arrives, and back."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.t: Any = None
        self.up: Any = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        up, _ = await loop.create_connection(lambda: _RelayDown(self.t), *self.upstream)
        self.up = up
        for d in self.pending:
            up.write(d)
        self.pending = []
        if self.t.is_closing():
            up.close()

    def data_received(self, data: bytes) -> None:
        if self.up is not None:
            self.up.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.close()


class _RelayDown(asyncio.Protocol):
    def __init__(self, down: Any) -> None:
        self.down = down

    def data_received(self, data: bytes) -> None:
        self.down.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.close()


async def _serve_forever(factory: Any, port: int) -> int:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", port, backlog=2048, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    return 0


async def _relay_main(args: argparse.Namespace) -> int:
    return await _serve_forever(lambda: _RelayUp(("127.0.0.1", args.upstream)), args.port)


async def _floor_main(args: argparse.Namespace) -> int:
    from .floor import floor_main

    return await floor_main(args.port, args.gateway_port, args.api_key, args.stats)


async def _echo_main(args: argparse.Namespace) -> int:
    return await _serve_forever(_EchoProto, args.port)


# =========================================================================== callers (load generator)


class _Recorder:
    """Everything one caller process measures, in flat lists (converted to arrays at the end)."""

    def __init__(self, ws: float, we: float) -> None:
        self.ws, self.we = ws, we
        self.we_echo = we - 0.5  # frames sent after this may still be on their way back at the end
        self.e_cid: list[int] = []
        self.e_seq: list[int] = []
        self.e_tsend: list[float] = []
        self.e_tgwr: list[float] = []
        self.e_tgws: list[float] = []
        self.e_trecv: list[float] = []
        self.skips: list[tuple[int, int, int]] = []
        self.flush: list[float] = []
        self.tool_rtt: list[float] = []
        self.tick_late: list[float] = []
        self.missed_ticks = 0


class _Call(asyncio.Protocol):
    """A lean Asterisk-like caller: UUID first, then one marked 20 ms frame per tick."""

    __slots__ = ("cid", "rec", "t", "seq", "frame", "buf", "arr", "in_burst", "t_end_burst",
                 "seq_first", "seq_last", "ended", "connected")

    def __init__(self, cid: int, rec: _Recorder) -> None:
        self.cid = cid
        self.rec = rec
        self.t: Any = None
        self.seq = 0
        self.frame = bytearray(bytes((0x10, PAYLOAD >> 8, PAYLOAD & 0xFF)) + bytes(PAYLOAD))
        self.buf = bytearray()
        self.arr: list[float] = []
        self.in_burst = False
        self.t_end_burst = 0.0
        self.seq_first = -1
        self.seq_last = -1
        self.ended = False
        self.connected = False

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(b"\x01\x00\x10" + _uuid.UUID(int=UUID_BASE | self.cid).bytes)
        self.connected = True

    def send(self, now: float) -> None:
        f = self.frame
        seq = self.seq
        MARK.pack_into(f, 3, MAGIC, KIND_CALLER, self.cid, seq, 0, 0, now, 0.0, 0.0, 0.0, 0.0)
        self.t.write(bytes(f))
        rec = self.rec
        if rec.ws <= now < rec.we_echo:
            if self.seq_first < 0:
                self.seq_first = seq
            self.seq_last = seq
        self.seq = seq + 1

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        rec = self.rec
        in_window = rec.ws <= now < rec.we
        buf = self.buf
        buf += data
        off, n = 0, len(buf)
        while n - off >= 3:
            kind = buf[off]
            end = off + 3 + ((buf[off + 1] << 8) | buf[off + 2])
            if end > n:
                break
            if 0x10 <= kind <= 0x18:
                if in_window:
                    self.arr.append(now)
                if buf.startswith(MAGIC, off + 3):
                    (_, mkind, _cid, seq, skip_first, skip_count, t_send, t_gwr, t_gws, t_clear,
                     tool_rtt) = MARK.unpack_from(buf, off + 3)
                    if mkind == KIND_BURST:
                        self.in_burst = True
                    else:
                        if self.in_burst:
                            self.in_burst = False
                            self.t_end_burst = now
                        if rec.ws <= t_send < rec.we_echo:
                            rec.e_cid.append(self.cid)
                            rec.e_seq.append(seq)
                            rec.e_tsend.append(t_send)
                            rec.e_tgwr.append(t_gwr)
                            rec.e_tgws.append(t_gws)
                            rec.e_trecv.append(now)
                        if skip_count:
                            rec.skips.append((self.cid, skip_first, skip_count))
                        if t_clear and in_window and self.t_end_burst >= t_clear:
                            rec.flush.append(self.t_end_burst - t_clear)
                        if tool_rtt and in_window:
                            rec.tool_rtt.append(tool_rtt)
                elif self.in_burst:  # silence after the flushed burst
                    self.in_burst = False
                    self.t_end_burst = now
            elif kind == 0x00 or kind == 0xFF:
                self.ended = True
            off = end
        if off:
            del buf[:off]

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True


async def _callers_main(args: argparse.Namespace) -> int:
    """One caller process: ``--count`` calls from ``--first-id``, connected at ``--ramp-rate``
    per second from ``--t0``, measured in [``--ws``, ``--we``), hung up at ``--stop``."""
    loop = asyncio.get_running_loop()
    rec = _Recorder(args.ws, args.we)
    calls: list[_Call] = []
    groups = max(1, args.groups)
    group_calls: list[list[_Call]] = [[] for _ in range(groups)]
    connect_failed = 0
    step = FRAME_S / groups

    # One absolute-monotonic ticker for every call in this process, in `groups` phases 20/groups
    # ms apart (real calls are not phase-aligned). Late by a whole period: skip, never burst.
    start = max(time.monotonic(), args.t0)
    state = {"k": 0}
    done = loop.create_future()

    def tick() -> None:
        k = state["k"]
        due = start + k * step
        now = time.monotonic()
        late = now - due
        if rec.ws <= now < rec.we:
            rec.tick_late.append(late)
        for c in group_calls[k % groups]:
            if c.connected and not c.ended:
                c.send(now)
        k += 1
        if late >= FRAME_S:
            missed = int(late // step)
            if rec.ws <= now < rec.we:
                rec.missed_ticks += missed
            k += missed
        state["k"] = k
        if now < args.stop:
            loop.call_at(start + k * step, tick)  # loop.time() is time.monotonic() here
        elif not done.done():
            done.set_result(None)

    async def connect(i: int) -> None:
        nonlocal connect_failed
        c = _Call(args.first_id + i, rec)
        try:
            async with asyncio.timeout(5):
                await loop.create_connection(lambda: c, args.host, args.port)
        except (OSError, TimeoutError):
            connect_failed += 1
            return
        calls.append(c)
        group_calls[i % groups].append(c)

    loop.call_at(start, tick)
    tasks = []
    for i in range(args.count):
        at = args.t0 + i / args.ramp_rate
        delay = at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(connect(i)))
    await asyncio.gather(*tasks)
    await done
    ended_early = sum(1 for c in calls if c.ended)
    for c in calls:
        if c.t is not None:
            c.t.close()
    await asyncio.sleep(0.2)

    arr_cid = np.concatenate([np.full(len(c.arr), c.cid, dtype=np.int64) for c in calls]) if calls else np.zeros(0)
    arr_t = np.concatenate([np.asarray(c.arr, dtype=np.float64) for c in calls]) if calls else np.zeros(0)
    sk = np.asarray(rec.skips, dtype=np.int64).reshape(-1, 3)
    np.savez(
        args.out,
        e_cid=np.asarray(rec.e_cid, dtype=np.int64), e_seq=np.asarray(rec.e_seq, dtype=np.int64),
        e_tsend=np.asarray(rec.e_tsend), e_tgwr=np.asarray(rec.e_tgwr), e_tgws=np.asarray(rec.e_tgws),
        e_trecv=np.asarray(rec.e_trecv), arr_cid=arr_cid, arr_t=arr_t,
        call_cid=np.asarray([c.cid for c in calls], dtype=np.int64),
        call_seq_first=np.asarray([c.seq_first for c in calls], dtype=np.int64),
        call_seq_last=np.asarray([c.seq_last for c in calls], dtype=np.int64),
        skip_cid=sk[:, 0], skip_first=sk[:, 1], skip_count=sk[:, 2],
        flush=np.asarray(rec.flush), tool_rtt=np.asarray(rec.tool_rtt), tick_late=np.asarray(rec.tick_late),
        counters=np.asarray([len(calls), connect_failed, ended_early, rec.missed_ticks], dtype=np.int64),
    )
    return 0


# =========================================================================== orchestration


class _Procs:
    """Processes this bench started; stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, *argv: str, log: Path, ready: bool = True, timeout: float = 20.0,
                    env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        # A local log file opened once per process start, outside any measurement: blocking is fine.
        with open(log, "ab") as errf:  # noqa: ASYNC230
            p = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE if ready else asyncio.subprocess.DEVNULL,
                # From the directory that holds this ``bridge`` package: ``python -m bridge…`` then
                # runs this very code, not whatever copy is installed (an editable install of
                # another checkout would otherwise win, and the bench would measure that).
                stderr=errf, env=env, cwd=str(_SOURCE_ROOT),
            )
        self.procs.append(p)
        if ready:
            assert p.stdout is not None
            try:
                async with asyncio.timeout(timeout):
                    line = await p.stdout.readline()
            except TimeoutError:
                line = b""
            if line.strip() != b"ready":
                raise RuntimeError(f"{' '.join(argv[1:4])} did not start; see {log}:\n{_tail(log)}")
        return p

    async def stop(self, p: asyncio.subprocess.Process, timeout: float = 8.0) -> None:
        if p.returncode is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                async with asyncio.timeout(timeout):
                    await p.wait()
            except TimeoutError:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await p.wait()
        if p in self.procs:
            self.procs.remove(p)

    async def stop_all(self) -> None:
        for p in list(reversed(self.procs)):
            await self.stop(p)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TCK  # utime, stime
    except (OSError, IndexError, ValueError):
        return float("nan")


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def machine_info() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    try:
        import uvloop
        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio"
    return {
        "cpu": model, "cores": os.cpu_count(), "memory": mem,
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "event_loop": loop, "loadavg_at_start": os.getloadavg(),
    }


def _pct(a: np.ndarray, q: float) -> float | None:
    return None if a.size == 0 else round(float(np.percentile(a, q)), 3)


def _max(a: np.ndarray) -> float | None:
    return None if a.size == 0 else round(float(a.max()), 3)


def _load_callers(files: list[Path]) -> dict[str, np.ndarray]:
    parts = [dict(np.load(f)) for f in files if f.exists()]
    if not parts:
        raise RuntimeError("no caller process wrote its results")
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "counters"}
    out["counters"] = np.sum([p["counters"] for p in parts], axis=0)
    return out


#: Most echoed frames one barge-in may have cleared from a call's playout queue (1 s of audio);
#: a longer run of missing frames before a barge-in is counted lost.
CLEARED_RUN_MAX = 50


def _cleared_by_barge_in(d: dict[str, np.ndarray], first: dict[int, int], last: dict[int, int],
                         got: set[tuple[int, int]]) -> tuple[int, int]:
    """Echoed frames a barge-in rightly discarded: (how many, the longest run of one barge-in).

    The gateway stops echoing (its burst's hold, ``skip_first`` on) and then sends
    ``playback_clear_buffer``, which must empty the call's playout queue. Whatever echoed frames
    were still queued then are gone by design: the frames right before the hold that never came
    back, in one unbroken run ending at ``skip_first``. They are only there when the queue had a
    standing backlog (a bare relay has no queue); any other missing frame is lost. Only frames of
    the measured window count (``first``..``last`` of each call), as for the loss itself.
    """
    holds = list(zip(d["skip_cid"].tolist(), d["skip_first"].tolist(), d["skip_count"].tolist(), strict=True))
    held = {(c, seq) for c, f, n in holds for seq in range(f, f + n)}  # counted as skipped already
    cleared, longest = 0, 0
    for c, f, _n in holds:
        lo, hi = first.get(c, -1), last.get(c, -1)
        if lo < 0 or not lo < f <= hi + 1:  # a hold before the window, or after it
            continue
        run, seq = 0, f - 1
        while seq >= lo and (c, seq) not in got and (c, seq) not in held and run < CLEARED_RUN_MAX:
            run, seq = run + 1, seq - 1
        if run and (seq < lo or (c, seq) in got or (c, seq) in held):  # a whole run ending at the hold
            cleared += run
            longest = max(longest, run)
    return cleared, longest


def _analyse(d: dict[str, np.ndarray], phases: dict[int, float]) -> dict[str, Any]:
    """Per-frame numbers → the step's summary (times in ms)."""
    ms = 1000.0
    res: dict[str, Any] = {}
    # Arrivals, per call, in time order: jitter, late slots, lateness against the playout slot.
    order = np.lexsort((d["arr_t"], d["arr_cid"]))
    cid, t = d["arr_cid"][order], d["arr_t"][order]
    same = cid[1:] == cid[:-1]
    gaps = np.diff(t)[same]
    jitter = np.abs(gaps - FRAME_S) * ms
    slots = np.rint(gaps / FRAME_S)
    res["frames_received"] = int(t.size)
    res["jitter_ms"] = {"p50": _pct(jitter, 50), "p99": _pct(jitter, 99), "max": _max(jitter)}
    res["late_frames"] = int(np.clip(slots - 1, 0, None).sum())
    if phases:
        ph = np.array([phases.get(int(c), np.nan) for c in cid])
        x = np.mod(t - ph, FRAME_S)
        added = np.where(x < 0.9 * FRAME_S, x, x - FRAME_S)[~np.isnan(ph)] * ms
        res["downlink_added_ms"] = {"p50": _pct(added, 50), "p99": _pct(added, 99), "max": _max(added)}
    else:
        res["downlink_added_ms"] = {"p50": None, "p99": None, "max": None}
    # Echoed caller frames: latency each way, loss.
    bridge_mode = d["e_tgwr"].size and bool(np.any(d["e_tgwr"] > 0))
    if bridge_mode:
        up = (d["e_tgwr"] - d["e_tsend"]) * ms
        down = (d["e_trecv"] - d["e_tgws"]) * ms
        res["uplink_ms"] = {"p50": _pct(up, 50), "p99": _pct(up, 99), "max": _max(up)}
        res["downlink_total_ms"] = {"p50": _pct(down, 50), "p99": _pct(down, 99), "max": _max(down)}
    rtt = (d["e_trecv"] - d["e_tsend"]) * ms
    res["round_trip_ms"] = {"p50": _pct(rtt, 50), "p99": _pct(rtt, 99), "max": _max(rtt)}
    expected = 0
    skipped = 0
    first = dict(zip(d["call_cid"].tolist(), d["call_seq_first"].tolist(), strict=True))
    last = dict(zip(d["call_cid"].tolist(), d["call_seq_last"].tolist(), strict=True))
    for c, f in first.items():
        if f >= 0:
            expected += last[c] - f + 1
    for c, f, n in zip(d["skip_cid"].tolist(), d["skip_first"].tolist(), d["skip_count"].tolist(), strict=True):
        lo, hi = first.get(c, -1), last.get(c, -1)
        if lo >= 0:
            skipped += max(0, min(hi, f + n - 1) - max(lo, f) + 1)
    got_set = set(zip(d["e_cid"].tolist(), d["e_seq"].tolist(), strict=True))
    got = len(got_set)
    cleared, cleared_run = _cleared_by_barge_in(d, first, last, got_set)
    res["frames_sent"] = expected
    res["lost_frames"] = max(0, expected - skipped - cleared - got)
    res["barge_in_skipped_frames"] = skipped
    res["barge_in_cleared_frames"] = cleared
    res["barge_in_cleared_max_run"] = cleared_run
    fl = d["flush"] * ms
    res["barge_in_flush_ms"] = {"n": int(fl.size), "p50": _pct(fl, 50), "p99": _pct(fl, 99), "max": _max(fl)}
    tr = d["tool_rtt"] * ms
    res["tool_rtt_ms"] = {"n": int(tr.size), "p50": _pct(tr, 50), "p99": _pct(tr, 99), "max": _max(tr)}
    tl = d["tick_late"] * ms
    calls, failed, ended_early, missed = (int(x) for x in d["counters"])
    res["callers"] = {"connected": calls, "connect_failed": failed, "ended_early": ended_early,
                      "timer_late_ms": {"p50": _pct(tl, 50), "p99": _pct(tl, 99), "max": _max(tl)},
                      "missed_ticks": missed}
    return res


class _Step:
    """Shared mechanics of one measured run (bridge or baseline) at N calls."""

    def __init__(self, args: argparse.Namespace, procs: _Procs, tmp: Path, n: int, label: str) -> None:
        self.args, self.procs, self.tmp, self.n, self.label = args, procs, tmp, n, label

    async def drive(self, port: int, measured: list[int], others: list[int], duration: float,
                    on_window_end: Any = None, watched: tuple[int, ...] = ()) -> dict[str, Any]:
        """Run the callers against ``port`` and measure the window: CPU summed over ``measured``
        (``cpu_pct``, ``rss_mb``) and over ``others``; ``per_pid`` has each of ``measured``,
        ``others`` and ``watched`` (processes measured on their own only) separately."""
        args, n = self.args, self.n
        nprocs = args.caller_procs or max(1, math.ceil(n / 500))
        nprocs = min(nprocs, n)
        t0 = time.monotonic() + 0.5
        ramp = n / args.ramp_rate
        ws = t0 + ramp + args.warmup
        we = ws + duration
        stop = we + 1.0
        files, callers = [], []
        per = [n // nprocs + (1 if i < n % nprocs else 0) for i in range(nprocs)]
        first = 0
        for i, cnt in enumerate(per):
            out = self.tmp / f"{self.label}-{n}-callers{i}.npz"
            files.append(out)
            callers.append(await self.procs.start(
                sys.executable, "-m", "bridge.devtools.bench", "_callers", "--port", str(port),
                "--first-id", str(first), "--count", str(cnt), "--ramp-rate", str(args.ramp_rate / nprocs),
                "--t0", repr(t0), "--ws", repr(ws), "--we", repr(we), "--stop", repr(stop),
                "--groups", "4", "--out", str(out), log=self.tmp / f"{self.label}-callers.log", ready=False,
            ))
            first += cnt
        caller_pids = [p.pid for p in callers]
        await asyncio.sleep(max(0.0, ws - time.monotonic()))
        every = [*measured, *others, *watched, *caller_pids]
        c0 = {pid: _cpu_seconds(pid) for pid in every}
        m0, w0 = _machine_busy(), time.monotonic()
        await asyncio.sleep(max(0.0, we - time.monotonic()))
        c1 = {pid: _cpu_seconds(pid) for pid in every}
        m1, w1 = _machine_busy(), time.monotonic()
        rss_of = {pid: _rss_mb(pid) for pid in [*measured, *others, *watched]}
        rss = sum(rss_of[pid] for pid in measured)
        if on_window_end is not None:
            on_window_end()
        for p in callers:
            try:
                async with asyncio.timeout(stop - time.monotonic() + 30):
                    await p.wait()
            except TimeoutError:
                pass
            await self.procs.stop(p)
        wall = w1 - w0

        def cpu(pids: list[int]) -> float:
            return round(100 * sum(c1[p] - c0[p] for p in pids) / wall, 2)

        return {
            "window_s": round(wall, 2), "files": files,
            "cpu_pct": cpu(measured), "rss_mb": round(rss, 1),
            "other_cpu_pct": cpu(others), "callers_cpu_pct": cpu(caller_pids),
            "machine_busy_pct": round(100 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1]), 1),
            "per_pid": {pid: {"cpu_pct": cpu([pid]), "rss_mb": round(mb, 1)} for pid, mb in rss_of.items()},
        }


async def _start_redis(procs: _Procs, tmp: Path, n: int) -> tuple[asyncio.subprocess.Process, int]:
    """``--cluster``: the Redis server the step's workers share, as production's would be, but
    on a free loopback port, persisting nothing (``--save "" --appendonly no``) in a directory of
    its own; stopped by PID with the step (or by :meth:`_Procs.stop_all` on a failure)."""
    server = shutil.which(REDIS_SERVER)
    if server is None:  # preflight() checked: PATH changed under a running bench
        raise RuntimeError(_NO_REDIS_SERVER)
    port = _free_port()
    work = tmp / f"redis-{n}"
    work.mkdir(exist_ok=True)
    log = tmp / "redis.log"
    proc = await procs.start(server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(work), "--logfile", str(log), log=log, ready=False)
    deadline = time.monotonic() + 20.0
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"redis-server exited with status {proc.returncode}; see {log}:\n{_tail(log)}")
        try:
            async with asyncio.timeout(1.0):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    writer.write(b"PING\r\n")
                    if (await reader.readline()).startswith(b"+PONG"):
                        return proc, port
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not answer PING on 127.0.0.1:{port} within 20 s; see {log}:\n"
                               f"{_tail(log)}")
        await asyncio.sleep(0.05)


async def _read_stats(paths: list[Path], timeout: float = 10.0) -> list[dict[str, Any] | None]:
    """Each worker's stats dump (SIGUSR1), waited for until ``timeout``: None for a worker that
    wrote none (it died, or its dump is late)."""
    deadline = time.monotonic() + timeout
    # Other processes write the files: there is no event here to await, only the file to look for.
    while not all(p.exists() for p in paths) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    out: list[dict[str, Any] | None] = []
    for path in paths:
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            out.append(None)
    return out


def _worker_figures(i: int, pid: int, st: dict[str, Any] | None, measured: dict[str, float],
                    idle_rss: float) -> dict[str, Any]:
    """One bridge worker's share of the step: its calls (its sessions at the end of the window),
    its own CPU and RSS over the window, its playout clock, and (``--cluster``) its node's view of
    the cluster's registry."""
    calls = None if st is None else st["sessions"]
    cpu = measured["cpu_pct"]
    fig: dict[str, Any] = {
        "worker": i, "pid": pid, "node_id": None if st is None else st.get("node_id"),
        "calls": calls, "cpu_pct": cpu,
        "cpu_pct_per_call": round(cpu / calls, 4) if calls else None,
        "rss_mb": measured["rss_mb"], "rss_idle_mb": round(idle_rss, 1),
    }
    if st is None:
        fig["stats"] = "missing: the worker wrote no stats dump"
        return fig
    c = st["clock"]
    fig["tick"] = {"lateness_p99_ms": c["lateness_p99_ms"], "lateness_max_ms": c["max_lateness_ms"],
                   "cost_p99_ms": c["tick_cost_p99_ms"], "late_ticks": c["late_ticks"],
                   "skipped_ticks": c["skipped_ticks"]}
    fig["frames_out_dropped"] = st["frames_out_dropped"]
    if "cluster" in st:
        fig["cluster"] = st["cluster"]
    return fig


async def _bridge_step(args: argparse.Namespace, procs: _Procs, tmp: Path, n: int, *,
                       floor: bool = False) -> dict[str, Any]:
    """One step of the bridge at ``n`` calls against the gateway simulator — or, with ``floor``,
    of the floor (bridge/devtools/floor.py) in its place, one process, measured the same way."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBRIDGE_")}
    if args.asyncio:
        env["VOXBRIDGE_NO_UVLOOP"] = "1"
    sim_port, as_port = _free_port(), _free_port()
    sim = await procs.start(
        sys.executable, "-m", "bridge.devtools.gateway_sim", "--listen", f"127.0.0.1:{sim_port}", "--settle-ms", "0",
        "--api-key", "bench", "--bench-echo", "--bench-barge-every", str(args.barge_every),
        "--bench-tool-every", str(args.tool_every), "--bench-tool", "bench_noop",
        log=tmp / "sim.log", ready=False, env=env,
    )
    await _wait_port(sim_port)
    redis, redis_port = await _start_redis(procs, tmp, n) if args.cluster and not floor else (None, 0)
    cfg: dict[str, Any] = {
        "log_level": "WARNING",
        "audiosocket": {"listen": f"127.0.0.1:{as_port}", "max_calls": 100_000, "reuse_port": args.workers > 1},
        "gateway": {"url": f"ws://127.0.0.1:{sim_port}/ws", "api_key": "bench", "settle_ms": 0,
                    "connect_timeout": 30},
        "api": {"enabled": False},
        "ami": {"enabled": False},
        "profiles": {"default": {"sample_rate": RATE, "first_message": None, "farewell_message": None,
                                 "max_duration": 3600, "tools": ["bench_noop"]}},
    }
    workers = []
    nworkers = 1 if floor else args.workers
    stats_paths = [tmp / f"{'floor' if floor else 'bridge'}-{i}.json" for i in range(nworkers)]
    if floor:
        workers.append(await procs.start(
            sys.executable, "-m", "bridge.devtools.bench", "_floor", "--port", str(as_port),
            "--gateway-port", str(sim_port), "--api-key", "bench", "--stats", str(stats_paths[0]),
            log=tmp / "floor.log", env=env,
        ))
    for i in range(0 if floor else nworkers):
        if redis is not None:
            # One cluster on Redis, as production runs it: each worker a node of its own name.
            cfg["cluster"] = {"redis_url": f"redis://127.0.0.1:{redis_port}/0", "node_id": f"w{i}"}
        cfg_path = tmp / f"bridge-config-{i}.json"  # JSON is YAML
        cfg_path.write_text(json.dumps(cfg))
        workers.append(await procs.start(
            sys.executable, "-m", "bridge.devtools.bench", "_bridge", "--config", str(cfg_path),
            "--stats", str(stats_paths[i]), *(("--stalls", str(args.stalls)) if args.stalls else ()),
            log=tmp / "bridge.log", env=env,
        ))
    await asyncio.sleep(0.5)
    wpids = [w.pid for w in workers]
    idle = {p: _rss_mb(p) for p in wpids}
    idle_rss = sum(idle.values())

    def dump() -> None:
        for w, path in zip(workers, stats_paths, strict=True):
            path.unlink(missing_ok=True)  # a previous step's
            os.kill(w.pid, signal.SIGUSR1)

    try:
        m = await _Step(args, procs, tmp, n, "floor" if floor else "bridge").drive(
            as_port, wpids, [sim.pid], args.baseline_duration if floor else args.duration, dump,
            watched=(redis.pid,) if redis is not None else ())
        dumps = await _read_stats(stats_paths)
        phases: dict[int, float] = {}
        clock: list[dict[str, Any]] = []
        stalls: list[dict[str, Any]] = []
        dropped = 0
        for st in dumps:
            if st is None:
                continue
            clock.append(st["clock"])
            if "stalls" in st:
                stalls.append(st["stalls"])
            dropped += st["frames_out_dropped"]
            phases.update({int(c): ph for c, ph in st["call_phases"].items() if ph is not None})
        res = _analyse(_load_callers(m["files"]), phases)
    finally:
        for w in workers:
            await procs.stop(w)
        if redis is not None:
            await procs.stop(redis)  # after the workers: they leave the cluster cleanly
        await procs.stop(sim)
    res.update({
        "calls": n,
        "bridge_cpu_pct": m["cpu_pct"],
        "cpu_pct_per_call": round(m["cpu_pct"] / n, 4),
        "rss_mb": m["rss_mb"],
        "rss_idle_mb": round(idle_rss, 1),
        "rss_per_call_mb": round((m["rss_mb"] - idle_rss) / n, 3),
        "gateway_sim_cpu_pct": m["other_cpu_pct"],
        "callers_cpu_pct": m["callers_cpu_pct"],
        "machine_busy_pct": m["machine_busy_pct"],
        "window_s": m["window_s"],
        "bridge_frames_out_dropped": dropped,
        "bridge_clock": clock,
        **({"stalls": stalls} if stalls else {}),
        # The bridge's own view of its playout clock (what no caller-side noise can blame on it):
        # worst worker's tick lateness and the time one tick takes to serve every call.
        "bridge_tick": {
            "late_ticks": sum(c["late_ticks"] for c in clock),
            "skipped_ticks": sum(c["skipped_ticks"] for c in clock),
            "lateness_p99_ms": max((c["lateness_p99_ms"] or 0 for c in clock), default=None),
            "lateness_max_ms": max((c["max_lateness_ms"] for c in clock), default=None),
            "cost_p99_ms": max((c["tick_cost_p99_ms"] or 0 for c in clock), default=None),
        },
    })
    if not floor and (args.workers > 1 or redis is not None):
        # Each worker on its own: the kernel's SO_REUSEPORT hash of each connection's addresses
        # and ports (not the workers' load) decides how calls spread over them, so an uneven
        # spread is a finding, not a failure.
        res["workers"] = [_worker_figures(i, pid, st, m["per_pid"][pid], idle[pid])
                          for i, (pid, st) in enumerate(zip(wpids, dumps, strict=True))]
        res["calls_per_worker"] = [w["calls"] for w in res["workers"]]
    if redis is not None:
        # The cluster's Redis is part of what a cluster costs, but not bridge code: reported on its
        # own, outside bridge_cpu_pct (and so outside the ratio to the relay), and added in
        # cluster_cpu_pct_per_call.
        r = m["per_pid"][redis.pid]
        res.update({
            "redis_pid": redis.pid,
            "redis_cpu_pct": r["cpu_pct"],
            "redis_rss_mb": r["rss_mb"],
            "cluster_cpu_pct_per_call": round((m["cpu_pct"] + r["cpu_pct"]) / n, 4),
        })
    return res


async def _baseline_step(args: argparse.Namespace, procs: _Procs, tmp: Path, n: int) -> dict[str, Any]:
    env = dict(os.environ)
    if args.asyncio:
        env["VOXBRIDGE_NO_UVLOOP"] = "1"
    echo_port, relay_port = _free_port(), _free_port()
    echo = await procs.start(sys.executable, "-m", "bridge.devtools.bench", "_echo", "--port", str(echo_port),
                             log=tmp / "baseline.log", env=env)
    relay = await procs.start(sys.executable, "-m", "bridge.devtools.bench", "_relay", "--port", str(relay_port),
                              "--upstream", str(echo_port), log=tmp / "baseline.log", env=env)
    try:
        await asyncio.sleep(0.3)
        idle = _rss_mb(relay.pid)
        m = await _Step(args, procs, tmp, n, "baseline").drive(relay_port, [relay.pid], [echo.pid],
                                                               args.baseline_duration)
        d = _load_callers(m["files"])
        rtt = (d["e_trecv"] - d["e_tsend"]) * 1000
        media = _analyse(d, {})
    finally:
        await procs.stop(relay)
        await procs.stop(echo)
    return {
        "calls": n, "relay_cpu_pct": m["cpu_pct"], "cpu_pct_per_call": round(m["cpu_pct"] / n, 4),
        "rss_mb": m["rss_mb"], "rss_per_call_mb": round((m["rss_mb"] - idle) / n, 3),
        "round_trip_ms": {"p50": _pct(rtt, 50), "p99": _pct(rtt, 99), "max": _max(rtt)},
        "jitter_ms": media["jitter_ms"], "late_frames": media["late_frames"],
        "frames_received": media["frames_received"], "lost_frames": media["lost_frames"],
        "callers": media["callers"],
        "callers_cpu_pct": m["callers_cpu_pct"], "machine_busy_pct": m["machine_busy_pct"],
    }


def _add_floor(step: dict[str, Any], fl: dict[str, Any]) -> None:
    """``--floor``: the floor's figures from the same step (bridge/devtools/floor.py), and the
    bridge's CPU per call as a ratio to it; the floor's own ratio to the relay when that ran."""
    keep = ("bridge_cpu_pct", "cpu_pct_per_call", "rss_per_call_mb", "machine_busy_pct", "window_s",
            "frames_received", "lost_frames", "barge_in_cleared_frames", "late_frames", "jitter_ms", "uplink_ms",
            "downlink_added_ms", "bridge_tick", "callers")
    floor = {("cpu_pct" if k == "bridge_cpu_pct" else k): fl.get(k) for k in keep}
    per_call = floor["cpu_pct_per_call"]
    base = (step.get("baseline") or {}).get("cpu_pct_per_call")
    floor["cpu_ratio_to_baseline"] = round(per_call / base, 2) if base else None
    step["floor"] = floor
    step["cpu_ratio_to_floor"] = round(step["cpu_pct_per_call"] / per_call, 2) if per_call else None


def _judge(step: dict[str, Any]) -> None:
    """Which service levels a step broke (``broken``: [names]); ``held`` if none."""
    values = {
        "lost_frames": step["lost_frames"],
        "late_frames": step["late_frames"],
        "jitter_p99_ms": step["jitter_ms"]["p99"],
        "uplink_p99_ms": (step.get("uplink_ms") or {}).get("p99"),
        "downlink_added_p99_ms": step["downlink_added_ms"]["p99"],
        "rss_per_call_mb": step["rss_per_call_mb"],
    }
    broken = [k for k, limit in SERVICE_LEVELS.items() if values[k] is None or values[k] > limit]
    c = step["callers"]
    if c["connect_failed"] or c["ended_early"]:
        broken.append("calls_completed")
    step["service_levels"] = values
    step["broken"] = broken
    late_p99 = c["timer_late_ms"]["p99"]
    step["load_generator_late"] = bool(late_p99 is not None and late_p99 > CALLER_LATE_P99_MS)
    step["held"] = not broken
    ratio = step.get("cpu_ratio_to_baseline")
    step["cpu_ratio_within_aim"] = None if ratio is None else ratio <= CPU_RATIO_AIM
    base = step.get("baseline")
    if base is None:
        return
    rel = relative_levels(step, base)
    rel_broken = [k for k, limit in RELATIVE_LEVELS.items() if (v := rel[k]) is None or v > limit]
    if "calls_completed" in broken:
        rel_broken.append("calls_completed")
    step["relative"] = {"levels": rel, "broken": rel_broken, "held": not rel_broken}


def relative_levels(step: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    """What the bridge adds to the bare relay of the same run (see the module doc)."""
    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(a - b, 3)

    def per_1000(late: int, received: int) -> float:
        return 1000 * late / received if received else 0.0

    up, down = (step.get("uplink_ms") or {}).get("p99"), step["downlink_added_ms"]["p99"]
    bridge_latency = None if up is None or down is None else up + down
    return {
        "lost_frames": step["lost_frames"],
        "added_late_per_1000": round(per_1000(step["late_frames"], step["frames_received"])
                                     - per_1000(base["late_frames"], base["frames_received"]), 3),
        "added_jitter_p99_ms": minus(step["jitter_ms"]["p99"], base["jitter_ms"]["p99"]),
        "added_latency_p99_ms": minus(bridge_latency, base["round_trip_ms"]["p99"]),
        "rss_per_call_mb": step["rss_per_call_mb"],
    }


def plot(result: dict[str, Any], path: Path) -> bool:
    """Latency, jitter and CPU per call against N. False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = result["steps"]
    ns = [s["calls"] for s in steps]

    def series(f: Any) -> list[float]:
        out = []
        for s in steps:
            try:
                v = f(s)
            except (KeyError, TypeError):
                v = None
            out.append(np.nan if v is None else v)
        return out

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    a = ax[0]
    a.plot(ns, series(lambda s: s["uplink_ms"]["p99"]), "o-", label="uplink p99")
    a.plot(ns, series(lambda s: s["uplink_ms"]["p50"]), "o--", label="uplink p50")
    a.plot(ns, series(lambda s: s["downlink_added_ms"]["p99"]), "s-", label="downlink added p99")
    a.plot(ns, series(lambda s: s["downlink_added_ms"]["p50"]), "s--", label="downlink added p50")
    a.axhline(SERVICE_LEVELS["uplink_p99_ms"], color="red", lw=0.8, ls=":", label="aim p99 ≤ 5 ms")
    a.set_yscale("symlog", linthresh=1)
    a.set_ylim(bottom=0)  # latencies are never negative: no mirrored axis
    a.set_title("relay latency added by the bridge (ms)")
    a = ax[1]
    a.plot(ns, series(lambda s: s["jitter_ms"]["p50"]), "o--", label="p50")
    a.plot(ns, series(lambda s: s["jitter_ms"]["p99"]), "o-", label="p99")
    a.plot(ns, series(lambda s: s["jitter_ms"]["max"]), "^:", label="max")
    a.axhline(SERVICE_LEVELS["jitter_p99_ms"], color="red", lw=0.8, ls=":", label="aim p99 ≤ 2 ms")
    a.set_yscale("symlog", linthresh=1)
    a.set_ylim(bottom=0)
    a.set_title("playout inter-frame jitter (ms)")
    a = ax[2]
    a.plot(ns, series(lambda s: s["bridge_cpu_pct"]), "o-", label="bridge CPU %")
    a.plot(ns, series(lambda s: s["baseline"]["relay_cpu_pct"]), "s--", label="bare relay CPU %")
    a.set_title("CPU (% of one core) — ratio per call annotated")
    for s in steps:
        r = s.get("cpu_ratio_to_baseline")
        if r is not None:
            a.annotate(f"{r:.1f}×", (s["calls"], s["bridge_cpu_pct"]), textcoords="offset points", xytext=(4, 4),
                       fontsize=8)
    for a in ax:
        a.set_xlabel("concurrent calls (N)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    held = result.get("largest_n_held")
    fig.suptitle(f"voxbridge bench — largest N that held: {held}   ({result['machine']['cpu']}, "
                 f"{result['machine']['cores']} cores, {result['machine']['event_loop']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def _worker_rows(s: dict[str, Any]) -> str:
    """The lines under a step's summary: the cluster's Redis (``--cluster``), the spread of calls,
    and one line per worker (empty for one plain worker)."""
    f = _fmt
    lines = []
    if "redis_cpu_pct" in s:
        lines.append(f"       cluster: redis cpu {f(s['redis_cpu_pct'], '.1f')}% (not in the bridge cpu above), "
                     f"bridge + redis {f(s['cluster_cpu_pct_per_call'], '.3f')}/call"
                     f" (×{f(s.get('cluster_cpu_ratio_to_baseline'), '.2f')} relay)")
    if "workers" in s:
        lines.append("       calls per worker: " + " / ".join(f(c, "d") for c in s["calls_per_worker"]))
    for w in s.get("workers", ()):
        t = w.get("tick") or {}
        reg = w.get("cluster") or {}
        lines.append(
            f"       worker {w['worker']} pid {w['pid']}" + (f" node {w['node_id']}" if w["node_id"] else "")
            + f": {f(w['calls'], 'd')} calls  cpu {f(w['cpu_pct'], '.1f')}% ({f(w['cpu_pct_per_call'], '.3f')}/call)"
            f"  rss {f(w['rss_mb'], '.1f')} MB  tick late p99 {f(t.get('lateness_p99_ms'), '.1f')}"
            f" max {f(t.get('lateness_max_ms'), '.1f')} cost p99 {f(t.get('cost_p99_ms'), '.1f')}"
            f" late {f(t.get('late_ticks'), 'd')} skipped {f(t.get('skipped_ticks'), 'd')}"
            f"  dropped {f(w.get('frames_out_dropped'), 'd')}"
            + (f"  registry {f(reg.get('registry_calls'), 'd')} calls" if reg else "")
            + (f"  ({w['stats']})" if "stats" in w else ""))
    return "".join("\n" + line for line in lines)


def _row(s: dict[str, Any]) -> str:
    f = _fmt

    up, da, j = s.get("uplink_ms", {}), s["downlink_added_ms"], s["jitter_ms"]
    b = s.get("baseline") or {}
    return (f"{s['calls']:>5}  up {f(up.get('p50'))}/{f(up.get('p99'))}  down+ {f(da['p50'])}/{f(da['p99'])}  "
            f"jit {f(j['p50'])}/{f(j['p99'])}/{f(j['max'])}  late {s['late_frames']} lost {s['lost_frames']}"
            + (f" (cleared by barge-in {c})" if (c := s.get("barge_in_cleared_frames")) else "") + "  "
            f"flush p99 {f(s['barge_in_flush_ms']['p99'], '.1f')}  tool p99 {f(s['tool_rtt_ms']['p99'], '.1f')}  "
            f"cpu {f(s['bridge_cpu_pct'], '.1f')}% ({f(s['cpu_pct_per_call'], '.3f')}/call, "
            f"×{f(s.get('cpu_ratio_to_baseline'), '.2f')} relay {f(b.get('relay_cpu_pct'), '.1f')}%)  "
            f"rss/call {f(s['rss_per_call_mb'], '.3f')} MB  "
            f"callers late p99 {f(s['callers']['timer_late_ms']['p99'])}  "
            f"bridge tick late p99 {f(s['bridge_tick']['lateness_p99_ms'], '.1f')} cost p99 "
            f"{f(s['bridge_tick']['cost_p99_ms'], '.1f')} skipped {s['bridge_tick']['skipped_ticks']}  "
            f"machine {f(s['machine_busy_pct'], '.0f')}%"
            f"  absolute {'HELD' if s['held'] else 'BROKE: ' + ','.join(s['broken'])}"
            + (f"\n       vs relay (jit p99 {f(b['jitter_ms']['p99'])}, rtt p99 {f(b['round_trip_ms']['p99'])}, "
               f"late {b['late_frames']}): added jit p99 {f(r['levels']['added_jitter_p99_ms'])} "
               f"latency p99 {f(r['levels']['added_latency_p99_ms'])} "
               f"late/1000 {f(r['levels']['added_late_per_1000'], '.3f')}  "
               f"relative {'HELD' if r['held'] else 'BROKE: ' + ','.join(r['broken'])}"
               if (r := s.get("relative")) else "")
            + (f"\n       floor (the least this design costs in Python): cpu {f(fl['cpu_pct_per_call'], '.3f')}/call "
               f"(×{f(fl['cpu_ratio_to_baseline'], '.2f')} relay)  jit p99 {f(fl['jitter_ms']['p99'])}  "
               f"late {fl['late_frames']} lost {fl['lost_frames']}  machine {f(fl['machine_busy_pct'], '.0f')}%"
               f"  → the bridge ×{f(s.get('cpu_ratio_to_floor'), '.2f')} the floor"
               if (fl := s.get("floor")) else "")
            + _worker_rows(s))


def preflight(args: argparse.Namespace) -> str | None:
    """Why this run cannot start, checked before anything is started (the bench then exits 2), or None."""
    if args.workers < 1:
        return (f"--workers {args.workers}: the bench needs at least one bridge process"
                + ("; --cluster makes the workers the nodes of one cluster on Redis, so it needs --workers 1 "
                   "or more" if args.cluster else ""))
    if args.cluster:
        if shutil.which(REDIS_SERVER) is None:
            return _NO_REDIS_SERVER
        if importlib.util.find_spec("redis") is None:
            return ("--cluster: the bridge workers need the Python package redis, which is not installed "
                    "(the 'cluster' extra: pip install -e '.[cluster]')")
    return None


async def run_bench(args: argparse.Namespace) -> int:
    """``voxbridge bench``: ramp N, measure, write ``bench.json`` (+ ``bench.png``). Exit 0 if the
    first step held (relative to the bare relay when it ran, else absolutely); 2 if it cannot
    run at all (:func:`preflight`: nothing is started)."""
    problem = preflight(args)
    if problem is not None:
        print(f"voxbridge bench: {problem}", file=sys.stderr)
        return 2
    steps_n = [int(x) for x in str(args.calls).split(",") if x.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything is measured
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * max(steps_n) + 1024))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    tmp = Path(tempfile.mkdtemp(prefix="voxbridge-bench-"))
    procs = _Procs()
    result: dict[str, Any] = {
        "command": "voxbridge bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else " ".join(sys.argv),
        "machine": machine_info(),
        "params": {"calls": steps_n, "duration_s": args.duration, "baseline_duration_s": args.baseline_duration,
                   "warmup_s": args.warmup, "ramp_rate": args.ramp_rate, "workers": args.workers,
                   "cluster": bool(args.cluster), "floor": bool(args.floor),
                   "caller_procs": args.caller_procs or "auto (1 per 500 calls)", "barge_every_s": args.barge_every,
                   "tool_every_s": args.tool_every, "codec": f"slin {RATE} Hz both sides (no resampling)",
                   "event_loop": "asyncio" if args.asyncio else result_loop()},
        "service_levels": SERVICE_LEVELS, "relative_levels": RELATIVE_LEVELS, "cpu_ratio_aim": CPU_RATIO_AIM,
        "steps": [],
    }
    started = time.monotonic()
    rc = 1
    try:
        for n in steps_n:
            step = await _bridge_step(args, procs, tmp, n)
            if not args.no_baseline:
                step["baseline"] = await _baseline_step(args, procs, tmp, n)
                base = step["baseline"]["cpu_pct_per_call"]
                step["cpu_ratio_to_baseline"] = round(step["cpu_pct_per_call"] / base, 2) if base > 0 else None
                if "cluster_cpu_pct_per_call" in step:
                    step["cluster_cpu_ratio_to_baseline"] = (
                        round(step["cluster_cpu_pct_per_call"] / base, 2) if base > 0 else None)
            if args.floor:
                _add_floor(step, await _bridge_step(args, procs, tmp, n, floor=True))
            _judge(step)
            result["steps"].append(step)
            print(_row(step), flush=True)
            if not _held(step) and not args.keep_going:
                break
        steps = result["steps"]
        held = [s["calls"] for s in steps if s["held"]]
        first_break = next((s for s in steps if not s["held"]), None)
        result["largest_n_held"] = max(held) if held else None
        result["first_break"] = None if first_break is None else {
            "calls": first_break["calls"], "broken": first_break["broken"],
            "load_generator_late": first_break["load_generator_late"]}
        if not args.no_baseline:
            held_rel = [s["calls"] for s in steps if s["relative"]["held"]]
            rel_break = next((s for s in steps if not s["relative"]["held"]), None)
            result["largest_n_held_relative"] = max(held_rel) if held_rel else None
            result["first_break_relative"] = None if rel_break is None else {
                "calls": rel_break["calls"], "broken": rel_break["relative"]["broken"]}
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        rc = 0 if steps and _held(steps[0]) else 1
    finally:
        await procs.stop_all()
        (out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
        if args.keep_tmp:
            print(f"raw data and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    drew = plot(result, out / "bench.png") if result["steps"] else False
    print(f"largest N that held (absolute): {result.get('largest_n_held')}"
          + (f"; first break at N={result['first_break']['calls']}: {', '.join(result['first_break']['broken'])}"
             if result.get("first_break") else ""))
    if "largest_n_held_relative" in result:
        rb = result.get("first_break_relative")
        print(f"largest N that held (relative to the bare relay): {result['largest_n_held_relative']}"
              + (f"; first break at N={rb['calls']}: {', '.join(rb['broken'])}" if rb else ""))
    print(f"wrote {out / 'bench.json'}" + (f" and {out / 'bench.png'}" if drew else " (no plot: matplotlib missing)"))
    return rc


def _held(step: dict[str, Any]) -> bool:
    """The verdict the ramp follows: relative to the bare relay when it ran, else absolute."""
    rel = step.get("relative")
    return bool(rel["held"]) if rel is not None else bool(step["held"])


def result_loop() -> str:
    try:
        import uvloop
        return f"uvloop {uvloop.__version__}"
    except ImportError:
        return "asyncio"


#: The numeric options of ``voxbridge bench``: (flag, type, default, metavar, help).
_NUMERIC_OPTIONS: tuple[tuple[str, type, float, str, str], ...] = (
    ("--duration", float, 15.0, "S", "measured seconds per step (default 15)"),
    ("--baseline-duration", float, 8.0, "S", "measured seconds of the bare relay (and --floor) per step (default 8)"),
    ("--warmup", float, 3.0, "S", "seconds after the last call connected before measuring (default 3)"),
    ("--ramp-rate", float, 250.0, "CALLS/S", "new calls per second while ramping up a step (default 250)"),
    ("--workers", int, 1, "W", "bridge processes sharing the AudioSocket port with SO_REUSEPORT (default 1)"),
    ("--caller-procs", int, 0, "P", "load-generator processes (default: one per 500 calls)"),
    ("--barge-every", float, 10.0, "S",
     "per call, a gateway burst + playback_clear_buffer every S seconds (default 10)"),
    ("--tool-every", float, 10.0, "S", "per call, a no-op tool call every S seconds (default 10)"),
)
#: Its on/off switches: (flag, help).
_SWITCHES: tuple[tuple[str, str], ...] = (
    ("--no-baseline", "skip the bare relay baseline"),
    ("--keep-going", "run every step even after one broke"),
    ("--asyncio", "run bridge and relay on asyncio instead of uvloop"),
    ("--keep-tmp", "keep raw per-frame data and process logs"),
    ("--floor", ("also run the floor in each step, a minimal Python bridge of the same design "
                 "(bridge/devtools/floor.py), and report the bridge's CPU against it too")),
    ("--cluster", ("run the --workers as one cluster on a Redis server the bench starts on loopback "
                   "(redis-server from Debian's package; the 'cluster' extra), as production would")),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``voxbridge bench``."""
    parser.add_argument("--calls", default=DEFAULT_STEPS, metavar="N,N,…",
                        help=f"concurrent calls per step, ramped in order (default {DEFAULT_STEPS})")
    for flag, kind, default, metavar, help_ in _NUMERIC_OPTIONS:
        parser.add_argument(flag, type=kind, default=kind(default), metavar=metavar, help=help_)
    parser.add_argument("--stalls", type=float, nargs="?", const=2.0, default=0.0, metavar="MS",
                        help="sample what holds the bridge's event loop when it is more than MS late "
                             "(default 2; bridge/devtools/stalls.py) and report it per step")
    parser.add_argument("--out", default="bench-results", metavar="DIR",
                        help="where bench.json and bench.png go (default ./bench-results)")
    for flag, help_ in _SWITCHES:
        parser.add_argument(flag, action="store_true", help=help_)


# =========================================================================== entry point (roles)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bridge.devtools.bench")
    sub = p.add_subparsers(dest="role", required=True)
    add_arguments(sub.add_parser("run", help="the benchmark (same as voxbridge bench)"))
    b = sub.add_parser("_bridge")
    b.add_argument("--config", required=True)
    b.add_argument("--stats", required=True)
    b.add_argument("--stalls", type=float, default=0.0)
    c = sub.add_parser("_callers")
    c.add_argument("--host", default="127.0.0.1")
    for name in ("--port", "--first-id", "--count", "--groups"):
        c.add_argument(name, type=int, required=name != "--groups", default=4)
    for name in ("--ramp-rate", "--t0", "--ws", "--we", "--stop"):
        c.add_argument(name, type=float, required=True)
    c.add_argument("--out", required=True)
    r = sub.add_parser("_relay")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--upstream", type=int, required=True)
    e = sub.add_parser("_echo")
    e.add_argument("--port", type=int, required=True)
    fl = sub.add_parser("_floor")
    for name in ("--port", "--gateway-port"):
        fl.add_argument(name, type=int, required=True)
    fl.add_argument("--api-key", required=True)
    fl.add_argument("--stats", required=True)
    args = p.parse_args(argv)
    from ..cli import _run

    role = {"run": run_bench, "_bridge": _bridge_main, "_callers": _callers_main,
            "_relay": _relay_main, "_echo": _echo_main, "_floor": _floor_main}[args.role]
    return _run(role(args))


if __name__ == "__main__":
    sys.exit(main())
