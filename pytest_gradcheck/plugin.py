"""pytest hooks of pytest-gradcheck: options and ini keys, the ``gradequiv`` marker, header, summary.

This module is imported by pytest at start-up (``pytest11`` entry point), so it
imports only pytest, the standard library and the package's torch-free modules;
torch and numpy are imported the first time a check runs. The fixture object
and the resolution of its settings live in :mod:`pytest_gradcheck.fixture`, the
options themselves in one declaration (``_options.OPTIONS``).

Precedence of settings: keyword arguments of a call > the ``gradequiv``
marker > command-line options > ini options > built-in defaults.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest

from ._options import MARKER_HELP, SESSION_OPTIONS
from ._tracking import collecting
from .errors import BroadcastError, GradEquivError
from .fixture import CURRENT_ITEM_KEY, SETTINGS_KEY, GradEquivFixture, marker_options, resolve_settings

__all__ = ["GradEquivFixture"]

_PROPERTY = "gradequiv"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradcheck", "gradient equivalence checks (pytest-gradcheck)")
    for opt in SESSION_OPTIONS:
        kwargs = opt.argparse_kwargs()
        group.addoption(opt.flag, **kwargs)
        parser.addini(opt.ini, kwargs["help"], default=None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    config.stash[SETTINGS_KEY] = resolve_settings(config)
    config.stash[CURRENT_ITEM_KEY] = None
    config.pluginmanager.register(_Summary(config), "gradcheck-summary")


def pytest_report_header(config: pytest.Config) -> Optional[str]:
    """The session settings, when one was set or with ``-v``: what a rerun needs to reproduce."""
    settings = config.stash[SETTINGS_KEY]
    if not settings.explicit and config.option.verbose <= 0:
        return None
    shown = []
    for opt in SESSION_OPTIONS:
        if not opt.checks and settings.sources[opt.name] == "default":
            continue  # a session-only setting left alone (no report file, no gate)
        shown.append(f"{opt.name}={opt.show(settings[opt.name])}")
    return "gradcheck: " + ", ".join(shown)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gradequiv") is not None:
        marker_options(item)  # a bad option fails here, before the test body runs
    item.config.stash[CURRENT_ITEM_KEY] = item


def pytest_runtest_teardown(item: pytest.Item) -> None:
    item.config.stash[CURRENT_ITEM_KEY] = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    with collecting() as reports:
        try:
            result = yield
        finally:  # count the checks of a failing test too
            if reports:
                item.user_properties.append(
                    (
                        _PROPERTY,
                        {
                            "checks": len(reports),
                            "failed": sum(not r.passed for r in reports),
                            "loop": sum(getattr(r, "reference_method", "") == "loop" for r in reports),
                            "rounding": sum(bool(getattr(r, "rounding", False)) for r in reports),
                        },
                    )
                )
    if not reports and item.get_closest_marker("gradequiv") is not None:
        pytest.fail(
            f"{item.name} is marked gradequiv but ran no gradient check: call the gradequiv "
            "fixture (or assert_gradequiv) in the test, or remove the marker.",
            pytrace=False,
        )
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """An xfailed check carries its report into ``-rx``: a known bug stays explained."""
    report = yield
    excinfo = call.excinfo
    if (
        getattr(report, "wasxfail", None) is not None
        and excinfo is not None
        and isinstance(excinfo.value, (GradEquivError, BroadcastError))
    ):
        text = "\n".join("    " + line if line else "" for line in str(excinfo.value).splitlines())
        report.wasxfail = f"{report.wasxfail}\n{text}" if report.wasxfail else f"\n{text}"
    return report


class _Summary:
    """Counts the checks of a session (from report properties, so xdist workers count too)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.counts = {"checks": 0, "failed": 0, "tests": 0, "loop": 0, "rounding": 0}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        for name, value in report.user_properties:
            if name == _PROPERTY and isinstance(value, dict):
                self.counts["tests"] += 1
                for key in ("checks", "failed", "loop", "rounding"):
                    self.counts[key] += int(value.get(key, 0))

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        c = self.counts
        if not c["checks"] or self.config.option.verbose <= 0:
            return
        terminalreporter.write_sep("-", "gradequiv")
        line = (
            f"{c['checks']} gradient check{'s' if c['checks'] != 1 else ''} in "
            f"{c['tests']} test{'s' if c['tests'] != 1 else ''}: "
            f"{c['checks'] - c['failed']} passed, {c['failed']} failed"
        )
        if c["rounding"]:
            line += f"; {c['rounding']} passed only after the float64 re-check (rounding)"
        if c["loop"]:
            line += f"; {c['loop']} used the per-sample loop (vmap could not run the model)"
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def gradequiv(pytestconfig: pytest.Config) -> GradEquivFixture:
    """Check gradients like :func:`pytest_gradcheck.assert_gradequiv`, configured by the
    test's ``gradequiv`` marker, the command line and the ini file."""
    return GradEquivFixture(pytestconfig)
