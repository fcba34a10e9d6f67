"""The report of a finite-difference check: its figures, and the one renderer that words them.

Filled by :func:`pytest_gradcheck.assert_grad_numpy` (the cause included: the check
decides it from the figures, the renderer only words it); ``str(report)`` renders it.
Pure Python: importing it imports neither torch nor numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .format import bullets, close_to, columns, fmt_factor, fmt_number, fmt_ratio, fmt_shape, section

__all__ = [
    "FDEntry",
    "FDParam",
    "FiniteDifferenceReport",
    "CAUSE_SCALE",
    "CAUSE_LOSS_IGNORES_PARAMS",
    "CAUSE_DERIVATIVE",
    "render",
    "cause_headline",
    "headline",
]

#: every mismatching parameter is the numerical gradient times one common ``factor``
CAUSE_SCALE = "scale"
#: the loss did not move at any checked coordinate of any mismatching parameter
CAUSE_LOSS_IGNORES_PARAMS = "loss-ignores-params"
#: the analytic gradient does not follow the loss: a wrong derivative
CAUSE_DERIVATIVE = "derivative"


@dataclass(frozen=True)
class FDEntry:
    """One checked coordinate: its index, the analytic and the numerical derivative."""

    index: tuple[int, ...]
    analytic: float
    numeric: float


@dataclass(frozen=True)
class FDParam:
    """Figures of one parameter in :func:`~pytest_gradcheck.assert_grad_numpy`.

    ``rel_err`` is ``max_abs_err`` over the parameter's gradient scale (the largest
    magnitude of either gradient at the checked coordinates); ``allowed`` is
    ``atol + rtol * scale + noise``; ``ratio`` is the least-squares factor
    analytic/numeric over the checked coordinates (``scale_fits`` when that factor
    explains the whole difference); ``worst`` holds the entries with the largest
    errors, worst first.
    """

    name: str
    shape: tuple[int, ...]
    checked: int
    numel: int
    max_abs_err: float
    rel_err: float
    allowed: float
    ratio: float
    worst: tuple[FDEntry, ...]
    scale_fits: bool = False  # analytic == ratio * numeric within the tolerance
    loss_flat: bool = False  # the loss did not move at any checked coordinate

    @property
    def passed(self) -> bool:
        return self.max_abs_err <= self.allowed


@dataclass
class FiniteDifferenceReport:
    """The figures of a finite-difference check. ``str(report)`` renders it.

    ``cause`` is one of the ``CAUSE_*`` keys when the check failed (``factor``: the common
    factor of :data:`CAUSE_SCALE`).

    >>> import numpy as np
    >>> from pytest_gradcheck import assert_grad_numpy
    >>> def loss(p, x, y): return float(np.sum(p["w"] ** 2))
    >>> def grad(p, x, y): return {"w": 2 * p["w"]}
    >>> report = assert_grad_numpy(loss, grad, {"w": np.arange(3.0)}, np.zeros((2, 1)))
    >>> print(report.summary())
    Analytic gradients match central finite differences (1 parameter, float64).
    """

    passed: bool
    params: tuple[FDParam, ...]
    eps: float
    rtol: float
    atol: float
    noise: float
    loss: float
    seed: int
    max_coords: int
    batch_size: Optional[int] = None
    cause: Optional[str] = None
    factor: Optional[float] = None
    check: str = "finite-difference"
    backend: str = "numpy"
    dtype: str = "float64"
    device: str = "cpu"
    reference_method: str = "central differences"
    rounding: bool = False
    broadcasts: tuple[Any, ...] = ()
    notes: list[str] = field(default_factory=list)

    @property
    def failing(self) -> tuple[FDParam, ...]:
        return tuple(p for p in self.params if not p.passed)

    @property
    def parameters(self) -> tuple[FDParam, ...]:
        return self.params

    @property
    def location(self) -> Optional[str]:
        """``path:line`` behind a failure: not known for this check (the error is in ``grad_fn``)."""
        return None

    def summary(self) -> str:
        """The first line of the report: the verdict of a pass, the cause of a failure."""
        return headline(self) if self.passed else cause_headline(self)

    def __str__(self) -> str:
        return render(self)


def headline(report: FiniteDifferenceReport) -> str:
    """The one-line verdict."""
    n = len(report.params)
    plural = "s" if n != 1 else ""
    if report.passed:
        return f"Analytic gradients match central finite differences ({n} parameter{plural}, float64)."
    bad = report.failing
    names = ", ".join(p.name for p in bad[:4]) + (", ..." if len(bad) > 4 else "")
    return (
        f"Analytic gradients do NOT match central finite differences: {len(bad)} of {n} "
        f"parameter{plural} differ ({names})."
    )


def cause_headline(report: FiniteDifferenceReport) -> str:
    """The first line of a failure: the cause the check decided, in one clause."""
    causes, _ = _causes(report)
    if not causes:
        return headline(report)
    return causes[0].split("; ")[0].rstrip(".")


def _factor_meaning(f: float, b: Optional[int]) -> str:
    if b and close_to(f, b):
        return f" (B={b}: the gradient is summed over the batch where the loss averages)"
    if b and close_to(f * b, 1):
        return f" (1/B, B={b}: the gradient is averaged where the loss sums)"
    if close_to(f, -1):
        return " (the sign is flipped: descent would climb)"
    if close_to(f, 2) or close_to(f, 0.5, rel=2e-3):
        return " (a factor 2: the derivative of x**2 is 2*x; check the 0.5 in the loss)"
    return ""


def _causes(report: FiniteDifferenceReport) -> tuple[list[str], list[str]]:
    """(cause lines, advice lines) for the cause the check decided."""
    bad = report.failing
    names = ", ".join(p.name for p in bad)
    if report.cause == CAUSE_SCALE and report.factor is not None:
        f = report.factor
        return (
            [
                f"the analytic gradient of {names} is {fmt_factor(f)} times the numerical one"
                f"{_factor_meaning(f, report.batch_size)}; the directions agree, only the scale is off."
            ],
            ["make grad_fn and loss_fn agree on the scale of the loss (mean or sum over the batch, constant factors)."],
        )
    if report.cause == CAUSE_LOSS_IGNORES_PARAMS:
        return (
            [
                f"loss_fn does not change when {names} change{'s' if len(bad) == 1 else ''}: it ignores "
                "the params it is given (does it read a global or captured array?), or the parameter "
                "does not enter the loss."
            ],
            ["compute the loss from the params argument, as grad_fn does."],
        )
    if report.cause == CAUSE_DERIVATIVE:
        causes = [
            f"the analytic gradient of {names} does not follow loss_fn: a derivative in the backward "
            "pass is wrong (an activation's derivative, a missing or extra transpose, a wrong index)."
        ]
        ok = [p.name for p in report.params if p.passed]
        if ok:
            causes.append(
                f"{', '.join(ok)} match{'es' if len(ok) == 1 else ''}: backprop carries an "
                "error backwards, so the faulty step sits after the mismatching parameters and before "
                "the matching ones in the forward pass."
            )
        advice = [
            "re-derive the backward step of the layer that owns the first mismatching parameter "
            "(e.g. sigmoid'(z) = s * (1 - s) with s = sigmoid(z)), and check each layer's backward on "
            "its own with assert_grad_numpy."
        ]
        return causes, advice
    return [], []


def _context(report: FiniteDifferenceReport) -> list[str]:
    ctx = f"float64 · central differences, eps={report.eps:g} · loss {report.loss:.6g}"
    if report.batch_size:
        ctx = f"batch of {report.batch_size} · " + ctx
    lines = [ctx]
    sampled = [f"{p.name}: {p.checked} of {p.numel} entries sampled" for p in report.params if p.checked < p.numel]
    if sampled:
        lines.append(f"Coordinates (seed={report.seed}, max_coords={report.max_coords}): " + "; ".join(sampled))
    lines.append(
        f"Compared with (loss(p + eps) - loss(p - eps)) / (2 eps) (rtol={report.rtol:g}, atol={report.atol:g}, "
        f"finite-difference noise {fmt_number(report.noise)}; a parameter matches when "
        "max|analytic - numeric| <= atol + rtol * max|gradient| + noise):"
    )
    return lines


def _params_table(report: FiniteDifferenceReport) -> list[str]:
    rows = [("parameter", "shape", "checked", "max abs err", "rel err", "allowed", "ratio", "")]
    for p in sorted(report.params, key=lambda p: (p.passed, -p.rel_err)):
        rows.append(
            (
                p.name, fmt_shape(p.shape), f"{p.checked}/{p.numel}", fmt_number(p.max_abs_err),
                fmt_number(p.rel_err), fmt_number(p.allowed), fmt_ratio(p.ratio), "ok" if p.passed else "MISMATCH",
            )
        )  # fmt: skip
    return columns(rows)


def _worst_table(report: FiniteDifferenceReport) -> list[str]:
    rows = [("parameter", "index", "analytic", "numeric", "abs err")]
    for p in report.failing:
        for e in p.worst:
            rows.append(
                (p.name, str(e.index), f"{e.analytic:.6g}", f"{e.numeric:.6g}", fmt_number(abs(e.analytic - e.numeric)))
            )
    return columns(rows)


def render(report: FiniteDifferenceReport) -> str:
    """Render ``report`` as text (the ``GradEquivError`` message, ``str(report)``)."""
    top = [headline(report)] if report.passed else [cause_headline(report), headline(report)]
    lines = [*top, "", *_context(report), "", *_params_table(report)]
    if not report.passed:
        lines += ["", "Worst entries:", *_worst_table(report)]
        causes, advice = _causes(report)
        lines += section("Cause", causes)
        lines += section("What to do", advice)
    lines += bullets("Notes", report.notes)
    return "\n".join(lines)
