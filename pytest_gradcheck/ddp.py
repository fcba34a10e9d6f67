"""DistributedDataParallel: the DDP gradient of one step equals the single-process full-batch gradient.

:func:`assert_ddp_equiv` starts ``world_size`` processes (``multiprocessing``'s
*forkserver* context where there is one, else *spawn*: either way the ranks
get the model factory and the loss by pickle, never by inheritance), joins them in a ``torch.distributed`` process group over the
loopback interface only (``127.0.0.1``), builds the model in every rank with
the same seed, wraps it in :class:`~torch.nn.parallel.DistributedDataParallel`,
gives each rank its shard of the batch and runs one training step
(``loss.backward()``, optionally accumulated over micro-batches under
``no_sync()``). Every rank sends its gradients back to the parent, which
compares them, through the shared verdict path (:func:`pytest_gradcheck.verdict.run_check`),
with the gradient of the same loss on the whole batch in one process.

A mismatch is explained in words: ranks that weight samples by ``1/shard size``
(a per-rank mean over uneven shards), samples repeated by ``DistributedSampler``,
BatchNorm normalising per rank, ranks that end the step with different
gradients, and a ``no_sync()`` accumulation that misses its ``1/k``. Each
diagnosis is a hypothesis recomputed in the parent (the ranks' steps re-run one
at a time) and compared with the same comparator.

The whole run is bounded (``timeout`` seconds, and the process group's own
timeout for every collective); the child processes are stopped, killed if they
must be, and joined on every path out, failures and ``KeyboardInterrupt``
included.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.machinery
import importlib.util
import io
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import time
import traceback
import types
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any, Callable, Union

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ._options import check_batch_sizes, check_bool, check_choice, check_tolerance
from ._torch.inputs import (
    class_name,
    describe_leaf,
    leaf_paths,
    loss_form_paths,
    sparse_input_message,
    zero_dim_message,
)
from ._torch.loss import as_scalar_loss, default_dtype, first_line
from ._torch.state import disable_dropout_modules
from .compare import compare_gradients, default_tolerances
from .errors import DDPTimeoutError, DDPWorkerError, GradCheckError, GradEquivError, InvalidArgument
from .report import Finding, GradEquivReport
from .verdict import run_check

__all__ = ["DDPTimeoutError", "DDPWorkerError", "assert_ddp_equiv"]

TensorOrTuple = Union[torch.Tensor, Sequence[torch.Tensor]]

BACKENDS = ("gloo", "nccl")
_LOOPBACK = "127.0.0.1"
#: Modules the forkserver imports once, so that a rank starts in milliseconds, not seconds
#: (DDP's constructor alone imports torch._dynamo).
_PRELOAD = (
    "torch",
    "torch.distributed",
    "torch.nn.parallel",
    "torch._dynamo",
    "numpy",
    "pytest_gradcheck.ddp",
)
#: Seconds a rank that has sent its results gets to exit on its own before it is stopped.
_EXIT_GRACE = 10.0
#: Seconds between SIGTERM and SIGKILL when stopping a rank.
_TERM_GRACE = 2.0


# --------------------------------------------------------------------------- public API


def assert_ddp_equiv(
    make_model: Callable[[], torch.nn.Module],
    loss_fn: Callable[..., torch.Tensor] | None,
    inputs: Any,
    targets: TensorOrTuple | None = None,
    *,
    world_size: int = 2,
    backend: str = "gloo",
    shards: Sequence[Sequence[int]] | None = None,
    sampler: bool = False,
    micro_batches: int = 1,
    reduction: str = "mean",
    rtol: float | None = None,
    atol: float | None = None,
    timeout: float = 60.0,
    step_fn: Callable[[torch.nn.Module, Any], Any] | None = None,
    ddp_options: Mapping[str, Any] | None = None,
    float64_recheck: bool = True,
    start_method: str = "auto",
) -> GradEquivReport:
    """Assert that one DDP training step computes the single-process full-batch gradient.

    ``world_size`` processes each call ``torch.manual_seed(0); make_model()``,
    wrap the model in ``DistributedDataParallel`` (``ddp_options`` are passed
    to it) and run ``loss_fn(model(*x_shard), y_shard).backward()`` on their
    shard of ``inputs``/``targets`` (batch on dim 0, as in
    :func:`~pytest_gradcheck.assert_gradequiv`). The gradient every rank holds
    after DDP's all-reduce is compared with the gradient of
    ``loss_fn(model(*inputs), targets)`` on the whole batch, in this process,
    from the same initial parameters. The reference is that gradient *as is*:
    ``reduction`` (``"mean"``, ``"sum"``, or ``"auto"`` to infer it) only says
    how the loss reduces over the batch, for the report's words.

    Shards: contiguous ``tensor_split`` pieces by default; ``shards`` gives one
    list of sample indices per rank (uneven sizes allowed); ``sampler=True``
    reproduces ``DistributedSampler(shuffle=False, drop_last=False)``, which
    strides samples over the ranks and repeats some to even the shards out
    (the report names them). ``micro_batches=k`` splits each shard into ``k``
    micro-batches and calls ``backward()`` on each loss as it is (no ``1/k``),
    under ``model.no_sync()`` for all but the last. ``step_fn(model, batch)``
    replaces ``loss_fn`` for steps of another form (``loss_fn`` is then None and
    ``inputs`` is the batch: any nesting of tuples, lists and dicts of tensors
    with the batch on dim 0); it returns the loss, or a mapping with a
    ``"loss"`` entry.

    The reference and the diagnosis call ``loss_fn``/``step_fn`` in this
    process, which has no process group (``torch.distributed.is_initialized()``
    is False here): a loss that normalises by a global count must guard its
    collectives with it (see ``examples/test_ddp.py``).

    ``start_method``: ``"auto"`` (default) uses a *forkserver* where the
    platform has one: it imports torch once per session and forks every rank
    from it, ready to run (a spawned rank spends seconds importing torch);
    ``"spawn"`` starts fresh interpreters. Both send the factories and the
    batch by pickle, and both give the ranks this process's ``sys.path`` and
    environment. ``ddp_options`` are passed to ``DistributedDataParallel``
    (e.g. ``{"find_unused_parameters": True}``).

    ``make_model``, ``loss_fn`` and ``step_fn`` are sent to the spawned
    processes by pickle: module-level functions (a test module's are fine),
    classes, or picklable objects such as ``torch.nn.MSELoss()``; lambdas and
    local functions raise :class:`~pytest_gradcheck.errors.InvalidArgument`.

    ``timeout`` (seconds) bounds the whole run, process start-up included, and
    every collective: on expiry the processes are stopped and
    :class:`DDPTimeoutError` is raised. Dropout is switched off in every rank
    and in the reference. A float32 mismatch is re-checked in float64 (the
    ranks run both steps; ``float64_recheck=False`` skips it).

    Returns a :class:`~pytest_gradcheck.report.GradEquivReport` (``check="ddp"``);
    raises :class:`~pytest_gradcheck.errors.GradEquivError` on mismatch,
    :class:`~pytest_gradcheck.errors.InvalidArgument` on bad arguments, and
    :class:`DDPWorkerError` when a rank fails.

    >>> import torch, torch.nn.functional as F
    >>> from pytest_gradcheck import assert_ddp_equiv
    >>> def make_model():  # at module level in real code
    ...     return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> assert_ddp_equiv(make_model, F.mse_loss, x, y, world_size=2).passed  # doctest: +SKIP
    True
    >>> assert_ddp_equiv(make_model, F.mse_loss, x, y, shards=[range(5), range(5, 8)])  # doctest: +SKIP
    Traceback (most recent call last):
    GradEquivError: Gradients are NOT equivalent: the DDP gradient differs from the single-process ...
    ...
    Cause: ranks weight samples by 1/shard size: with shards of 5 and 3 samples the DDP gradient is a
    shard-size-weighted mean ...; divide by the global count instead ...
    """
    __tracebackhide__ = True
    cfg = _Config.build(
        make_model,
        loss_fn,
        inputs,
        targets,
        world_size=world_size,
        backend=backend,
        shards=shards,
        sampler=sampler,
        micro_batches=micro_batches,
        reduction=reduction,
        rtol=rtol,
        atol=atol,
        timeout=timeout,
        step_fn=step_fn,
        ddp_options=ddp_options,
        float64_recheck=float64_recheck,
        start_method=start_method,
    )
    ref = _Reference(cfg)
    if cfg.reduction == "auto":
        cfg.reduction = ref.infer_reduction()
        cfg.notes.append(
            f"the loss is a {cfg.reduction} over the batch (inferred: doubling the batch "
            + ("leaves it unchanged)." if cfg.reduction == "mean" else "doubles it).")
        )
    ref.gradient(False)  # bad losses fail here, before any process is started
    results = _run_ranks(cfg, ref)
    problem = _DDPProblem(cfg, ref, results)
    try:
        report = run_check(
            problem,
            reduction=cfg.reduction,
            rtol=cfg.rtol,
            atol=cfg.atol,
            float64_recheck=cfg.float64_recheck,
            check="ddp",
            notes=problem.notes(),
        )
    except GradEquivError as err:
        failed = err.report
        failed.findings = tuple(problem.diagnose(failed))
        failed.would_match = problem.would_match
        raise GradEquivError(failed) from None
    return report


# --------------------------------------------------------------------------- configuration


class _Step:
    """``loss_fn(model(*x), y)`` or ``step_fn(model, batch)``: picklable, run in every rank."""

    def __init__(
        self,
        loss_fn: Callable[..., Any] | None,
        step_fn: Callable[[torch.nn.Module, Any], Any] | None,
        targets_mode: str,
    ) -> None:
        self.loss_fn = loss_fn
        self.step_fn = step_fn
        self.targets_mode = targets_mode  # "none" | "tensor" | "tuple" (loss form only)

    def __call__(self, model: torch.nn.Module, batch: Any, where: str) -> torch.Tensor:
        if self.step_fn is not None:
            return as_scalar_loss(self.step_fn(model, batch), where=where)
        xs, ys = batch
        out = model(*xs)
        if self.loss_fn is None:  # pragma: no cover - excluded by _Config
            raise InvalidArgument("loss_fn is None")
        if self.targets_mode == "none":
            loss = self.loss_fn(out)
        elif self.targets_mode == "tuple":
            loss = self.loss_fn(out, *ys)
        else:
            loss = self.loss_fn(out, ys[0])
        return as_scalar_loss(loss, where=where)


class _Config:
    """Validated arguments of one :func:`assert_ddp_equiv` call."""

    make_model: Callable[[], torch.nn.Module]
    step: _Step
    batch: Any
    batch_size: int
    world_size: int
    backend: str
    shards: list[np.ndarray]
    shard_source: str
    repeated: tuple[int, ...]
    micro_batches: int
    reduction: str
    rtol: float | None
    atol: float | None
    timeout: float
    ddp_options: dict[str, Any]
    float64_recheck: bool
    start_method: str
    notes: list[str]

    @classmethod
    def build(
        cls,
        make_model: Any,
        loss_fn: Any,
        inputs: Any,
        targets: Any,
        *,
        world_size: Any,
        backend: Any,
        shards: Any,
        sampler: Any,
        micro_batches: Any,
        reduction: Any,
        rtol: Any,
        atol: Any,
        timeout: Any,
        step_fn: Any,
        ddp_options: Any,
        float64_recheck: Any,
        start_method: Any,
    ) -> _Config:
        self = cls()
        self.notes = []
        self.world_size = _check_int(world_size, "world_size", minimum=1)
        self.micro_batches = _check_int(micro_batches, "micro_batches", minimum=1)
        self.backend = check_choice(backend, "backend", BACKENDS)
        if self.backend == "nccl" and torch.cuda.device_count() < self.world_size:
            raise InvalidArgument(
                f"backend='nccl' needs one CUDA device per rank: world_size={self.world_size} but "
                f"{torch.cuda.device_count()} CUDA device(s) are visible; use backend='gloo' (CPU)"
            )
        self.reduction = check_choice(reduction, "reduction", ("mean", "sum", "auto"))
        self.rtol = check_tolerance(rtol, "rtol")
        self.atol = check_tolerance(atol, "atol")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise InvalidArgument(f"Invalid timeout={timeout!r}: expected a finite number of seconds > 0")
        self.timeout = float(timeout)
        sampler = check_bool(sampler, "sampler")
        self.float64_recheck = check_bool(float64_recheck, "float64_recheck")
        self.start_method = _start_method(start_method)
        if ddp_options is None:
            self.ddp_options = {}
        elif isinstance(ddp_options, Mapping):
            bad = sorted(k for k in ddp_options if k in ("module", "device_ids", "output_device", "process_group"))
            if bad:
                raise InvalidArgument(
                    f"ddp_options may not set {', '.join(bad)}: the check builds the module, the "
                    "process group and the device placement itself"
                )
            self.ddp_options = dict(ddp_options)
        else:
            raise InvalidArgument(f"ddp_options must be a mapping or None, got {type(ddp_options).__name__}")

        if not callable(make_model):
            raise InvalidArgument(f"make_model must be callable (it builds the model), got {type(make_model).__name__}")
        if step_fn is not None:
            if loss_fn is not None:
                raise InvalidArgument("pass either loss_fn or step_fn, not both (loss_fn=None with step_fn=...)")
            if targets is not None:
                raise InvalidArgument("with step_fn, pass the whole batch as inputs and leave targets=None")
            if not callable(step_fn):
                raise InvalidArgument(f"step_fn must be callable, got {type(step_fn).__name__}")
            self.step = _Step(None, step_fn, "none")
            self.batch = inputs
            allow_non_tensor = True
            paths = leaf_paths(inputs)
        else:
            if isinstance(loss_fn, type) and issubclass(loss_fn, torch.nn.Module):
                name = class_name(loss_fn)
                raise InvalidArgument(f"loss_fn is the class {name}; pass an instance: {name}()")
            if not callable(loss_fn):
                raise InvalidArgument(f"loss_fn must be callable, got {type(loss_fn).__name__} (or pass step_fn=...)")
            inputs_t = _tensor_tuple(inputs, "inputs")
            if targets is None:
                targets_t: tuple[torch.Tensor, ...] = ()
                mode = "none"
            else:
                targets_t = _tensor_tuple(targets, "targets")
                mode = "tuple" if isinstance(targets, (tuple, list)) else "tensor"
            self.step = _Step(loss_fn, None, mode)
            self.batch = (inputs_t, targets_t)
            allow_non_tensor = False
            paths = loss_form_paths(inputs, targets)
        _check_picklable(make_model, "make_model", "a module-level function")
        if loss_fn is not None:
            _check_picklable(loss_fn, "loss_fn", "a module-level function, or an object such as torch.nn.MSELoss()")
        if step_fn is not None:
            _check_picklable(step_fn, "step_fn", "a module-level function")
        self.make_model = make_model
        self.batch_size = _batch_size(self.batch, allow_non_tensor, paths)
        self.shards, self.shard_source, self.repeated = _plan_shards(self.batch_size, self.world_size, shards, sampler)
        for r, idx in enumerate(self.shards):
            if len(idx) < self.micro_batches:
                raise InvalidArgument(
                    f"rank {r} has {len(idx)} sample(s), fewer than micro_batches={self.micro_batches}: "
                    "every micro-batch needs at least one sample"
                )
        return self

    # -- derived views ----------------------------------------------------------------------
    @property
    def shard_sizes(self) -> list[int]:
        return [len(s) for s in self.shards]

    def micro_splits(self, rank: int) -> list[np.ndarray]:
        return [np.asarray(a, dtype=np.int64) for a in np.array_split(self.shards[rank], self.micro_batches)]

    def describe(self) -> str:
        sizes = self.shard_sizes
        text = (
            f"DDP step on {self.world_size} rank{'s' if self.world_size != 1 else ''} ({self.backend}), "
            f"shards of {_and(sizes)} sample{'s' if sizes != [1] else ''} ({self.shard_source}"
        )
        shown = "; ".join(_fmt_indices(s) for s in self.shards[:4])
        if len(self.shards) > 4:
            shown += "; ..."
        text += f": {shown})"
        if self.micro_batches > 1:
            text += (
                f", {self.micro_batches} micro-batches per rank accumulated under no_sync() "
                "(the last one synchronised), each loss back-propagated as is"
            )
        return text + "."


def _start_method(value: Any) -> str:
    available = multiprocessing.get_all_start_methods()
    choice = check_choice(value, "start_method", ("auto", "forkserver", "spawn"))
    if choice == "auto":
        return "forkserver" if "forkserver" in available else "spawn"
    if choice not in available:
        raise InvalidArgument(f"start_method={choice!r} is not available on this platform; use 'spawn'")
    return choice


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise InvalidArgument(f"Invalid {name}={value!r}: expected an integer >= {minimum}")
    return int(value)


def _tensor_tuple(value: Any, name: str) -> tuple[torch.Tensor, ...]:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not items:
        raise InvalidArgument(f"{name} is empty: pass a tensor or a tuple of tensors with the batch on dim 0")
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            label = f"{name}[{i}]" if isinstance(value, (tuple, list)) else name
            raise InvalidArgument(
                f"{label} is a {type(t).__name__}, not a tensor: every entry of {name} must be a tensor "
                "with the batch on dim 0 (use step_fn= for batches of another form)"
            )
    return items


def _batch_size(batch: Any, allow_non_tensor: bool, paths: list[str]) -> int:
    """The global batch size, checked like every other check's (``check_batch_sizes``: sizes that
    disagree, an empty batch and a batch of one are refused), naming tensors as the user passed them."""
    leaves, _ = pytree.tree_flatten(batch)
    sizes: list[tuple[str, int]] = []
    for path, leaf in zip(paths, leaves):
        if isinstance(leaf, torch.Tensor):
            if leaf.dim() == 0:
                raise InvalidArgument(zero_dim_message(path))
            if leaf.layout != torch.strided:
                raise InvalidArgument(sparse_input_message(path, leaf))
            sizes.append((describe_leaf(path, leaf), int(leaf.shape[0])))
        elif not allow_non_tensor:
            raise InvalidArgument(f"{path} is a {type(leaf).__name__}, not a tensor")
    if not sizes:
        raise InvalidArgument("the batch holds no tensor: nothing to shard over the ranks")
    return check_batch_sizes(sizes)


def _plan_shards(b: int, world_size: int, shards: Any, sampler: bool) -> tuple[list[np.ndarray], str, tuple[int, ...]]:
    if sampler and shards is not None:
        raise InvalidArgument("pass either shards=... or sampler=True, not both")
    repeated: tuple[int, ...] = ()
    if sampler:
        from torch.utils.data import DistributedSampler

        out = [
            np.asarray(
                list(DistributedSampler(range(b), num_replicas=world_size, rank=r, shuffle=False, drop_last=False)),
                dtype=np.int64,
            )
            for r in range(world_size)
        ]
        counts = np.bincount(np.concatenate(out), minlength=b)
        repeated = tuple(int(i) for i in np.nonzero(counts > 1)[0])
        source = "DistributedSampler(shuffle=False, drop_last=False)"
    elif shards is None:
        if b < world_size:
            raise InvalidArgument(
                f"a batch of {b} cannot be split over world_size={world_size} ranks: every rank needs at "
                "least one sample"
            )
        out = [np.asarray(a, dtype=np.int64) for a in np.array_split(np.arange(b), world_size)]
        source = "contiguous split"
    else:
        if isinstance(shards, (str, bytes)) or not isinstance(shards, Sequence):
            raise InvalidArgument(
                f"shards must be a sequence of index lists, one per rank, got {type(shards).__name__}"
            )
        if len(shards) != world_size:
            raise InvalidArgument(
                f"shards has {len(shards)} index list(s) but world_size={world_size}: give one per rank"
            )
        out = []
        for r, s in enumerate(shards):
            try:
                idx = np.asarray(s.tolist() if isinstance(s, (torch.Tensor, np.ndarray)) else list(s))
            except TypeError:
                raise InvalidArgument(f"shards[{r}] is not a sequence of sample indices") from None
            if idx.size == 0:
                raise InvalidArgument(f"shards[{r}] is empty: every rank needs at least one sample")
            if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
                raise InvalidArgument(f"shards[{r}] must be a flat list of integer sample indices")
            if idx.min() < 0 or idx.max() >= b:
                raise InvalidArgument(f"shards[{r}] has indices outside the batch of {b}: {_fmt_indices(idx)}")
            out.append(idx.astype(np.int64))
        source = "explicit shards"
    for r, idx in enumerate(out):
        if idx.size == 0:
            raise InvalidArgument(f"rank {r} gets no sample: every rank needs at least one sample")
    return out, source, repeated


def _check_picklable(obj: Any, name: str, what: str) -> None:
    message = (
        f"{name} must be importable by the child processes ({what}), lambdas and local functions "
        "cannot be sent to spawned processes"
    )
    try:
        pickle.dumps(obj)
    except Exception as exc:  # PicklingError, AttributeError ("Can't pickle local object"), TypeError
        raise InvalidArgument(f"{message}: {type(exc).__name__}: {first_line(exc)}") from None
    module = getattr(obj, "__module__", None) if isinstance(obj, (types.FunctionType, type)) else None
    if module == "__main__" and not getattr(sys.modules.get("__main__"), "__file__", None):
        raise InvalidArgument(
            f"{message}: {name} is defined in an interactive session (__main__ has no file), which a "
            "spawned process cannot import; define it in a module"
        )


# --------------------------------------------------------------------------- helpers on batches and models


def _take(batch: Any, idx: np.ndarray) -> Any:
    index = torch.as_tensor(idx, dtype=torch.long)

    def take(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.detach().index_select(0, index.to(x.device)).clone()
        return x

    return pytree.tree_map(take, batch)


def _convert(batch: Any, float64: bool, device: torch.device | None = None) -> Any:
    def conv(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        y = x.detach()
        if device is not None:
            y = y.to(device)
        if float64 and y.is_floating_point():
            y = y.to(torch.float64)
        return y.clone()

    return pytree.tree_map(conv, batch)


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        data = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(data.dtype).encode())
        h.update(str(tuple(data.shape)).encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def _grads_of(model: torch.nn.Module) -> tuple[dict[str, np.ndarray], list[str]]:
    out: dict[str, np.ndarray] = {}
    missing: list[str] = []
    for name, p in _trainable(model):
        if p.grad is None:
            missing.append(name)
            out[name] = np.zeros(tuple(p.shape), dtype=np.float64)
        else:
            out[name] = p.grad.detach().to("cpu", torch.float64).numpy().copy()
    return out, missing


def _batchnorms(model: torch.nn.Module) -> list[str]:
    """Paths of BatchNorm modules that normalise with batch statistics (not SyncBatchNorm)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    out = []
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and not isinstance(module, torch.nn.SyncBatchNorm):
            if module.training or module.running_mean is None:
                out.append(f"model{'.' + name if name else ''} ({type(module).__name__})")
    return out


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """``torch.manual_seed(0)`` for the block; the caller's RNG states are restored afterwards."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    torch.manual_seed(0)
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _build_model(make_model: Callable[[], Any], where: str) -> torch.nn.Module:
    model = make_model()
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgument(f"make_model() must return a torch.nn.Module, got {type(model).__name__} ({where})")
    if not _trainable(model):
        raise InvalidArgument("the model has no parameter that requires grad: there is no gradient to check")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise InvalidArgument("make_model() must return the plain model: the check wraps it in DDP itself")
    return model


# --------------------------------------------------------------------------- the single-process side


class _Reference:
    """The model built in this process and the single-process gradients the verdict needs."""

    def __init__(self, cfg: _Config) -> None:
        self.cfg = cfg
        with _seeded():
            self.model = _build_model(cfg.make_model, "in the parent process")
        self.dropout = disable_dropout_modules(self.model)
        self.batchnorms = _batchnorms(self.model)
        self.names = [n for n, _ in _trainable(self.model)]
        first = _trainable(self.model)[0][1]
        self.dtype = str(first.dtype).replace("torch.", "")
        self.device = first.device
        self.hash = _state_hash(self.model)
        self.source = "parent"  # whose initial parameters: "parent" or "rank 0"
        self._models: dict[bool, torch.nn.Module] = {False: self.model}
        self._full: dict[bool, dict[str, np.ndarray]] = {}
        self._local: dict[tuple[bool, bytes], dict[str, np.ndarray]] = {}

    def adopt(self, state: bytes) -> None:
        """Start from rank 0's initial parameters (DDP broadcast them to every rank)."""
        loaded = torch.load(io.BytesIO(state), map_location=self.device, weights_only=True)
        self.model.load_state_dict(loaded)
        self.source = "rank 0"
        self._models = {False: self.model}
        self._full.clear()
        self._local.clear()

    def _model(self, float64: bool) -> torch.nn.Module:
        if float64 not in self._models:
            self._models[float64] = copy.deepcopy(self.model).to(torch.float64)
        return self._models[float64]

    def _grad(self, idx: np.ndarray | None, float64: bool) -> dict[str, np.ndarray]:
        model = self._model(float64)
        batch = self.cfg.batch if idx is None else _take(self.cfg.batch, idx)
        saved = {n: b.detach().clone() for n, b in model.named_buffers()}
        params = [p for _, p in _trainable(model)]
        with default_dtype(float64), _seeded():
            loss = self.cfg.step(model, _convert(batch, float64, self.device), where="batch")
            if not loss.requires_grad:
                raise InvalidArgument(
                    "the loss does not depend on any parameter that requires grad (it has no grad_fn): "
                    "is it computed under torch.no_grad(), or from detached outputs?"
                )
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])
        return {
            n: (np.zeros(tuple(p.shape)) if g is None else g.detach().to("cpu", torch.float64).numpy())
            for n, g, p in zip(self.names, grads, params)
        }

    def gradient(self, float64: bool) -> dict[str, np.ndarray]:
        """The full-batch gradient, as is."""
        if float64 not in self._full:
            self._full[float64] = self._grad(None, float64)
        return self._full[float64]

    def local(self, idx: np.ndarray, float64: bool) -> dict[str, np.ndarray]:
        """The gradient of the loss on the samples ``idx`` alone (one rank's micro-batch)."""
        key = (float64, np.asarray(idx, dtype=np.int64).tobytes())
        if key not in self._local:
            self._local[key] = self._grad(idx, float64)
        return self._local[key]

    def infer_reduction(self) -> str:
        """``"mean"`` if doubling the batch leaves the loss unchanged, ``"sum"`` if it doubles it."""
        b = self.cfg.batch_size
        idx = np.arange(b)
        values = []
        for sel in (idx, np.concatenate([idx, idx])):
            with torch.no_grad(), _seeded():
                batch = _convert(_take(self.cfg.batch, sel), False, self.device)
                values.append(float(self.cfg.step(self.model, batch, "reduction probe")))
        one, two = values
        if math.isclose(two, one, rel_tol=1e-3, abs_tol=1e-12):
            return "mean"
        if math.isclose(two, 2 * one, rel_tol=1e-3, abs_tol=1e-12):
            return "sum"
        raise InvalidArgument(
            f"reduction='auto' could not tell how the loss reduces over the batch (loss {one:.6g} on the "
            f"batch, {two:.6g} on the batch twice over); pass reduction='mean' or 'sum'"
        )


