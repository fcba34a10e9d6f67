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
import random
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ._options import check_batch_sizes, validate_options
from .errors import GradEquivError, InvalidArgument, UnsupportedModelError
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
    ``"vmap"`` or ``"loop"``.

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
        }
    )
    _check_model(model)
    if not callable(step_fn):
        raise InvalidArgument(f"step_fn must be callable, got {type(step_fn).__name__}")

    def build(record: Optional[list], float64: bool) -> Callable[[torch.nn.Module, Any], Any]:
        if record is None:
            return step_fn

        def watched(m: torch.nn.Module, b: Any) -> Any:
            with _loss_guard(record):
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
        report = run_check(
            problem,
            reduction=opts["reduction"],
            weights=w,
            rtol=opts["rtol"],
            atol=opts["atol"],
            float64_recheck=opts["float64_recheck"],
        )
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
    if not callable(loss_fn):
        raise InvalidArgument(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    inputs_t = _as_tensor_tuple(inputs, "inputs")
    targets_is_tuple = isinstance(targets, (tuple, list))
    targets_t = () if targets is None else _as_tensor_tuple(targets, "targets")
    return inputs_t, targets_t, targets_is_tuple


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
            with _loss_guard(record):
                if not has_targets:
                    return fn(out)
                if targets_is_tuple:
                    return fn(out, *ys)
                return fn(out, ys[0])

        return step

    return build


@contextlib.contextmanager
def _loss_guard(record: Optional[list]) -> Iterator[None]:
    if record is None:
        yield
        return
    from .broadcast import recording

    with recording(True) as records:
        yield
    record.extend(records)


# --------------------------------------------------------------------------- validation


def _check_model(model: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgument(f"model must be a torch.nn.Module, got {type(model).__name__}")


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
    return items


def _describe_leaf(path: str, t: torch.Tensor) -> str:
    return f"{path} (shape {tuple(t.shape)})"


def _batch_size(batch: Any, allow_non_tensor: bool, leaves: Optional[list] = None) -> int:
    if leaves is None:
        leaves, _ = pytree.tree_flatten(batch)
    # the common case, without building the leaf descriptions an error message needs
    if all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in leaves):
        sizes0 = {int(x.shape[0]) for x in leaves}
        if len(sizes0) == 1 and min(sizes0) >= 2:
            return sizes0.pop()
    paths = _leaf_paths(batch)
    sizes: list[tuple[str, int]] = []
    for path, leaf in zip(paths, leaves):
        if isinstance(leaf, torch.Tensor):
            if leaf.dim() == 0:
                raise InvalidArgument(
                    f"{path} is a 0-d tensor: every tensor needs the batch on dim 0"
                )
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
        values = []
        for i in range(b):
            v = weights(sample_of(i))
            values.append(float(v.detach().cpu()) if isinstance(v, torch.Tensor) else float(v))
        w = np.asarray(values, dtype=np.float64)
    else:
        if isinstance(weights, torch.Tensor):
            w = weights.detach().to("cpu", torch.float64).numpy()
        else:
            w = np.asarray(weights, dtype=np.float64)
        w = w.reshape(-1) if w.ndim > 1 and w.size == b else w
    if w.shape != (b,):
        raise InvalidArgument(f"weights has shape {tuple(w.shape)}: expected one weight per sample, ({b},)")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InvalidArgument(f"weights must be finite and >= 0, got {w.tolist()[:8]}")
    if w.sum() <= 0:
        raise InvalidArgument("weights sum to 0: at least one sample must count")
    return w


def _ignore_index_candidates(loss_fn: Any, targets: Sequence[torch.Tensor]) -> list[tuple[str, np.ndarray]]:
    """Per-sample weightings worth naming when a loss is not a plain mean/sum."""
    out: list[tuple[str, np.ndarray]] = []
    ignore = getattr(loss_fn, "ignore_index", -100)
    for t in targets:
        if isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex() and t.dim() >= 2:
            valid = (t != ignore).reshape(t.shape[0], -1).sum(dim=1)
            out.append(
                (f"their number of non-ignored targets (targets != {ignore})", valid.cpu().double().numpy())
            )
    return out


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
        self.dropout_disabled: tuple[str, ...] = ()
        self.broadcasts: tuple[Any, ...] = ()
        self.watch_broadcast = watch_broadcast
        self.extra_modules = list(extra_modules)
        self._weight_candidates = weight_candidates
        self._copy_inputs = False
        self._modules = list(model.named_modules())  # walked once, for the checks below and dropout
        self.has_rnn = any(isinstance(m, torch.nn.RNNBase) for _, m in self._modules)
        # kept as tensors, read only by a diagnosis (loss_values): no device sync on a passing check
        self._batch_loss: dict[bool, torch.Tensor] = {}
        self._sample_losses: dict[bool, torch.Tensor] = {}
        _check_sample_mixing(model, self._modules)

    # -- set-up and tear-down -------------------------------------------------------------
    @contextlib.contextmanager
    def prepared(self) -> Iterator[None]:
        """Dropout off for the check; everything the check could disturb restored after."""
        saved = _SavedState(self.model, self.extra_modules)
        try:
            self.dropout_disabled = _disable_dropout(self.model, self._modules)
            yield
        finally:
            saved.restore()

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
        """Sample ``i`` of ``leaves`` as a batch of one, in the batch's structure."""
        return self._slice(leaves, i, i + 1)

    def _loss_of(self, state: Optional[dict], step: Callable, float64: bool) -> Callable[[int], torch.Tensor]:
        """``i -> the scalar loss of unit i run alone`` (a unit is a sample here, a micro-batch
        in the accumulation check, which overrides this)."""
        leaves = self._batch_leaves(float64)
        return lambda i: _as_scalar_loss(self._call(state, self._one(leaves, i), step), where="per-sample")

    def _retrying_with_copies(self, run: Callable[[], Any]) -> Any:
        try:
            return run()
        except Exception as exc:
            if self._copy_inputs or not _writes_into_input(exc):
                raise
        self._copy_inputs = True  # the model writes into its inputs: give it copies
        return run()

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
            with _default_dtype(float64):
                yield

    def _call(self, state: Optional[dict], batch: Any, step: Callable) -> Any:
        if state is None:
            return step(self.model, batch)
        return torch.func.functional_call(_StepModule(self.model, step), state, (batch,))

    # -- GradientProblem ------------------------------------------------------------------------
    def batch_gradient(self, float64: bool) -> dict[str, np.ndarray]:
        return self._retrying_with_copies(lambda: self._batch_gradient(float64))

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
                    if _is_randomness_error(exc):
                        raise UnsupportedModelError(
                            "the model (or the loss) draws random numbers on every forward pass, "
                            "outside nn.Dropout modules (e.g. F.dropout(x, training=True), "
                            "torch.randn_like): the batch run and the per-sample runs draw "
                            "different numbers, so their gradients cannot be compared. Make the "
                            "step deterministic for the check: put the module in eval mode, use "
                            "nn.Dropout (the check switches it off), or pass the noise in as an input."
                        ) from exc
                    if self.method == "vmap":
                        raise InvalidArgument(
                            f"torch.func.vmap could not run the model on single samples: {_first_line(exc)}; "
                            "use reference='auto' or 'loop' to fall back to a per-sample loop"
                        ) from exc
                    self._check_single_sample_runs(state, step)
                    self.reference_method = "loop"
                    self.fallback_reason = _first_line(exc)
                    grads = self._reference_loop(state, params, leaves, step, c)
            else:
                self._check_single_sample_runs(state, step)
                grads = self._reference_loop(state, params, leaves, step, c)
        return self._to_numpy(grads, params)

    def per_sample_gradients(self, float64: bool) -> Optional[dict[str, np.ndarray]]:
        step = self.build_step(None, float64)
        out: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        with self._precision(float64):
            state, params = self._state(float64)
            loss_of = self._loss_of(state, step, float64)
            for i in range(self.batch_size):
                grads = torch.autograd.grad(loss_of(i), params, allow_unused=True)
                for n, g in self._to_numpy(grads, params).items():
                    out[n].append(g)
        return {n: np.stack(v) for n, v in out.items()}

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
            losses = torch.func.vmap(one, in_dims=in_dims, randomness="error")(*shaped)
        self._keep_losses(losses)
        total = torch.dot(losses, c if c.dtype == losses.dtype else c.to(losses.dtype))
        return torch.autograd.grad(total, params, allow_unused=True)

    def _reference_loop(
        self, state: Optional[dict], params: list[torch.Tensor], leaves: list[Any], step: Callable, c: torch.Tensor
    ) -> Sequence[Optional[torch.Tensor]]:
        acc: list[Optional[torch.Tensor]] = [None] * len(params)
        values: list[torch.Tensor] = []
        for start in range(0, self.batch_size, _LOOP_CHUNK):
            total: Optional[torch.Tensor] = None
            for i in range(start, min(self.batch_size, start + _LOOP_CHUNK)):
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
            _as_scalar_loss(self._call(state, one, step), where="per-sample")
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
        "leaf Variable that requires grad" in text or "Can't call numpy() on Tensor that requires grad" in text
    )


