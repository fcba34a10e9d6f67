"""The finite-difference check of a hand-written NumPy gradient: :func:`assert_grad_numpy`.

Figures only: the analytic gradient, central differences of the loss at the checked
coordinates, per-parameter errors and the cause they point to go into a
:class:`~pytest_gradcheck.report.finite_differences.FiniteDifferenceReport`, whose
renderer words them.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from .._options import check_tolerance
from .._tracking import record as record_check
from ..errors import GradEquivError, InvalidArgument
from ..report.finite_differences import (
    CAUSE_DERIVATIVE,
    CAUSE_LOSS_IGNORES_PARAMS,
    CAUSE_SCALE,
    FDEntry,
    FDParam,
    FiniteDifferenceReport,
)
from ..report.format import close_to
from .arguments import Array, Arrays, BatchArg, GradFn, LossFn, Params, ParamsArg, as_loss, copy_array, left_as_found

__all__ = ["assert_grad_numpy"]

#: the entries with the largest errors kept on each parameter's figures
_WORST = 3


def assert_grad_numpy(
    loss_fn: LossFn,
    grad_fn: GradFn,
    params: ParamsArg,
    inputs: BatchArg,
    targets: Optional[BatchArg] = None,
    *,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    max_coords: int = 128,
    seed: int = 0,
) -> FiniteDifferenceReport:
    """Assert that ``grad_fn`` is the gradient of ``loss_fn``, by central finite differences.

    Everything runs in float64, on copies: ``grad_fn(params, inputs, targets)``
    gives the analytic gradient (in the structure of ``params``, as for
    :func:`~pytest_gradcheck.assert_gradequiv_numpy`); each checked coordinate ``j`` of each
    parameter gets ``(loss_fn(p + eps e_j) - loss_fn(p - eps e_j)) / (2 eps)``.

    A parameter passes when ``max|analytic - numeric| <= atol + rtol * scale +
    noise`` over its checked coordinates, with ``scale`` the largest magnitude of
    either gradient there and ``noise = 64 * 2**-52 * max|loss| / eps`` the
    rounding of the difference quotient. Parameters with more than
    ``max_coords`` entries are sampled: the entry with the largest analytic
    gradient plus ``max_coords - 1`` others drawn with ``numpy.random.default_rng(seed)``
    (the global RNG is not touched). Kinks (ReLU at 0, ``abs``) can make
    finite differences disagree with a correct gradient; keep inputs away from them.

    Returns a :class:`~pytest_gradcheck.report.finite_differences.FiniteDifferenceReport`;
    raises :class:`~pytest_gradcheck.errors.GradEquivError` (its ``.report``) naming the
    parameters, indices, analytic and numeric values of the worst entries.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> params = {"w": rng.normal(size=(3, 1))}
    >>> x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 1))
    >>> def loss(p, x, y):
    ...     return float(np.mean((x @ p["w"] - y) ** 2))
    >>> def grad(p, x, y):
    ...     return {"w": x.T @ (2 * (x @ p["w"] - y) / len(x))}
    >>> assert_grad_numpy(loss, grad, params, x, y).passed
    True
    """
    __tracebackhide__ = True
    if not callable(loss_fn):
        raise InvalidArgument(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not callable(grad_fn):
        raise InvalidArgument(f"grad_fn must be callable, got {type(grad_fn).__name__}")
    eps_v = check_tolerance(eps, "eps")
    if eps_v is None or eps_v <= 0:
        raise InvalidArgument(f"Invalid eps={eps!r} from argument: expected a number > 0")
    rtol_v = check_tolerance(rtol, "rtol") or 0.0
    atol_v = check_tolerance(atol, "atol") or 0.0
    if isinstance(max_coords, bool) or not isinstance(max_coords, (int, np.integer)) or max_coords < 1:
        raise InvalidArgument(f"Invalid max_coords={max_coords!r} from argument: expected an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidArgument(f"Invalid seed={seed!r} from argument: expected an integer")
    p = Params.from_user(params)
    xs = Arrays.from_user(inputs, "inputs")
    ys = Arrays.from_user(targets, "targets") if targets is not None else None
    calls = _Calls(loss_fn, grad_fn, p, xs, ys)
    with left_as_found(p, xs, ys, "grad_fn or loss_fn"):
        report = _finite_differences(calls, float(eps_v), rtol_v, atol_v, int(max_coords), int(seed))
    record_check(report)
    if not report.passed:
        raise GradEquivError(report)
    return report


class _Calls:
    """``grad_fn`` and ``loss_fn`` on fresh float64 copies of params, inputs and targets."""

    def __init__(self, loss_fn: LossFn, grad_fn: GradFn, p: Params, xs: Arrays, ys: Optional[Arrays]) -> None:
        self.loss_fn = loss_fn
        self.grad_fn = grad_fn
        self.p = p
        self.xs = xs
        self.ys = ys
        self.base = [copy_array(a, True) for a in p.arrays]

    def _data(self) -> tuple[Any, Any]:
        x = self.xs.build([copy_array(a, True) for a in self.xs.arrays])
        y = None if self.ys is None else self.ys.build([copy_array(a, True) for a in self.ys.arrays])
        return x, y

    def analytic(self) -> dict[str, Array]:
        """What ``grad_fn`` returns, by parameter name; refused if not finite."""
        __tracebackhide__ = True
        x, y = self._data()
        analytic = self.p.collect(self.grad_fn(self.p.build([a.copy() for a in self.base]), x, y), "the float64 call")
        for name, label in zip(self.p.names, self.p.labels):
            if not np.all(np.isfinite(analytic[name])):
                raise InvalidArgument(
                    f"the gradient of {label} returned by grad_fn has non-finite entries (NaN or inf): "
                    "it cannot be compared with finite differences"
                )
        return analytic

    def loss(self) -> float:
        """``loss_fn`` at the unperturbed params."""
        __tracebackhide__ = True
        x, y = self._data()
        return as_loss(self.loss_fn(self.p.build([a.copy() for a in self.base]), x, y), "the unperturbed params")

    def loss_at(self, k: int, flat: int, value: float) -> float:
        """``loss_fn`` with entry ``flat`` of parameter ``k`` set to ``value``."""
        __tracebackhide__ = True
        arrays = [a.copy() for a in self.base]
        arrays[k].reshape(-1)[flat] = value
        x, y = self._data()
        return as_loss(self.loss_fn(self.p.build(arrays), x, y), f"{self.p.labels[k]} perturbed at entry {flat}")


def _coordinates(analytic: Array, max_coords: int, rng: np.random.Generator) -> Array:
    """Flat indices to check: all, or the largest analytic entry plus a seeded sample."""
    n = analytic.size
    if n <= max_coords:
        return np.arange(n)
    top = int(np.argmax(np.abs(analytic).reshape(-1)))
    others = np.delete(np.arange(n), top)
    picked = rng.choice(others, size=max_coords - 1, replace=False)
    return np.concatenate([[top], np.sort(picked)])


def _central_differences(calls: _Calls, k: int, coords: Array, eps: float) -> tuple[Array, float]:
    """The numerical derivative at ``coords`` of parameter ``k``, and the largest ``|loss|`` seen."""
    num = np.empty(coords.size, dtype=np.float64)
    flat_base = calls.base[k].reshape(-1)
    max_loss = 0.0
    for j, c in enumerate(coords):
        v = float(flat_base[c])
        lp = calls.loss_at(k, int(c), v + eps)
        lm = calls.loss_at(k, int(c), v - eps)
        max_loss = max(max_loss, abs(lp), abs(lm))
        num[j] = (lp - lm) / (2 * eps)
    return num, max_loss


def _param_figures(
    name: str, param: Array, coords: Array, a_c: Array, num: Array, rtol: float, atol: float, noise: float
) -> FDParam:
    """One parameter's figures from its analytic (``a_c``) and numerical derivatives at ``coords``."""
    if coords.size == 0:
        return FDParam(name, tuple(param.shape), 0, int(param.size), 0.0, 0.0, atol, float("nan"), ())
    diff = np.abs(a_c - num)
    scale = float(max(np.abs(a_c).max(), np.abs(num).max()))
    max_abs = float(diff.max())
    nn = float(np.dot(num, num))
    ratio = float(np.dot(a_c, num) / nn) if nn > 0 else float("nan")
    fits = (
        math.isfinite(ratio)
        and ratio != 0
        and float(np.abs(a_c - ratio * num).max()) <= (atol + rtol * scale + noise * max(1.0, abs(ratio)))
    )
    worst = tuple(
        FDEntry(tuple(int(i) for i in np.unravel_index(int(coords[o]), param.shape)), float(a_c[o]), float(num[o]))
        for o in np.argsort(-diff, kind="stable")[:_WORST]
    )
    return FDParam(
        name=name,
        shape=tuple(param.shape),
        checked=int(coords.size),
        numel=int(param.size),
        max_abs_err=max_abs,
        rel_err=max_abs / scale if scale > 0 else 0.0,
        allowed=atol + rtol * scale + noise,
        ratio=ratio,
        worst=worst,
        scale_fits=fits,
        loss_flat=not bool(np.any(num)),
    )


