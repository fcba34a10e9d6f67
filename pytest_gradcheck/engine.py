"""The PyTorch engine: batch gradient, per-sample reference, and the user's state left as found.

The reference runs **each sample alone** (a batch of one) through the whole
model and the loss, with ``torch.func.vmap`` over the single-sample call, and
accumulates the per-sample losses with the declared weights before one
``torch.autograd.grad``: about one extra forward+backward, never B of them.
Where vmap cannot run the model (``.item()``, data-dependent control flow,
in-place updates of buffers) it falls back to a chunked loop and says so.

The comparison, float64 re-check and diagnosis are backend-neutral and live in
:mod:`pytest_gradcheck.verdict`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ._options import takes_test_defaults, validate_options
from ._torch.inputs import (
    TensorOrTuple,
    WeightsArg,
    check_model,
    ignore_index_candidates,
    loss_call_arguments,
    resolve_weights,
)
from ._torch.loss import loss_guard, loss_step_builder
from ._torch.problem import TorchProblem
from .errors import GradEquivError, InvalidArgument
from .report import GradEquivReport
from .verdict import run_check, verdict_options

__all__ = ["assert_gradequiv", "assert_gradequiv_step"]


# --------------------------------------------------------------------------- public API


@takes_test_defaults("gradequiv")
def assert_gradequiv(
    model: torch.nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    inputs: TensorOrTuple,
    targets: Optional[TensorOrTuple] = None,
    *,
    reduction: str = "mean",
    weights: WeightsArg = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    rtol_float64: Optional[float] = None,
    atol_float64: Optional[float] = None,
    broadcast: str = "warn",
    reference: str = "auto",
    float64_recheck: bool = True,
    per_sample: bool = False,
    chunk_size: Optional[int] = None,
) -> GradEquivReport:
    """Assert that the batch gradient equals the accumulation of per-sample gradients.

    The batch gradient of ``loss_fn(model(*inputs), targets)`` is compared,
    parameter by parameter, with the gradient of the same loss computed on each
    sample alone and accumulated by ``reduction``: ``"mean"`` (default),
    ``"sum"``, or ``"auto"`` (whichever holds, reported in ``report.matched``).
    ``weights`` declares a weighted accumulation instead: a tensor of B
    per-sample weights, or a callable on one sample's targets (a batch of one),
    e.g. ``lambda t: (t != -100).sum()`` for token-level losses with padding;
    the reference is then the weighted mean (or, with ``reduction="sum"``, sum).

    ``inputs`` is a tensor or a tuple of tensors (``model(*inputs)``), batch on
    dim 0; ``targets`` a tensor, a tuple (``loss_fn(out, *targets)``) or None
    (``loss_fn(out)``). A mismatch in float32/16 is re-run in float64 before it
    is called a bug: ``rtol``/``atol`` are the working dtype's tolerances, and the
    re-check keeps float64's own (1e-7, 0) unless ``rtol_float64``/``atol_float64``
    are given. Under pytest, an option not passed comes from the running test's
    ``gradequiv`` marker, then the command line and the ini file. Dropout modules are switched off for the check. The model's
    parameters, ``.grad``, buffers, train/eval modes and the global RNG are left
    as found.

    ``broadcast``: ``"warn"`` (default) warns about an implicit broadcast in the
    loss call when gradients agree, ``"error"`` fails the check on one, ``"off"``
    does not watch. ``reference``: ``"auto"`` (vmap, falling back to a loop),
    ``"vmap"`` or ``"loop"``. ``per_sample=True`` puts the tool's per-sample
    gradients on the report, pass or fail: ``report.per_sample_gradients``,
    ``{name: (B, *shape)}`` (each sample's loss, the sample run alone).
    ``chunk_size=n`` runs the per-sample reference n samples at a time (one vmap
    call and one backward per chunk, the chunks' gradients summed): its activations
    are those of n samples rather than of the whole batch, for large batches; the
    report states it. By default the whole batch is one chunk.

    Returns a :class:`~pytest_gradcheck.report.GradEquivReport`; raises
    :class:`~pytest_gradcheck.errors.GradEquivError` on mismatch and
    :class:`~pytest_gradcheck.errors.InvalidArgument` on input it cannot check.

    >>> import torch, torch.nn.functional as F
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
    >>> assert_gradequiv(model, F.mse_loss, x, y).matched
    'mean'
    >>> def sum_loss(out, y):
    ...     return ((out - y) ** 2).sum()
    >>> assert_gradequiv(model, sum_loss, x, y, reduction="auto").matched
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
            "per_sample": per_sample,
            "chunk_size": chunk_size,
        }
    )
    inputs_t, targets_t, targets_is_tuple = loss_call_arguments(model, loss_fn, inputs, targets)
    loss_modules = [loss_fn] if isinstance(loss_fn, torch.nn.Module) else []
    build = loss_step_builder(loss_fn, has_targets=bool(targets_t), targets_is_tuple=targets_is_tuple)

    def sample_targets(i: int) -> Any:
        ys = tuple(t[i : i + 1] for t in targets_t)
        return ys if targets_is_tuple else (ys[0] if ys else None)

    def candidates() -> list[tuple[str, np.ndarray]]:
        return ignore_index_candidates(loss_fn, targets_t)

    problem = TorchProblem(
        model,
        build,
        (inputs_t, targets_t),
        reference=opts["reference"],
        chunk_size=opts["chunk_size"],
        watch_broadcast=opts["broadcast"] != "off",
        extra_modules=loss_modules,
        weight_candidates=candidates,
    )
    return _execute(problem, opts, weights, sample_targets)


