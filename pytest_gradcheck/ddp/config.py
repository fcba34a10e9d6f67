"""The arguments of a data-parallel check, validated before any process starts.

Each group of arguments becomes one small frozen object, built by one function
that names the bad parameter: :class:`LaunchOptions` (how the ranks run),
:class:`VerdictOptions` (how the gradients are compared, the declared weights
included), :class:`Workload` (the model factory, the step and the batch) and
:class:`ShardPlan` (which samples each rank gets). :class:`DDPConfig` holds them
with the wrapper's own options: DDP's ``ddp_options``, or
:class:`FSDPOptions` (the modules ``fully_shard`` wraps, the mixed-precision policy).
"""

from __future__ import annotations

import math
import multiprocessing
import pickle
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, cast

import numpy as np
import torch

from .._options import check_batch_sizes, check_bool, check_choice, check_tolerance
from .._torch.inputs import (
    batch_size_of,
    class_name,
    describe_leaf,
    loss_form_paths,
    sparse_input_message,
    zero_dim_message,
)
from ..errors import InvalidArgument, first_line
from ..report.format import fmt_indices
from .step import Step

if TYPE_CHECKING:  # pragma: no cover
    from torch.utils.data import Dataset

__all__ = [
    "BACKENDS",
    "DDPConfig",
    "FSDPOptions",
    "LaunchOptions",
    "ShardPlan",
    "VerdictOptions",
    "Workload",
    "check_ddp_options",
    "check_launch",
    "check_mp_policy",
    "check_verdict",
    "check_weights",
    "check_workload",
    "plan_shards",
]

BACKENDS = ("gloo", "nccl")
START_METHODS = ("auto", "forkserver", "spawn")
#: ``DistributedDataParallel`` arguments the check sets itself.
RESERVED_DDP_OPTIONS = ("module", "device_ids", "output_device", "process_group")
#: ``MixedPrecisionPolicy`` arguments ``mp_policy`` may set.
MP_POLICY_OPTIONS = ("param_dtype", "reduce_dtype", "output_dtype", "cast_forward_inputs")
#: unit roundoff of each floating dtype: the lowest precision of a step decides its tolerance
EPS = {"float64": 2.2e-16, "float32": 1.19e-7, "float16": 9.77e-4, "bfloat16": 7.81e-3}


@dataclass(frozen=True)
class LaunchOptions:
    """How the ranks run: how many, which collective backend, the time bound, the start method."""

    world_size: int
    backend: str
    timeout: float
    start_method: str


@dataclass(frozen=True)
class VerdictOptions:
    """How the gradients are compared (``reduction`` is ``"mean"`` or ``"sum"`` once inferred)."""

    reduction: str
    rtol: Optional[float]
    atol: Optional[float]
    float64_recheck: bool
    rtol_float64: Optional[float] = None  # the float64 re-check's own tolerances (None: float64's default)
    atol_float64: Optional[float] = None
    #: the declared per-sample weights (``weights=``), one per sample, or None for a plain mean/sum
    weights: Optional[tuple[float, ...]] = None


@dataclass(frozen=True, eq=False)
class Workload:
    """What every rank runs: ``make_model``, the :class:`~pytest_gradcheck.ddp.step.Step` and the
    whole batch (``(inputs, targets)`` tuples for the loss form, the user's batch for ``step_fn``)."""

    make_model: Callable[[], torch.nn.Module]
    step: Step
    batch: Any
    batch_size: int


@dataclass(frozen=True, eq=False)
class ShardPlan:
    """Each rank's sample indices; ``source`` is ``"contiguous"``, ``"explicit"`` or ``"sampler"``,
    ``repeated`` the samples ``DistributedSampler`` repeated to even the shards out."""

    shards: tuple[np.ndarray, ...]
    source: str
    repeated: tuple[int, ...]
    micro_batches: int

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.shards)

    def micro_splits(self, rank: int) -> list[np.ndarray]:
        """Rank ``rank``'s micro-batches, in order."""
        return [np.asarray(a, dtype=np.int64) for a in np.array_split(self.shards[rank], self.micro_batches)]


