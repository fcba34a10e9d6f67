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

import contextlib
import copy
import numbers
import re
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ._options import check_batch_sizes, validate_options
from ._torch.randomness import DropoutOff, NeutralDropout, Watch
from ._torch.state import SavedState, disable_dropout_modules
from .errors import GradCheckError, GradEquivError, InvalidArgument, UnsupportedModelError
from .report import GradEquivReport
from .verdict import FlatGrads, run_check

__all__ = ["assert_gradequiv", "assert_gradequiv_step"]

TensorOrTuple = Union[torch.Tensor, Sequence[torch.Tensor]]
WeightsArg = Union[None, torch.Tensor, Sequence[float], np.ndarray, Callable[[Any], Any]]
_NamedModules = Sequence[tuple[str, torch.nn.Module]]  # model.named_modules(), walked once

_LOOP_CHUNK = 32


# --------------------------------------------------------------------------- public API


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
    broadcast: str = "warn",
    reference: str = "auto",
    float64_recheck: bool = True,
    per_sample: bool = False,
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
    is called a bug. Dropout modules are switched off for the check. The model's
    parameters, ``.grad``, buffers, train/eval modes and the global RNG are left
    as found.

    ``broadcast``: ``"warn"`` (default) warns about an implicit broadcast in the
    loss call when gradients agree, ``"error"`` fails the check on one, ``"off"``
    does not watch. ``reference``: ``"auto"`` (vmap, falling back to a loop),
    ``"vmap"`` or ``"loop"``. ``per_sample=True`` puts the tool's per-sample
    gradients on the report, pass or fail: ``report.per_sample_gradients``,
    ``{name: (B, *shape)}`` (each sample's loss, the sample run alone).

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
            "broadcast": broadcast,
            "reference": reference,
            "float64_recheck": float64_recheck,
            "per_sample": per_sample,
        }
    )
    inputs_t, targets_t, targets_is_tuple = loss_call_arguments(model, loss_fn, inputs, targets)
    loss_modules = [loss_fn] if isinstance(loss_fn, torch.nn.Module) else []
    build = loss_step_builder(loss_fn, has_targets=bool(targets_t), targets_is_tuple=targets_is_tuple)

    def sample_targets(i: int) -> Any:
        ys = tuple(t[i : i + 1] for t in targets_t)
        return ys if targets_is_tuple else (ys[0] if ys else None)

    def candidates() -> list[tuple[str, np.ndarray]]:
        return _ignore_index_candidates(loss_fn, targets_t)

    problem = _TorchProblem(
        model,
        build,
        (inputs_t, targets_t),
        reference=opts["reference"],
        watch_broadcast=opts["broadcast"] != "off",
        extra_modules=loss_modules,
        weight_candidates=candidates,
    )
    return _execute(problem, opts, weights, sample_targets)


