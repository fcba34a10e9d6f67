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

import os
from typing import Any, Optional

import pytest

from . import results
from ._options import MARKER_HELP, SESSION_OPTIONS, set_test_defaults
from ._tracking import collecting
from .errors import BroadcastError, GradEquivError
from .fixture import CURRENT_ITEM_KEY, SETTINGS_KEY, GradEquivFixture, marker_options, resolve_settings

__all__ = ["GradEquivFixture"]

_RECORDS_KEY = pytest.StashKey["list[results.Record]"]()  # on an item: the records of its checks
_PREVIOUS_DEFAULTS_KEY = pytest.StashKey["dict[str, Any]"]()  # on an item: the check defaults before it ran


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradcheck", "gradient equivalence checks (pytest-gradcheck)")
    for opt in SESSION_OPTIONS:
        kwargs = opt.argparse_kwargs()
        group.addoption(opt.flag, **kwargs)
        parser.addini(opt.ini, kwargs["help"], default=None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    from .report.format import set_rootdir  # torch-free

    previous = set_rootdir(str(config.rootpath))  # reports show the user's paths relative to it

    def restore_rootdir() -> None:
        set_rootdir(previous)

    config.add_cleanup(restore_rootdir)
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
    # every check of the test, direct assert_* calls included, defaults to the session and the marker
    defaults = {**item.config.stash[SETTINGS_KEY].check_options(), **marker_options(item)}
    item.stash[_PREVIOUS_DEFAULTS_KEY] = set_test_defaults(defaults)


def pytest_runtest_teardown(item: pytest.Item) -> None:
    item.config.stash[CURRENT_ITEM_KEY] = None
    set_test_defaults(item.stash.get(_PREVIOUS_DEFAULTS_KEY, None))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    with collecting() as reports:
        try:
            result = yield
        finally:  # record the checks of a failing test too
            rootdir = str(item.config.rootpath)
            records = [
                results.make_record(r, item.nodeid, secs, rootdir, kind)
                for r, secs, kind in zip(reports, reports.seconds, reports.kinds)
            ]
            item.stash[_RECORDS_KEY] = records
            limit = item.config.stash[SETTINGS_KEY]["max_margin"]
            near = [r for r in records if limit is not None and results.over_margin(r, limit)]
            messages = [results.fail_near_miss(r, limit) for r in near]
            if records:
                item.user_properties.extend(results.junit_properties(records))
    if messages:
        pytest.fail("\n".join(messages), pytrace=False)
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
    records = item.stash.get(_RECORDS_KEY, None) if call.when == "call" else None
    if records:  # the records travel on the report (to the xdist controller too)
        report.gradequiv_checks = records
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
    """The session's check records (read from the call reports, so xdist workers' checks count too).

    At the end: the summary line (by default), the table of checks (``-v``),
    GitHub Actions annotations and the ``--gradequiv-json`` document, all from
    the controller (an xdist worker only sends its reports).
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.records: list[results.Record] = []
        self.worker = hasattr(config, "workerinput")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call":
            self.records.extend(getattr(report, "gradequiv_checks", None) or [])

    def _annotate(self) -> bool:
        settings = self.config.stash[SETTINGS_KEY]
        return bool(settings["annotations"]) or os.environ.get("GITHUB_ACTIONS") == "true"

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.worker or not self.records:
            return
        terminalreporter.write_sep("-", "gradequiv")
        terminalreporter.write_line(results.summary_line(self.records))
        if self.config.option.verbose > 0:
            for line in results.table(self.records):
                terminalreporter.write_line(line)
        else:
            for line in results.rescued(self.records):
                terminalreporter.write_line(line)
        if self._annotate():
            rootdir = str(self.config.rootpath)
            workspace = os.environ.get("GITHUB_WORKSPACE")
            for record in self.records:
                error = results.annotation(record, rootdir, workspace)
                if error is not None:
                    terminalreporter.write_line(error)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        path = self.config.stash[SETTINGS_KEY]["json"]
        if self.worker or path is None:
            return
        results.write_json(os.path.join(self.config.invocation_params.dir, path), self.records)


@pytest.fixture(scope="session")
def gradequiv(pytestconfig: pytest.Config) -> GradEquivFixture:
    """Check gradients like :func:`pytest_gradcheck.assert_gradequiv`, configured by the
    test's ``gradequiv`` marker, the command line and the ini file."""
    return GradEquivFixture(pytestconfig)