@dataclass(frozen=True)
class FSDPOptions:
    """What :func:`~pytest_gradcheck.assert_fsdp_equiv` shards and how.

    ``units``: the submodules ``fully_shard`` wraps before the root (their paths, in the
    order they are wrapped: innermost first); ``mp_policy``: ``MixedPrecisionPolicy``
    arguments; ``precision``: the lowest precision of the step (the parameters', or a
    lower ``param_dtype``/``reduce_dtype``), whose tolerance the comparison uses.
    """

    units: tuple[str, ...]
    mp_policy: tuple[tuple[str, Any], ...] = ()
    precision: str = "float32"

    @property
    def policy(self) -> dict[str, Any]:
        return dict(self.mp_policy)

    def dtype_names(self) -> tuple[tuple[str, str], ...]:
        """The policy's dtypes as ``(argument, dtype name)``, for the report."""
        return tuple((k, str(v).replace("torch.", "")) for k, v in self.mp_policy if isinstance(v, torch.dtype))


@dataclass(frozen=True, eq=False)
class DDPConfig:
    """The validated arguments of one data-parallel check: :func:`~pytest_gradcheck.assert_ddp_equiv`
    (``ddp_options``) or :func:`~pytest_gradcheck.assert_fsdp_equiv` (``fsdp``)."""

    launch: LaunchOptions
    verdict: VerdictOptions
    work: Workload
    plan: ShardPlan
    ddp_options: dict[str, Any] = field(default_factory=dict)
    fsdp: Optional[FSDPOptions] = None

    @property
    def check(self) -> str:
        """The report's ``check``: ``"fsdp"`` or ``"ddp"``."""
        return "ddp" if self.fsdp is None else "fsdp"


# --------------------------------------------------------------------------- option groups


def check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise InvalidArgument(f"Invalid {name}={value!r}: expected an integer >= {minimum}")
    return int(value)


def check_launch(*, world_size: Any, backend: Any, timeout: Any, start_method: Any) -> LaunchOptions:
    w = check_int(world_size, "world_size", minimum=1)
    backend = check_choice(backend, "backend", BACKENDS)
    if backend == "nccl" and torch.cuda.device_count() < w:
        raise InvalidArgument(
            f"backend='nccl' needs one CUDA device per rank: world_size={w} but "
            f"{torch.cuda.device_count()} CUDA device(s) are visible; use backend='gloo' (CPU)"
        )
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise InvalidArgument(f"Invalid timeout={timeout!r}: expected a finite number of seconds > 0")
    return LaunchOptions(w, backend, float(timeout), _start_method(start_method))


def _start_method(value: Any) -> str:
    available = multiprocessing.get_all_start_methods()
    choice = check_choice(value, "start_method", START_METHODS)
    if choice == "auto":
        return "forkserver" if "forkserver" in available else "spawn"
    if choice not in available:
        raise InvalidArgument(f"start_method={choice!r} is not available on this platform; use 'spawn'")
    return choice


def check_verdict(
    *, reduction: Any, rtol: Any, atol: Any, float64_recheck: Any, rtol_float64: Any = None, atol_float64: Any = None
) -> VerdictOptions:
    return VerdictOptions(
        reduction=check_choice(reduction, "reduction", ("mean", "sum", "auto")),
        rtol=check_tolerance(rtol, "rtol"),
        atol=check_tolerance(atol, "atol"),
        float64_recheck=check_bool(float64_recheck, "float64_recheck"),
        rtol_float64=check_tolerance(rtol_float64, "rtol_float64"),
        atol_float64=check_tolerance(atol_float64, "atol_float64"),
    )


