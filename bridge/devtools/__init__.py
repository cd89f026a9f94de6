"""Developer tools: what voxbridge ships to test and measure itself, kept apart from the service.

* :mod:`bridge.devtools.gateway_sim` — the reference AI gateway: a strict simulator of the
  AillomVox protocol (``voxbridge gateway-sim``). The test suite runs the bridge against it, and
  the service's zero-config demo mode uses it as its upstream.
* :mod:`bridge.devtools.dial` — the test caller: it behaves like Asterisk on AudioSocket
  (``voxbridge dial``), for a first call without a PBX, for the tests and for the benchmark.
* :mod:`bridge.devtools.bench` — the load benchmark (``voxbridge bench``): simulated callers
  through the bridge against the reference gateway, compared with a bare TCP relay.

They live in a package of their own because they are not the service: together they are about as
large as the rest of ``bridge/``, and a reader looking for what runs in production should not have
to tell the simulator from the real gateway adapter (:mod:`bridge.gateway.aillomvox`). They are
still installed with the package and reachable from the CLI, but :mod:`bridge.cli` imports a tool
only for the command that runs it, and the service never imports them, with one deliberate
exception: in demo mode (no gateway URL configured, see :func:`bridge.config.load_config`)
:mod:`bridge.app` starts the reference gateway in-process as the demo's upstream.
``tests/integration/test_cli.py`` checks that ``serve`` and ``check-config`` load none of them
when a gateway URL is configured.

Nothing in this package is imported by the service's modules at import time; importing
``bridge.devtools`` itself loads no tool.
"""
