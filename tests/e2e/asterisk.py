"""A real Asterisk 22 for end-to-end tests, run from the Debian sid chroot ``sandbox.sh`` builds.

:class:`AsteriskSandbox` writes a self-contained configuration into the chroot under
``ROOT/tmp/vb-<id>/`` (its own etc, run, spool, log, db and sound dirs, so several instances can
run side by side on different ports), starts ``chroot ROOT /usr/sbin/asterisk -f -C <conf>``,
waits for the AMI banner, and stops it again without leaving processes behind. It has no pytest
dependency; ``conftest.py`` wraps it in fixtures.

Verified against Asterisk 22.10.1 (Debian sid package) by ``test_sandbox.py``:

* Originate ``Channel: Local/caller@voxbridge-test`` with ``Context/Exten/Priority:
  voxbridge-ai,ai,1``: the ``;2`` half runs ``caller@voxbridge-test`` (MixMonitor, Playback, Wait:
  the simulated caller) and, once it answers, the ``;1`` half runs ``voxbridge-ai,ai,1`` (the
  AudioSocket side). Originate ``Variable:``s are set on ``;1`` and inherited by ``;2``, so
  ``AS_UUID`` is visible on both halves (both carry ``ChanVariable: AS_UUID=...``).
* ``AudioSocket()`` delivers the UUID frame, then 0x10 frames of 320 bytes (the last frame of a
  Playback can be shorter); a peer 0x00 frame makes the app return and the dialplan continues
  (``VoxbridgeReturned``). ``AUDIOSOCKETSTATUS`` does not exist in 22.10.1, so its ``Status`` is
  empty; it is kept in the dialplan because it costs nothing and later versions may set it.
* ``Dial(AudioSocket/127.0.0.1:PORT/${AS_UUID}/c(slin16),,g)`` delivers 0x12 frames of 640
  bytes. Without Dial's ``g`` option a peer hangup ends the whole call (Dial returns -1); with it
  the dialplan continues and ``Status`` is ``ANSWER``.
* MixMonitor with a ``.wav`` file name writes an 8 kHz, 16-bit mono RIFF WAV containing both
  directions of the channel it runs on, finalised when the channel hangs up; Debian's build has
  TEST_FRAMEWORK, so a ``TestEvent`` (``State: MIXMONITOR_END``, ``File: <path without .wav>``)
  marks that moment on AMI.
* UserEvent() events are in the AMI ``user`` class: an AMI account without ``read = user`` never
  sees ``VoxbridgeReturned`` and friends.
* AMI answers with its banner *before* Asterisk is fully booted (CLI commands such as
  ``core show version`` can still be missing), so ``start()`` also runs ``core waitfullybooted``.
  Start to fully booted takes about 0.3 s; ``core stop now`` about 0.1-1 s.

``start()`` mounts proc at ROOT/proc if it is not mounted and leaves it mounted (instances share
it; the session fixture unmounts what it mounted). Each instance runs in its own process group.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
import wave
from pathlib import Path

__all__ = ["AsteriskSandbox", "AsteriskError", "MODULE_DIR", "ensure_proc", "release_proc"]

MODULE_DIR = "/usr/lib/x86_64-linux-gnu/asterisk/modules"

AMI_USERNAME = "voxbridge"
AMI_SECRET = "voxbridge-test-secret"
# The classes ami.md specifies for the bridge, plus ``user`` (UserEvent), which the bridge's
# tests need to observe VoxbridgeReturned / VoxbridgeTransferred / VoxbridgeForbiddenReached.
AMI_READ = "system,call,dialplan,dtmf,reporting,user"
AMI_WRITE = "system,call,originate,reporting"

# Modules the test dialplan and the bridge's AMI actions use (autoload = no). Each is checked to
# exist in the chroot before it is listed (a missing one is a loud error, not a silent skip).
MODULES = (
    # core plumbing
    "res_timing_timerfd",  # timing source for Playback / Wait / MixMonitor
    "pbx_config",  # extensions.conf
    "bridge_simple",  # two-party bridges (Dial)
    "bridge_softmix",
    "bridge_holding",
    "codec_resample",  # slin <-> slin16 etc.
    "codec_ulaw",
    "codec_alaw",
    "format_wav",  # Playback / MixMonitor .wav
    "format_pcm",
    "format_sln",
    # AudioSocket (app, channel driver, shared resource)
    "res_audiosocket",
    "app_audiosocket",
    "chan_audiosocket",
    # dialplan applications
    "app_playback",
    "app_mixmonitor",
    "app_userevent",
    "app_dial",
    "app_echo",
    "app_verbose",
    "app_senddtmf",
    "app_waitforsilence",
    "app_originate",
    "app_stack",  # Gosub
    "app_exec",
    "app_transfer",
    "app_channelredirect",
    "res_mutestream",  # AMI MuteAudio
    "res_musiconhold",
    # dialplan functions
    "func_uuid",
    "func_uri",  # URIENCODE, used by the shipped dialplan (examples/asterisk)
    "func_logic",  # IF
    "func_channel",
    "func_strings",
    "func_callerid",
    "func_hangupcause",
    "func_global",
    "func_math",
)

#: Loaded too when the instance has an HTTP port: ARI, Stasis and External Media (RTP).
ARI_MODULES = (
    "res_http_websocket",
    "res_sorcery_config",  # res_websocket_client's configuration
    "res_websocket_client",  # res_ari needs its symbols (outbound ARI websockets), even unused
    "res_stasis",
    "res_stasis_answer",
    "res_stasis_playback",
    "res_stasis_recording",  # res_ari_bridges/channels need its symbols
    "res_stasis_snoop",
    "res_ari",
    "res_ari_model",
    "res_ari_applications",
    "res_ari_asterisk",
    "res_ari_bridges",
    "res_ari_channels",
    "res_ari_events",
    "app_stasis",
    "res_pjproject",  # res_rtp_asterisk needs its symbols (ICE/STUN), even unused
    "res_rtp_asterisk",
    "res_rtp_multicast",  # chan_rtp needs its symbols
    "chan_rtp",  # External Media (UnicastRTP channels)
)
ARI_USERNAME = "voxbridge"
ARI_PASSWORD = "voxbridge-ari-secret"

_BANNER_PREFIX = b"Asterisk Call Manager/"


class AsteriskError(RuntimeError):
    """Asterisk could not be configured, started or stopped."""


def ensure_proc(root: Path) -> bool:
    """Mount proc at ROOT/proc unless it is mounted already. True if this call mounted it."""
    target = Path(root) / "proc"
    if os.path.ismount(target):
        return False
    target.mkdir(exist_ok=True)
    res = subprocess.run(["mount", "-t", "proc", "proc", str(target)], capture_output=True, text=True)
    if res.returncode != 0:
        raise AsteriskError(f"cannot mount proc at {target}: {res.stderr.strip()}")
    return True


def release_proc(root: Path) -> None:
    """Unmount ROOT/proc (only call this if :func:`ensure_proc` mounted it and nothing runs)."""
    target = Path(root) / "proc"
    if os.path.ismount(target):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


class AsteriskSandbox:
    """One Asterisk instance in the chroot at ``root``, with its own config, ports and dirs.

    ``workdir`` is a host directory for the instance's logs (``asterisk-console.log`` while it
    runs; ``asterisk-messages.log`` is copied there on :meth:`stop`). ``sip_free`` must stay True:
    no SIP stack is loaded, calls are made with Local channels and AMI Originate.

    Paths the tests hand to Asterisk are *chroot* paths; :meth:`host_path` translates them.
    """

    def __init__(
        self,
        root: Path,
        workdir: Path,
        ami_port: int,
        audiosocket_port: int,
        sip_free: bool = True,
        *,
        instance_id: str | None = None,
        http_port: int | None = None,
        rtp_ports: tuple[int, int] = (31000, 31999),
    ) -> None:
        if not sip_free:
            raise NotImplementedError("the sandbox has no SIP configuration (sip_free=False is not supported)")
        self.root = Path(root)
        self.workdir = Path(workdir)
        self.ami_port = int(ami_port)
        self.audiosocket_port = int(audiosocket_port)
        self.sip_free = sip_free
        #: Asterisk's HTTP server, serving ARI (None: no HTTP, no ARI modules).
        self.http_port = http_port
        self.rtp_ports = rtp_ports
        self.ari_username = ARI_USERNAME
        self.ari_password = ARI_PASSWORD
        self.id = instance_id or f"{os.getpid()}-{ami_port}-{uuid.uuid4().hex[:6]}"
        self.ami_username = AMI_USERNAME
        self.ami_secret = AMI_SECRET
        self.ami_banner: str | None = None
        self.version: str | None = None
        self._proc: subprocess.Popen | None = None
        self._console: object | None = None
        #: Appended to extensions.conf (set before start(); e.g. the shipped example dialplan).
        self.extra_dialplan = ""
        #: Whole configuration files that replace the generated ones (e.g. the shipped ari.conf).
        self.config_files: dict[str, str] = {}

        # chroot paths
        self.base = f"/tmp/vb-{self.id}"
        self.etc_dir = f"{self.base}/etc"
        self.conf_file = f"{self.etc_dir}/asterisk.conf"
        self.run_dir = f"{self.base}/run"
        self.log_dir = f"{self.base}/log"
        self.spool_dir = f"{self.base}/spool"
        self.lib_dir = f"{self.base}/lib"
        self.cache_dir = f"{self.base}/cache"
        self.sounds_dir = f"{self.base}/sounds"
        self.recordings_dir = f"{self.base}/recordings"
        self.console_log = self.workdir / "asterisk-console.log"
        self.messages_log = self.workdir / "asterisk-messages.log"

        if not (self.root / "usr/sbin/asterisk").exists():
            raise AsteriskError(f"{self.root} has no /usr/sbin/asterisk: build it with tests/e2e/sandbox.sh asterisk")

    # ------------------------------------------------------------------ paths and files

    def host_path(self, chroot_path: str | os.PathLike) -> Path:
        """The host path of an absolute path inside the chroot."""
        p = str(chroot_path)
        if not p.startswith("/"):
            raise ValueError(f"not an absolute chroot path: {p!r}")
        return self.root / p.lstrip("/")

    def write_wav(self, name: str, pcm_8k_s16le: bytes, sample_rate: int = 8000) -> str:
        """Write mono s16le PCM as ``<sounds_dir>/<name>.wav``; return the chroot path without
        extension, ready for ``Playback()`` (or ``PLAY_FILE``)."""
        if "/" in name or name.endswith(".wav"):
            raise ValueError("name is a bare file name without extension")
        if len(pcm_8k_s16le) % 2:
            raise ValueError("PCM must be whole 16-bit samples")
        chroot_noext = f"{self.sounds_dir}/{name}"
        host = self.host_path(chroot_noext + ".wav")
        host.parent.mkdir(parents=True, exist_ok=True)
        with wave.open(str(host), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sample_rate)
            w.writeframes(pcm_8k_s16le)
        return chroot_noext

    def recording_path(self, name: str) -> str:
        """A chroot path for a MixMonitor recording (``REC_FILE``); name should end in .wav."""
        return f"{self.recordings_dir}/{name}"

    # ------------------------------------------------------------------ configuration

    def available_modules(self) -> set[str]:
        d = self.root / MODULE_DIR.lstrip("/")
        return {p.name[:-3] for p in d.glob("*.so")}

    def write_config(self) -> None:
        """(Re)write the instance's configuration and create its directories."""
        for d in (
            self.etc_dir,
            self.run_dir,
            self.log_dir,
            self.spool_dir,
            self.lib_dir,
            self.cache_dir,
            self.sounds_dir,
            self.recordings_dir,
            f"{self.lib_dir}/keys",
            f"{self.spool_dir}/outgoing",
            f"{self.spool_dir}/monitor",
            f"{self.spool_dir}/tmp",
        ):
            self.host_path(d).mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)

        available = self.available_modules()
        missing = [m for m in self.modules if m not in available]
        if missing:
            raise AsteriskError(f"modules missing from the chroot ({MODULE_DIR}): {', '.join(missing)}")

        files = {
            "asterisk.conf": self._asterisk_conf(),
            "modules.conf": self._modules_conf(),
            "manager.conf": self._manager_conf(),
            "logger.conf": self._logger_conf(),
            "extensions.conf": self.extensions_conf() + "\n" + self.extra_dialplan,
            # Quiet, minimal versions of files core Asterisk reads at startup.
            "cdr.conf": "[general]\nenable = no\n",
            "cel.conf": "[general]\nenable = no\n",
            "http.conf": self._http_conf(),
            "ari.conf": self._ari_conf(),
            "pjproject.conf": "",
            "websocket_client.conf": "",
            "rtp.conf": f"[general]\nrtpstart = {self.rtp_ports[0]}\nrtpend = {self.rtp_ports[1]}\n",
            "musiconhold.conf": "[general]\n",
            "features.conf": "[general]\n",
            "ccss.conf": "[general]\n",
            "udptl.conf": "[general]\n",
            "acl.conf": "",
            "stasis.conf": "",
        }
        files.update(self.config_files)
        etc = self.host_path(self.etc_dir)
        for name, text in files.items():
            (etc / name).write_text(text)
        indications = self.root / "etc/asterisk/indications.conf"  # tones for Busy()/Congestion()
        if indications.exists():
            shutil.copyfile(indications, etc / "indications.conf")

    def _asterisk_conf(self) -> str:
        return f"""[directories]
astetcdir => {self.etc_dir}
astmoddir => {MODULE_DIR}
astvarlibdir => /var/lib/asterisk
astdbdir => {self.lib_dir}
astkeydir => {self.lib_dir}/keys
astdatadir => /usr/share/asterisk
astagidir => /usr/share/asterisk/agi-bin
astspooldir => {self.spool_dir}
astrundir => {self.run_dir}
astlogdir => {self.log_dir}
astcachedir => {self.cache_dir}
astsbindir => /usr/sbin

[options]
verbose = 3
debug = 0
nocolor = yes
hideconnect = yes
transcode_via_sln = yes
documentation_language = en_US
"""

    @property
    def modules(self) -> tuple[str, ...]:
        return MODULES + (ARI_MODULES if self.http_port is not None else ())

    @property
    def ari_url(self) -> str:
        assert self.http_port is not None, "this instance has no HTTP port (http_port=None)"
        return f"http://127.0.0.1:{self.http_port}"

    def _http_conf(self) -> str:
        if self.http_port is None:
            return "[general]\nenabled = no\n"
        return f"[general]\nenabled = yes\nbindaddr = 127.0.0.1\nbindport = {self.http_port}\n"

    def _ari_conf(self) -> str:
        if self.http_port is None:
            return "[general]\nenabled = no\n"
        return f"""[general]
enabled = yes
pretty = no
channelvars = AS_UUID,AS_PROFILE,AS_VARS

[{self.ari_username}]
type = user
read_only = no
password = {self.ari_password}
password_format = plain
"""

    def _modules_conf(self) -> str:
        lines = ["[modules]", "autoload = no"]
        lines += [f"load => {m}.so" for m in self.modules]
        return "\n".join(lines) + "\n"

    def _manager_conf(self) -> str:
        return f"""[general]
enabled = yes
webenabled = no
bindaddr = 127.0.0.1
port = {self.ami_port}
displayconnects = no
timestampevents = no
channelvars = AS_UUID,AS_PROFILE

[{self.ami_username}]
secret = {self.ami_secret}
deny = 0.0.0.0/0.0.0.0
permit = 127.0.0.1/255.255.255.255
read = {AMI_READ}
write = {AMI_WRITE}
"""

    def _logger_conf(self) -> str:
        return """[general]
dateformat = %F %T.%3q

[logfiles]
console => error
messages.log => notice,warning,error,verbose
"""

    def extensions_conf(self) -> str:
        """The test dialplan (contexts the bridge's e2e tests rely on by name)."""
        port = self.audiosocket_port
        return f"""[general]
static = yes
writeprotect = yes

[globals]

; Inbound AI extension, the shape of the shipped example. Runs on the Local ;1 half.
[voxbridge-ai]
exten => ai,1,Answer()
 same => n,Set(AS_UUID=${{IF($["${{AS_UUID}}" = ""]?${{UUID()}}:${{AS_UUID}})}})
 same => n,Set(AS_PROFILE=${{IF($["${{AS_PROFILE}}" = ""]?default:${{AS_PROFILE}})}})
 same => n,AudioSocket(${{AS_UUID}},127.0.0.1:{port})
 same => n,UserEvent(VoxbridgeReturned,UUID: ${{AS_UUID}},Status: ${{AUDIOSOCKETSTATUS}})
 same => n,Hangup()

; The 16 kHz variant: chan_audiosocket via Dial, c(slin16) -> 0x12 frames of 640 bytes.
; Dial option g: continue here when the AudioSocket leg hangs up (without it Dial returns -1
; and the call ends), so a peer 0x00 hands the call back exactly like the AudioSocket() app.
exten => ai16,1,Answer()
 same => n,Set(AS_UUID=${{IF($["${{AS_UUID}}" = ""]?${{UUID()}}:${{AS_UUID}})}})
 same => n,Set(AS_PROFILE=${{IF($["${{AS_PROFILE}}" = ""]?default:${{AS_PROFILE}})}})
 same => n,Dial(AudioSocket/127.0.0.1:{port}/${{AS_UUID}}/c(slin16),,g)
 same => n,UserEvent(VoxbridgeReturned,UUID: ${{AS_UUID}},Status: ${{DIALSTATUS}})
 same => n,Hangup()

; The ARI way in: the same call, sent to the bridge's Stasis application (ingress: ari).
; Stasis arguments: profile, then AS_VARS-style variables; the dialplan goes on when the bridge
; lets the call go (the same VoxbridgeReturned event as the AudioSocket extension).
[voxbridge-ari]
exten => ai,1,Answer()
 same => n,Stasis(voxbridge,${{AS_PROFILE}},${{AS_VARS}})
 same => n,UserEvent(VoxbridgeReturned,UUID: ${{AS_UUID}},Status: ${{STASISSTATUS}})
 same => n,Hangup()

; The simulated caller: the Local ;2 half of Originate(Local/caller@voxbridge-test -> voxbridge-ai).
; REC_FILE (chroot path ending in .wav), PLAY_FILE (chroot path without extension) and WAIT_AFTER
; (seconds) come in as Originate Variables.
[voxbridge-test]
exten => caller,1,Answer()
 same => n,MixMonitor(${{REC_FILE}})
 same => n,Playback(${{PLAY_FILE}})
 same => n,Wait(${{IF($["${{WAIT_AFTER}}" = ""]?10:${{WAIT_AFTER}})}})
 same => n,Hangup()

; Allowed transfer targets.
[voxbridge-transfer]
exten => 100,1,UserEvent(VoxbridgeTransferred,Exten: 100)
 same => n,Answer()
 same => n,Wait(2)
 same => n,Hangup()

; A context the bridge must never reach.
[voxbridge-forbidden]
exten => 666,1,UserEvent(VoxbridgeForbiddenReached)
 same => n,Hangup()

; Originate targets: answered / busy / no answer.
[voxbridge-outbound]
exten => answer,1,Answer()
 same => n,Wait(2)
 same => n,Hangup()
exten => busy,1,Busy(2)
exten => noanswer,1,Wait(30)
"""

    # ------------------------------------------------------------------ lifecycle

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Write the config, start Asterisk and wait until AMI answers with its banner."""
        if self.running:
            return
        self.write_config()
        ensure_proc(self.root)
        if _port_in_use(self.ami_port):
            raise AsteriskError(f"AMI port {self.ami_port} is already in use")
        self._console = open(self.console_log, "ab")  # noqa: SIM115 - open for the process's life; closed in stop()
        cmd = ["chroot", str(self.root), "/usr/sbin/asterisk", "-f", "-C", self.conf_file]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._console,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a unit if it must be
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"},
        )
        try:
            self.ami_banner = self._wait_for_ami(timeout)
            # AMI accepts connections before Asterisk is fully booted (modules still loading,
            # CLI commands missing): wait for the FullyBooted state as well.
            self._wait_fully_booted(timeout)
            self.version = self._read_version()
        except BaseException:
            self.stop()
            raise

    def _wait_for_ami(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise AsteriskError(f"asterisk exited (code {code}) before AMI came up\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.ami_port), timeout=1.0) as s:
                    s.settimeout(2.0)
                    data = b""
                    while b"\n" not in data:
                        chunk = s.recv(256)
                        if not chunk:
                            break
                        data += chunk
                    line = data.split(b"\n", 1)[0].strip()
                    if line.startswith(_BANNER_PREFIX):
                        return line.decode()
                    last_err = AsteriskError(f"unexpected AMI banner {line!r}")
            except OSError as exc:
                last_err = exc
            time.sleep(0.1)
        raise AsteriskError(
            f"AMI on 127.0.0.1:{self.ami_port} did not answer within {timeout:.0f}s "
            f"(last error: {last_err})\n{self.log_tail()}"
        )

    def _wait_fully_booted(self, timeout: float) -> None:
        try:
            out = self.cli("core waitfullybooted", timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AsteriskError(f"asterisk was not fully booted within {timeout:.0f}s\n{self.log_tail()}") from None
        if "fully booted" not in out.lower():
            raise AsteriskError(f"unexpected answer to core waitfullybooted: {out!r}\n{self.log_tail()}")

    def cli(self, command: str, timeout: float = 10.0) -> str:
        """Run a CLI command on this instance (``asterisk -C <conf> -rx``) and return its output."""
        res = subprocess.run(
            ["chroot", str(self.root), "/usr/sbin/asterisk", "-C", self.conf_file, "-rx", command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if res.returncode != 0:
            raise AsteriskError(f"asterisk -rx {command!r} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def _read_version(self) -> str:
        try:
            out = self.cli("core show version").strip()
        except (AsteriskError, subprocess.TimeoutExpired):
            out = ""
        if not out.startswith("Asterisk "):
            raise AsteriskError(f"unexpected answer to core show version: {out!r}")
        return out

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Asterisk (``core stop now``, then SIGTERM/SIGKILL by PID). Safe to call twice."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                try:
                    self.cli("core stop now", timeout=timeout)
                except (AsteriskError, subprocess.TimeoutExpired, OSError):
                    pass
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(proc, signal.SIGTERM)
                    try:
                        proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        self._signal_group(proc, signal.SIGKILL)
                        proc.wait(timeout=5)
            # Anything Asterisk spawned in its session (it spawns nothing with this config).
            self._signal_group(proc, signal.SIGKILL)
            self._proc = None
        if self._console is not None:
            self._console.close()  # type: ignore[attr-defined]
            self._console = None
        messages = self.host_path(f"{self.log_dir}/messages.log")
        if messages.exists():
            try:
                shutil.copyfile(messages, self.messages_log)
            except OSError:
                pass

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the group we created with start_new_session (pgid == pid)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL the instance (a crash: no hang-ups, no goodbyes); :meth:`start` brings it back."""
        proc = self._proc
        if proc is not None:
            self._signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)
            self._proc = None
        if self._console is not None:
            self._console.close()  # type: ignore[attr-defined]
            self._console = None

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.start(timeout=timeout)

    def cleanup(self) -> None:
        """Stop, then remove the instance's directory inside the chroot (config, recordings)."""
        self.stop()
        shutil.rmtree(self.host_path(self.base), ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for label, path in (
            ("console", self.console_log),
            ("messages", self.host_path(f"{self.log_dir}/messages.log")),
        ):
            try:
                text = Path(path).read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"--- {label} log ({path}) ---\n" + "\n".join(text))
        return "\n".join(parts) or "(no Asterisk log output)"

    def __enter__(self) -> AsteriskSandbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<AsteriskSandbox {self.id} ami={self.ami_port} audiosocket={self.audiosocket_port} {state}>"


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
