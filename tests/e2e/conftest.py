"""Fixtures for the end-to-end tests against a real Asterisk 22 (see sandbox.sh, asterisk.py).

* ``asterisk_root`` (session): builds or reuses the Debian sid chroot with ``sandbox.sh asterisk``.
  If it cannot be built the e2e tests are skipped with a loud reason, unless ``CI`` is set, in
  which case they fail.
* ``asterisk`` (function): a started :class:`AsteriskSandbox` on free ports; stopped afterwards.
* ``ami``: the independent test AMI client (:mod:`ami_client`), logged in to that Asterisk.
* ``free_port()``: a free TCP port on 127.0.0.1.

Every test collected under tests/e2e gets the ``e2e`` marker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # so test modules can `import asterisk, ami_client` in any import mode
    sys.path.insert(0, str(HERE))

from ami_client import AmiClient  # noqa: E402
from asterisk import AsteriskSandbox, ensure_proc, release_proc  # noqa: E402

from tests.conftest import ci_enabled  # noqa: E402
from tests.ports import free_port  # noqa: E402

SANDBOX_SH = HERE / "sandbox.sh"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


def _unavailable(reason: str) -> None:
    msg = f"E2E SANDBOX UNAVAILABLE: {reason}"
    if ci_enabled():
        pytest.fail(msg + " (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(msg)


def build_sandbox(part: str, timeout: float) -> Path:
    """Run ``sandbox.sh <part>`` (cached after the first run) and return the path it prints last.

    Skips loudly when the machine cannot build it, unless CI is set: then it is a failure.
    """
    if os.geteuid() != 0:
        _unavailable(f"the {part} sandbox needs root (debootstrap, chroot, mount proc)")
    try:
        res = subprocess.run(["bash", str(SANDBOX_SH), part], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"sandbox.sh {part} did not run: {exc}")
    if res.returncode != 0:
        _unavailable(f"sandbox.sh {part} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    lines = res.stdout.strip().splitlines()
    if not lines:
        _unavailable(f"sandbox.sh {part} printed no path:\n{res.stderr[-3000:]}")
    return Path(lines[-1])


@pytest.fixture(scope="session")
def asterisk_root() -> Path:
    """The sid chroot with Asterisk 22 (built on first use, ~1 min; cached afterwards)."""
    root = build_sandbox("asterisk", timeout=900)
    if not (root / "usr/sbin/asterisk").exists():
        _unavailable(f"{root} has no /usr/sbin/asterisk")
    mounted = ensure_proc(root)
    yield root
    if mounted:
        release_proc(root)


@pytest.fixture
def asterisk(asterisk_root: Path, tmp_path: Path) -> AsteriskSandbox:
    """A running Asterisk on fresh ports (``.ami_port``, ``.audiosocket_port``); stopped after."""
    sandbox = AsteriskSandbox(asterisk_root, tmp_path / "asterisk", free_port(), free_port())
    try:
        sandbox.start()
    except BaseException:
        sandbox.cleanup()
        raise
    try:
        yield sandbox
    finally:
        sandbox.stop()
        sandbox.cleanup()  # logs were copied into tmp_path by stop()


@pytest.fixture
def make_asterisk(asterisk_root: Path, tmp_path: Path):
    """``make_asterisk(extra)`` → a started AsteriskSandbox with dialplan appended; stopped after.

    ``extra`` is dialplan text, or a function of the (not yet started) sandbox returning it —
    for dialplan that must name the sandbox's ports; ``options`` go to AsteriskSandbox
    (``http_port`` for ARI, ``rtp_ports``).
    """
    started: list[AsteriskSandbox] = []

    def factory(extra: str | Callable[[AsteriskSandbox], str] = "", **options: Any) -> AsteriskSandbox:
        sandbox = AsteriskSandbox(asterisk_root, tmp_path / f"asterisk-{len(started)}", free_port(), free_port(),
                                  **options)
        sandbox.extra_dialplan = extra(sandbox) if callable(extra) else extra
        try:
            sandbox.start()
        except BaseException:
            sandbox.cleanup()
            raise
        started.append(sandbox)
        return sandbox

    yield factory
    for sandbox in started:
        sandbox.stop()
        sandbox.cleanup()


@pytest.fixture
async def ami(asterisk: AsteriskSandbox) -> AmiClient:
    client = await AmiClient.connect("127.0.0.1", asterisk.ami_port, asterisk.ami_username, asterisk.ami_secret)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(name="free_port")
def free_port_fixture():
    """The :func:`free_port` helper, as a fixture."""
    return free_port