@takes_test_defaults("step")
def assert_gradequiv_step(
    step_fn: Callable[[torch.nn.Module, Any], Any],
    model: torch.nn.Module,
    batch: Any,
    *,
    reduction: str = "mean",
    weights: WeightsArg = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    rtol_float64: Optional[float] = None,
    atol_float64: Optional[float] = None,
    reference: str = "auto",
    float64_recheck: bool = True,
    per_sample: bool = False,
    chunk_size: Optional[int] = None,
) -> GradEquivReport:
    """The general form of :func:`assert_gradequiv` for any training step.

    ``step_fn(model, batch)`` returns the loss (a scalar tensor, or a mapping
    with a ``"loss"`` entry, as a Lightning ``training_step`` may return).
    ``batch`` is any nesting of tuples, lists and dicts whose tensors carry the
    batch on dim 0; non-tensor leaves are passed unchanged to every call. Each
    sample is run alone as ``step_fn(model, batch_of_one)``. ``weights`` may be
    a callable on one sample's batch (a batch of one).

    The whole step is watched for implicit broadcasts; one that was recorded is
    named as a cause when the gradients disagree (there is no warning when they
    agree: a model may broadcast both operands on purpose). Tensors the step
    stores outside itself during the per-sample ``vmap`` run (``logged.append(
    loss.detach())``) belong to vmap and must not be used afterwards; pass
    ``reference="loop"`` if the step's side effects must stay usable.

    >>> import torch, torch.nn.functional as F
    >>> model = torch.nn.Linear(3, 1)
    >>> def training_step(m, batch):
    ...     return {"loss": F.mse_loss(m(batch["x"]), batch["y"]), "log": {"n": 1}}
    >>> batch = {"x": torch.randn(6, 3), "y": torch.randn(6, 1)}
    >>> assert_gradequiv_step(training_step, model, batch).passed
    True
    """
    __tracebackhide__ = True
    opts = validate_options(
        {
            "reduction": reduction,
            "rtol": rtol,
            "atol": atol,
            "rtol_float64": rtol_float64,
            "atol_float64": atol_float64,
            "reference": reference,
            "float64_recheck": float64_recheck,
            "per_sample": per_sample,
            "chunk_size": chunk_size,
        }
    )
    check_model(model)
    if not callable(step_fn):
        raise InvalidArgument(f"step_fn must be callable, got {type(step_fn).__name__}")

    def build(record: Optional[list[Any]], float64: bool) -> Callable[[torch.nn.Module, Any], Any]:
        if record is None:
            return step_fn

        def watched(m: torch.nn.Module, b: Any) -> Any:
            with loss_guard(record, problem.batch_size):
                return step_fn(m, b)

        return watched

    def candidates() -> list[tuple[str, np.ndarray]]:
        leaves, _ = pytree.tree_flatten(batch)
        return ignore_index_candidates(None, [x for x in leaves if isinstance(x, torch.Tensor)])

    problem = TorchProblem(
        model,
        build,
        batch,
        reference=opts["reference"],
        chunk_size=opts["chunk_size"],
        watch_broadcast=True,
        allow_non_tensor=True,
        weight_candidates=candidates,
        broadcast_scope="the training step",
    )

    def sample_batch(i: int) -> Any:
        return problem.sample(i)

    # The whole step is watched, model included, where broadcasting both operands
    # can be intended (positional encodings, outer products): a recorded broadcast
    # is stated as a cause when the gradients disagree, never warned about otherwise.
    opts["broadcast"] = "off"
    return _execute(problem, opts, weights, sample_batch, check="step")


# --------------------------------------------------------------------------- driver


def _execute(
    problem: "TorchProblem",
    opts: Mapping[str, Any],
    weights: WeightsArg,
    sample_of: Callable[[int], Any],
    check: str = "per-sample",
) -> GradEquivReport:
    __tracebackhide__ = True
    w = resolve_weights(weights, problem.batch_size, sample_of)
    with problem.prepared():
        # on request, the tool's own per-sample gradients ride on the report, pass or fail
        per_sample = problem.per_sample_tensors() if opts.get("per_sample") else None
        try:
            report = run_check(
                problem,
                reduction=opts["reduction"],
                weights=w,
                **verdict_options(opts),
                check=check,
            )
        except GradEquivError as err:
            err.report.per_sample_gradients = per_sample
            raise
    report.per_sample_gradients = per_sample
    if report.broadcasts:
        from .broadcast import emit_after_check

        emit_after_check(report, opts["broadcast"], where="the loss")
    return report


# --------------------------------------------------------------------------- validation


# --------------------------------------------------------------------------- the torch problem


# --------------------------------------------------------------------------- model inspection