def assert_gradequiv_step(
    step_fn: Callable[[torch.nn.Module, Any], Any],
    model: torch.nn.Module,
    batch: Any,
    *,
    reduction: str = "mean",
    weights: WeightsArg = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    reference: str = "auto",
    float64_recheck: bool = True,
    per_sample: bool = False,
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
            "reference": reference,
            "float64_recheck": float64_recheck,
            "per_sample": per_sample,
        }
    )
    _check_model(model)
    if not callable(step_fn):
        raise InvalidArgument(f"step_fn must be callable, got {type(step_fn).__name__}")

    def build(record: Optional[list], float64: bool) -> Callable[[torch.nn.Module, Any], Any]:
        if record is None:
            return step_fn

        def watched(m: torch.nn.Module, b: Any) -> Any:
            with _loss_guard(record, problem.batch_size):
                return step_fn(m, b)

        return watched

    def candidates() -> list[tuple[str, np.ndarray]]:
        leaves, _ = pytree.tree_flatten(batch)
        return _ignore_index_candidates(None, [x for x in leaves if isinstance(x, torch.Tensor)])

    problem = _TorchProblem(
        model,
        build,
        batch,
        reference=opts["reference"],
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
    return _execute(problem, opts, weights, sample_batch)


# --------------------------------------------------------------------------- driver


def _execute(
    problem: "_TorchProblem", opts: Mapping[str, Any], weights: WeightsArg, sample_of: Callable[[int], Any]
) -> GradEquivReport:
    __tracebackhide__ = True
    w = _resolve_weights(weights, problem.batch_size, sample_of)
    with problem.prepared():
        # on request, the tool's own per-sample gradients ride on the report, pass or fail
        per_sample = problem.per_sample_tensors() if opts.get("per_sample") else None
        try:
            report = run_check(
                problem,
                reduction=opts["reduction"],
                weights=w,
                rtol=opts["rtol"],
                atol=opts["atol"],
                float64_recheck=opts["float64_recheck"],
            )
        except GradEquivError as err:
            err.report.per_sample_gradients = per_sample
            raise
    report.per_sample_gradients = per_sample
    if report.broadcasts:
        from .broadcast import emit_after_check

        emit_after_check(report, opts["broadcast"], where="the loss")
    return report


def loss_call_arguments(
    model: Any, loss_fn: Any, inputs: Any, targets: Any
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], bool]:
    """Validate the ``(model, loss_fn, inputs, targets)`` form; return the tensors as tuples.

    Returns ``(inputs, targets, targets_is_tuple)``; ``targets`` is ``()`` for None.
    """
    _check_model(model)
    if isinstance(loss_fn, type) and issubclass(loss_fn, torch.nn.Module):
        name = _class_name(loss_fn)
        raise InvalidArgument(f"loss_fn is the class {name}; pass an instance: {name}()")
    if not callable(loss_fn):
        raise InvalidArgument(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    inputs_t = _as_tensor_tuple(inputs, "inputs")
    targets_is_tuple = isinstance(targets, (tuple, list))
    targets_t = () if targets is None else _as_tensor_tuple(targets, "targets")
    _check_loss_form_batch(inputs_t, targets_t, loss_form_paths(inputs, targets))
    return inputs_t, targets_t, targets_is_tuple


def loss_form_paths(inputs: Any, targets: Any) -> list[str]:
    """The names of the tensors of ``(inputs, targets)`` as the user passed them, in order:
    ``inputs`` or ``inputs[i]``, then ``targets`` or ``targets[i]``."""
    out = [f"inputs[{i}]" for i in range(len(inputs))] if isinstance(inputs, (tuple, list)) else ["inputs"]
    if isinstance(targets, (tuple, list)):
        out += [f"targets[{i}]" for i in range(len(targets))]
    elif targets is not None:
        out.append("targets")
    return out


def _check_loss_form_batch(
    inputs_t: Sequence[torch.Tensor], targets_t: Sequence[torch.Tensor], paths: Sequence[str]
) -> None:
    """The batch sizes of ``inputs``/``targets``, checked with the names the user knows them by."""
    tensors = [*inputs_t, *targets_t]
    if all(t.dim() > 0 for t in tensors) and len({int(t.shape[0]) for t in tensors}) == 1 and tensors[0].shape[0] >= 2:
        return  # the common case, without building the descriptions an error message needs
    sizes = []
    for path, t in zip(paths, tensors):
        if t.dim() == 0:
            raise InvalidArgument(_zero_dim_message(path))
        sizes.append((_describe_leaf(path, t), int(t.shape[0])))
    check_batch_sizes(sizes)


def loss_step_builder(
    loss_fn: Callable[..., Any], *, has_targets: bool, targets_is_tuple: bool
) -> Callable[[Optional[list], bool], Callable[[torch.nn.Module, Any], Any]]:
    """The step ``loss_fn(model(*inputs), targets)`` over a batch ``(inputs, targets)``.

    ``build(record, float64)`` returns the step; with ``record`` (a list) the
    broadcast guard records around the loss call only, never the model's
    forward; with ``float64`` a loss module is run on a float64 copy.
    """

    def build(record: Optional[list], float64: bool) -> Callable[[torch.nn.Module, Any], Any]:
        fn = loss_fn
        if float64 and isinstance(loss_fn, torch.nn.Module):
            fn = copy.deepcopy(loss_fn).to(torch.float64)

        def step(m: torch.nn.Module, batch: Any) -> Any:
            xs, ys = batch
            out = m(*xs)
            with _loss_guard(record, xs[0].shape[0]):
                if not has_targets:
                    return fn(out)
                if targets_is_tuple:
                    return fn(out, *ys)
                return fn(out, ys[0])

        return step

    return build


@contextlib.contextmanager
def _loss_guard(record: Optional[list], batch_size: Optional[int] = None) -> Iterator[None]:
    if record is None:
        yield
        return
    from .broadcast import recording

    with recording(True, batch_size=batch_size) as records:
        yield
    record.extend(records)


# --------------------------------------------------------------------------- validation


def _check_model(model: Any) -> None:
    if isinstance(model, type) and issubclass(model, torch.nn.Module):
        name = _class_name(model)
        raise InvalidArgument(f"model is the class {name}; pass an instance: {name}(...)")
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgument(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _class_name(cls: type) -> str:
    """``nn.MSELoss`` for torch's own modules (as users write them), else the class's name."""
    if cls.__module__.startswith("torch.nn") and getattr(torch.nn, cls.__name__, None) is cls:
        return f"nn.{cls.__name__}"
    return cls.__name__


def _as_tensor_tuple(value: Any, name: str) -> tuple[torch.Tensor, ...]:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not items:
        raise InvalidArgument(f"{name} is empty: pass a tensor or a tuple of tensors with the batch on dim 0")
    for i, t in enumerate(items):
        label = f"{name}[{i}]" if isinstance(value, (tuple, list)) else name
        if not isinstance(t, torch.Tensor):
            raise InvalidArgument(
                f"{label} is a {type(t).__name__}, not a tensor: every entry of {name} must be a "
                "tensor with the batch on dim 0 (use assert_gradequiv_step for other arguments)"
            )
        if t.layout != torch.strided:
            raise InvalidArgument(_sparse_input_message(label, t))
    return items


def _zero_dim_message(path: str) -> str:
    return (
        f"{path} is a 0-d tensor (a single number): every tensor needs the batch on dim 0, one value "
        "per sample (shape (B, ...))"
    )


def _sparse_input_message(path: str, t: torch.Tensor) -> str:
    return (
        f"{path} is a sparse tensor (layout {t.layout}): the check slices every tensor into single "
        "samples and runs them through torch.func.vmap, which sparse tensors do not support; pass "
        f"{path}.to_dense() for the check"
    )


def _describe_leaf(path: str, t: torch.Tensor) -> str:
    return f"{path} (shape {tuple(t.shape)})"


def _batch_size(batch: Any, allow_non_tensor: bool, leaves: Optional[list] = None) -> int:
    if leaves is None:
        leaves, _ = pytree.tree_flatten(batch)
    # the common case, without building the leaf descriptions an error message needs
    if all(isinstance(x, torch.Tensor) and x.dim() > 0 and x.layout == torch.strided for x in leaves):
        sizes0 = {int(x.shape[0]) for x in leaves}
        if len(sizes0) == 1 and min(sizes0) >= 2:
            return sizes0.pop()
    paths = _leaf_paths(batch)
    sizes: list[tuple[str, int]] = []
    for path, leaf in zip(paths, leaves):
        if isinstance(leaf, torch.Tensor):
            if leaf.dim() == 0:
                raise InvalidArgument(_zero_dim_message(path))
            if leaf.layout != torch.strided:
                raise InvalidArgument(_sparse_input_message(path, leaf))
            sizes.append((_describe_leaf(path, leaf), int(leaf.shape[0])))
        elif not allow_non_tensor:
            raise InvalidArgument(f"{path} is a {type(leaf).__name__}, not a tensor")
    return check_batch_sizes(sizes)


def _leaf_paths(batch: Any) -> list[str]:
    """Readable paths of the leaves of ``batch``, in ``tree_flatten`` order."""
    # Batches built by assert_gradequiv are ((inputs...), (targets...)).
    out: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, (tuple, list)) and not isinstance(node, torch.Tensor):
            for i, child in enumerate(node):
                walk(child, f"{path}[{i}]")
        elif isinstance(node, dict):
            for k in sorted(node) if _sortable(node) else node:
                walk(node[k], f"{path}[{k!r}]")
        else:
            out.append(path or "batch")

    walk(batch, "batch")
    leaves, _ = pytree.tree_flatten(batch)
    if len(out) != len(leaves):  # exotic containers: fall back to indices
        return [f"batch leaf {i}" for i in range(len(leaves))]
    return out


def _sortable(d: dict) -> bool:
    try:
        sorted(d)
        return True
    except TypeError:
        return False


def _resolve_weights(weights: WeightsArg, b: int, sample_of: Callable[[int], Any]) -> Optional[np.ndarray]:
    if weights is None:
        return None
    if callable(weights) and not isinstance(weights, (torch.Tensor, np.ndarray)):
        w = np.asarray([_weight_of_sample(weights(sample_of(i)), i) for i in range(b)], dtype=np.float64)
    elif isinstance(weights, torch.Tensor):
        w = weights.detach().to("cpu", torch.float64).numpy()
    elif isinstance(weights, (np.ndarray, list, tuple, range)):
        try:
            w = np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(
                f"weights cannot be read as numbers ({type(exc).__name__}: {_first_line(exc)}): pass one "
                f"number per sample, shape ({b},)"
            ) from None
    else:
        raise InvalidArgument(
            f"weights is a {type(weights).__name__}: pass one number per sample (a tensor, array or "
            f"sequence of {b}), or a callable that returns the weight of one sample (a batch of one)"
        )
    if w.shape != (b,):
        raise InvalidArgument(
            f"weights has shape {tuple(w.shape)}: expected one weight per sample, ({b},): a 1-d tensor, "
            f"array or sequence of {b} numbers"
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InvalidArgument(f"weights must be finite and >= 0, got {w.tolist()[:8]}")
    if w.sum() <= 0:
        raise InvalidArgument("weights sum to 0: at least one sample must count")
    return w


def _weight_of_sample(value: Any, i: int) -> float:
    """The number a ``weights`` callable returned for sample ``i``, or a clear error."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value.detach().reshape(()).cpu())
    if isinstance(value, np.ndarray) and value.size == 1 and not np.iscomplexobj(value):
        return float(value.reshape(()))
    if isinstance(value, numbers.Real):
        return float(value)
    what = (
        f"a tensor of shape {tuple(value.shape)}"
        if isinstance(value, (torch.Tensor, np.ndarray))
        else f"a {type(value).__name__}"
    )
    raise InvalidArgument(
        f"weights(sample {i}) returned {what}: the weights callable must return one number per sample "
        "(it is called on one sample, a batch of one), e.g. (targets != -100).sum()"
    )


def _ignore_index_candidates(loss_fn: Any, targets: Sequence[torch.Tensor]) -> list[tuple[str, np.ndarray]]:
    """Per-sample weightings worth naming when a loss is not a plain mean/sum.

    For every integer target tensor: its number of non-ignored entries per sample
    (``ignore_index`` of the loss, else -100), and for targets with a sequence
    dimension the same count after the one-position shift that causal language
    models apply inside the model (``labels[:, 1:]``).
    """
    out: list[tuple[str, np.ndarray]] = []
    ignore = getattr(loss_fn, "ignore_index", -100)
    for t in targets:
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dim() < 1:
            continue
        if t.dtype == torch.bool:
            continue
        if t.dim() == 1:
            kept = (t != ignore).to("cpu", torch.float64).numpy()
            if kept.all():
                continue  # every sample counts: the plain mean
            out.append(
                (
                    f"whether their target is counted (a mean over the {int(kept.sum())} of {kept.size} "
                    f"samples whose target is not ignore_index={ignore}; ignored samples weigh 0)",
                    kept,
                )
            )
            continue
        out.append((f"their number of non-ignored targets (targets != {ignore})", non_ignored_counts(t, ignore)))
        if t.dim() == 2 and t.shape[1] > 1:
            out.append((shifted_label(ignore), non_ignored_counts(t, ignore, shift=True)))
    return out


def shifted_label(ignore: int) -> str:
    return (
        "their number of non-ignored targets after the one-token shift a causal language model "
        f"applies to its labels (labels[:, 1:] != {ignore})"
    )


def non_ignored_counts(t: torch.Tensor, ignore: int, shift: bool = False) -> np.ndarray:
    """Per sample: how many entries of ``t`` are not ``ignore`` (after dropping the first
    position of dim 1, as a causal language model does with its labels, if ``shift``)."""
    if shift:
        t = t[:, 1:]
    return (t != ignore).reshape(t.shape[0], -1).sum(dim=1).to("cpu", torch.float64).numpy()


# --------------------------------------------------------------------------- the torch problem


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class _StepModule(torch.nn.Module):
    """Wraps the user's model so that ``functional_call`` can run any step function."""

    def __init__(self, model: torch.nn.Module, step: Callable[[torch.nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_step", step)

    def forward(self, batch: Any) -> Any:  # noqa: D401
        return self._step(self.model, batch)


class _TorchProblem:
    """One check on a torch model, as :func:`pytest_gradcheck.verdict.run_check` drives it."""

    backend = "torch"

    def __init__(
        self,
        model: torch.nn.Module,
        build_step: Callable[[Optional[list], bool], Callable[[torch.nn.Module, Any], Any]],
        batch: Any,
        *,
        reference: str = "auto",
        watch_broadcast: bool = True,
        allow_non_tensor: bool = False,
        extra_modules: Sequence[torch.nn.Module] = (),
        weight_candidates: Optional[Callable[[], list[tuple[str, np.ndarray]]]] = None,
        broadcast_scope: str = "the loss",
    ) -> None:
        self.model = model
        self.broadcast_scope = broadcast_scope
        self.build_step = build_step
        self.batch = batch
        self._leaves, self._spec = pytree.tree_flatten(batch)
        self.batch_size = _batch_size(batch, allow_non_tensor, self._leaves)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise InvalidArgument(
                "the model has no parameter that requires grad: there is no gradient to check"
            )
        self.names = [n for n, _ in trainable]
        self.params = [p for _, p in trainable]
        first = self.params[0]
        self.dtype = _dtype_name(first.dtype)
        self.device = str(first.device)
        self._shapes = [tuple(p.shape) for p in self.params]
        # _to_numpy's fast path: every parameter on CPU, in float32 (or every one in float64)
        self._flat_np_dtype = np.float64 if first.dtype == torch.float64 else np.float32
        self._numpy_concat = all(
            p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) and p.dtype == first.dtype
            for p in self.params
        )
        self.method = reference
        self.reference_method = "loop" if reference == "loop" else "vmap"
        self.fallback_reason: Optional[str] = None
        self._dropout_modules: tuple[str, ...] = ()
        self._neutralised: list[str] = []  # dropout ops neutralised, e.g. "F.dropout(p=0.1)"
        self._saved: Optional[SavedState] = None  # while prepared()
        self._passes = 0
        self._touched: Optional[tuple[str, ...]] = None  # state the model writes in forward, once known
        self._vmap_randomness = "error"
        self._draws: list[Any] = []

        self.random_note: Optional[str] = None
        self.broadcasts: tuple[Any, ...] = ()
        self.watch_broadcast = watch_broadcast
        self.extra_modules = list(extra_modules)
        self._weight_candidates = weight_candidates
        self._copy_inputs = False
        self._modules = list(model.named_modules())  # walked once, for the checks below and dropout
        self._watch_ops = False  # every op watched (random ops named): once a check has failed
        self._off: Optional[DropoutOff] = None
        self.has_rnn = any(isinstance(m, torch.nn.RNNBase) for _, m in self._modules)
        # kept as tensors, read only by a diagnosis (loss_values): no device sync on a passing check
        self._batch_loss: dict[bool, torch.Tensor] = {}
        self._sample_losses: dict[bool, torch.Tensor] = {}
        _check_sample_mixing(model, self._modules)

    # -- set-up and tear-down -------------------------------------------------------------
    @contextlib.contextmanager
    def prepared(self) -> Iterator[None]:
        """Dropout off for the check; everything the check could disturb restored after."""
        saved = SavedState(self.model, self.extra_modules)
        self._saved = saved
        self._passes = 0
        self._touched = None
        off = self._off = DropoutOff().__enter__()  # dropout functions neutral for the whole check
        try:
            saved.set_aside_accumulators()
            self._dropout_modules = disable_dropout_modules(self.model, self._modules)
            yield
        finally:
            off.__exit__(None, None, None)
            self._saved = None
            saved.restore()

    @property
    def dropout_disabled(self) -> tuple[str, ...]:
        """Dropout modules, and dropout ops applied functionally, that the check switched off."""
        from torch.nn.modules.dropout import _DropoutNd

        # an nn.Dropout module's own F.dropout calls are named by the module's path
        rates = {f"(p={m.p:g})" for _, m in self._modules if isinstance(m, _DropoutNd) and m.training}
        seen = dict.fromkeys([*self._neutralised, *(self._off.neutralised if self._off is not None else ())])
        ops = [x for x in seen if not (x.startswith("F.") and x[x.index("(") :] in rates)]
        if not ops:
            return tuple(self._dropout_modules)
        return (*self._dropout_modules, f"{', '.join(ops)} (applied functionally, neutralised at the op)")

    def _begin_pass(self) -> None:
        """Start a run of the model from the state saved before the check.

        After the first run, the state is inspected once: a model that writes into it
        in forward (a running average, a counter, a metric, a cached tensor) is put back
        before every later run, and before every sample of a loop reference.
        """
        saved = self._saved
        if saved is None:
            return
        self._passes += 1
        if self._touched is None:
            if self._passes == 1:
                return  # the first run starts from the saved state itself
            self._touched = tuple(saved.touched())
        if self._touched:
            saved.reset()

    def _begin_unit(self) -> None:
        """Before each sample (micro-batch) of a loop: the saved state, if the model writes into it."""
        if self._touched and self._saved is not None:
            self._saved.reset()

    # -- inputs -----------------------------------------------------------------------------
    def _batch_leaves(self, float64: bool) -> list[Any]:
        """The batch's leaves as the model sees them, without letting it write into the user's tensors.

        Floating tensors are passed as detached aliases that require grad: an
        in-place write to one raises before it changes any data (the autograd
        leaf rule), and the check then retries with copies (``_copy_inputs``).
        ``autograd.grad`` w.r.t. the parameters does no work for these inputs.
        Other tensors (token ids, masks) are small and are copied.
        """

        def conv(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            y = x.detach()
            if float64 and y.is_floating_point():
                return y.to(torch.float64)
            if y.is_floating_point() and not self._copy_inputs:
                return y.requires_grad_(True)
            return y.clone()

        return [conv(x) for x in self._leaves]

    def _tree(self, leaves: Sequence[Any]) -> Any:
        """``leaves`` (in ``tree_flatten`` order) put back into the batch's structure."""
        return pytree.tree_unflatten(list(leaves), self._spec)

    def _slice(self, leaves: Sequence[Any], start: int, stop: int) -> Any:
        """Samples ``start:stop`` of ``leaves``, in the batch's structure."""
        return self._tree([x[start:stop] if isinstance(x, torch.Tensor) else x for x in leaves])

    def _one(self, leaves: Sequence[Any], i: int) -> Any:
        """Sample ``i`` of ``leaves`` as a batch of one, in the batch's structure (its own copy once the
        model is known to write into its inputs: slices of one tensor share its version counter)."""
        one = self._slice(leaves, i, i + 1)
        if self._copy_inputs:
            one = pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, one)
        return one

    def _loss_of(self, state: Optional[dict], step: Callable, float64: bool) -> Callable[[int], torch.Tensor]:
        """``i -> the scalar loss of unit i run alone`` (a unit is a sample here, a micro-batch
        in the accumulation check, which overrides this)."""
        leaves = self._batch_leaves(float64)
        return lambda i: _as_scalar_loss(self._call(state, self._one(leaves, i), step), where="per-sample")

    def _retrying_with_copies(self, run: Callable[[], Any]) -> Any:
        # The first run is the working-dtype batch run: only a failure there can be the
        # user's inputs against the model's parameters (a later float64 run casts both).
        first = not self.__dict__.get("_has_run", False)
        try:
            out = run()
        except Exception as exc:
            if self._copy_inputs or not _writes_into_input(exc):
                _raise_clear_error(exc, self._leaves, self.params, self._modules, first)
                raise
        else:
            self._has_run = True
            return out
        self._copy_inputs = True  # the model writes into its inputs: give it copies
        try:
            out = run()
        except Exception as exc:
            _raise_clear_error(exc, self._leaves, self.params, self._modules, first)
            raise
        self._has_run = True
        return out

    def sample(self, i: int) -> Any:
        """Sample ``i`` as a batch of one."""
        return self._one(self._leaves, i)

    # -- state: None (the module's own tensors) or a float64 copy -------------------------------
    def _state(self, float64: bool) -> tuple[Optional[dict[str, torch.Tensor]], list[torch.Tensor]]:
        if not float64:
            return None, self.params
        state: dict[str, torch.Tensor] = {}
        trainable = set(self.names)
        by_name: dict[str, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            t = p.detach().to(torch.float64) if p.is_floating_point() else p.detach()
            if name in trainable:
                t = t.clone().requires_grad_(True)
                by_name[name] = t
            state["model." + name] = t
        for name, buf in self.model.named_buffers():
            state["model." + name] = buf.detach().to(torch.float64) if buf.is_floating_point() else buf
        grads = [by_name[n] for n in self.names]
        return state, grads

    @contextlib.contextmanager
    def _precision(self, float64: bool, internal: bool = True) -> Iterator[None]:
        """Run in ``float64`` (default dtype too) or the working dtype.

        ``internal`` runs (the per-sample reference, the float64 re-check) do not
        repeat torch's own "Using a target size ..." warning: the user saw it once
        from the batch run, and the broadcast guard names the op and line better.
        """
        with warnings.catch_warnings():
            # vmap's "performance drop ... batching rule" notice is about our reference, not the user's code
            warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
            if internal:
                warnings.filterwarnings("ignore", message="Using a target size", category=UserWarning)
            with _default_dtype(float64), self._neutral_dropout():
                yield

    @contextlib.contextmanager
    def _neutral_dropout(self) -> Iterator[None]:
        """Dropout ops neutralised and random draws recorded (see pytest_gradcheck._torch.randomness).

        On the passing path the dropout functions are swapped for neutral ones
        (:class:`DropoutOff`, no cost per op); once a check fails, every op is watched
        (:class:`NeutralDropout`, ~1.5 us an op) so that random ops are named.
        """
        if not self._watch_ops:
            yield  # DropoutOff is on for the whole check (prepared())
            return
        with NeutralDropout() as nd:
            yield
        self._draws = nd.draws or []
        self._note_neutralised(nd.neutralised)

    def _note_neutralised(self, labels: Sequence[str]) -> None:
        for label in labels:
            if label not in self._neutralised:
                self._neutralised.append(label)

    def _call(self, state: Optional[dict], batch: Any, step: Callable) -> Any:
        if state is None:
            return step(self.model, batch)
        return torch.func.functional_call(_StepModule(self.model, step), state, (batch,))

    # -- GradientProblem ------------------------------------------------------------------------
    def batch_gradient(self, float64: bool) -> dict[str, np.ndarray]:
        self._begin_pass()
        return self._retrying_with_copies(lambda: self._batch_gradient(float64))

    def confirm_deterministic(self, g: Optional[Mapping[str, np.ndarray]] = None) -> bool:
        """Before a mismatch is diagnosed (or when vmap meets a random op): is the step random?

        The batch gradient is computed again, twice, with the random ops recorded and the
        global generators watched. If it changes from run to run, the step is random
        (dropout is already neutralised at the ops): a clear error naming the op and the
        user's line, never "samples interact". If it does not, any draws are harmless
        (LayerDrop at rate 0) and vmap may run them. Nothing of this runs on a passing check.

        Returns True when the runs so far were not all from the state before the check (the
        forward writes into it in a way only a comparison by value shows): compare again.
        """
        from .verdict import compare_gradients, default_tolerances

        self._watch_ops = True  # record the random ops by name from now on
        self._draws = []
        runs = [] if g is None else [g]
        if self._saved is not None:
            # a forward that writes into its state, even its own weights through .data, is not
            # random: from now on every run starts from the state before the check
            written = self._saved.touched(parameters=True)
            stale = bool(written) and not self._touched
            if written:
                self._touched = tuple(written)
        else:
            stale = False
        with Watch() as watch:
            while len(runs) < 2 or (g is not None and len(runs) < 3):
                self._begin_pass()
                runs.append(self._retrying_with_copies(lambda: self._batch_gradient(False)))
        draws = list(self._draws)
        rtol, atol = default_tolerances(self.dtype)
        same = all(
            compare_gradients(runs[0], r, rtol=rtol, atol=atol, reduction="mean", precision=self.dtype).passed
            for r in runs[1:]
        )
        names = [str(d) for d in draws] or [_GENERATORS.get(m, m) for m in watch.moved]
        what = ", ".join(dict.fromkeys(names))
        if same:
            if draws or watch.moved:
                self._vmap_randomness = "different"
                self.random_note = (
                    f"the step draws random numbers ({what}) that do not change its gradient (repeated "
                    "batch runs agree), so they were left alone."
                )
            return stale
        raise UnsupportedModelError(
            f"the training step is random: it draws random numbers ({what or 'from an unknown source'}) "
            "that change its gradient from one run to the next (batch runs with the same parameters and "
            "batch disagree), so the batch run and the per-sample runs cannot be compared. Dropout is "
            "already switched off at the ops; this is other randomness (noise, random masks, sampled "
            "timesteps). Make the step deterministic for the check: pass the random tensors in as part "
            "of the batch, or draw them from a generator you re-seed for each call."
        )

    def _batch_gradient(self, float64: bool) -> dict[str, np.ndarray]:
        record: Optional[list] = [] if (self.watch_broadcast and not float64) else None
        step = self.build_step(record, float64)
        with self._precision(float64, internal=float64 or self.watch_broadcast):
            state, params = self._state(float64)
            batch = self._tree(self._batch_leaves(float64))
            loss = _as_scalar_loss(self._call(state, batch, step), where="batch")
            grads = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else ()
            if all(g is None for g in grads):
                raise InvalidArgument(
                    "the loss does not depend on any parameter that requires grad: is it computed "
                    "under torch.no_grad(), or from detached outputs?"
                )
        self._batch_loss[float64] = loss.detach()
        if record is not None:
            self.broadcasts = tuple(record)
        return self._to_numpy(grads, params)

    def reference_gradient(self, coeffs: np.ndarray, float64: bool) -> dict[str, np.ndarray]:
        self._begin_pass()
        return self._retrying_with_copies(lambda: self._reference_gradient(coeffs, float64))

    def _reference_gradient(self, coeffs: np.ndarray, float64: bool) -> dict[str, np.ndarray]:
        step = self.build_step(None, float64)
        with self._precision(float64):
            state, params = self._state(float64)
            leaves = self._batch_leaves(float64)
            ref_dtype = torch.float64 if float64 else self.params[0].dtype
            c = torch.as_tensor(coeffs, dtype=ref_dtype, device=self.params[0].device)
            if self.reference_method == "vmap":
                try:
                    grads = self._reference_vmap(state, params, leaves, step, c)
                except (InvalidArgument, GradEquivError):
                    raise
                except Exception as exc:
                    if _writes_into_input(exc) and not self._copy_inputs:
                        raise
                    if _is_randomness_error(exc) and self._vmap_randomness == "error":
                        # a random op under vmap: refused if it changes the gradient, else allowed
                        self.confirm_deterministic()
                        return self._reference_gradient(coeffs, float64)
                    if self.method == "vmap":
                        raise InvalidArgument(
                            f"torch.func.vmap could not run the model on single samples: {_first_line(exc)}; "
                            "use reference='auto' or 'loop' to fall back to a per-sample loop"
                        ) from exc
                    self._begin_unit()
                    self._check_single_sample_runs(state, step)
                    self.reference_method = "loop"
                    self.fallback_reason = _first_line(exc)
                    if self._touched:
                        self.fallback_reason = (
                            f"the model writes into its own state during forward ({', '.join(self._touched[:4])}"
                            f"{', ...' if len(self._touched) > 4 else ''}), which vmap cannot batch; every "
                            f"sample ran alone from the state before the check ({self.fallback_reason})"
                        )
                    grads = self._reference_loop(state, params, leaves, step, c)
            else:
                self._check_single_sample_runs(state, step)
                grads = self._reference_loop(state, params, leaves, step, c)
        return self._to_numpy(grads, params)

    def per_sample_gradients(self, float64: bool) -> Optional[dict[str, np.ndarray]]:
        step = self.build_step(None, float64)
        out: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        self._begin_pass()
        with self._precision(float64):
            state, params = self._state(float64)
            loss_of = self._loss_of(state, step, float64)
            for i in range(self.batch_size):
                self._begin_unit()
                grads = torch.autograd.grad(loss_of(i), params, allow_unused=True)
                for n, g in self._to_numpy(grads, params).items():
                    out[n].append(g)
        return {n: np.stack(v) for n, v in out.items()}

    def per_sample_tensors(self, float64: bool = False) -> dict[str, torch.Tensor]:
        """The gradient of each sample's loss, the sample run alone: ``{name: (B, *shape)}``.

        ``torch.func.vmap`` of ``torch.func.grad`` over single-sample calls (B gradients
        in one batched backward), or a loop where vmap cannot run the model. On the
        parameters' device and in the working dtype (float64 if ``float64``).
        """
        step = self.build_step(None, float64)
        self._begin_pass()
        with self._precision(float64):
            state, params = self._state(float64)
            leaves = self._batch_leaves(float64)
            if self.reference_method == "vmap":
                try:
                    return self._per_sample_vmap(state, params, leaves, step)
                except (InvalidArgument, GradEquivError, UnsupportedModelError):
                    raise
                except Exception:  # noqa: BLE001 - the loop below computes the same gradients
                    self._begin_unit()
            loss_of = self._loss_of(state, step, float64)
            rows: list[list[torch.Tensor]] = [[] for _ in params]
            for i in range(self.batch_size):
                self._begin_unit()
                grads = torch.autograd.grad(loss_of(i), params, allow_unused=True)
                for k, (g, p) in enumerate(zip(grads, params)):
                    rows[k].append(torch.zeros_like(p) if g is None else g)
        return {n: torch.stack(r) for n, r in zip(self.names, rows)}

    def _per_sample_vmap(
        self, state: Optional[dict], params: list[torch.Tensor], leaves: list[Any], step: Callable
    ) -> dict[str, torch.Tensor]:
        in_dims = tuple(0 if isinstance(x, torch.Tensor) else None for x in leaves)
        shaped = [x.unsqueeze(1) if isinstance(x, torch.Tensor) else x for x in leaves]
        base = dict(state) if state is not None else {}
        keys = ["model." + n for n in self.names]
        wrapper = _StepModule(self.model, step)

        def one(values: tuple[torch.Tensor, ...], *sample: Any) -> torch.Tensor:
            full = {**base, **dict(zip(keys, values))}
            out = torch.func.functional_call(wrapper, full, (self._tree(sample),))
            return _as_scalar_loss(out, where="per-sample")

        detached = tuple(p.detach() for p in params)
        with _vmap_friendly_attention(self.params[0].device), _vmap_friendly_rnn(self.has_rnn):
            grads = torch.func.vmap(
                torch.func.grad(one), in_dims=(None, *in_dims), randomness=self._vmap_randomness
            )(detached, *shaped)
        return dict(zip(self.names, grads))

    def weight_candidates(self) -> list[tuple[str, np.ndarray]]:
        return self._weight_candidates() if self._weight_candidates else []

    def loss_values(self, float64: bool) -> Optional[tuple[float, np.ndarray]]:
        if float64 in self._batch_loss and float64 in self._sample_losses:
            losses = self._sample_losses[float64].to("cpu", torch.float64).numpy()
            return float(self._batch_loss[float64]), losses
        return None

    def _keep_losses(self, losses: torch.Tensor) -> None:
        self._sample_losses[losses.dtype == torch.float64] = losses.detach()

    # -- reference computations ------------------------------------------------------------------
    def _reference_vmap(
        self, state: Optional[dict], params: list[torch.Tensor], leaves: list[Any], step: Callable, c: torch.Tensor
    ) -> Sequence[Optional[torch.Tensor]]:
        # Each tensor is viewed as (B, 1, ...) before vmap, so every sample arrives as a batch
        # of one without a batched unsqueeze per input (each op under vmap costs ~20 us).
        in_dims: Any = tuple(0 if isinstance(x, torch.Tensor) else None for x in leaves)
        if all(d == 0 for d in in_dims):
            in_dims = 0  # vmap broadcasts a plain 0 to the leaves faster than it matches a tuple
        shaped = [x.unsqueeze(1) if isinstance(x, torch.Tensor) else x for x in leaves]

        def one(*sample: Any) -> torch.Tensor:  # flat positional leaves: vmap's cheapest calling form
            return _as_scalar_loss(self._call(state, self._tree(sample), step), where="per-sample")

        with _vmap_friendly_attention(self.params[0].device), _vmap_friendly_rnn(self.has_rnn):
            losses = torch.func.vmap(one, in_dims=in_dims, randomness=self._vmap_randomness)(*shaped)
        self._keep_losses(losses)
        total = torch.dot(losses, c if c.dtype == losses.dtype else c.to(losses.dtype))
        return torch.autograd.grad(total, params, allow_unused=True)

    def _reference_loop(
        self, state: Optional[dict], params: list[torch.Tensor], leaves: list[Any], step: Callable, c: torch.Tensor
    ) -> Sequence[Optional[torch.Tensor]]:
        acc: list[Optional[torch.Tensor]] = [None] * len(params)
        values: list[torch.Tensor] = []
        # a model that writes into its state runs every sample from the saved state, one
        # backward each (resetting a tensor that a pending graph saved would break it)
        chunk = 1 if self._touched else _LOOP_CHUNK
        for start in range(0, self.batch_size, chunk):
            total: Optional[torch.Tensor] = None
            for i in range(start, min(self.batch_size, start + chunk)):
                self._begin_unit()
                loss_i = _as_scalar_loss(self._call(state, self._one(leaves, i), step), where="per-sample")
                values.append(loss_i.detach())
                term = loss_i * c[i]
                total = term if total is None else total + term
            if total is None:
                continue
            grads = torch.autograd.grad(total, params, allow_unused=True)
            for k, g in enumerate(grads):
                if g is not None:
                    acc[k] = g if acc[k] is None else acc[k] + g
        if values:
            self._keep_losses(torch.stack(values))
        return acc

    def _check_single_sample_runs(self, state: Optional[dict], step: Callable) -> None:
        one = self._one(self._batch_leaves(state is not None), 0)
        try:
            _as_scalar_loss(_run_watching_sample(lambda: self._call(state, one, step), one), where="per-sample")
        except (InvalidArgument, GradEquivError):
            raise
        except Exception as exc:
            if _writes_into_input(exc) and not self._copy_inputs:
                raise
            raise InvalidArgument(
                "the model cannot run on a single sample (a batch of one), which the per-sample "
                f"reference needs: {type(exc).__name__}: {_first_line(exc)}. A model that squeezes "
                "the batch dimension away, or needs several samples (BatchNorm in train mode), "
                "cannot be checked per sample."
            ) from exc

    def _to_numpy(self, grads: Sequence[Optional[torch.Tensor]], params: Sequence[torch.Tensor]) -> FlatGrads:
        """The gradients as one flat NumPy buffer with per-parameter views (see FlatGrads).

        For the model's own CPU parameters NumPy concatenates the gradients straight
        from their shared memory (measured: 37 us against torch.cat's 98 us for the
        36K-entry MLP, right after a matmul); otherwise one ``torch.cat`` and one
        device-to-host copy. float16/bfloat16 widen to float32.
        """
        # params is self.params: the model's own parameters (the float64 re-check passes copies)
        if self._numpy_concat and params is self.params:
            try:
                arrays = [
                    np.zeros(p.numel(), dtype=self._flat_np_dtype) if g is None else g.detach().numpy().reshape(-1)
                    for g, p in zip(grads, params)
                ]
            except (RuntimeError, TypeError):  # .numpy() refuses some layouts and dtypes: torch.cat below
                pass
            else:
                return FlatGrads.from_flat(np.concatenate(arrays), self.names, self._shapes)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        parts = []
        for g, p in zip(grads, params):
            if g is None:  # a parameter the loss does not reach: its gradient is zero
                parts.append(torch.zeros(p.numel(), dtype=dtype, device=p.device))
            else:
                g = g.reshape(-1)
                parts.append(g if g.dtype == dtype else g.to(dtype))
        return FlatGrads.from_flat(torch.cat(parts).detach().cpu().numpy(), self.names, self._shapes)


@contextlib.contextmanager
def _default_dtype(float64: bool) -> Iterator[None]:
    """float64 as torch's default dtype inside, if ``float64``; otherwise the default is left alone
    (setting it, even to its own value, costs about 0.1 ms in a check)."""
    if not float64:
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


_GENERATORS = {
    "torch": "torch's global generator",
    "torch.cuda": "torch's CUDA generator",
    "random": "Python's random module",
    "numpy": "NumPy's global np.random",
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 240 else line[:237] + "..."


@contextlib.contextmanager
def _vmap_friendly_attention(device: torch.device) -> Iterator[None]:
    """On CPU, run scaled_dot_product_attention with the MATH kernel inside vmap.

    vmap has no batching rule for the CPU flash-attention kernel and silently
    falls back to a loop over samples (measured: 6x slower than a training step
    for a transformer block at B=256); the math kernel is plain matmul/softmax,
    which vmap batches. Each sample is still run alone. (CUDA kernels have
    batching rules and are left alone.)
    """
    if device.type != "cpu":
        yield
        return
    # On CPU the choice is flash or math, so only the flash switch is flipped
    # (torch.nn.attention.sdpa_kernel flips every backend and costs ~40 us a call).
    enabled = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_flash_sdp(enabled)


_RNN_OPS: dict[Any, Any] = {}


def _rnn_decompositions() -> dict[Any, Any]:
    """``torch._VF`` RNN entry points -> torch's own decompositions into plain aten ops."""
    if not _RNN_OPS:
        try:
            from torch._decomp import decomposition_table
        except ImportError:  # pragma: no cover - very old torch
            return _RNN_OPS
        aten = torch.ops.aten
        for vf, op in (
            (torch._VF.gru, aten.gru.input),
            (torch._VF.lstm, aten.lstm.input),
            (torch._VF.rnn_tanh, aten.rnn_tanh.input),
            (torch._VF.rnn_relu, aten.rnn_relu.input),
        ):
            if op in decomposition_table:
                _RNN_OPS[vf] = decomposition_table[op]
    return _RNN_OPS


@contextlib.contextmanager
def _vmap_friendly_rnn(enabled: bool) -> Iterator[None]:
    """Run nn.RNN/LSTM/GRU through torch's decompositions inside vmap.

    vmap has no batching rule for the fused RNN kernels (``aten::gru.input``...),
    so without this a model with a GRU falls back to the per-sample loop (about
    as slow as B training steps). torch's decompositions of those ops are plain
    matmuls and pointwise ops, which vmap batches; each sample is still run alone
    (measured: GRU reference about 2x a training step instead of 54x). oneDNN is
    switched off meanwhile: on CPU the LSTM decomposition would otherwise call
    ``mkldnn_rnn_layer``, which has no batching rule either. Packed sequences
    (the ``.data`` overloads) are passed through unchanged.
    """
    table = _rnn_decompositions() if enabled else {}
    if not table:
        yield
        return
    from torch.overrides import TorchFunctionMode

    class _RNNDecompositions(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            decomposed = table.get(func)
            # the ``.input`` overloads take has_biases (a bool) 4th; ``.data`` (packed) does not
            if decomposed is not None and len(args) > 3 and isinstance(args[3], bool):
                return decomposed(*args, **kwargs)
            return func(*args, **kwargs)

    mkldnn = torch.backends.mkldnn
    was_enabled = mkldnn.enabled
    mkldnn.enabled = False  # only this flag: mkldnn.flags() would also reset its TF32 setting
    try:
        with _RNNDecompositions():
            yield
    finally:
        mkldnn.enabled = was_enabled


def _writes_into_input(exc: BaseException) -> bool:
    """Errors a model raises only because its inputs came as grad-requiring aliases.

    Writing into one in place (the autograd leaf rule), or calling ``.numpy()`` on
    it: the check then retries with plain copies of the inputs.
    """
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "leaf Variable that requires grad" in text
        or "Can't call numpy() on Tensor that requires grad" in text
        # a sample that writes into its slice bumps the version counter its neighbours
        # (slices of the same tensor) share: each sample then needs its own copy
        or "modified by an inplace operation" in text
    )


# torch's words for a dtype mismatch between tensors (matmul, conv, norms, bilinear, RNNs, generic)
_DTYPE_MISMATCH = re.compile(
    r"same dtype|same datatype|should be the same|does not match weight dtype|expected scalar type"
    r"|found dtype \w+ but expected|must have the same type",
    re.IGNORECASE,
)


def _raise_clear_error(
    exc: BaseException,
    leaves: Sequence[Any],
    params: Sequence[torch.Tensor],
    modules: _NamedModules,
    first_run: bool,
) -> None:
    """Raise an :class:`InvalidArgument` in place of ``exc`` where its cause is certain
    (a dtype mismatch of inputs and parameters, a sparse gradient); otherwise return."""
    if isinstance(exc, GradCheckError) or not isinstance(exc, (RuntimeError, ValueError, TypeError, NotImplementedError)):
        return
    text = str(exc)
    if "sparse" in text.lower():
        for name, module in modules:
            weight = getattr(module, "weight", None)
            if (
                isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))
                and module.sparse
                and isinstance(weight, torch.Tensor)
                and weight.requires_grad
            ):
                path = "model" + (f".{name}" if name else "")
                raise InvalidArgument(
                    f"{path} ({type(module).__name__}) has sparse=True: its weight gets a sparse gradient, "
                    "which the check cannot compare (the per-sample reference and the comparison work on "
                    "dense gradients). Build it with sparse=False for the check: the gradient values are "
                    f"the same, only their layout differs. ({type(exc).__name__}: {_first_line(exc)})"
                ) from exc
    if first_run and _DTYPE_MISMATCH.search(text):
        param_dtypes = sorted({p.dtype for p in params if p.is_floating_point()}, key=str)
        input_dtypes = sorted(
            {x.dtype for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()}, key=str
        )
        odd = [d for d in input_dtypes if d not in param_dtypes]
        if len(param_dtypes) == 1 and odd:
            want, have = _dtype_name(param_dtypes[0]), " and ".join(_dtype_name(d) for d in odd)
            raise InvalidArgument(
                f"dtype mismatch: the inputs are {have} but the model's parameters are {want}, and torch "
                f"does not mix them ({type(exc).__name__}: {_first_line(exc)}). Convert one to the other "
                f"before the check: inputs.to(torch.{want}), or model.to(torch.{_dtype_name(odd[0])})"
            ) from exc


def _is_randomness_error(exc: BaseException) -> bool:
    text = str(exc)
    return "randomness" in text and "vmap" in text


def _as_scalar_loss(out: Any, where: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor) and out.dim() == 0 and out.is_floating_point():
        if where == "per-sample":
            _check_depends_on_its_sample(out)
        return out  # the common case, in two queries (each costs more on a vmap-batched tensor)
    loss = out
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise InvalidArgument(
                f"the step returned a mapping without a 'loss' entry (keys: {sorted(map(str, out))})"
            )
        loss = out["loss"]
    if not isinstance(loss, torch.Tensor):
        raise InvalidArgument(
            f"the loss ({where}) is a {type(loss).__name__}, not a tensor: return the loss tensor "
            "(not loss.item())"
        )
    if loss.numel() != 1:
        raise InvalidArgument(
            f"the loss ({where}) has shape {tuple(loss.shape)}, not a scalar: reduce it to one "
            "number (e.g. .mean() or .sum()); with reduction='none' losses, reduce them yourself"
        )
    if not loss.is_floating_point():
        raise InvalidArgument(f"the loss ({where}) has dtype {loss.dtype}: a floating-point scalar is needed")
    if where == "per-sample":
        _check_depends_on_its_sample(loss)
    return loss if loss.dim() == 0 else loss.reshape(())


def _check_depends_on_its_sample(loss: torch.Tensor) -> None:
    """Inside the per-sample ``vmap``, a loss that is not batched was computed from none of
    the sample's tensors: the step ignores its batch, and the check would compare nothing."""
    try:
        from torch._C import _functorch

        top = _functorch.peek_interpreter_stack()
        if top is None or top.key() != _functorch.TransformType.Vmap:
            return  # not under vmap (the loop reference, a single-sample run)
        batched = _functorch.is_batchedtensor(loss) and _functorch.maybe_get_level(loss) == top.level()
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - private API moved
        return
    if not batched:
        raise InvalidArgument(_IGNORES_BATCH)


_IGNORES_BATCH = (
    "the loss does not depend on the batch: run on a single sample, the step computed its loss "
    "from none of that sample's tensors (e.g. it calls the model on a fixed tensor, not on the "
    "batch it is given), so every per-sample gradient is the same and nothing would be checked. "
    "Compute the loss from the batch: loss_fn(model(*inputs), targets) must use the outputs or "
    "the targets; step_fn(model, batch) must use batch."
)


def _run_watching_sample(run: Callable[[], Any], sample: Any) -> Any:
    """``run()`` (one sample's step, outside vmap), refused if no torch op received any of
    ``sample``'s tensors: the loop reference's counterpart of :func:`_check_depends_on_its_sample`.

    Costs one Python call per op of that one run; the reference loop itself is not watched.
    """
    ids = {id(t) for t in pytree.tree_leaves(sample) if isinstance(t, torch.Tensor)}
    if not ids:
        return run()
    from torch.overrides import TorchFunctionMode

    seen = [False]

    class _SampleUse(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if not seen[0] and any(id(x) in ids for x in pytree.tree_leaves((args, kwargs))):
                seen[0] = True
            return func(*args, **kwargs)

    with _SampleUse():
        out = run()
    if not seen[0]:
        raise InvalidArgument(_IGNORES_BATCH)
    return out


# --------------------------------------------------------------------------- model inspection


def _check_sample_mixing(model: torch.nn.Module, modules: Optional[_NamedModules] = None) -> None:
    from torch.nn.modules.batchnorm import _BatchNorm

    for name, module in model.named_modules() if modules is None else modules:
        if isinstance(module, _BatchNorm):
            uses_batch_stats = module.training or module.running_mean is None
            if uses_batch_stats:
                path = "model" + (f".{name}" if name else "")
                why = "is in train mode" if module.training else "has no running statistics"
                raise UnsupportedModelError(
                    f"{path} ({type(module).__name__}) {why}: BatchNorm normalises each sample with "
                    "the mean and variance of the whole batch, so one sample's gradient depends on "
                    "the other samples and per-sample gradients do not exist. Check the model in "
                    "eval mode (model.eval(); the check switches dropout off by itself), or use "
                    "GroupNorm/LayerNorm, which normalise each sample alone."
                )


def _disable_dropout(model: torch.nn.Module, modules: Optional[_NamedModules] = None) -> tuple[str, ...]:
    """Switch off every dropout the model applies in train mode; return their paths.

    Covers ``nn.Dropout*`` modules and the modules that apply dropout functionally
    from a float attribute: ``nn.MultiheadAttention`` (attention dropout) and
    ``nn.RNN``/``LSTM``/``GRU`` (dropout between layers). Modes are restored
    after the check.
    """
    from torch.nn.modules.dropout import _DropoutNd

    names = []
    for name, module in model.named_modules() if modules is None else modules:
        if not module.training:
            continue
        if isinstance(module, _DropoutNd):
            rate = module.p
        elif isinstance(module, (torch.nn.MultiheadAttention, torch.nn.RNNBase)):
            rate = float(getattr(module, "dropout", 0.0) or 0.0)
        else:
            continue
        if rate > 0:
            module.training = False
            names.append(f"model.{name}" if name else "model")
    return tuple(names)


# shared with independence.py and ddp.py until they move to the _torch toolkit
_SavedState = SavedState