def _is_randomness_error(exc: BaseException) -> bool:
    text = str(exc)
    return "randomness" in text and "vmap" in text


def _as_scalar_loss(out: Any, where: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor) and out.dim() == 0 and out.is_floating_point():
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
    return loss if loss.dim() == 0 else loss.reshape(())


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


class _SavedState:
    """Snapshot of everything a check could disturb, restored on exit, pass or fail.

    Tensors are compared by value on restore, not by version counter: a write
    through ``.data`` (weight clipping, counters) does not bump ``_version``.
    """

    def __init__(self, model: torch.nn.Module, extra: Sequence[torch.nn.Module]) -> None:
        modules = [model, *extra]
        self.training = [(m, m.training) for root in modules for m in root.modules()]
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.grads: list[tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]] = []
        seen: set[int] = set()
        for root in modules:
            for t in [*root.parameters(), *root.buffers()]:
                if id(t) in seen:
                    continue
                seen.add(id(t))
                self.tensors.append((t, t.detach().clone()))  # detached: no autograd graph, no no_grad() needed
                if isinstance(t, torch.nn.Parameter):
                    g = t.grad
                    self.grads.append((t, g, None if g is None else g.detach().clone()))
        self.default_dtype = torch.get_default_dtype()
        self.rng = torch.get_rng_state()
        self.cuda_rng = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None  # initialized implies available
        )
        self.py_rng = random.getstate()
        self.np_rng = _NumpyGlobalRNG()

    def restore(self) -> None:
        undo = [(t, saved) for t, saved in self.tensors if not torch.equal(t, saved)]  # NaN != NaN: copied, harmless
        undo += [(g, saved) for _, g, saved in self.grads if saved is not None and not torch.equal(g, saved)]
        if undo:
            with torch.no_grad():  # parameters are leaves that require grad
                for t, saved in undo:
                    t.copy_(saved)
        for p, g, _ in self.grads:
            if p.grad is not g:
                p.grad = g
        for m, mode in self.training:
            if m.training != mode:  # nn.Module.__setattr__ is slow; most modes did not change
                m.training = mode
        torch.set_default_dtype(self.default_dtype)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        random.setstate(self.py_rng)
        self.np_rng.restore()


