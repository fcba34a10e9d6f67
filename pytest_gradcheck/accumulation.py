"""Gradient accumulation: k micro-batches, accumulated, give the full-batch gradient.

The check runs the full batch once (one forward, one backward) and each
micro-batch alone (k forwards, one backward of their weighted sum), then hands
both to the shared verdict path (:func:`pytest_gradcheck.verdict.run_check`
with ``check="accumulation"``): the "samples" of the comparison are the
micro-batches. The reference is

    sum_k w_k * grad(L_k) / sum_k w_k

with ``L_k`` the loss of micro-batch ``k`` run alone and ``w_k`` its weight:
its number of samples by default, or ``weights(micro_targets)``, e.g. its
number of non-ignored tokens for a token-normalised language-model loss.

Micro-batches follow :func:`torch.tensor_split`: ``micro_batches=k`` splits B
samples into k contiguous micro-batches, the first ``B % k`` of them one sample
larger (B=10, k=4 gives sizes 3, 3, 2, 2). Pass a list of sizes instead to
choose the split, e.g. ``micro_batches=[4, 4, 2]`` for a data loader whose last
micro-batch is short.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ._options import check_batch_sizes, takes_test_defaults, validate_options
from ._torch.inputs import (
    batch_size_of,
    check_model,
    leaf_paths,
    loss_call_arguments,
    non_ignored_counts,
    shifted_label,
)
from ._torch.loss import as_scalar_loss, loss_step_builder
from ._torch.problem import TorchProblem
from .diagnosis import IGNORE_INDEX
from .errors import GradEquivError, InvalidArgument, first_line
from .report import GradEquivReport
from .verdict import run_check, verdict_options

__all__ = ["assert_accumulation_equiv", "assert_accumulation_equiv_step", "split_sizes"]

TensorOrTuple = Union[torch.Tensor, Sequence[torch.Tensor]]
MicroBatches = Union[int, Sequence[int]]
MicroWeights = Union[None, torch.Tensor, Sequence[float], np.ndarray, Callable[[Any], Any]]


# --------------------------------------------------------------------------- public API


@takes_test_defaults("accumulation")
def assert_accumulation_equiv(
    model: torch.nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    inputs: TensorOrTuple,
    targets: Optional[TensorOrTuple] = None,
    *,
    micro_batches: MicroBatches,
    weights: MicroWeights = None,
    reduction: str = "mean",
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    rtol_float64: Optional[float] = None,
    atol_float64: Optional[float] = None,
    broadcast: str = "warn",
    float64_recheck: bool = True,
) -> GradEquivReport:
    """Assert that accumulating ``micro_batches`` micro-batch gradients gives the full-batch gradient.

    The gradient of ``loss_fn(model(*inputs), targets)`` on the whole batch is
    compared, parameter by parameter, with ``sum_k w_k grad(L_k) / sum_k w_k``,
    where ``L_k`` is the same loss on micro-batch ``k`` run alone.

    ``micro_batches``: the number k of micro-batches (``1 <= k <= B``, split
    like :func:`torch.tensor_split`: contiguous, the first ``B % k`` one sample
    larger), or a list of micro-batch sizes that sum to B. ``weights``: how the
    micro-batches are combined: ``None`` (default) weighs each by its number of
    samples, which is right for a per-sample mean loss; a callable
    ``weights(micro_targets)`` returns one micro-batch's weight, e.g.
    ``lambda t: (t != -100).sum()`` for a loss averaged over non-ignored tokens;
    or a sequence of k numbers. Plain "mean of micro-batch means" is
    ``weights=[1] * k``. With ``reduction="sum"`` (a summed loss) the reference
    is ``sum_k w_k grad(L_k)`` and the default weights are 1.

    A float32 mismatch is re-run in float64 before it is called a bug; on a
    mismatch the report says which weighting would have matched (the sample
    count, the count of non-ignored integer targets, equal weights, or a
    factor). ``broadcast`` works as in :func:`~pytest_gradcheck.assert_gradequiv`.
    Dropout is switched off; the model's parameters, ``.grad``, buffers,
    train/eval modes and the global RNG are left as found.

    Returns a :class:`~pytest_gradcheck.report.GradEquivReport` (``check ==
    "accumulation"``, ``batch_size`` is the number of micro-batches); raises
    :class:`~pytest_gradcheck.errors.GradEquivError` on mismatch and
    :class:`~pytest_gradcheck.errors.InvalidArgument` on input it cannot check.

    >>> import torch, torch.nn.functional as F
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> x, y = torch.randn(10, 3), torch.randn(10, 1)
    >>> assert_accumulation_equiv(model, F.mse_loss, x, y, micro_batches=4).matched  # sizes 3, 3, 2, 2
    'weighted mean'
    >>> try:  # the plain mean of the four micro-batch means is not the full-batch mean
    ...     assert_accumulation_equiv(model, F.mse_loss, x, y, micro_batches=4, weights=[1, 1, 1, 1])
    ... except GradEquivError as err:
    ...     print(err.report.would_match)
    mean weighted by their number of samples
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
            "float64_recheck": float64_recheck,
        }
    )
    inputs_t, targets_t, targets_is_tuple = loss_call_arguments(model, loss_fn, inputs, targets)
    named = [(f"inputs[{k}]" if isinstance(inputs, (tuple, list)) else "inputs", t) for k, t in enumerate(inputs_t)]
    named += [(f"targets[{k}]" if targets_is_tuple else "targets", t) for k, t in enumerate(targets_t)]
    b = _named_batch_size(named)
    sizes = split_sizes(micro_batches, b)
    loss_modules = [loss_fn] if isinstance(loss_fn, torch.nn.Module) else []
    build = loss_step_builder(loss_fn, has_targets=bool(targets_t), targets_is_tuple=targets_is_tuple)

    bounds = _bounds(sizes)

    def micro_targets(k: int) -> Any:
        if not targets_t:
            raise InvalidArgument("weights is a callable on the micro-batch targets, but targets is None")
        start, stop = bounds[k]
        ys = tuple(t[start:stop] for t in targets_t)
        return ys if targets_is_tuple else ys[0]

    ignore = getattr(loss_fn, "ignore_index", IGNORE_INDEX)

    def candidates() -> list[tuple[str, np.ndarray]]:
        named = [(f"their number of non-ignored targets (targets != {ignore})", t) for t in targets_t]
        return _micro_candidates(sizes, bounds, named, ignore)

    problem = MicroBatchProblem(
        model,
        build,
        (inputs_t, targets_t),
        sizes,
        watch_broadcast=opts["broadcast"] != "off",
        allow_non_tensor=False,
        extra_modules=loss_modules,
        weight_candidates=candidates,
    )
    return _run(problem, opts, weights, micro_targets, "weights(micro_targets)")