def check_ddp_options(value: Any) -> dict[str, Any]:
    """``ddp_options`` as a dict of ``DistributedDataParallel`` arguments the check leaves to the user."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"ddp_options must be a mapping or None, got {type(value).__name__}")
    bad = sorted(k for k in value if k in RESERVED_DDP_OPTIONS)
    if bad:
        raise InvalidArgument(
            f"ddp_options may not set {', '.join(bad)}: the check builds the module, the "
            "process group and the device placement itself"
        )
    return dict(value)


def check_mp_policy(value: Any) -> tuple[tuple[str, Any], ...]:
    """``mp_policy`` as ``MixedPrecisionPolicy`` arguments: a mapping of dtypes (or None)."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise InvalidArgument(
            f"mp_policy must be a mapping of MixedPrecisionPolicy arguments or None, got {type(value).__name__}: "
            "e.g. mp_policy={'reduce_dtype': torch.bfloat16}"
        )
    bad = sorted(str(k) for k in value if k not in MP_POLICY_OPTIONS)
    if bad:
        raise InvalidArgument(
            f"mp_policy has unknown argument(s) {', '.join(bad)}: MixedPrecisionPolicy takes "
            f"{', '.join(MP_POLICY_OPTIONS)}"
        )
    out: list[tuple[str, Any]] = []
    for key in MP_POLICY_OPTIONS:
        if key not in value:
            continue
        v = value[key]
        if key == "cast_forward_inputs":
            out.append((key, check_bool(v, "mp_policy['cast_forward_inputs']")))
        elif v is not None and not (isinstance(v, torch.dtype) and v.is_floating_point):
            raise InvalidArgument(f"mp_policy[{key!r}]={v!r}: expected a floating torch.dtype (torch.bfloat16) or None")
        else:
            out.append((key, v))
    return tuple(out)


def lowest_precision(*dtypes: Optional[str]) -> str:
    """The dtype of least precision among ``dtypes`` (None ignored).

    >>> lowest_precision("float32", "bfloat16", None), lowest_precision("float64")
    ('bfloat16', 'float64')
    """
    names = [d for d in dtypes if d is not None]
    return max(names, key=lambda d: EPS.get(d, EPS["float32"]))


# --------------------------------------------------------------------------- the workload


def check_workload(make_model: Any, loss_fn: Any, inputs: Any, targets: Any, step_fn: Any) -> Workload:
    """The model factory, the step and the batch, checked; every piece must pickle for the ranks."""
    if not callable(make_model):
        raise InvalidArgument(f"make_model must be callable (it builds the model), got {type(make_model).__name__}")
    if step_fn is not None:
        step, batch, b = _step_form(loss_fn, step_fn, inputs, targets)
    else:
        step, batch, b = _loss_form(loss_fn, inputs, targets)
    check_picklable(make_model, "make_model", "a module-level function")
    if loss_fn is not None:
        check_picklable(loss_fn, "loss_fn", "a module-level function, or an object such as torch.nn.MSELoss()")
    if step_fn is not None:
        check_picklable(step_fn, "step_fn", "a module-level function")
    return Workload(make_model, step, batch, b)


def _step_form(loss_fn: Any, step_fn: Any, inputs: Any, targets: Any) -> tuple[Step, Any, int]:
    if loss_fn is not None:
        raise InvalidArgument("pass either loss_fn or step_fn, not both (loss_fn=None with step_fn=...)")
    if targets is not None:
        raise InvalidArgument("with step_fn, pass the whole batch as inputs and leave targets=None")
    if not callable(step_fn):
        raise InvalidArgument(f"step_fn must be callable, got {type(step_fn).__name__}")
    return Step(step_fn=step_fn), inputs, batch_size_of(inputs, True)


def _loss_form(loss_fn: Any, inputs: Any, targets: Any) -> tuple[Step, Any, int]:
    if isinstance(loss_fn, type) and issubclass(loss_fn, torch.nn.Module):
        name = class_name(loss_fn)
        raise InvalidArgument(f"loss_fn is the class {name}; pass an instance: {name}()")
    if not callable(loss_fn):
        raise InvalidArgument(f"loss_fn must be callable, got {type(loss_fn).__name__} (or pass step_fn=...)")
    inputs_t = _tensor_tuple(inputs, "inputs")
    targets_t = () if targets is None else _tensor_tuple(targets, "targets")
    sizes = []
    for path, t in zip(loss_form_paths(inputs, targets), (*inputs_t, *targets_t)):
        if t.dim() == 0:
            raise InvalidArgument(zero_dim_message(path))
        if t.layout != torch.strided:
            raise InvalidArgument(sparse_input_message(path, t))
        sizes.append((describe_leaf(path, t), int(t.shape[0])))
    step = Step(loss_fn=loss_fn, has_targets=targets is not None, targets_is_tuple=isinstance(targets, (tuple, list)))
    return step, (inputs_t, targets_t), check_batch_sizes(sizes)


