"""Sharded data parallel: the ``fully_shard`` (FSDP2) gradient of one step against the full-batch gradient.

:func:`assert_fsdp_equiv` is :func:`~pytest_gradcheck.assert_ddp_equiv` with
``fully_shard`` instead of ``DistributedDataParallel``: the same launch (gloo
over 127.0.0.1, bounded in time, every process stopped on the way out), the same
single-process reference, the same verdict and diagnosis
(:func:`~pytest_gradcheck.ddp.check.run_data_parallel`). What differs is the
rank's job, :class:`FSDPJob`: ``fully_shard`` on each selected submodule and
then on the root, an optional ``MixedPrecisionPolicy``, the gradient sync
turned off with ``set_requires_gradient_sync(False)`` for all micro-batches but
the last, and the gradients gathered from their ``DTensor`` shards
(``full_tensor()``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, ContextManager, Optional

import numpy as np
import torch

from ..errors import InvalidArgument, UnsupportedModelError, first_line
from ..report import GradEquivReport
from ..report.format import fmt_and
from .check import TensorOrTuple, detached, run_data_parallel
from .config import (
    DDPConfig,
    FSDPOptions,
    check_launch,
    check_mp_policy,
    check_verdict,
    check_weights,
    check_workload,
    lowest_precision,
    plan_shards,
)
from .reference import Reference
from .step import trainable
from .worker import Gradients, RankJob

__all__ = ["FSDPJob", "assert_fsdp_equiv", "fully_shard_available", "select_units"]


def fully_shard_available() -> bool:
    """Whether this torch has ``torch.distributed.fsdp.fully_shard`` (FSDP2)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return bool(torch.distributed.is_available())


def _path(name: str) -> str:
    return f"model.{name}" if name else "model"


def _is_container(module: torch.nn.Module) -> bool:
    """A module without a forward of its own (``ModuleList``, ``ModuleDict``): fully_shard refuses it."""
    if isinstance(module, torch.jit.ScriptModule):
        return False
    return getattr(type(module).forward, "__name__", "") == "_forward_unimplemented"