# --------------------------------------------------------------------------- the ranks: parent side


class _RankResult:
    def __init__(self, payload: Mapping[str, Any]) -> None:
        self.rank: int = payload["rank"]
        self.init_hash: str = payload["init_hash"]
        self.init_state: bytes | None = payload.get("init_state")
        self.grads: dict[str, np.ndarray] = payload["grads"]
        self.missing: list[str] = payload["missing"]
        self.grads64: dict[str, np.ndarray] | None = payload.get("grads64")
        self.f64_error: str | None = payload.get("f64_error")
        self.losses: list[float] = payload.get("losses", [])


def _loopback_interface() -> str | None:
    try:
        names = [n for _, n in socket.if_nameindex()]
    except OSError:  # pragma: no cover - platforms without if_nameindex
        return None
    for n in ("lo", "lo0"):
        if n in names:
            return n
    return next((n for n in names if n.startswith("lo")), None)


def _record_modules(obj: Any) -> tuple[bytes, set[str]]:
    """Pickle ``obj``; also return the modules of every function and class it refers to."""
    modules: set[str] = set()

    class _Recorder(pickle.Pickler):
        def reducer_override(self, o: Any) -> Any:
            if isinstance(o, (types.FunctionType, type)):
                name = getattr(o, "__module__", None)
                if isinstance(name, str):
                    modules.add(name)
            return NotImplemented

    buf = io.BytesIO()
    _Recorder(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue(), modules


def _resolves_to(name: str, file: str) -> bool:
    """Whether importing ``name`` from ``sys.path`` finds ``file`` (checked without importing)."""
    path: Sequence[str] | None = None
    spec = None
    parts = name.split(".")
    for i in range(len(parts)):
        try:
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), path)
        except Exception:
            return False
        if spec is None:
            return False
        path = spec.submodule_search_locations
        if i < len(parts) - 1 and path is None:
            return False
    origin = getattr(spec, "origin", None)
    return bool(origin) and os.path.realpath(str(origin)) == os.path.realpath(file)


