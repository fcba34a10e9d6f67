"""The per-sample check of a hand-written NumPy gradient: :func:`assert_gradequiv_numpy`.

Arguments are validated (:mod:`.arguments`), the check is described as a
:class:`~.problem.NumpyProblem`, and :func:`pytest_gradcheck.verdict.run_check` compares,
re-checks in float64, diagnoses and reports, as for the torch check.
"""

from __future__ import annotations

from typing import Optional

from .._options import takes_test_defaults, validate_options
from ..broadcast import emit_after_check
from ..errors import InvalidArgument
from ..report import GradEquivReport
from ..verdict import run_check, verdict_options
from .arguments import Arrays, BatchArg, GradFn, LossFn, Params, ParamsArg, WeightsArg, left_as_found, resolve_weights
from .problem import NumpyProblem

__all__ = ["assert_gradequiv_numpy"]


@takes_test_defaults("numpy")
def assert_gradequiv_numpy(
    grad_fn: GradFn,
    params: ParamsArg,
    inputs: BatchArg,
    targets: Optional[BatchArg] = None,
    *,
    reduction: str = "mean",
    weights: WeightsArg = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    rtol_float64: Optional[float] = None,
    atol_float64: Optional[float] = None,
    broadcast: str = "warn",
    float64_recheck: bool = True,
    loss_fn: Optional[LossFn] = None,
    reference: str = "auto",
) -> GradEquivReport:
    """Assert that a hand-written batch gradient equals the accumulation of per-sample gradients.

    ``grad_fn(params, inputs, targets)`` returns the gradient of the batch loss
    in the structure of ``params``: a dict with the same keys, a list/tuple of
    the same length, or one array when ``params`` is one array. ``inputs`` is an
    array or a tuple/list of arrays with the batch on axis 0 (``grad_fn``
    receives the same structure); ``targets`` likewise, or None.

    The reference calls ``grad_fn`` on each sample alone (``x[i:i+1]``) and
    accumulates the B gradients by ``reduction``: ``"mean"`` (default),
    ``"sum"``, or ``"auto"`` (whichever holds, reported in ``report.matched``).
    ``weights`` declares a weighted accumulation: B per-sample weights, or a
    callable on one sample's targets (a batch of one). A mismatch in float32/16
    is re-run with float64 copies of params, inputs and targets before it is
    called a bug. ``loss_fn(params, inputs, targets) -> float`` is optional; it
    lets the diagnosis tell a reweighting of samples from samples that interact.

    Every call gets fresh copies: ``params``, ``inputs`` and ``targets`` are
    left as found. A ``grad_fn`` that writes into the caller's own arrays (via a
    closure or a global) has them restored and gets an
    :class:`~pytest_gradcheck.errors.InvalidArgument`.

    ``broadcast``: ``"warn"`` (default) warns when ``grad_fn`` pairs samples by
    broadcasting (the rule is in :mod:`pytest_gradcheck.numpy_backend.tracking`) and
    the gradients agree anyway, ``"error"`` raises
    :class:`~pytest_gradcheck.errors.BroadcastError`, ``"off"`` does not watch. ``reference`` is accepted for parity with the
    torch check; the NumPy reference is always a per-sample loop.

    Returns a :class:`~pytest_gradcheck.report.GradEquivReport`; raises
    :class:`~pytest_gradcheck.errors.GradEquivError` on mismatch and
    :class:`~pytest_gradcheck.errors.InvalidArgument` on input it cannot check.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> params = {"w": rng.normal(size=(3, 1)), "b": np.zeros(1)}
    >>> x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 1))
    >>> def grad_mse(p, x, y):              # loss = mean over the batch of (x @ w + b - y)**2
    ...     d = 2 * (x @ p["w"] + p["b"] - y) / len(x)
    ...     return {"w": x.T @ d, "b": d.sum(axis=0)}
    >>> assert_gradequiv_numpy(grad_mse, params, x, y).matched
    'mean'
    >>> def grad_summed(p, x, y):           # forgot to divide by the batch size
    ...     d = 2 * (x @ p["w"] + p["b"] - y)
    ...     return {"w": x.T @ d, "b": d.sum(axis=0)}
    >>> assert_gradequiv_numpy(grad_summed, params, x, y, reduction="auto").matched
    'sum'
    """
    __tracebackhide__ = True
    opts = validate_options(
        {
            "reduction": reduction,
            "rtol": rtol,
            "atol": atol,
            "rtol_float64": rtol_float64,
            "atol_float64": atol_float64,
            "broadcast": broadcast,
            "reference": reference,
            "float64_recheck": float64_recheck,
        }
    )
    if not callable(grad_fn):
        raise InvalidArgument(f"grad_fn must be callable, got {type(grad_fn).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise InvalidArgument(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
    p = Params.from_user(params)
    xs = Arrays.from_user(inputs, "inputs")
    ys = Arrays.from_user(targets, "targets") if targets is not None else None
    problem = NumpyProblem(grad_fn, p, xs, ys, loss_fn=loss_fn, watch_broadcast=opts["broadcast"] != "off")
    w = resolve_weights(weights, problem.batch_size, problem.sample_targets)
    with left_as_found(p, xs, ys, "grad_fn"):
        report = run_check(
            problem,
            reduction=opts["reduction"],
            weights=w,
            **verdict_options(opts),
            # the problem's notes on grad_fn's runs come through run_notes, once the verdict is known
        )
    if report.broadcasts:
        emit_after_check(report, opts["broadcast"], where="grad_fn")
    return report
