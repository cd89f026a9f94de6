"""``voxbridge`` command line.

    voxbridge serve [--config FILE] [--audiosocket-listen HOST:PORT] [--api-listen HOST:PORT] [--gateway-url URL]
    voxbridge dial [--to HOST:PORT] [--wav FILE | --tone HZ] [--dtmf 1@2.5] [--record OUT.wav] …
    voxbridge gateway-sim [--protocol aillomvox|generic-ws|aivoco|openai-realtime] [--listen HOST:PORT] …
    voxbridge check-config FILE
    voxbridge bench [--calls 50,100,…] [--duration S] [--workers W [--cluster]] [--out DIR]

``serve`` and ``check-config`` are the service; ``dial``, ``gateway-sim`` and ``bench`` are the dev
tools of :mod:`bridge.devtools`, whose modules (and their options) are loaded only when their own
command runs, so the service's process never carries them (demo mode aside: see bridge/app.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from . import __version__
from .config import ConfigError, load_config, parse_hostport


class _CallFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        call = getattr(record, "call", None)
        record.callctx = f" [{call}]" if call else ""
        return True


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_CallFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s%(callctx)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # One INFO line per request (httpx2 is the mcp package's client: one per MCP tool call).
    for noisy in ("websockets", "uvicorn.access", "httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def freeze_startup_heap() -> None:
    """Move everything alive after start-up (modules, config, the parts) out of the collector's reach.

    A full collection walks every tracked object, and with the AI adapters, their libraries and the
    VAD loaded that is ~200 000 objects: ~80 ms measured on this project's 2-core VM, during which no
    call gets a frame. Frozen, a full collection walks only what calls create (gc.freeze(), the
    documented way for long-running servers)."""
    gc.collect()
    gc.freeze()


def _serve_config(args: argparse.Namespace):
    """The config ``serve`` runs with: the file, the environment, then the command line's options
    (validated like the rest, so a bad ``--gateway-url`` is named like a bad ``gateway.url``).

    With ``--config``, the file (or the environment, or ``--gateway-url``) must name the gateway
    or set ``gateway.demo: true``; with no file, no URL means the embedded demo (see
    :func:`bridge.config.load_config`).
    """
    overrides: dict[str, str] = {}
    if args.audiosocket_listen:
        parse_hostport(args.audiosocket_listen, "--audiosocket-listen")
        overrides["audiosocket.listen"] = args.audiosocket_listen
    if args.api_listen:
        parse_hostport(args.api_listen, "--api-listen")
        overrides["api.listen"] = args.api_listen
    if args.gateway_url:
        overrides["gateway.url"] = args.gateway_url
    cfg = load_config(args.config, overrides=overrides)
    if cfg.gateway.url and not cfg.gateway.api_key:
        raise ConfigError("gateway.url is set but no API key: set VOXBRIDGE_GATEWAY_API_KEY (or gateway.api_key)")
    return cfg


async def _serve(args: argparse.Namespace) -> int:
    from .app import Bridge

    cfg = _serve_config(args)
    setup_logging(args.log_level or cfg.log_level)
    bridge = Bridge(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await bridge.start()
    freeze_startup_heap()
    ways = []
    if "audiosocket" in cfg.ingress:
        host, port = bridge.audiosocket_address
        ways.append(f"AudioSocket on {host}:{port}")
    if "ari" in cfg.ingress:
        ways.append(f"ARI application {cfg.ari.app} at {cfg.ari.url}")
    print(f"voxbridge {__version__} ready: {', '.join(ways)}"
          + (f", gateway {bridge.gateway_url} (embedded demo)" if cfg.gateway.url is None else ""), flush=True)
    if cfg.gateway.url is None and "audiosocket" in cfg.ingress:
        print(f"place a test call:  voxbridge dial --to {host}:{port}", flush=True)
    stopping = asyncio.ensure_future(stop.wait())
    broken = asyncio.ensure_future(bridge.failed.wait())
    try:
        await asyncio.wait({stopping, broken}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        broken.cancel()
        logging.getLogger("voxbridge").info("stopping (%s)", "a part failed" if bridge.failed.is_set()
                                            else "signal received")
        await bridge.stop()
    return 1 if bridge.failed.is_set() else 0


def _check_config(args: argparse.Namespace) -> int:
    from .app import build_tools

    try:
        cfg = load_config(args.file)
        errors, warnings = cfg.problems(build_tools(cfg).names)
        # A credential is read from the environment `serve` runs in, which may not be this one.
        warnings += [f"{p}; `serve` needs it" for p in cfg.credential_problems()]
    except (ConfigError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if errors:
        print(f"invalid configuration in {args.file}:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    default = "embedded demo (gateway.demo)" if cfg.gateway.url is None else cfg.gateway.url
    named = "".join(f"; gateway {n}: {g.protocol} {g.url}" for n, g in cfg.gateways.items())
    print(f"{args.file}: OK ({len(cfg.profiles)} profile(s): {', '.join(cfg.profiles)}; "
          f"gateway {default if cfg.uses_default_gateway else '(unused)'}{named})")
    return 0


#: The dev tools on the command line (see :mod:`bridge.devtools`): command -> (one-line help, module).
#: Each module provides ``add_arguments(parser)``; it is imported only when its own command is
#: parsed, so ``serve`` and ``check-config`` never load the simulator, the caller or the bench.
DEVTOOL_COMMANDS: dict[str, tuple[str, str]] = {
    "dial": ("place a test call over AudioSocket, like Asterisk would", "bridge.devtools.dial"),
    "gateway-sim": ("run the reference AI gateway (protocol simulator)", "bridge.devtools.gateway_sim"),
    "bench": ("load benchmark: N simulated calls through the bridge, vs a bare relay", "bridge.devtools.bench"),
}
#: ``gateway-sim --protocol P``: the reference simulator of each AI protocol (each module has
#: ``add_arguments(parser)`` and ``run_from_args(args)``; only the chosen one is imported).
SIMULATORS: dict[str, str] = {
    "aillomvox": "bridge.devtools.gateway_sim",
    "generic-ws": "bridge.devtools.sim_generic_ws",
    "aivoco": "bridge.devtools.sim_aivoco",
    "openai-realtime": "bridge.devtools.sim_openai",
}


def _protocol_of(argv: Sequence[str]) -> str:
    """The simulator ``gateway-sim`` is asked for (``--protocol P`` / ``--protocol=P``), found
    before parsing so that only that simulator's options are added; argparse checks the value."""
    for i, arg in enumerate(argv):
        if arg == "--protocol" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--protocol="):
            return arg.partition("=")[2]
    return "aillomvox"


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names, found before parsing: the first word that is not an option
    (the top-level parser has only ``--help`` and ``--version``, which take no value). Anything
    that is not a command is left for argparse to reject."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(command: str | None = None, argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``voxbridge`` parser. Every command is listed with its help; a dev tool's options are
    added only for ``command`` (the one being parsed), which imports that tool's module."""
    p = argparse.ArgumentParser(prog="voxbridge", description="Asterisk AudioSocket ⇄ AI voice gateway bridge")
    p.add_argument("--version", action="version", version=f"voxbridge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the bridge")
    s.add_argument("--config", "-c", help="YAML config file (optional: without one, the embedded demo gateway "
                                          "runs unless --gateway-url or VOXBRIDGE_GATEWAY_URL is given)")
    s.add_argument("--audiosocket-listen", metavar="HOST:PORT", help="default 127.0.0.1:9000")
    s.add_argument("--api-listen", metavar="HOST:PORT", help="default 127.0.0.1:8080")
    s.add_argument("--gateway-url", metavar="URL", help="ws(s)://…/ws of the AI gateway (overrides gateway.url)")
    s.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    c = sub.add_parser("check-config", help="validate a config file and exit")
    c.add_argument("file")

    for name, (help_text, module) in DEVTOOL_COMMANDS.items():
        tool = sub.add_parser(name, help=help_text)
        if name == command == "gateway-sim":
            tool.add_argument("--protocol", choices=list(SIMULATORS), default="aillomvox",
                              help="which AI protocol to simulate (default aillomvox)")
            protocol = _protocol_of(argv)
            if protocol in SIMULATORS:
                importlib.import_module(SIMULATORS[protocol]).add_arguments(tool)
        elif name == command:
            importlib.import_module(module).add_arguments(tool)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_of(argv), argv).parse_args(argv)
    try:
        if args.command == "check-config":
            return _check_config(args)
        if args.command == "serve":
            return _run(_serve(args))
        if args.command == "dial":
            from .devtools.dial import run_dial
            return _run(run_dial(args))
        if args.command == "gateway-sim":
            simulator = importlib.import_module(SIMULATORS[args.protocol])
            setup_logging("INFO")
            return _run(simulator.run_from_args(args)) or 0
        if args.command == "bench":
            from .devtools.bench import run_bench
            return _run(run_bench(args))
    except ConfigError as exc:
        print(f"voxbridge: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"voxbridge: {exc}", file=sys.stderr)
        return 1
    return 0


def _run(coro) -> int:
    if os.environ.get("VOXBRIDGE_NO_UVLOOP") is None:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coro) or 0
    try:
        return asyncio.run(coro) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