def _modules_to_ship(names: set[str]) -> list[tuple[str, str]]:
    """Modules the children cannot import by name (pytest's importlib mode): ship their files."""
    stdlib = getattr(sys, "stdlib_module_names", frozenset())
    out = []
    for name in sorted(names):
        if name in ("__main__", "__mp_main__", "builtins") or name.split(".")[0] in stdlib:
            continue
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if not file or _resolves_to(name, file):
            continue
        out.append((name, os.path.abspath(file)))
    return out


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((_LOOPBACK, 0))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _run_ranks(cfg: _Config, ref: _Reference) -> list[_RankResult]:
    """Spawn the ranks, collect their gradients; always stop and join them."""
    __tracebackhide__ = True
    import torch.distributed as dist

    deadline = time.monotonic() + cfg.timeout
    float64 = cfg.float64_recheck and ref.dtype != "float64"
    # The rendezvous store lives here, on a socket bound to 127.0.0.1 only (TCPStore would
    # listen on every interface), on a port the OS picks: no race for a free port.
    sock = _listening_socket()
    port = sock.getsockname()[1]
    spec = {
        "world_size": cfg.world_size,
        "backend": cfg.backend,
        "port": port,
        "timeout": cfg.timeout,
        "make_model": cfg.make_model,
        "step": cfg.step,
        "batch": pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, cfg.batch),
        "shards": [s.tolist() for s in cfg.shards],
        "micro_batches": cfg.micro_batches,
        "float64": float64,
        "expected_hash": ref.hash,
        "ddp_options": cfg.ddp_options,
        "ifname": _loopback_interface(),
        "environ": dict(os.environ),
    }
    try:
        blob, module_names = _record_modules(spec)
    except Exception as exc:
        sock.close()
        raise InvalidArgument(
            f"the check's arguments cannot be sent to the spawned processes: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    modules = _modules_to_ship(module_names)
    fd = sock.detach()
    try:
        store = dist.TCPStore(
            _LOOPBACK,
            port,
            None,
            True,
            timedelta(seconds=cfg.timeout),
            wait_for_workers=False,
            master_listen_fd=fd,
        )
    except BaseException:
        os.close(fd)
        raise
    ctx = multiprocessing.get_context(cfg.start_method)
    if cfg.start_method == "forkserver":
        # The server imports torch once; every later rank is forked from it, ready to run.
        ctx.set_forkserver_preload(list(_PRELOAD))
    procs: list[Any] = []
    conns: dict[int, Any] = {}
    try:
        for rank in range(cfg.world_size):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_worker,
                args=(rank, send, blob, list(sys.path), modules),
                name=f"gradcheck-ddp-rank{rank}",
                daemon=False,
            )
            p.start()
            send.close()
            procs.append(p)
            conns[rank] = recv
        results = _collect(cfg, procs, conns, deadline)
        # Every rank has sent its results: let them leave the process group and exit.
        end = time.monotonic() + min(_EXIT_GRACE, max(1.0, deadline - time.monotonic()))
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
    finally:
        _stop(procs)
        for c in conns.values():
            c.close()
        del store
    for r in results:
        if r.rank == 0 and r.init_state is not None:
            ref.adopt(r.init_state)
    return sorted(results, key=lambda r: r.rank)