def _cause(rows: Sequence[FDParam]) -> tuple[Optional[str], Optional[float]]:
    """The cause the mismatching parameters point to (a ``CAUSE_*`` key), and the common factor."""
    bad = [r for r in rows if not r.passed]
    if not bad:
        return None, None
    factor = bad[0].ratio
    if all(r.scale_fits for r in bad) and all(close_to(r.ratio, factor) for r in bad):
        return CAUSE_SCALE, factor
    if all(r.loss_flat for r in bad):
        return CAUSE_LOSS_IGNORES_PARAMS, None
    return CAUSE_DERIVATIVE, None


def _finite_differences(
    calls: _Calls, eps: float, rtol: float, atol: float, max_coords: int, seed: int
) -> FiniteDifferenceReport:
    __tracebackhide__ = True
    p = calls.p
    analytic = calls.analytic()
    loss0 = calls.loss()
    rng = np.random.default_rng(seed)
    max_loss = abs(loss0)
    measured: list[tuple[Array, Array, Array]] = []  # (coords, analytic there, numeric there) by parameter
    for k, name in enumerate(p.names):
        a = analytic[name].reshape(-1)
        coords = _coordinates(a, max_coords, rng)
        num, seen = _central_differences(calls, k, coords, eps)
        max_loss = max(max_loss, seen)
        measured.append((coords, a[coords], num))
    noise = float(64 * np.finfo(np.float64).eps * max_loss / eps)
    rows = tuple(
        _param_figures(name, arr, coords, a_c, num, rtol, atol, noise)
        for (coords, a_c, num), name, arr in zip(measured, p.names, p.arrays)
    )
    cause, factor = _cause(rows)
    first = calls.xs.arrays[0]
    return FiniteDifferenceReport(
        passed=all(r.passed for r in rows),
        params=rows,
        eps=eps,
        rtol=rtol,
        atol=atol,
        noise=noise,
        loss=loss0,
        seed=seed,
        max_coords=max_coords,
        batch_size=int(first.shape[0]) if first.ndim else None,
        cause=cause,
        factor=factor,
    )
