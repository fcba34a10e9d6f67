"""pytest hooks of pytest-gradcheck: options, the ``gradequiv`` marker and fixture.

This module is imported by pytest at start-up (``pytest11`` entry point), so it
imports only pytest and the standard library; torch and numpy are imported the
first time a check runs.

Precedence of settings: keyword arguments of a call > the ``gradequiv``
marker > command-line options > ini options > built-in defaults.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest

from . import _tracking
from ._options import BROADCAST_MODES, MARKER_OPTIONS, check_choice, check_tolerance, validate_options
from .errors import BroadcastError, GradEquivError, InvalidArgument

__all__ = ["GradEquivFixture"]

MARKER_HELP = (
    "gradequiv(*, rtol=None, atol=None, reduction='mean', weights=None, broadcast=None, "
    "reference='auto', float64_recheck=True): the test checks gradients with the gradequiv "
    "fixture or assert_gradequiv; the options become the fixture's defaults, and the test fails "
    "if it runs no check."
)


@dataclass(frozen=True)
class _Settings:
    rtol: Optional[float]
    atol: Optional[float]
    broadcast: str

    def as_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"broadcast": self.broadcast}
        if self.rtol is not None:
            opts["rtol"] = self.rtol
        if self.atol is not None:
            opts["atol"] = self.atol
        return opts


_settings_key = pytest.StashKey[_Settings]()
_current_item_key = pytest.StashKey[Optional[pytest.Item]]()

_PROPERTY = "gradequiv"


def _tolerance_type(flag: str) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            result = check_tolerance(value, flag.lstrip("-").replace("-", "_"), source=flag)
        except InvalidArgument as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return float(result)  # type: ignore[arg-type]

    return parse


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradcheck", "gradient equivalence checks (pytest-gradcheck)")
    group.addoption(
        "--gradequiv-rtol",
        dest="gradequiv_rtol",
        type=_tolerance_type("--gradequiv-rtol"),
        default=None,
        metavar="RTOL",
        help="relative tolerance of gradient checks (default: by dtype, 1e-4 for float32).",
    )
    group.addoption(
        "--gradequiv-atol",
        dest="gradequiv_atol",
        type=_tolerance_type("--gradequiv-atol"),
        default=None,
        metavar="ATOL",
        help="absolute tolerance of gradient checks (default: 0).",
    )
    group.addoption(
        "--gradequiv-broadcast",
        dest="gradequiv_broadcast",
        choices=BROADCAST_MODES,
        default=None,
        help="implicit broadcasts in loss terms: off, warn (default) or error.",
    )
    parser.addini("gradequiv_rtol", "relative tolerance of gradient checks (default: by dtype)", default=None)
    parser.addini("gradequiv_atol", "absolute tolerance of gradient checks (default: 0)", default=None)
    parser.addini(
        "gradequiv_broadcast", "implicit broadcasts in loss terms: off, warn (default) or error", default=None
    )


def _resolve_settings(config: pytest.Config) -> _Settings:
    def pick(name: str) -> tuple[Any, str]:
        cli = config.getoption(f"gradequiv_{name}")
        if cli is not None:
            return cli, f"--gradequiv-{name}"
        ini = config.getini(f"gradequiv_{name}")
        if ini not in (None, ""):
            return ini, f"ini option gradequiv_{name}"
        return None, "default"

    try:
        rtol_v, rtol_src = pick("rtol")
        atol_v, atol_src = pick("atol")
        bc_v, bc_src = pick("broadcast")
        rtol = check_tolerance(rtol_v, "rtol", rtol_src)
        atol = check_tolerance(atol_v, "atol", atol_src)
        broadcast = "warn" if bc_v is None else check_choice(str(bc_v).strip(), "broadcast", BROADCAST_MODES, bc_src)
    except InvalidArgument as exc:
        raise pytest.UsageError(str(exc)) from None
    return _Settings(rtol=rtol, atol=atol, broadcast=broadcast)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    config.stash[_settings_key] = _resolve_settings(config)
    config.stash[_current_item_key] = None
    config.pluginmanager.register(_Summary(config), "gradcheck-summary")


def pytest_report_header(config: pytest.Config) -> Optional[str]:
    settings = config.stash[_settings_key]
    explicit = any(
        config.getoption(f"gradequiv_{n}") is not None or config.getini(f"gradequiv_{n}") not in (None, "")
        for n in ("rtol", "atol", "broadcast")
    )
    if not explicit and config.option.verbose <= 0:
        return None
    rtol = "by dtype" if settings.rtol is None else f"{settings.rtol:g}"
    atol = "0" if settings.atol is None else f"{settings.atol:g}"
    return f"gradcheck: rtol={rtol}, atol={atol}, broadcast={settings.broadcast}"


def _marker_options(item: pytest.Item) -> dict[str, Any]:
    marker = item.get_closest_marker("gradequiv")
    if marker is None:
        return {}
    if marker.args:
        raise InvalidArgument(
            f"the gradequiv marker takes keyword options only ({', '.join(MARKER_OPTIONS)}), "
            f"got positional {marker.args!r} on {item.nodeid}"
        )
    return validate_options(marker.kwargs, source=f"the gradequiv marker on {item.nodeid}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gradequiv") is not None:
        _marker_options(item)  # a bad option fails here, before the test body runs
    item.config.stash[_current_item_key] = item


def pytest_runtest_teardown(item: pytest.Item) -> None:
    item.config.stash[_current_item_key] = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    with _tracking.collecting() as reports:
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

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
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


class GradEquivFixture:
    """The object the ``gradequiv`` fixture returns: ``assert_gradequiv`` preconfigured.

    Its defaults come from the current test's ``gradequiv`` marker, then the
    command line, then the ini file. It is session-scoped and reads the current
    test's marker at call time, so it works inside Hypothesis ``@given`` tests
    without the function-scoped-fixture health check.

    Example (in a test file)::

        @pytest.mark.gradequiv(rtol=1e-4)
        def test_marked(gradequiv):
            gradequiv(model, F.mse_loss, (u, v), y)
    """

    def __init__(self, config: pytest.Config) -> None:
        self._config = config

    def options(self, **overrides: Any) -> dict[str, Any]:
        """The options a call with ``overrides`` runs with (settings, marker, call)."""
        opts = self._config.stash[_settings_key].as_options()
        item = self._config.stash.get(_current_item_key, None)
        if item is not None:
            opts.update(_marker_options(item))
        opts.update(overrides)
        return opts

    def __call__(self, model: Any, loss_fn: Any, inputs: Any, targets: Any = None, **options: Any) -> Any:
        """Run :func:`pytest_gradcheck.assert_gradequiv` with this test's defaults."""
        __tracebackhide__ = True
        from .engine import assert_gradequiv

        return assert_gradequiv(model, loss_fn, inputs, targets, **self.options(**options))

    def step(self, step_fn: Any, model: Any, batch: Any, **options: Any) -> Any:
        """Run :func:`pytest_gradcheck.assert_gradequiv_step` with this test's defaults."""
        __tracebackhide__ = True
        from .engine import assert_gradequiv_step

        opts = self.options(**options)
        opts.pop("broadcast", None)
        return assert_gradequiv_step(step_fn, model, batch, **opts)

    def numpy(self, grad_fn: Any, params: Any, inputs: Any, targets: Any = None, **options: Any) -> Any:
        """Run :func:`pytest_gradcheck.assert_gradequiv_numpy` with this test's defaults."""
        __tracebackhide__ = True
        from .numpy_backend import assert_gradequiv_numpy

        opts = self.options(**options)
        opts.pop("per_sample", None)
        return assert_gradequiv_numpy(grad_fn, params, inputs, targets, **opts)

    def accumulation(self, model: Any, loss_fn: Any, inputs: Any, targets: Any = None, **options: Any) -> Any:
        """Run :func:`pytest_gradcheck.assert_accumulation_equiv` with this test's defaults."""
        __tracebackhide__ = True
        from .accumulation import assert_accumulation_equiv

        opts = self.options(**options)
        opts.pop("reference", None)  # micro-batches are always run one by one
        opts.pop("per_sample", None)
        return assert_accumulation_equiv(model, loss_fn, inputs, targets, **opts)

    def per_sample_gradients(
        self, model: Any, loss_fn: Any, inputs: Any, targets: Any = None, grads: Any = None, **options: Any
    ) -> Any:
        """Run :func:`pytest_gradcheck.assert_per_sample_gradients` with this test's defaults."""
        __tracebackhide__ = True
        from .per_sample import assert_per_sample_gradients

        keep = ("rtol", "atol", "reference", "float64_recheck")
        opts = {k: v for k, v in self.options(**options).items() if k in keep}
        return assert_per_sample_gradients(model, loss_fn, inputs, targets, grads=grads, **opts)

    def independent(self, model: Any, inputs: Any, **options: Any) -> Any:
        """Run :func:`pytest_gradcheck.assert_batch_independent` (tolerances from this test)."""
        __tracebackhide__ = True
        from .independence import assert_batch_independent

        opts = {
            k: v for k, v in self.options(**options).items() if k in ("rtol", "atol", "samples", "max_samples", "seed")
        }
        return assert_batch_independent(model, inputs, **opts)

    def __repr__(self) -> str:
        return f"<gradequiv fixture {self.options()!r}>"


@pytest.fixture(scope="session")
def gradequiv(pytestconfig: pytest.Config) -> GradEquivFixture:
    """Check gradients like :func:`pytest_gradcheck.assert_gradequiv`, configured by the
    test's ``gradequiv`` marker, the command line and the ini file."""
    return GradEquivFixture(pytestconfig)