def _collect(cfg: _Config, procs: Sequence[Any], conns: Mapping[int, Any], deadline: float) -> list[_RankResult]:
    """Read every rank's messages (progress, results, errors) until all have reported."""
    __tracebackhide__ = True
    pending = dict(conns)
    stages = {r: "starting up (process start, joining the process group)" for r in conns}
    results: dict[int, _RankResult] = {}
    errors: list[tuple[int, dict[str, Any]]] = []
    while pending and not errors:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout_error(cfg, sorted(results), {r: stages[r] for r in sorted(pending)}, [])
        waitables: list[Any] = list(pending.values()) + [procs[r].sentinel for r in pending]
        ready = multiprocessing.connection.wait(waitables, timeout=remaining)
        for rank in sorted(pending):
            conn, proc = pending[rank], procs[rank]
            if conn not in ready and proc.sentinel not in ready:
                continue
            try:
                if not conn.poll():
                    if proc.sentinel in ready:
                        raise EOFError
                    continue
                kind, _rank, payload = conn.recv()
            except (EOFError, OSError):
                proc.join(1.0)
                errors.append(
                    (
                        rank,
                        {
                            "type": "ProcessDied",
                            "message": _exit_text(proc.exitcode),
                            "traceback": "",
                            "invalid": False,
                            "collective": False,
                        },
                    )
                )
                del pending[rank]
                continue
            if kind == "stage":
                stages[rank] = payload
                continue
            del pending[rank]
            if kind == "ok":
                results[rank] = _RankResult(payload)
            else:
                errors.append((rank, payload))
    if errors:
        others = [(r, e) for r, e in errors if not e.get("collective_timeout")]
        if others:
            # the first failure that is not a peer's broken connection is the cause
            cause = min(others, key=lambda x: (bool(x[1].get("collective")), x[0]))
            raise _worker_error(cfg, *cause)
        waited = [r for r, _ in errors]
        unfinished = {r: stages[r] for r in range(cfg.world_size) if r not in results and r not in waited}
        raise _timeout_error(cfg, sorted(results), unfinished, waited)
    return [results[r] for r in sorted(results)]


