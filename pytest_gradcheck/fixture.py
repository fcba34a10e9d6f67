"""The ``gradequiv`` fixture object and the settings it runs with.

Imported by the plugin at pytest start-up, so it imports only pytest and the
package's torch-free modules; each check's module is imported when it first runs.

Precedence: keyword arguments of a call > the test's ``gradequiv`` marker >
command line > ini file > the option's default (the declaration in
``_options.OPTIONS``). A marker or session value reaches only the checks that
take that option (``reduction`` does not reach ``independent``); a keyword of
the call is passed as given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union

import pytest

from ._options import BY_NAME, MARKER_OPTIONS, SESSION_OPTIONS, accepted, validate_options
from .errors import InvalidArgument

if TYPE_CHECKING:  # pragma: no cover - types only: importing them at run time would import torch
    import torch

    from .report import GradEquivReport
    from .report.independence import BatchIndependenceReport

    Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]

__all__ = [
    "CURRENT_ITEM_KEY",
    "SETTINGS_KEY",
    "GradEquivFixture",
    "Settings",
    "marker_options",
    "resolve_settings",
]


@dataclass(frozen=True)
class Settings:
    """The session settings: every session option's value (``None``: unset) and where it came from."""

    values: Mapping[str, Any]
    sources: Mapping[str, str]  # "--gradequiv-rtol", "ini option gradequiv_rtol" or "default"

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    @property
    def explicit(self) -> bool:
        """Whether any setting came from the command line or the ini file."""
        return any(source != "default" for source in self.sources.values())

    def check_options(self) -> dict[str, Any]:
        """The session's defaults for the checks: the options a check takes, where set."""
        return {name: v for name, v in self.values.items() if v is not None and BY_NAME[name].checks}


SETTINGS_KEY = pytest.StashKey[Settings]()  # on the config
CURRENT_ITEM_KEY = pytest.StashKey[Optional[pytest.Item]]()  # on the config: the test running now
_MARKER_KEY = pytest.StashKey[dict[str, Any]]()  # on an item: its marker options, validated once


def resolve_settings(config: pytest.Config) -> Settings:
    """Each session option from the command line (checked by argparse), else the ini file, else its default."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for opt in SESSION_OPTIONS:
        cli = config.getoption(opt.dest)
        ini = config.getini(opt.ini)
        if cli is not None:
            values[opt.name], sources[opt.name] = cli, opt.flag
        elif ini not in (None, ""):
            try:
                values[opt.name] = opt.from_ini(ini)
            except InvalidArgument as exc:
                raise pytest.UsageError(str(exc)) from None
            sources[opt.name] = f"ini option {opt.ini}"
        else:
            values[opt.name], sources[opt.name] = opt.default, "default"
    return Settings(values, sources)


def marker_options(item: pytest.Item) -> dict[str, Any]:
    """The options of ``item``'s ``gradequiv`` marker (``{}`` if unmarked), validated on first use."""
    cached = item.stash.get(_MARKER_KEY, None)
    if cached is not None:
        return dict(cached)
    marker = item.get_closest_marker("gradequiv")
    opts: dict[str, Any] = {}
    if marker is not None:
        if marker.args:
            raise InvalidArgument(
                f"the gradequiv marker takes keyword options only ({', '.join(MARKER_OPTIONS)}), "
                f"got positional {marker.args!r} on {item.nodeid}"
            )
        opts = validate_options(marker.kwargs, source=f"the gradequiv marker on {item.nodeid}")
    item.stash[_MARKER_KEY] = opts
    return dict(opts)


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
        opts = self._config.stash[SETTINGS_KEY].check_options()
        item = self._config.stash.get(CURRENT_ITEM_KEY, None)
        if item is not None:
            opts.update(marker_options(item))
        opts.update(overrides)
        return opts

    def _for(self, check: str, call: dict[str, Any]) -> dict[str, Any]:
        """The keywords of a ``check`` call: the defaults it takes, then the call's own."""
        return {**accepted(check, self.options()), **call}

    def __call__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[..., Any],
        inputs: Tensors,
        targets: Tensors | None = None,
        **options: Any,
    ) -> GradEquivReport:
        """Run :func:`pytest_gradcheck.assert_gradequiv` with this test's defaults."""
        __tracebackhide__ = True
        from .engine import assert_gradequiv

        return assert_gradequiv(model, loss_fn, inputs, targets, **self._for("gradequiv", options))

    def step(
        self, step_fn: Callable[[torch.nn.Module, Any], Any], model: torch.nn.Module, batch: Any, **options: Any
    ) -> GradEquivReport:
        """Run :func:`pytest_gradcheck.assert_gradequiv_step` with this test's defaults."""
        __tracebackhide__ = True
        from .engine import assert_gradequiv_step

        return assert_gradequiv_step(step_fn, model, batch, **self._for("step", options))

    def numpy(
        self, grad_fn: Callable[..., Any], params: Any, inputs: Any, targets: Any = None, **options: Any
    ) -> GradEquivReport:
        """Run :func:`pytest_gradcheck.assert_gradequiv_numpy` with this test's defaults."""
        __tracebackhide__ = True
        from .numpy_backend import assert_gradequiv_numpy

        return assert_gradequiv_numpy(grad_fn, params, inputs, targets, **self._for("numpy", options))

    def accumulation(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[..., Any],
        inputs: Tensors,
        targets: Tensors | None = None,
        **options: Any,
    ) -> GradEquivReport:
        """Run :func:`pytest_gradcheck.assert_accumulation_equiv` with this test's defaults."""
        __tracebackhide__ = True
        from .accumulation import assert_accumulation_equiv

        return assert_accumulation_equiv(model, loss_fn, inputs, targets, **self._for("accumulation", options))

    def per_sample_gradients(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[..., Any],
        inputs: Tensors,
        targets: Tensors | None = None,
        grads: Mapping[str, torch.Tensor] | None = None,
        **options: Any,
    ) -> GradEquivReport:
        """Run :func:`pytest_gradcheck.assert_per_sample_gradients` with this test's defaults."""
        __tracebackhide__ = True
        from .per_sample import assert_per_sample_gradients

        opts = self._for("per_sample_gradients", options)
        return assert_per_sample_gradients(model, loss_fn, inputs, targets, grads=grads, **opts)

    def independent(self, model: torch.nn.Module, inputs: Tensors, **options: Any) -> BatchIndependenceReport:
        """Run :func:`pytest_gradcheck.assert_batch_independent` (tolerances from this test)."""
        __tracebackhide__ = True
        from .independence import assert_batch_independent

        return assert_batch_independent(model, inputs, **self._for("independent", options))

    def __repr__(self) -> str:
        return f"<gradequiv fixture {self.options()!r}>"