def _tensor_tuple(value: Any, name: str) -> tuple[torch.Tensor, ...]:
    """``value`` as a tuple of tensors; the advice for other batches is DDP's ``step_fn=``."""
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


def check_weights(weights: Any, work: Workload) -> Optional[tuple[float, ...]]:
    """``weights`` as one float per sample (as in :func:`~pytest_gradcheck.assert_gradequiv`), or None.

    A callable is called on one sample's targets (the loss form) or on the batch of one
    sample (``step_fn``), e.g. ``lambda y: (y != -100).sum()``, the sample's token count.
    """
    from .._torch.inputs import resolve_weights
    from .step import take

    step, batch = work.step, work.batch

    def sample_of(i: int) -> Any:
        one = take(batch, np.asarray([i], dtype=np.int64))
        if step.step_fn is not None:
            return one
        ys = one[1]
        return ys if step.targets_is_tuple else (ys[0] if ys else None)

    w = resolve_weights(weights, work.batch_size, sample_of)
    return None if w is None else tuple(float(x) for x in w)


def check_picklable(obj: Any, name: str, what: str) -> None:
    """Refuse what the ranks could not unpickle: lambdas, local functions, ``__main__`` of a REPL."""
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


# --------------------------------------------------------------------------- shards


def plan_shards(b: int, world_size: int, *, shards: Any, sampler: Any, micro_batches: Any) -> ShardPlan:
    """Each rank's samples: ``shards`` as given, ``DistributedSampler``'s, or a contiguous split."""
    k = check_int(micro_batches, "micro_batches", minimum=1)
    if check_bool(sampler, "sampler") and shards is not None:
        raise InvalidArgument("pass either shards=... or sampler=True, not both")
    repeated: tuple[int, ...] = ()
    if sampler:
        out = _sampler_shards(b, world_size)
        counts = np.bincount(np.concatenate(out), minlength=b)
        repeated = tuple(int(i) for i in np.nonzero(counts > 1)[0])
        source = "sampler"
    elif shards is None:
        out = _contiguous_shards(b, world_size)
        source = "contiguous"
    else:
        out = _explicit_shards(b, world_size, shards)
        source = "explicit"
    for r, idx in enumerate(out):
        if idx.size == 0:
            raise InvalidArgument(f"rank {r} gets no sample: every rank needs at least one sample")
        if len(idx) < k:
            raise InvalidArgument(
                f"rank {r} has {len(idx)} sample(s), fewer than micro_batches={k}: "
                "every micro-batch needs at least one sample"
            )
    return ShardPlan(tuple(out), source, repeated, k)


def _sampler_shards(b: int, world_size: int) -> list[np.ndarray]:
    """``DistributedSampler(shuffle=False, drop_last=False)``'s indices for each rank."""
    from torch.utils.data import DistributedSampler

    dataset = cast("Dataset[int]", range(b))
    return [
        np.asarray(
            list(DistributedSampler(dataset, num_replicas=world_size, rank=r, shuffle=False, drop_last=False)),
            dtype=np.int64,
        )
        for r in range(world_size)
    ]


def _contiguous_shards(b: int, world_size: int) -> list[np.ndarray]:
    if b < world_size:
        raise InvalidArgument(
            f"a batch of {b} cannot be split over world_size={world_size} ranks: every rank needs at least one sample"
        )
    return [np.asarray(a, dtype=np.int64) for a in np.array_split(np.arange(b), world_size)]


def _explicit_shards(b: int, world_size: int, shards: Any) -> list[np.ndarray]:
    if isinstance(shards, (str, bytes)) or not isinstance(shards, Sequence):
        raise InvalidArgument(f"shards must be a sequence of index lists, one per rank, got {type(shards).__name__}")
    if len(shards) != world_size:
        raise InvalidArgument(f"shards has {len(shards)} index list(s) but world_size={world_size}: give one per rank")
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
            raise InvalidArgument(f"shards[{r}] has indices outside the batch of {b}: {fmt_indices(idx.tolist())}")
        out.append(idx.astype(np.int64))
    return out