def _exit_text(code: int | None) -> str:
    if code is None:
        return "the process ended its connection without reporting"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the process was killed by {name} without reporting (a crash in native code?)"
    return f"the process exited with code {code} without reporting"


def _worker_error(cfg: _Config, rank: int, info: Mapping[str, Any]) -> GradCheckError:
    message = info.get("message", "")
    if info.get("invalid"):
        return InvalidArgument(f"rank {rank} of {cfg.world_size}: {message}")
    tb = info.get("traceback", "")
    text = f"rank {rank} of {cfg.world_size} failed: {info.get('type', 'Error')}: {message}"
    if tb:
        text += f"\n\nTraceback in rank {rank}:\n{tb.rstrip()}"
    return DDPWorkerError(text, rank, tb)


def _timeout_error(
    cfg: _Config, done: Sequence[int], unfinished: Mapping[int, str], waited: Sequence[int] = ()
) -> DDPTimeoutError:
    """``unfinished``: rank -> what it was doing when time ran out (its last progress message)."""
    parts = [f"rank {r} was {stage}" for r, stage in sorted(unfinished.items())]
    if waited:
        parts.append(
            f"rank{'s' if len(waited) != 1 else ''} {_and(list(waited))} waited {cfg.timeout:g} s in a "
            "collective for the others and gave up"
        )
    if done:
        parts.append(f"rank{'s' if len(done) != 1 else ''} {_and(list(done))} finished")
    pending = sorted({*unfinished, *waited})
    return DDPTimeoutError(
        f"assert_ddp_equiv ran out of time (timeout={cfg.timeout:g} s) before every rank finished the step: "
        + "; ".join(parts)
        + ". The child processes were stopped. A rank that never reaches the all-reduce (an endless loop, "
        "a collective that only some ranks call, a deadlock in the model or the loss) blocks the others, "
        "which wait in DDP's gradient all-reduce; if the step is merely slow, pass a larger timeout=.",
        ranks_done=done,
        ranks_pending=pending,
    )


