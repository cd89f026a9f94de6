"""Suite-wide hooks: end-to-end tests cannot vanish quietly.

The e2e tier (tests/e2e, marker ``e2e``) needs a root sandbox with a real Asterisk and a real
n8n. Where that cannot be built the tests skip — and a skipped e2e test in a long list of
passes is easy to miss, so a run that did not exercise the real Asterisk could look green.

So, whenever any e2e test was skipped, the terminal summary gets a section listing each one
with its reason, and one line to grep for::

    E2E SKIPPED: 12 test(s) did not run; ...

With ``CI`` set to anything but empty, ``0`` or ``false``, a skipped e2e test fails the run
(exit status 1), and the summary says so: CI is where the real-Asterisk tier must run.

A test counts as e2e if it carries the ``e2e`` marker (tests/e2e/conftest.py gives it to every
test it collects). A module or directory skipped whole at collection time has no test items to
carry the marker; it counts if its path has an ``e2e`` directory in it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import PurePath

import pytest

# An invalid call-state transition (bridge/state.py) is a bug: raise it in tests, in this
# process and in the bridges tests start as child processes. Production logs it instead.
os.environ.setdefault("VOXBRIDGE_STRICT_STATE", "1")

E2E_MARKER = "e2e"
#: Lines of a long skip reason shown once in the details (e.g. the tail of sandbox.sh's stderr).
DETAIL_LINES = 30


@dataclass(frozen=True)
class SkippedE2E:
    nodeid: str
    reason: str


def ci_enabled(value: str | None = None) -> bool:
    """Is this a CI run? ``CI`` set to anything but empty, ``0`` or ``false`` (any case)."""
    if value is None:
        value = os.environ.get("CI", "")
    return value.strip().lower() not in ("", "0", "false")


def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        text = str(longrepr[2])
    else:
        text = str(longrepr) if longrepr is not None else ""
    return text.removeprefix("Skipped: ").strip() or "(no reason given)"


class E2ESkipWatch:
    """Collects the skipped e2e tests of one run (a plugin: hooks on reports have no config)."""

    name = "voxbridge-e2e-skip-watch"

    def __init__(self) -> None:
        self.skipped: list[SkippedE2E] = []
        self.failed_run = False  # True once this plugin turned a passing run into a failing one

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # An xfail is reported as skipped too (with ``wasxfail``): an expected outcome, not a gap.
        if report.skipped and not hasattr(report, "wasxfail") and E2E_MARKER in report.keywords:
            self.skipped.append(SkippedE2E(report.nodeid, _reason(report)))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped and E2E_MARKER in PurePath(report.nodeid.split("::")[0]).parts[:-1]:
            self.skipped.append(SkippedE2E(report.nodeid, _reason(report)))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        passing = session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
        if self.skipped and ci_enabled() and passing:
            self.failed_run = True
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze the test process's heap once everything is imported (as ``voxbridge serve`` freezes its
    own after start-up: bridge/cli.py): a full collection over every module of the suite takes
    ~80 ms, a pause every call in the process would feel, which timing assertions then blame on the
    bridge."""
    import gc

    gc.collect()
    gc.freeze()


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin(E2ESkipWatch.name):
        config.pluginmanager.register(E2ESkipWatch(), E2ESkipWatch.name)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    watch = config.pluginmanager.get_plugin(E2ESkipWatch.name)
    skipped = watch.skipped if watch is not None else []
    if not skipped:
        return
    tr = terminalreporter
    ci = ci_enabled()
    tr.section("skipped end-to-end tests", sep="=", red=ci, yellow=not ci, bold=True)
    details: dict[str, None] = {}
    for s in skipped:
        first, _, rest = s.reason.partition("\n")
        tr.line(f"SKIPPED {s.nodeid}: {first}")
        if rest.strip():
            details[s.reason] = None
    for reason in details:
        lines = reason.splitlines()
        tr.line("")
        tr.line(f"reason in full ({len(lines)} lines" + (f", last {DETAIL_LINES}" if len(lines) > DETAIL_LINES else "")
                + "):")
        for line in lines[:1] + lines[1:][-DETAIL_LINES:]:
            tr.line(f"    {line}")
    tr.line("")
    summary = (f"E2E SKIPPED: {len(skipped)} test(s) did not run; the real-Asterisk/n8n tier is not covered "
               "by this run (run as root: sudo bash tests/run.sh)")
    if watch.failed_run:
        summary += f" — FAILING the run because CI={os.environ.get('CI', '')!r}: e2e tests must run in CI"
    elif ci:
        summary += f" (CI={os.environ.get('CI', '')!r}: the run failed anyway)"
    tr.line(summary, red=ci, yellow=not ci, bold=True)
