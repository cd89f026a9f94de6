"""The n8n community node package: official lint, Jest tests and build (with the host's Node)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "n8n"
pytestmark = pytest.mark.timeout(900)


def npm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["npm", *args], cwd=PACKAGE, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def package() -> Path:
    if shutil.which("npm") is None:
        if os.environ.get("CI"):
            pytest.fail("npm is not installed: the n8n package cannot be linted, tested or built")
        pytest.skip("npm is not installed (the n8n package needs Node >= 20)")
    if not (PACKAGE / "node_modules" / ".bin" / "n8n-node").exists():
        # `npm ci` refuses this lock file: it lacks entries for non-Linux optional builds the
        # registry here does not serve; `install --no-save` takes the locked versions as they are.
        res = npm("install", "--no-save", "--no-audit", "--no-fund")
        assert res.returncode == 0, res.stderr[-3000:]
    return PACKAGE


@pytest.mark.parametrize("script", ["lint", "test", "build"])
def test_npm_script(package: Path, script: str) -> None:
    res = npm("run", script)
    assert res.returncode == 0, f"npm run {script} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    if script == "build":
        for built in ("dist/credentials/VoxbridgeApi.credentials.js", "dist/nodes/Voxbridge/Voxbridge.node.js",
                      "dist/nodes/VoxbridgeTrigger/VoxbridgeTrigger.node.js"):
            assert (package / built).exists(), built