def _stop(procs: Sequence[Any]) -> None:
    """Terminate, then kill, then join every child that is still running."""
    for p in procs:
        if p.is_alive():
            with contextlib.suppress(Exception):
                p.terminate()
    end = time.monotonic() + _TERM_GRACE
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            with contextlib.suppress(Exception):
                p.kill()
    for p in procs:
        with contextlib.suppress(Exception):
            p.join()
        with contextlib.suppress(Exception):
            p.close()


# --------------------------------------------------------------------------- the ranks: child side


def _worker(rank: int, conn: Any, blob: bytes, sys_path: list[str], modules: list[tuple[str, str]]) -> None:
    """Entry point of one rank (runs in a forked-from-forkserver or spawned process)."""
    _die_with_parent()
    sys.path[:] = sys_path
    code = 1
    try:
        _load_modules(modules)
        spec = pickle.loads(blob)
        if spec.get("environ") is not None:  # the parent's environment now, not the forkserver's
            os.environ.clear()
            os.environ.update(spec["environ"])
        if spec.get("ifname"):
            os.environ["GLOO_SOCKET_IFNAME"] = spec["ifname"]  # gloo listens on loopback only
        payload = _rank_step(rank, spec, lambda stage: conn.send(("stage", rank, stage)))
        conn.send(("ok", rank, payload))
        code = 0
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    except BaseException as exc:  # report everything, KeyboardInterrupt included
        # No clean-up that could block on the other ranks: the parent stops them all.
        with contextlib.suppress(Exception):
            conn.send(("error", rank, _describe_error(exc)))
    finally:
        with contextlib.suppress(Exception):
            conn.close()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)  # skip interpreter teardown: nothing is left to clean up