def _holds_parameters(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _default_units(model: torch.nn.Module) -> list[str]:
    """Each direct child holding parameters; a container (``ModuleList``) stands for its items."""
    out: list[str] = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if not _holds_parameters(child):
                continue
            if _is_container(child):
                visit(path + ".", child)
            else:
                out.append(path)

    visit("", model)
    return out


def _owners(model: torch.nn.Module, units: Sequence[str]) -> dict[int, set[str]]:
    """For each parameter (by identity), the units that would manage it (the innermost selected
    module holding it, or the root ``""``): a parameter with two owners is tied across units."""
    owners: dict[int, set[str]] = {}
    by_depth = sorted(units, key=lambda u: -u.count("."))
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = next((u for u in by_depth if name.startswith(u + ".")), "")
        owners.setdefault(id(p), set()).add(owner)
    return owners


def select_units(model: torch.nn.Module, wrap: Optional[Callable[[torch.nn.Module], Any]]) -> tuple[str, ...]:
    """The submodules ``fully_shard`` wraps before the root, innermost first; clear errors for a
    ``wrap`` that selects nothing or a module ``fully_shard`` cannot wrap.

    The default (``wrap=None``) is each direct child that holds parameters; a container
    without ``forward`` (``ModuleList``, ``ModuleDict``) stands for its items, and children
    that share a parameter (tied embeddings) are left to the root.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1)))
    >>> select_units(model, None)
    ('0', '2')
    >>> select_units(model, lambda m: isinstance(m, nn.Linear))
    ('2.0', '2.1', '0')
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"fully_shard cannot wrap a TorchScript module ({type(model).__name__}): it needs forward hooks, "
            "which ScriptModules do not support; pass make_model that builds the eager nn.Module"
        )
    named = list(model.named_modules())[1:]
    if wrap is None:
        units = _default_units(model)
        tied = {u for owners in _owners(model, units).values() if len(owners) > 1 for u in owners}
        units = [u for u in units if u not in tied]
    else:
        if not callable(wrap):
            raise InvalidArgument(
                f"wrap must be a callable module -> bool (which submodules fully_shard wraps) or None, "
                f"got {type(wrap).__name__}"
            )
        units = []
        for name, module in named:
            try:
                chosen = wrap(module)
            except Exception as exc:
                raise InvalidArgument(
                    f"wrap({_path(name)}) raised {type(exc).__name__}: {first_line(exc)} "
                    "(wrap is called on every submodule and must return True or False)"
                ) from None
            if chosen:
                units.append(name)
        if not units:
            kinds = sorted({type(m).__name__ for _, m in named})
            raise InvalidArgument(
                f"wrap selects no submodule of the model: it returned False for all {len(named)} submodules "
                f"({', '.join(kinds[:8])}{', ...' if len(kinds) > 8 else ''}), so fully_shard would wrap the root "
                "alone and the check would not test the sharding you meant. Fix the predicate (it is called on "
                "each submodule, e.g. wrap=lambda m: isinstance(m, Block)), or pass wrap=None for the default "
                "(each direct child holding parameters)."
            )
    _refuse_unwrappable(model, units)
    return tuple(sorted(units, key=lambda u: -u.count(".")))


def _refuse_unwrappable(model: torch.nn.Module, units: Sequence[str]) -> None:
    for name in units:
        module = model.get_submodule(name)
        if _is_container(module):
            raise UnsupportedModelError(
                f"fully_shard cannot wrap {_path(name)} ({type(module).__name__}): it is a container without "
                "forward(), which fully_shard does not support; select its items instead (e.g. "
                "wrap=lambda m: isinstance(m, Block) for the blocks it holds)"
            )
        if isinstance(module, torch.jit.ScriptModule):
            raise UnsupportedModelError(
                f"fully_shard cannot wrap {_path(name)} ({type(module).__name__}): TorchScript modules do not "
                "support the forward hooks fully_shard installs"
            )
    names = {id(p): n for n, p in model.named_parameters()}
    for pid, owners in _owners(model, units).items():
        if len(owners) > 1:
            where = fmt_and([_path(u) for u in sorted(owners)])
            raise UnsupportedModelError(
                f"fully_shard cannot wrap the selected modules: parameter {names.get(pid, '?')!r} is shared by "
                f"{where} (tied weights), which wrap puts in different fully_shard units; each parameter "
                "must belong to one unit. Leave the modules that share it out of wrap (the root then holds "
                "it), or wrap a module that holds all of them"
            )


@dataclass(frozen=True, eq=False)
class FSDPJob(RankJob):
    """The step under ``fully_shard``: each of ``units`` (submodule paths, innermost first), then the
    root, on a CPU device mesh of every rank, with ``MixedPrecisionPolicy(**mp_policy)`` (not in the
    float64 re-run); micro-batches accumulated with ``set_requires_gradient_sync(False)``; the
    gradients gathered from their shards with ``full_tensor()``."""

    units: tuple[str, ...] = ()
    mp_policy: tuple[tuple[str, Any], ...] = ()

    check: ClassVar[str] = "assert_fsdp_equiv"
    wrapper: ClassVar[str] = "fully_shard(model) (each rank keeps its own shard of the parameters)"
    sync_off_name: ClassVar[str] = "set_requires_gradient_sync(False)"
    collective: ClassVar[str] = "FSDP's parameter all-gathers and gradient reduce-scatters"

    def wrap(
        self, model: torch.nn.Module, rank: int, backend: str, float64: bool = False
    ) -> tuple[torch.nn.Module, torch.device]:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # torch warns about every wrapped module whose output is a view (a Linear on 3-d input);
        # an in-place op on one would break the gradient, which is what this check compares
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        policy = MixedPrecisionPolicy(**({} if float64 else dict(self.mp_policy)))
        for name in (*self.units, ""):
            module = model.get_submodule(name) if name else model
            try:
                fully_shard(module, mesh=mesh, mp_policy=policy)
            except Exception as exc:
                raise UnsupportedModelError(
                    f"fully_shard cannot wrap {_path(name)} ({type(module).__name__}): "
                    f"{type(exc).__name__}: {first_line(exc)}"
                ) from None
        return model, torch.device("cpu")

    def sync_off(self, wrapped: torch.nn.Module) -> ContextManager[Any]:
        return _no_gradient_sync(wrapped)

    def gradients(self, model: torch.nn.Module) -> Gradients:
        """Every trainable parameter's full gradient, gathered from the ranks' shards (a collective:
        every rank gathers the same parameters in the same order)."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        params = trainable(model)
        held = torch.tensor([p.grad is not None for _, p in params], dtype=torch.int64)
        dist.all_reduce(held)  # how many ranks hold each gradient
        world = dist.get_world_size()
        out: dict[str, np.ndarray] = {}
        missing: list[str] = []
        for (name, p), n in zip(params, held.tolist()):
            if n < world:
                missing.append(name)
            if n == 0:
                out[name] = np.zeros(tuple(p.shape), dtype=np.float64)
                continue
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            full = grad.full_tensor() if isinstance(grad, DTensor) else grad
            out[name] = full.detach().to("cpu", torch.float64).numpy().copy()
        return out, missing


@contextlib.contextmanager
def _no_gradient_sync(wrapped: torch.nn.Module) -> Iterator[None]:
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(wrapped, FSDPModule):  # pragma: no cover - wrap() returns one
        raise TypeError("set_requires_gradient_sync() needs the fully_shard module")
    wrapped.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def assert_fsdp_equiv(
    make_model: Callable[[], torch.nn.Module],
    loss_fn: Optional[Callable[..., torch.Tensor]],
    inputs: Any,
    targets: Optional[TensorOrTuple] = None,
    *,
    world_size: int = 2,
    shards: Optional[Sequence[Sequence[int]]] = None,
    micro_batches: int = 1,
    weights: Any = None,
    reduction: str = "mean",
    wrap: Optional[Callable[[torch.nn.Module], bool]] = None,
    mp_policy: Optional[dict[str, Any]] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    rtol_float64: Optional[float] = None,
    atol_float64: Optional[float] = None,
    timeout: float = 60.0,
    step_fn: Optional[Callable[[torch.nn.Module, Any], Any]] = None,
    float64_recheck: bool = True,
    start_method: str = "auto",
) -> GradEquivReport:
    """Assert that one sharded data-parallel step (``fully_shard``, FSDP2) computes the full-batch gradient.

    ``world_size`` processes join a gloo process group over 127.0.0.1, each
    calls ``torch.manual_seed(0); make_model()`` and applies
    ``torch.distributed.fsdp.fully_shard`` to every submodule that
    ``wrap(module)`` selects (default: each direct child holding parameters,
    the items of a ``ModuleList`` standing for it), then to the root. Each rank
    runs ``loss_fn(model(*x_shard), y_shard).backward()`` on its shard of
    ``inputs``/``targets`` (contiguous by default, or ``shards``: one index list
    per rank). The gradients, reduce-scattered by FSDP, are gathered from
    their ``DTensor`` shards (``full_tensor()``) and compared, through the
    same verdict as every check, with the gradient of the same loss on the
    whole batch in this process, from the same initial parameters.

    ``micro_batches=k`` runs ``k`` micro-batches per rank, each loss
    back-propagated as is (no ``1/k``), with
    ``model.set_requires_gradient_sync(False)`` for all but the last.
    ``mp_policy`` is a dict of ``MixedPrecisionPolicy`` arguments
    (``param_dtype``, ``reduce_dtype``, ``output_dtype``,
    ``cast_forward_inputs``): the comparison then uses the tolerance of the
    lowest precision of the step (``reduce_dtype=torch.bfloat16``: bfloat16's),
    the report says where the reduction ran, and the float64 re-check runs the
    step without the policy, so rounding vanishes there and a bug does not.

    ``weights`` declares how samples count, as in
    :func:`~pytest_gradcheck.assert_gradequiv`: a tensor of one weight per
    sample, or a callable on one sample's targets (e.g.
    ``lambda y: (y != -100).sum()``, its token count); the reference is then
    the weighted full-batch gradient. A step that divides each rank's loss by
    the rank's own token count fails with the counts per rank; one that
    all-reduces the count (and multiplies by world_size, since FSDP averages
    the ranks' gradients) passes.

    ``reduction``, ``step_fn``, ``rtol``/``atol`` (and their float64 twins),
    ``timeout``, ``float64_recheck`` and ``start_method`` are those of
    :func:`~pytest_gradcheck.assert_ddp_equiv`; ``make_model``, ``loss_fn``
    and ``step_fn`` must be picklable (module-level functions). The model must
    be built on the CPU: the check shards it over gloo.

    Raises :class:`~pytest_gradcheck.errors.GradEquivError` on mismatch (the
    diagnosis is DDP's: a per-rank mean over uneven shards, a missing ``1/k``
    under accumulation, a per-rank token count, ranks that built different
    parameters), :class:`~pytest_gradcheck.errors.UnsupportedModelError` for a
    module ``fully_shard`` cannot wrap, and
    :class:`~pytest_gradcheck.errors.InvalidArgument` for bad arguments (a
    ``wrap`` that selects nothing) or a torch without ``fully_shard``.

    >>> import torch, torch.nn.functional as F
    >>> from pytest_gradcheck import assert_fsdp_equiv
    >>> def make_model():  # at module level in real code
    ...     return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> assert_fsdp_equiv(make_model, F.mse_loss, x, y, world_size=2).passed  # doctest: +SKIP
    True
    >>> assert_fsdp_equiv(make_model, F.mse_loss, x, y, mp_policy={"reduce_dtype": torch.bfloat16}).passed
    ... # doctest: +SKIP
    True
    >>> assert_fsdp_equiv(make_model, F.mse_loss, x, y, micro_batches=2)  # doctest: +SKIP
    Traceback (most recent call last):
    GradEquivError: set_requires_gradient_sync(False) accumulation over 2 micro-batches sums their gradients ...
    """
    __tracebackhide__ = True
    if not fully_shard_available():
        raise InvalidArgument(
            "assert_fsdp_equiv needs torch.distributed.fsdp.fully_shard (FSDP2, PyTorch 2.6 or later) and "
            f"torch.distributed; this torch ({torch.__version__}) has not got them"
        )
    launch = check_launch(world_size=world_size, backend="gloo", timeout=timeout, start_method=start_method)
    verdict = check_verdict(
        reduction=reduction,
        rtol=rtol,
        atol=atol,
        float64_recheck=float64_recheck,
        rtol_float64=rtol_float64,
        atol_float64=atol_float64,
    )
    policy = check_mp_policy(mp_policy)
    work = check_workload(make_model, loss_fn, inputs, targets, step_fn)
    plan = plan_shards(work.batch_size, launch.world_size, shards=shards, sampler=False, micro_batches=micro_batches)
    ref = Reference(work)
    if ref.device.type != "cpu":
        raise InvalidArgument(
            f"make_model() built the model on {ref.device}: assert_fsdp_equiv shards it over gloo on the CPU; "
            "build it on the CPU"
        )
    units = select_units(ref.model, wrap)
    dtypes = dict(policy)
    precision = lowest_precision(
        ref.dtype,
        *(str(dtypes[k]).replace("torch.", "") for k in ("param_dtype", "reduce_dtype") if dtypes.get(k) is not None),
    )
    cfg = DDPConfig(
        launch,
        replace(verdict, weights=check_weights(weights, work)),
        work,
        plan,
        fsdp=FSDPOptions(units, policy, precision),
    )
    return run_data_parallel(cfg, ref, _job)


def _job(cfg: DDPConfig, ref: Reference) -> FSDPJob:
    """What every rank runs: the same model, step and batch, its own shard, the units to shard."""
    fsdp = cfg.fsdp
    if fsdp is None:  # pragma: no cover - assert_fsdp_equiv sets it
        raise InvalidArgument("an FSDP job needs the FSDP options")
    return FSDPJob(
        make_model=cfg.work.make_model,
        step=cfg.work.step,
        batch=detached(cfg.work.batch),
        shards=tuple(tuple(int(i) for i in s) for s in cfg.plan.shards),
        micro_batches=cfg.plan.micro_batches,
        float64=cfg.verdict.float64_recheck and fsdp.precision != "float64",
        expected_hash=ref.hash,
        units=fsdp.units,
        mp_policy=fsdp.mp_policy,
    )
