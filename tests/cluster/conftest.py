"""A real cluster on loopback: ``redis-server`` and PostgreSQL from Debian's packages, started here
on free ports, and three ``voxbridge serve`` processes (each with its embedded demo gateway)
sharing them. Nothing is mocked; Asterisk's AMI is a small simulator speaking the real protocol
over TCP (it answers Login and Originate; the callee's AudioSocket leg is then connected by the
test to whichever node it likes, as Asterisk's dialplan would).

Missing servers FAIL the tests, naming the packages (tests/run.sh installs them as root): a
cluster tier that silently skipped would look green without having run.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
#: Generous: two shared cores, three bridges, Redis and PostgreSQL starting together.
START_TIMEOUT_S = 60.0
HEARTBEAT_S = 0.5
NODE_TIMEOUT_S = 2.0
NODES = ("node-a", "node-b", "node-c")


def _need(binary: str, package: str) -> str:
    # PostgreSQL's server tools live in Debian's versioned directory, not on PATH.
    found = next((str(p) for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{binary}"))), None) \
        or shutil.which(binary)
    if found is None:
        pytest.fail(f"the cluster tests need {binary!r}: install the Debian package {package} "
                    f"(apt-get install -y {package}; tests/run.sh does this when run as root)", pytrace=False)
    return found


def _wait(check: Any, what: str, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{what} exited with status {proc.returncode}:\n{tail}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what} did not start within {START_TIMEOUT_S:g} s:\n{tail}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = _need("redis-server", "redis-server")
    port = free_port()
    work = tmp_path_factory.mktemp("redis")
    log = work / "redis.log"
    proc = subprocess.Popen([server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(work), "--logfile", str(log)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)

    def up() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    try:
        _wait(up, "redis-server", proc, log)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


def _pg_user() -> tuple[int, int, list[str]]:
    """PostgreSQL refuses to run as root: as root, run it as the package's ``postgres`` user."""
    if os.getuid() != 0:
        return os.getuid(), os.getgid(), []
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("the cluster tests run PostgreSQL as the user 'postgres' (created by the Debian package "
                    "postgresql): install it", pytrace=False)
    return pw.pw_uid, pw.pw_gid, ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    initdb = _need("initdb", "postgresql")
    pg_ctl = _need("pg_ctl", "postgresql")
    uid, gid, as_user = _pg_user()
    work = Path(tempfile.mkdtemp(prefix="voxbridge-pg-"))
    os.chown(work, uid, gid)
    data, log, port = work / "data", work / "pg.log", free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                    f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, stdout=subprocess.DEVNULL)
    try:
        subprocess.run([*as_user, _need("createdb", "postgresql"), "-h", "127.0.0.1", "-p", str(port),
                        "-U", "postgres", "voxbridge"], check=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/voxbridge"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


class _AmiHandler(socketserver.StreamRequestHandler):
    """The AMI protocol as Asterisk speaks it, for what the bridges send: Login, Ping, the channel
    resync (CoreShowChannels: none) and Originate (answered at once: reason 4)."""

    def handle(self) -> None:
        self.wfile.write(b"Asterisk Call Manager/5.0.6\r\n")
        block: dict[str, str] = {}
        for raw in self.rfile:
            line = raw.decode().rstrip("\r\n")
            if line:
                key, _, value = line.partition(":")
                block.setdefault(key.strip().lower(), value.strip())
                continue
            if not block:
                continue
            action, aid = block.get("action", "").lower(), block.get("actionid", "")
            if action == "corechannels" or action == "coreshowchannels":
                out = (f"Response: Success\r\nActionID: {aid}\r\nEventList: start\r\n\r\n"
                       f"Event: CoreShowChannelsComplete\r\nActionID: {aid}\r\nEventList: Complete\r\n"
                       "ListItems: 0\r\n\r\n")
            elif action == "originate":
                self.server.originated.append(dict(block))  # type: ignore[attr-defined]
                out = (f"Response: Success\r\nActionID: {aid}\r\nMessage: Originate successfully queued\r\n\r\n"
                       f"Event: OriginateResponse\r\nActionID: {aid}\r\nResponse: Success\r\nReason: 4\r\n"
                       "Channel: PJSIP/sim-00000001\r\nUniqueid: 1.1\r\n\r\n")
            else:
                out = f"Response: Success\r\nActionID: {aid}\r\nMessage: ok\r\n\r\n"
            self.wfile.write(out.encode())
            block = {}


class _AmiServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _AmiHandler)
        self.originated: list[dict[str, str]] = []


@pytest.fixture(scope="session")
def ami_sim() -> Iterator[_AmiServer]:
    server = _AmiServer()
    thread = threading.Thread(target=server.serve_forever, name="ami-sim", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Node:
    name: str
    api: str
    audiosocket: tuple[str, int]
    proc: subprocess.Popen[bytes]
    log: Path
    config: dict[str, Any] = field(default_factory=dict)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.api, timeout=15)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def node_config(name: str, redis_url: str, postgres_url: str, ami_port: int, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "cluster": {"redis_url": redis_url, "node_id": name, "heartbeat_s": HEARTBEAT_S,
                    "node_timeout_s": NODE_TIMEOUT_S, "command_timeout_s": 3},
        "store": {"postgres_url": postgres_url},
        "audiosocket": {"listen": f"127.0.0.1:{free_port()}"},
        "api": {"enabled": True, "listen": f"127.0.0.1:{free_port()}"},
        "gateway": {"demo": True},
        "ami": {"enabled": True, "port": ami_port, "secret": "sim", "channel_wait": 0.3},
        "allow": {"calls": [r"\+4420\d{8}"]},
        "outbound": {"answer_timeout": 10},
        "profiles": {"default": {}, "sales": {"prompt": "You sell {product}."}},
    }
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def start_node(name: str, cfg: dict[str, Any], work: Path) -> Node:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = work / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", "serve", "--config", str(path)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    api = f"http://{cfg['api']['listen']}"
    host, port = cfg["audiosocket"]["listen"].rsplit(":", 1)

    def up() -> bool:
        r = httpx.get(f"{api}/v1/health", timeout=1)
        return (r.status_code == 200 and r.json()["node"] == name
                and (r.json()["ami_connected"] or not cfg["ami"]["enabled"]))

    try:
        _wait(up, f"bridge {name}", proc, log)
    except BaseException:
        _stop(proc)
        raise
    return Node(name, api, (host, int(port)), proc, log, cfg)


@pytest.fixture(scope="module")
def cluster(redis_url: str, postgres_url: str, ami_sim: _AmiServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    """Three bridge processes, one Redis, one PostgreSQL."""
    work = tmp_path_factory.mktemp("cluster")
    nodes: dict[str, Node] = {}
    try:
        for name in NODES:
            cfg = node_config(name, redis_url, postgres_url, ami_sim.server_address[1])
            nodes[name] = start_node(name, cfg, work)
        yield nodes
    finally:
        for node in nodes.values():
            _stop(node.proc)