class _NumpyGlobalRNG:
    """NumPy's legacy global generator (``np.random.*``), saved and restored exactly.

    ``np.random.get_state()`` costs about 0.1 ms (it copies the Mersenne Twister
    key element by element); restoring unconditionally would double that on
    every check. The raw key and position are read through the bit generator's
    documented ``ctypes`` interface to tell whether anything drew from it; the
    state is put back only then, or when a cached Gaussian (legacy ``randn``)
    could have been consumed without moving the key.
    """

    _RAW_BYTES = 624 * 4 + 4  # mt19937_state: uint32 key[624]; int pos
    _raw_ok: Optional[bool] = None

    def __init__(self) -> None:
        self.state = np.random.get_state()
        self.raw = self._raw()

    @classmethod
    def _raw_usable(cls) -> bool:
        if cls._raw_ok is None:
            try:
                probe = np.random.RandomState(12345)
                probe.random_sample(3)
                _, key, pos, _, _ = probe.get_state()
                import ctypes

                raw = ctypes.string_at(probe._bit_generator.ctypes.state_address, cls._RAW_BYTES)
                cls._raw_ok = raw == key.astype("<u4").tobytes() + int(pos).to_bytes(4, "little", signed=True)
            except Exception:  # noqa: BLE001 - no ctypes interface: always restore
                cls._raw_ok = False
        return cls._raw_ok

    def _raw(self) -> Optional[bytes]:
        if not self._raw_usable():
            return None
        import ctypes

        return ctypes.string_at(np.random.mtrand._rand._bit_generator.ctypes.state_address, self._RAW_BYTES)

    def restore(self) -> None:
        has_gauss = self.state[3]
        if self.raw is not None and not has_gauss and self._raw() == self.raw:
            return  # nothing drew from it
        np.random.set_state(self.state)