@takes_test_defaults("accumulation")
def assert_accumulation_equiv_step(
    step_fn: Callable[[torch.nn.Module, Any], Any],
    model: torch.nn.Module,
    batch: Any,
    *,
    micro_batches: MicroBatches,
    weights: MicroWeights = None,
    reduction: str = "mean",
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    rtol_float64: Optional[float] = None,
    atol_float64: Optional[float] = None,
    float64_recheck: bool = True,
) -> GradEquivReport:
    """The training-step form of :func:`assert_accumulation_equiv`.

    ``step_fn(model, batch)`` returns the loss (a scalar tensor, or a mapping
    with a ``"loss"`` entry); ``batch`` is any nesting of tuples, lists and
    dicts whose tensors carry the batch on dim 0 (non-tensor leaves are passed
    unchanged). Each micro-batch is run as ``step_fn(model, micro_batch)``;
    ``weights`` may be a callable on a micro-batch (the same nesting, sliced).
    When the mismatch has an integer leaf holding ``-100`` (ignored labels),
    the diagnosis also tries weighting micro-batches by its other entries.

    >>> import torch, torch.nn.functional as F
    >>> model = torch.nn.Linear(3, 1)
    >>> def training_step(m, batch):
    ...     return {"loss": F.mse_loss(m(batch["x"]), batch["y"]), "log": {"epoch": 0}}
    >>> batch = {"x": torch.randn(8, 3), "y": torch.randn(8, 1)}
    >>> assert_accumulation_equiv_step(training_step, model, batch, micro_batches=2).passed
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
            "float64_recheck": float64_recheck,
        }
    )
    opts["broadcast"] = "off"
    check_model(model)
    if not callable(step_fn):
        raise InvalidArgument(f"step_fn must be callable, got {type(step_fn).__name__}")
    b = batch_size_of(batch, True)
    sizes = split_sizes(micro_batches, b)
    bounds = _bounds(sizes)

    def build(record: Optional[list[Any]], float64: bool) -> Callable[[torch.nn.Module, Any], Any]:
        return step_fn

    leaves, spec = pytree.tree_flatten(batch)
    paths = leaf_paths(batch)

    def micro(k: int) -> Any:
        start, stop = bounds[k]
        return pytree.tree_unflatten([x[start:stop] if isinstance(x, torch.Tensor) else x for x in leaves], spec)

    def candidates() -> list[tuple[str, np.ndarray]]:
        named = [(f"their number of entries != {IGNORE_INDEX} in {path}", leaf) for path, leaf in zip(paths, leaves)]
        return _micro_candidates(sizes, bounds, named, IGNORE_INDEX)

    problem = MicroBatchProblem(
        model,
        build,
        batch,
        sizes,
        watch_broadcast=False,
        allow_non_tensor=True,
        weight_candidates=candidates,
    )
    return _run(problem, opts, weights, micro, "weights(micro_batch)")


def split_sizes(micro_batches: MicroBatches, batch_size: int) -> list[int]:
    """The micro-batch sizes a check uses for ``micro_batches`` on a batch of ``batch_size``.

    An int k splits like :func:`torch.tensor_split` (the first ``B % k``
    micro-batches one sample larger); a sequence of sizes is validated.

    >>> split_sizes(4, 10)
    [3, 3, 2, 2]
    >>> split_sizes([4, 4, 2], 10)
    [4, 4, 2]
    >>> split_sizes(1, 10), split_sizes(10, 10) == [1] * 10
    ([10], True)
    """
    b = int(batch_size)
    if isinstance(micro_batches, bool):
        raise InvalidArgument(f"micro_batches={micro_batches!r}: expected an int >= 1 or a list of sizes")
    if isinstance(micro_batches, (int, np.integer)):
        k = int(micro_batches)
        if k < 1:
            raise InvalidArgument(
                f"micro_batches={k}: expected at least 1 micro-batch (an int k with 1 <= k <= {b}, "
                "or a list of micro-batch sizes)"
            )
        if k > b:
            raise InvalidArgument(
                f"micro_batches={k} is more than the batch has samples ({b}): every micro-batch "
                f"needs at least one sample, so use 1 <= micro_batches <= {b}"
            )
        q, r = divmod(b, k)
        return [q + 1] * r + [q] * (k - r)
    if isinstance(micro_batches, (list, tuple)):
        sizes = list(micro_batches)
        if not sizes:
            raise InvalidArgument("micro_batches=[]: give at least one micro-batch size")
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
                raise InvalidArgument(f"micro_batches={sizes!r}: every micro-batch size must be an int >= 1, got {s!r}")
        if sum(sizes) != b:
            raise InvalidArgument(
                f"micro_batches={sizes!r} adds up to {sum(sizes)} samples but the batch has {b}: the "
                "sizes must cover the batch exactly"
            )
        return [int(s) for s in sizes]
    raise InvalidArgument(
        f"micro_batches={micro_batches!r}: expected an int (the number of micro-batches) or a list of micro-batch sizes"
    )


# --------------------------------------------------------------------------- helpers


def _bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


def _is_integer(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _valid_counts(t: torch.Tensor, bounds: Sequence[tuple[int, int]], ignore: int, shift: bool = False) -> np.ndarray:
    valid = non_ignored_counts(t, ignore, shift)
    return np.asarray([float(valid[a:b].sum()) for a, b in bounds], dtype=np.float64)


def _token_candidates(
    t: torch.Tensor, bounds: Sequence[tuple[int, int]], ignore: int, label: str
) -> list[tuple[str, np.ndarray]]:
    """Per micro-batch: its non-ignored targets, and for (B, T) labels the same count after
    the one-token shift a causal language model applies inside the model."""
    out = [(label, _valid_counts(t, bounds, ignore))]
    if t.dim() == 2 and t.shape[1] > 1:
        out.append((shifted_label(ignore), _valid_counts(t, bounds, ignore, shift=True)))
    return out


def _micro_candidates(
    sizes: Sequence[int], bounds: Sequence[tuple[int, int]], named: Sequence[tuple[str, Any]], ignore: int
) -> list[tuple[str, np.ndarray]]:
    """Weightings of micro-batches worth naming: their sizes, equal weights, and for every integer
    tensor holding ``ignore`` its non-ignored entries per micro-batch (also after a causal shift)."""
    out = _count_candidates(sizes)
    for label, t in named:
        if isinstance(t, torch.Tensor) and _is_integer(t) and t.dim() >= 1 and bool((t == ignore).any()):
            out[1:1] = _token_candidates(t, bounds, ignore, label)
    return out


def _count_candidates(sizes: Sequence[int]) -> list[tuple[str, np.ndarray]]:
    return [
        ("their number of samples", np.asarray(sizes, dtype=np.float64)),
        ("equal weights (a plain mean of micro-batch losses)", np.ones(len(sizes), dtype=np.float64)),
    ]


def _named_batch_size(named: Sequence[tuple[str, torch.Tensor]]) -> int:
    for name, t in named:
        if t.dim() == 0:
            raise InvalidArgument(f"{name} is a 0-d tensor: every tensor needs the batch on dim 0")
    return check_batch_sizes([(f"{name} (shape {tuple(t.shape)})", int(t.shape[0])) for name, t in named])


def _resolve_weights(
    weights: MicroWeights,
    sizes: Sequence[int],
    reduction: str,
    micro_of: Callable[[int], Any],
    call_name: str,
) -> tuple[Optional[np.ndarray], Optional[str]]:
    """The micro-batch weights (None: all equal) and a note saying what they are."""
    k = len(sizes)
    if weights is None:
        if reduction == "sum" or len(set(sizes)) == 1:
            return None, None
        w = np.asarray(sizes, dtype=np.float64)
        return w, f"micro-batches are weighted by their number of samples {sizes} (the default)"
    if callable(weights) and not isinstance(weights, (torch.Tensor, np.ndarray)):
        values = []
        for i in range(k):
            try:
                v = weights(micro_of(i))
            except InvalidArgument:
                raise
            except Exception as exc:
                raise InvalidArgument(
                    f"{call_name} raised {type(exc).__name__} on micro-batch {i}: {first_line(exc)}"
                ) from exc
            try:
                values.append(float(v.detach().cpu()) if isinstance(v, torch.Tensor) else float(v))
            except (TypeError, ValueError, RuntimeError) as exc:
                raise InvalidArgument(
                    f"{call_name} returned {type(v).__name__} for micro-batch {i}, not one number"
                ) from exc
        w = np.asarray(values, dtype=np.float64)
    else:
        if isinstance(weights, torch.Tensor):
            w = weights.detach().to("cpu", torch.float64).numpy().reshape(-1)
        else:
            try:
                w = np.asarray(weights, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(
                    f"weights={weights!r}: expected a callable, or {k} numbers (one per micro-batch)"
                ) from exc
        if w.shape != (k,):
            raise InvalidArgument(
                f"weights has {w.size} entries: expected one weight per micro-batch ({k}), or a callable "
                "on a micro-batch's targets"
            )
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InvalidArgument(f"micro-batch weights must be finite and >= 0, got {w.tolist()[:8]}")
    if w.sum() <= 0:
        raise InvalidArgument("micro-batch weights sum to 0: at least one micro-batch must count")
    return w, f"micro-batch weights: {[round(float(x), 6) for x in w]}"


def _run(
    problem: "MicroBatchProblem",
    opts: dict[str, Any],
    weights: MicroWeights,
    micro_of: Callable[[int], Any],
    call_name: str,
) -> GradEquivReport:
    __tracebackhide__ = True
    w, weight_note = _resolve_weights(weights, problem.sizes, opts["reduction"], micro_of, call_name)
    notes = [problem.split_note()]
    if weight_note:
        notes.append(weight_note)
    with problem.prepared():
        report = run_check(
            problem,
            reduction=opts["reduction"],
            weights=w,
            **verdict_options(opts),
            check="accumulation",
            notes=notes,
        )
    if report.broadcasts:
        from .broadcast import emit_after_check

        emit_after_check(report, opts["broadcast"], where="the loss")
    return report


# --------------------------------------------------------------------------- the problem


class MicroBatchProblem(TorchProblem):
    """A :class:`~pytest_gradcheck.verdict.GradientProblem` whose "samples" are micro-batches.

    The batch gradient is the full batch's (inherited); the reference runs each
    micro-batch alone through the whole step and accumulates their losses with
    the given coefficients before one backward.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        build_step: Callable[[Optional[list[Any]], bool], Callable[[torch.nn.Module, Any], Any]],
        batch: Any,
        sizes: Sequence[int],
        *,
        watch_broadcast: bool,
        allow_non_tensor: bool,
        extra_modules: Sequence[torch.nn.Module] = (),
        weight_candidates: Optional[Callable[[], list[tuple[str, np.ndarray]]]] = None,
    ) -> None:
        self.sizes = list(sizes)
        self.bounds = _bounds(self.sizes)
        super().__init__(
            model,
            build_step,
            batch,
            reference="loop",
            watch_broadcast=watch_broadcast,
            allow_non_tensor=allow_non_tensor,
            extra_modules=extra_modules,
            weight_candidates=weight_candidates,
        )
        self.reference_method = "micro-batches"

    def _unit_count(self) -> int:
        return len(self.sizes)  # the units are micro-batches

    def split_note(self) -> str:
        k = len(self.sizes)
        ranges = ", ".join(f"{a}:{b}" for a, b in self.bounds[:8]) + (", ..." if k > 8 else "")
        sizes = self.sizes if k <= 16 else f"{self.sizes[:16]}..."
        return (
            f"{self.n_samples} samples split into {k} micro-batch{'es' if k != 1 else ''} of sizes "
            f"{sizes} (samples {ranges}; torch.tensor_split order)"
        )

    def sample(self, i: int) -> Any:
        """Micro-batch ``i``."""
        return self._slice(self._leaves, *self.bounds[i])

    def _loss_of(
        self, state: Optional[dict[str, Any]], step: Callable[..., Any], float64: bool
    ) -> Callable[[int], torch.Tensor]:
        leaves = self._batch_leaves(float64)
        return lambda k: self._micro_loss(state, leaves, step, k)

    def _micro_loss(
        self, state: Optional[dict[str, Any]], leaves: list[Any], step: Callable[..., Any], k: int
    ) -> torch.Tensor:
        start, stop = self.bounds[k]
        try:
            micro = self._slice(leaves, start, stop)
            loss = as_scalar_loss(self._call(state, micro, step), where=f"micro-batch {k}")
        except (InvalidArgument, GradEquivError):
            raise
        except Exception as exc:
            raise InvalidArgument(
                f"the step failed on micro-batch {k} (samples {start}:{stop}, {stop - start} sample"
                f"{'s' if stop - start != 1 else ''}): {type(exc).__name__}: {first_line(exc)}"
            ) from exc
        if not bool(torch.isfinite(loss.detach())):
            raise InvalidArgument(
                f"the loss of micro-batch {k} (samples {start}:{stop}) is {float(loss.detach())}: a "
                "micro-batch whose targets are all ignored (e.g. all -100) has no mean loss; choose "
                "micro_batches so that every micro-batch has at least one counted target"
            )
        return loss

    def reference_gradient(self, coeffs: np.ndarray, float64: bool) -> dict[str, torch.Tensor]:
        step = self.build_step(None, float64)
        with self._precision(float64):
            state, params = self._state(float64)
            loss_of = self._loss_of(state, step, float64)
            losses = [loss_of(k) for k in range(self.batch_size)]
            c = torch.as_tensor(coeffs, dtype=losses[0].dtype, device=losses[0].device)
            total = losses[0] * c[0]
            for k in range(1, len(losses)):
                total = total + losses[k] * c[k]
            grads = torch.autograd.grad(total, params, allow_unused=True)
        self._keep_losses(torch.stack([loss.detach() for loss in losses]))
        return self._named(grads, params)
