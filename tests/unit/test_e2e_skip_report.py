"""tests/conftest.py: skipped e2e tests are listed with their reasons, and fail the run in CI.

Each test runs pytest on a small fake project (pytester) that carries the real tests/conftest.py
and an ``e2e`` directory whose conftest marks its tests like tests/e2e/conftest.py does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

SUITE_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

E2E_CONFTEST = '''
from pathlib import Path
import pytest

HERE = Path(__file__).resolve().parent

def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)

@pytest.fixture
def sandbox():
    pytest.skip("E2E SANDBOX UNAVAILABLE: the asterisk sandbox needs root\\nsandbox.sh said: permission denied")
'''

E2E_TESTS = '''
import pytest

def test_needs_the_sandbox(sandbox):
    pass

def test_skips_itself():
    pytest.skip("no network to fetch n8n")

@pytest.mark.xfail(reason="known upstream bug", strict=True)
def test_expected_failure():
    assert False

def test_runs():
    pass
'''

PLAIN_TESTS = '''
import pytest

def test_passes():
    pass

def test_skipped_but_not_e2e():
    pytest.skip("not on this platform")
'''


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini("[pytest]\nmarkers =\n    e2e: end to end\n")
    pytester.makeconftest(SUITE_CONFTEST.read_text())
    e2e = pytester.mkpydir("e2e")
    (e2e / "conftest.py").write_text(E2E_CONFTEST)
    (e2e / "test_fake_e2e.py").write_text(E2E_TESTS)
    pytester.makepyfile(test_plain=PLAIN_TESTS)
    return pytester


def run(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None) -> pytest.RunResult:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    # The fake project needs none of the suite's plugins; leaving them out keeps each run short.
    return project.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:asyncio", "-p", "no:hypothesispytest",
                                       "-p", "no:anyio", "-p", "no:timeout")


@pytest.mark.parametrize(("value", "expected"), [
    (None, False), ("", False), ("0", False), ("false", False), ("False", False), (" FALSE ", False),
    ("true", True), ("1", True), ("yes", True), ("TRUE", True),
])
def test_what_counts_as_ci(monkeypatch, value, expected):
    from tests.conftest import ci_enabled

    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert ci_enabled() is expected


@pytest.mark.parametrize("ci", [None, "false"])
def test_without_ci_skipped_e2e_tests_are_listed_with_their_reasons_and_the_run_passes(project, monkeypatch, ci):
    result = run(project, monkeypatch, ci)
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=2, skipped=3, xfailed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*skipped end-to-end tests*",
        ("SKIPPED e2e/test_fake_e2e.py::test_needs_the_sandbox: "
         "E2E SANDBOX UNAVAILABLE: the asterisk sandbox needs root"),
        "SKIPPED e2e/test_fake_e2e.py::test_skips_itself: no network to fetch n8n",
        "*sandbox.sh said: permission denied*",  # the rest of a multi-line reason, shown once
        "E2E SKIPPED: 2 test(s) did not run*",
    ])
    assert out.count("sandbox.sh said: permission denied") == 1
    # Only e2e skips are listed: neither the plain skip nor the e2e xfail.
    assert "test_skipped_but_not_e2e" not in out.split("skipped end-to-end tests")[1].split("short test summary")[0]
    assert "test_expected_failure" not in out
    assert "FAILING the run" not in out


@pytest.mark.parametrize("ci", ["true", "1"])
def test_with_ci_a_skipped_e2e_test_fails_the_run_and_says_why(project, monkeypatch, ci):
    result = run(project, monkeypatch, ci)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=2, skipped=3, xfailed=1)  # nothing else changed: only the exit status
    result.stdout.fnmatch_lines([
        "SKIPPED e2e/test_fake_e2e.py::test_needs_the_sandbox: *",
        f"E2E SKIPPED: 2 test(s) did not run* FAILING the run because CI='{ci}': e2e tests must run in CI",
    ])


def test_with_ci_and_no_e2e_skip_the_run_passes_and_says_nothing(project, monkeypatch):
    (project.path / "e2e" / "conftest.py").write_text(E2E_CONFTEST.replace("pytest.skip(", "return None and ("))
    (project.path / "e2e" / "test_fake_e2e.py").write_text(E2E_TESTS.replace(
        '    pytest.skip("no network to fetch n8n")', "    pass"))
    result = run(project, monkeypatch, "true")
    assert result.ret == pytest.ExitCode.OK  # the plain (non-e2e) skip does not fail CI
    result.assert_outcomes(passed=4, skipped=1, xfailed=1)
    assert "E2E SKIPPED" not in result.stdout.str()
    assert "skipped end-to-end tests" not in result.stdout.str()


def test_with_ci_a_failing_run_stays_failing_and_the_skips_are_still_listed(project, monkeypatch):
    project.makepyfile(test_broken="def test_broken():\n    assert 1 == 2\n")
    result = run(project, monkeypatch, "true")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["E2E SKIPPED: 2 test(s) did not run* (CI='true': the run failed anyway)"])


def test_an_e2e_module_skipped_at_collection_is_listed(project, monkeypatch):
    (project.path / "e2e" / "test_whole_module.py").write_text(
        'import pytest\npytest.skip("asterisk binary missing", allow_module_level=True)\n')
    result = run(project, monkeypatch, None)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines([
        "SKIPPED e2e/test_whole_module.py: asterisk binary missing",
        "E2E SKIPPED: 3 test(s) did not run*",
    ])