def _load_modules(modules: Sequence[tuple[str, str]]) -> None:
    """Load the modules the parent found not importable by name from their files."""
    for name, file in modules:
        current = sys.modules.get(name)
        if current is not None and os.path.realpath(getattr(current, "__file__", "") or "") == os.path.realpath(file):
            continue
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def _die_with_parent() -> None:
    """Linux: have the kernel kill this rank if its parent (the check, or the forkserver) dies."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def _user_traceback(exc: BaseException) -> str:
    """The rank's traceback without this module's own frames (the user's frames are what matter)."""
    te = traceback.TracebackException.from_exception(exc)
    ours = {os.path.realpath(__file__)}
    frames = [f for f in te.stack if os.path.realpath(f.filename) not in ours]
    if frames:
        te.stack = traceback.StackSummary.from_list(frames)
    return "".join(te.format())


def _describe_error(exc: BaseException) -> dict[str, Any]:
    text = str(exc)
    lowered = text.lower()
    dist_error = type(exc).__name__.startswith("Dist") or "gloo" in lowered or "connection" in lowered
    return {
        "type": type(exc).__name__,
        "message": first_line(exc) if not isinstance(exc, InvalidArgument) else text,
        "traceback": _user_traceback(exc),
        "invalid": isinstance(exc, InvalidArgument),
        "collective": dist_error,
        "collective_timeout": dist_error and ("timed out" in lowered or "timeout" in lowered),
    }


def _rank_step(rank: int, spec: Mapping[str, Any], stage: Callable[[str], None]) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    world_size = spec["world_size"]
    threads = max(1, len(os.sched_getaffinity(0)) // world_size) if hasattr(os, "sched_getaffinity") else 1
    torch.set_num_threads(threads)
    timeout = timedelta(seconds=spec["timeout"])
    client = dist.TCPStore(_LOOPBACK, spec["port"], None, False, timeout)
    dist.init_process_group(spec["backend"], store=client, rank=rank, world_size=world_size, timeout=timeout)

    stage("building the model (make_model())")
    torch.manual_seed(0)
    model = _build_model(spec["make_model"], f"in rank {rank}")
    disable_dropout_modules(model)
    init_hash = _state_hash(model)
    init_state = None
    if rank == 0 and init_hash != spec["expected_hash"]:
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        init_state = buf.getvalue()
    model64 = copy.deepcopy(model).to(torch.float64) if spec["float64"] else None

    shard = np.asarray(spec["shards"][rank], dtype=np.int64)
    micro = [np.asarray(a, dtype=np.int64) for a in np.array_split(shard, spec["micro_batches"])]
    step: _Step = spec["step"]

    def run(m: torch.nn.Module, float64: bool) -> tuple[dict[str, np.ndarray], list[str], list[float]]:
        tag = "in the float64 re-run, " if float64 else "in "
        stage(f"{tag}DistributedDataParallel(model) (it broadcasts rank 0's parameters to every rank)")
        if spec["backend"] == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
            m.to(device)
            ddp = DDP(m, device_ids=[rank], **spec["ddp_options"])
        else:
            device = next(p for _, p in _trainable(m)).device
            ddp = DDP(m, **spec["ddp_options"])
        losses = []
        with default_dtype(float64):
            torch.manual_seed(0)
            for j, idx in enumerate(micro):
                ctx = ddp.no_sync() if j < len(micro) - 1 else contextlib.nullcontext()
                of = f"micro-batch {j + 1} of {len(micro)}"
                with ctx:
                    stage(f"{tag}the forward pass and the loss ({of})")
                    batch = _convert(_take(spec["batch"], idx), float64, device)
                    loss = step(ddp, batch, where=f"rank {rank}")
                    if j < len(micro) - 1:
                        stage(f"{tag}backward() under no_sync() ({of})")
                    else:
                        stage(f"{tag}backward() ({of}), whose gradient all-reduce waits for every rank")
                    loss.backward()
                    losses.append(float(loss.detach()))
        grads, missing = _grads_of(m)
        return grads, missing, losses

    grads, missing, losses = run(model, False)
    payload: dict[str, Any] = {
        "rank": rank,
        "init_hash": init_hash,
        "init_state": init_state,
        "grads": grads,
        "missing": missing,
        "losses": losses,
    }
    if model64 is not None:
        try:
            payload["grads64"] = run(model64, True)[0]
        except Exception as exc:
            if type(exc).__name__.startswith("Dist"):
                raise
            payload["f64_error"] = f"{type(exc).__name__}: {first_line(exc)}"
    return payload


# --------------------------------------------------------------------------- the verdict problem


class _DDPProblem:
    """The DDP gradient against the single-process full-batch gradient, for :func:`run_check`.

    ``batch_gradient`` is, per parameter, the gradient of the rank farthest from
    the reference (every rank must hold the same one after the all-reduce);
    ``reference_gradient`` is the full-batch gradient as is, scaled so that the
    declared reduction recovers it.
    """

    backend = "torch"
    reference_method = "ddp"
    fallback_reason: str | None = None
    dropout_disabled: tuple[str, ...] = ()
    broadcasts: tuple[Any, ...] = ()

    def __init__(self, cfg: _Config, ref: _Reference, results: Sequence[_RankResult]) -> None:
        self.cfg = cfg
        self.ref = ref
        self.results = list(results)
        self.batch_size = cfg.batch_size
        self.dtype = ref.dtype
        self.device = str(ref.device)
        self.would_match: str | None = None

    # -- GradientProblem ------------------------------------------------------------------------
    def rank_grads(self, float64: bool) -> list[dict[str, np.ndarray]]:
        if not float64:
            return [r.grads for r in self.results]
        grads = [r.grads64 for r in self.results]
        if any(g is None for g in grads):
            errors = [r.f64_error for r in self.results if r.f64_error]
            if errors:
                raise RuntimeError(f"the float64 DDP step failed: {errors[0]}")
            raise RuntimeError("the ranks did not run the float64 step (float64_recheck=False)")
        return [g for g in grads if g is not None]

    def batch_gradient(self, float64: bool) -> dict[str, np.ndarray]:
        ranks = self.rank_grads(float64)
        ref = self.ref.gradient(float64)
        out: dict[str, np.ndarray] = {}
        for name in self.ref.names:
            errs = [float(np.max(np.abs(g[name] - ref[name]), initial=0.0)) for g in ranks]
            out[name] = ranks[int(np.argmax(errs)) if errs else 0][name]
        return out

    def reference_gradient(self, coeffs: np.ndarray, float64: bool) -> dict[str, np.ndarray]:
        full = self.ref.gradient(float64)
        scale = float(np.sum(coeffs)) if self.cfg.reduction == "mean" else 1.0
        return {n: v * scale for n, v in full.items()}

    def per_sample_gradients(self, float64: bool) -> dict[str, np.ndarray] | None:
        return None  # the DDP diagnosis tests its own hypotheses (see diagnose)

    def weight_candidates(self) -> list[tuple[str, np.ndarray]]:
        return []

    def loss_values(self, float64: bool) -> tuple[float, np.ndarray] | None:
        return None

    # -- words ------------------------------------------------------------------------------------
    def _rank_spread(self, float64: bool, rtol: float, atol: float) -> tuple[bool, str | None]:
        """(ranks disagree beyond tolerance, a sentence about the largest difference)."""
        ranks = self.rank_grads(float64)
        worst: tuple[float, int, str] | None = None
        failed = False
        precision = "float64" if float64 else self.dtype
        for r in range(1, len(ranks)):
            cmp = compare_gradients(ranks[r], ranks[0], rtol=rtol, atol=atol, reduction="-", precision=precision)
            failed = failed or not cmp.passed
            for p in cmp.params:
                if p.max_abs_err > 0 and (worst is None or p.max_abs_err > worst[0]):
                    worst = (p.max_abs_err, r, p.name)
        if worst is None:
            return False, None
        d, r, name = worst
        return failed, f"rank {r}'s gradient of {name!r} differs from rank 0's (max abs diff {d:.2e})"

    def notes(self) -> list[str]:
        cfg, ref = self.cfg, self.ref
        out = list(cfg.notes)
        out.append(cfg.describe())
        if cfg.repeated:
            out.append(
                f"DistributedSampler repeated samples {_fmt_indices(cfg.repeated)} to even out the shards "
                f"({cfg.batch_size} samples padded to {sum(cfg.shard_sizes)})."
            )
        hashes = [r.init_hash for r in self.results]
        if len(set(hashes)) > 1:
            differ = [r.rank for r in self.results if r.init_hash != hashes[0]]
            out.append(
                f"the ranks built different initial parameters (rank{'s' if len(differ) != 1 else ''} "
                f"{_and(differ)} differ{'s' if len(differ) == 1 else ''} from rank 0 after "
                "torch.manual_seed(0); make_model() is not "
                "deterministic): DDP broadcast rank 0's at construction."
            )
        if ref.source == "rank 0":
            out.append(
                "make_model() built different initial parameters here than in rank 0; the reference "
                "starts from rank 0's, which DDP broadcast to every rank."
            )
        missing = sorted({n for r in self.results for n in r.missing})
        if missing:
            out.append(
                f"parameters with no gradient after the step (counted as zero): {', '.join(missing[:6])}"
                + (" ..." if len(missing) > 6 else "")
            )
        if ref.dropout:
            out.append(
                "dropout was switched off in every rank and in the reference (random masks differ "
                f"between processes): {', '.join(ref.dropout)}."
            )
        rtol, atol = default_tolerances(self.dtype, cfg.rtol, cfg.atol)
        with contextlib.suppress(Exception):
            failed, spread = self._rank_spread(False, rtol, atol)
            if spread and not failed:
                out.append(f"the ranks' gradients are not bitwise identical after the all-reduce: {spread}.")
        return out

    def diagnose(self, report: GradEquivReport) -> list[Finding]:
        """Explain a failed check in words (each sentence a hypothesis that was tested)."""
        cfg, ref = self.cfg, self.ref
        w, k = cfg.world_size, cfg.micro_batches
        float64 = report.float64 is not None and report.float64_error is None
        final = report.final
        rtol, atol = final.rtol, final.atol
        precision = final.precision
        findings: list[Finding] = []

        def say(text: str) -> None:
            findings.append(Finding("unidentifiable", label=text))

        self.would_match = "no rescaling or reweighting of the full-batch gradient"

        def close(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], slack: float = 10.0) -> bool:
            return compare_gradients(
                a, b, rtol=rtol * slack, atol=atol * slack, reduction="-", precision=precision
            ).passed

        ddp = self.batch_gradient(float64)
        full = ref.gradient(float64)

        disagree, spread = self._rank_spread(float64, rtol, atol)
        if disagree:
            self.would_match = "nothing: the ranks end the step with different gradients"
            say(
                "ranks disagree with each other: after DDP's all-reduce every rank must hold the same "
                f"gradient, but {spread}. The model or the step is rank-dependent or non-deterministic, or "
                "some gradients are not synchronised (a parameter DDP ignores, no_sync() around the last "
                "backward, gradients changed after backward()). The table shows, per parameter, the "
                "rank farthest from the reference."
            )
            unused = sorted({n for r in self.results for n in r.missing})
            if unused and not cfg.ddp_options.get("find_unused_parameters"):
                say(
                    f"parameters {', '.join(unused[:6])}{' ...' if len(unused) > 6 else ''} get no gradient "
                    "in the step, and DDP was not told: with find_unused_parameters=False the gradient "
                    "bucket that holds them is never all-reduced, so the ranks keep their own gradients. "
                    "Pass ddp_options={'find_unused_parameters': True}, or remove the unused parameters."
                )
        if ref.batchnorms and w > 1:
            self.would_match = "the ranks' own steps averaged (BatchNorm statistics per rank)"
            say(
                "BatchNorm normalises per rank; use SyncBatchNorm: "
                f"{_and(ref.batchnorms)} {'is' if len(ref.batchnorms) == 1 else 'are'} in train mode, so "
                "each rank normalises its shard with that shard's own mean and variance instead of the "
                "whole batch's, and the DDP gradient is not the full-batch one. Convert the model with "
                "torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) (CUDA), or check in eval mode, or "
                "use GroupNorm/LayerNorm, which normalise each sample alone."
            )
        counts = np.bincount(np.concatenate(cfg.shards), minlength=cfg.batch_size)
        unseen = [int(i) for i in np.nonzero(counts == 0)[0]]
        twice = [int(i) for i in np.nonzero(counts > 1)[0]]
        if cfg.repeated:
            pass  # said below, with the sampler
        elif unseen or twice:
            bits = []
            if unseen:
                bits.append(f"samples {_fmt_indices(unseen)} are on no rank")
            if twice:
                bits.append(f"samples {_fmt_indices(twice)} are on more than one rank")
            say(
                "the shards do not hold each sample once: "
                + "; ".join(bits)
                + ", while the full-batch reference counts every sample once."
            )

        factor = _factor(ddp, full)
        scaled = factor is not None and close(ddp, {n: factor * v for n, v in full.items()}, slack=1.0)
        if factor is not None and scaled and not disagree:
            self._explain_factor(factor, say)
            return findings

        # What the ranks' own losses give, DDP-averaged: each rank's micro-batch gradients re-run
        # one at a time in this process, summed per rank, averaged over ranks.
        try:
            expected = {n: np.zeros_like(v) for n, v in full.items()}
            for r in range(w):
                for idx in cfg.micro_splits(r):
                    g = ref.local(idx, float64)
                    for n in expected:
                        expected[n] = expected[n] + g[n] / w
        except Exception as exc:  # the hypothesis could not be computed: say nothing about it
            say(f"(the ranks' steps could not be re-run one at a time for a diagnosis: {first_line(exc)})")
            return findings
        if close(ddp, expected):
            if cfg.repeated:
                self.would_match = "the mean over the padded shards (repeated samples counted twice)"
                say(
                    f"DistributedSampler repeated samples {_fmt_indices(cfg.repeated)} to even out the shards "
                    f"({cfg.batch_size} samples over {w} ranks are padded to {sum(cfg.shard_sizes)}): each "
                    "repeated sample counts twice in the DDP gradient. Use a batch size divisible by "
                    "world_size, drop_last=True, or mask the padded samples out of the loss."
                )
            elif len(set(cfg.shard_sizes)) > 1 and not ref.batchnorms:
                sizes = cfg.shard_sizes
                per = ", ".join(f"1/{w * n} on a rank with {n}" for n in sorted(set(sizes), reverse=True))
                self.would_match = "the shard-size-weighted mean (each rank's mean weighted 1/world_size)"
                say(
                    f"ranks weight samples by 1/shard size: with shards of {_and(sizes)} samples the DDP "
                    f"gradient is a shard-size-weighted mean (DDP averages the ranks' means, so a sample "
                    f"counts {per} instead of 1/{cfg.batch_size}); divide by the global count instead: "
                    f"loss = sum over the shard / {cfg.batch_size} (the global batch size) * {w} (world_size, "
                    "because DDP averages the ranks' gradients)."
                )
            elif k > 1 and any(len({len(m) for m in cfg.micro_splits(r)}) > 1 for r in range(w)):
                self.would_match = "the micro-batch-size-weighted mean"
                say(
                    f"the micro-batches of a rank have different sizes ({_micro_sizes(cfg)}) and each "
                    "micro-batch loss is normalised by its own size: samples in smaller micro-batches count "
                    "more. Normalise every micro-batch loss by the global sample count instead."
                )
            elif not findings:
                self.would_match = "the ranks' own steps averaged"
                say(
                    "the DDP gradient is the average of what the ranks' own losses give, but that is not "
                    "the full-batch gradient: the loss is normalised per rank (or per micro-batch) in a way "
                    "that does not add up to the full-batch loss."
                )
        elif not disagree:
            say(
                "the DDP gradient is not the average of the ranks' own gradients (each rank's step re-run "
                "alone in one process): the step behaves differently under DDP, e.g. collectives or "
                "rank-dependent code in the model or the loss, randomness outside nn.Dropout, or hooks "
                "that change gradients."
            )
        return findings

    def _explain_factor(self, factor: float, say: Callable[[str], None]) -> None:
        w, k = self.cfg.world_size, self.cfg.micro_batches
        f = _fmt_factor(factor)
        if k > 1 and _near(factor, k):
            self.would_match = f"{k} × the full-batch gradient"
            say(
                f"no_sync() accumulation over {k} micro-batches sums their gradients: the DDP gradient is "
                f"{f} times the full-batch gradient (the 1/{k} is missing); divide each micro-batch loss "
                f"by {k} (loss / micro_batches) before backward(), or normalise by the global sample count."
            )
        elif w > 1 and _near(factor, 1.0 / w):
            self.would_match = f"1/{w} × the full-batch gradient"
            say(
                f"DDP averages the ranks' gradients (it divides by world_size={w}), but the loss is a sum "
                f"over each rank's shard: the DDP gradient is 1/{w} of the full-batch gradient. Multiply "
                "the loss by world_size (dist.get_world_size()), or use a mean normalised by the global count."
            )
        elif w > 1 and k > 1 and _near(factor, k / w):
            self.would_match = f"{k}/{w} × the full-batch gradient"
            say(
                f"the DDP gradient is {f} times the full-batch gradient: the {k} micro-batch gradients are "
                f"summed (1/{k} missing) and DDP averages over world_size={w} ranks a loss that is a sum "
                "over the shard."
            )
        elif _near(factor, -1.0):
            self.would_match = "-1 × the full-batch gradient"
            say("the DDP gradient has the opposite sign of the full-batch gradient (factor -1).")
        else:
            self.would_match = f"{f} × the full-batch gradient"
            say(
                f"the DDP gradient is {f} times the full-batch gradient (world_size={w}, "
                f"micro_batches={k}): the directions agree, only the scale is off; find where the loss "
                "or the gradients are scaled."
            )


# --------------------------------------------------------------------------- small formatting helpers


def _factor(g: Mapping[str, np.ndarray], r: Mapping[str, np.ndarray]) -> float | None:
    names = list(r)
    gv = np.concatenate([np.ravel(g[n]) for n in names])
    rv = np.concatenate([np.ravel(r[n]) for n in names])
    rr = float(np.dot(rv, rv))
    if rr <= 0:
        return None
    f = float(np.dot(gv, rv) / rr)
    return f if math.isfinite(f) and f != 0 else None


def _near(x: float, target: float, rel: float = 1e-3) -> bool:
    return abs(x - target) <= rel * max(abs(target), 1e-12)


def _fmt_factor(f: float) -> str:
    if abs(f - round(f)) < 1e-6 * max(1.0, abs(f)):
        return str(round(f))
    return f"{f:.4g}"


def _and(items: Sequence[Any]) -> str:
    words = [str(i) for i in items]
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _fmt_indices(idx: Sequence[int] | np.ndarray, limit: int = 10) -> str:
    values = [int(i) for i in np.asarray(idx).ravel()]
    if len(values) > 2 and values == list(range(values[0], values[0] + len(values))):
        return f"[{values[0]}..{values[-1]}]"
    shown = ", ".join(str(v) for v in values[:limit])
    if len(values) > limit:
        shown += f", ... ({len(values)} in all)"
    return f"[{shown}]"


def _micro_sizes(cfg: _Config) -> str:
    return "; ".join(f"rank {r}: {'+'.join(str(len(m)) for m in cfg.micro_splits(r))}" for r in range(cfg.world_size))
