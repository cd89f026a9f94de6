"""A real n8n for end-to-end tests, run in the Debian sid chroot that ``sandbox.sh n8n`` prepares.

``sandbox.sh n8n`` installs n8n 1.123.x on sid's Node 24 into ``ROOT/opt/voxbridge-n8n`` (see the
comments there for why: n8n 2.x is not installable from the registries here, n8n 1.123 does not
run on the host's Node 20) and builds the repo's node package (``n8n/dist``).

:class:`N8nSandbox` runs one n8n instance with its own user folder inside the chroot
(``ROOT/tmp/vb-n8n-<id>/``: SQLite database, settings, logs), on its own port, listening on
127.0.0.1 only. The chroot shares the host's network, so the bridge on the host and n8n in the
chroot reach each other on loopback. It has no pytest dependency; ``test_n8n.py`` wraps it.

Verified against n8n 1.123.81:

* Workflows and credentials are imported with the CLI before ``n8n start``
  (``import:credentials`` encrypts plain ``data`` objects with the instance's key;
  ``import:workflow``, then ``update:workflow --id=… --active=true``); ``n8n start`` activates
  them: production webhooks answer at ``/webhook/<path>``, and trigger nodes with
  ``webhookMethods`` run ``checkExists``/``create`` with the external service.
* ``/healthz`` answers 200 before the active workflows are registered: :meth:`start` waits for
  the log line n8n prints once it is ready ("Editor is now accessible").
* The node package is loaded with ``N8N_CUSTOM_EXTENSIONS`` (n8n's ``CustomDirectoryLoader``):
  its node types are then ``CUSTOM.voxbridge`` and ``CUSTOM.voxbridgeTrigger``, not
  ``n8n-nodes-voxbridge.*`` as after an install from the community-nodes settings page, so
  :meth:`import_workflow` rewrites the package prefix of the shipped workflows.
* A workflow id must be at most 16 characters: n8n never saves the static data of a longer one
  (``isWorkflowIdValid``), so a trigger node would lose what it stored on activation (here the
  webhook secret, and every delivery would be refused). :meth:`import_workflow` refuses such ids.
* ``SIGTERM`` stops n8n gracefully in a few seconds; an active trigger's ``delete`` is *not* called
  on shutdown (n8n keeps external webhooks across restarts), only on deactivation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from .asterisk import _port_in_use

__all__ = ["N8nSandbox", "N8nError", "N8N_CHROOT_DIR", "PACKAGE_NAME", "CUSTOM_PREFIX"]

N8N_CHROOT_DIR = "/opt/voxbridge-n8n"
N8N_BIN = f"{N8N_CHROOT_DIR}/node_modules/n8n/bin/n8n"
PACKAGE_NAME = "n8n-nodes-voxbridge"
CUSTOM_PREFIX = "CUSTOM"
ENCRYPTION_KEY = "voxbridge-e2e-test-encryption-key"
READY_MARKER = "Editor is now accessible"


class N8nError(RuntimeError):
    """n8n could not be configured, started, or did not answer."""


class N8nSandbox:
    """One n8n instance in the chroot at ``root``.

    ``workdir`` is a host directory for the console log (``n8n-console.log``). ``package_dir`` is
    the repo's node package (``n8n/``, built: ``dist/`` present); its ``dist`` is copied into the
    instance's custom-extensions folder inside the chroot.
    """

    def __init__(
        self,
        root: Path,
        workdir: Path,
        port: int,
        package_dir: Path | None = None,
        *,
        instance_id: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.workdir = Path(workdir)
        self.port = int(port)
        self.package_dir = Path(package_dir) if package_dir else None
        self.id = instance_id or f"{os.getpid()}-{port}-{uuid.uuid4().hex[:6]}"
        self.base = f"/tmp/vb-n8n-{self.id}"  # chroot paths
        self.user_folder = f"{self.base}/home"
        self.custom_dir = f"{self.base}/custom"
        self.import_dir = f"{self.base}/import"
        self.console_log = self.workdir / "n8n-console.log"
        self.version: str | None = None
        self._proc: subprocess.Popen | None = None
        self._console: Any = None
        if not self.host_path(N8N_BIN).exists():
            raise N8nError(f"{self.root} has no {N8N_BIN}: build it with tests/e2e/sandbox.sh n8n")

    # ------------------------------------------------------------------ paths and env

    def host_path(self, chroot_path: str) -> Path:
        if not chroot_path.startswith("/"):
            raise ValueError(f"not an absolute chroot path: {chroot_path!r}")
        return self.root / chroot_path.lstrip("/")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def webhook_url(self, path: str) -> str:
        """The production URL of a Webhook node's ``path`` (workflow active)."""
        return f"{self.url}/webhook/{path.lstrip('/')}"

    def env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": self.user_folder,
            "LANG": "C.UTF-8",
            "NODE_ENV": "production",
            "N8N_USER_FOLDER": self.user_folder,
            "N8N_PORT": str(self.port),
            "N8N_LISTEN_ADDRESS": "127.0.0.1",
            "N8N_HOST": "127.0.0.1",
            "N8N_PROTOCOL": "http",
            "WEBHOOK_URL": f"{self.url}/",
            "N8N_ENCRYPTION_KEY": ENCRYPTION_KEY,
            "N8N_CUSTOM_EXTENSIONS": self.custom_dir,
            "N8N_DIAGNOSTICS_ENABLED": "false",
            "N8N_VERSION_NOTIFICATIONS_ENABLED": "false",
            "N8N_TEMPLATES_ENABLED": "false",
            "N8N_PERSONALIZATION_ENABLED": "false",
            "N8N_SECURE_COOKIE": "false",
            "N8N_RUNNERS_ENABLED": "false",
            "N8N_ENFORCE_SETTINGS_FILE_PERMISSIONS": "false",
            "N8N_HIRING_BANNER_ENABLED": "false",
            "N8N_LOG_LEVEL": "info",
            "N8N_LOG_OUTPUT": "console",
            "EXECUTIONS_DATA_SAVE_ON_SUCCESS": "all",
            "DB_SQLITE_POOL_SIZE": "2",
        }

    def _cmd(self, *args: str) -> list[str]:
        env = [f"{k}={v}" for k, v in self.env().items()]
        return ["chroot", str(self.root), "/usr/bin/env", "-i", *env, "/usr/bin/node", N8N_BIN, *args]

    def cli(self, *args: str, timeout: float = 120.0) -> str:
        """Run an ``n8n`` CLI command against this instance's user folder; return its stdout."""
        self._prepare_dirs()
        res = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise N8nError(
                f"n8n {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
        return res.stdout

    # ------------------------------------------------------------------ setup

    def _prepare_dirs(self) -> None:
        for d in (self.user_folder, self.custom_dir, self.import_dir):
            self.host_path(d).mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)

    def install_package(self) -> None:
        """Copy the built node package (package.json + dist) into the custom-extensions folder."""
        if self.package_dir is None:
            return
        dist = self.package_dir / "dist"
        if not (dist / "nodes").is_dir():
            raise N8nError(
                f"{dist} is not built: run tests/e2e/sandbox.sh n8n (or npm run build in {self.package_dir})")
        target = self.host_path(f"{self.custom_dir}/{PACKAGE_NAME}")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        shutil.copy2(self.package_dir / "package.json", target / "package.json")
        shutil.copytree(dist, target / "dist")

    def _write_import(self, name: str, data: Any) -> str:
        self._prepare_dirs()
        path = f"{self.import_dir}/{name}"
        self.host_path(path).write_text(json.dumps(data, indent=1))
        return path

    def import_credentials(self, credentials: list[dict[str, Any]]) -> None:
        """Import credentials: ``[{"id", "name", "type", "data": {...plain...}}]``."""
        path = self._write_import(f"credentials-{uuid.uuid4().hex[:8]}.json", credentials)
        self.cli("import:credentials", f"--input={path}")

    def import_workflow(self, workflow: dict[str, Any] | Path, *, activate: bool = True) -> str:
        """Import a workflow (a dict or a JSON file); return its id. Node types of the package are
        rewritten to the ``CUSTOM.`` prefix the custom-extensions loader gives them."""
        if isinstance(workflow, (str, Path)):
            workflow = json.loads(Path(workflow).read_text())
        wf = json.loads(json.dumps(workflow))
        wf.setdefault("id", uuid.uuid4().hex[:16])
        if len(wf["id"]) > 16:
            # n8n silently never saves the static data of a workflow whose id is longer than 16
            # characters (isWorkflowIdValid): a trigger's webhook secret would be lost.
            raise N8nError(f"workflow id {wf['id']!r} is longer than 16 characters")
        wf["active"] = False
        for node in wf.get("nodes", []):
            if node.get("type", "").startswith(PACKAGE_NAME + "."):
                node["type"] = CUSTOM_PREFIX + node["type"][len(PACKAGE_NAME):]
        path = self._write_import(f"workflow-{wf['id']}.json", wf)
        self.cli("import:workflow", f"--input={path}")
        if activate:
            self.cli("update:workflow", f"--id={wf['id']}", "--active=true")
        return wf["id"]

    # ------------------------------------------------------------------ lifecycle

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 90.0) -> None:
        """Start ``n8n start`` and wait until it is healthy and has activated its workflows."""
        if self.running:
            return
        self._prepare_dirs()
        self.install_package()
        if _port_in_use(self.port):
            raise N8nError(f"port {self.port} is already in use")
        self._console = open(self.console_log, "ab")  # noqa: SIM115 - open for the process's life; closed in stop()
        self._log_offset = self.console_log.stat().st_size
        self._proc = subprocess.Popen(
            self._cmd("start"),
            stdin=subprocess.DEVNULL,
            stdout=self._console,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group (pgid == pid), stopped as a unit
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        healthy = False
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise N8nError(f"n8n exited (code {code}) while starting\n{self.log_tail()}")
            if not healthy:
                healthy = self._get("/healthz") == 200
            if healthy and READY_MARKER in self.log_since_start():
                return
            time.sleep(0.25)
        raise N8nError(f"n8n on {self.url} was not ready within {timeout:.0f}s\n{self.log_tail()}")

    def _get(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the instance's process group (graceful), SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                self._signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(proc, signal.SIGKILL)
                    proc.wait(timeout=5)
            self._signal_group(proc, signal.SIGKILL)  # anything it left in its group
            self._proc = None
        if self._console is not None:
            self._console.close()
            self._console = None

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def cleanup(self) -> None:
        """Stop, then remove the instance's folder inside the chroot."""
        self.stop()
        shutil.rmtree(self.host_path(self.base), ignore_errors=True)

    # ------------------------------------------------------------------ logs

    def log_since_start(self) -> str:
        try:
            with open(self.console_log, "rb") as f:
                f.seek(getattr(self, "_log_offset", 0))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.console_log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no n8n log output)"
        return f"--- n8n console log ({self.console_log}) ---\n" + "\n".join(text)

    def __enter__(self) -> N8nSandbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<N8nSandbox {self.id} port={self.port} {state}>"

