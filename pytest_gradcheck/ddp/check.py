"""The public DDP check, and the driver every data-parallel check shares: the single-process
reference, the ranks, the verdict (:func:`run_data_parallel`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..report import GradEquivReport
from ..verdict import run_check
from .config import (
    DDPConfig,
    check_ddp_options,
    check_launch,
    check_verdict,
    check_weights,
    check_workload,
    plan_shards,
)
from .launch import run_ranks
from .problem import DDPProblem
from .reference import Reference
from .worker import DDPJob, RankJob

__all__ = ["assert_ddp_equiv", "detached", "run_data_parallel"]

TensorOrTuple = Union[torch.Tensor, Sequence[torch.Tensor]]


def assert_ddp_equiv(
    make_model: Callable[[], torch.nn.Module],
    loss_fn: Optional[Callable[..., torch.Tensor]],
    inputs: Any,
    targets: Optional[TensorOrTuple] = None,
    *,
    world_size: int = 2,
    backend: str = "gloo",
    shards: Optional[Sequence[Sequence[int]]] = None,
    sampler: bool = False,
    micro_batches: int = 1,
    weights: Any = None,
    reduction: str = "mean",
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    rtol_float64: Optional[float] = None,
    atol_float64: Optional[float] = None,
    timeout: float = 60.0,
    step_fn: Optional[Callable[[torch.nn.Module, Any], Any]] = None,
    ddp_options: Optional[Mapping[str, Any]] = None,
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

    ``weights`` declares how samples count, with the meaning it has in
    :func:`~pytest_gradcheck.assert_gradequiv`: a tensor (or sequence) of one
    weight per sample, or a callable on one sample's targets (the batch of one
    sample with ``step_fn``), e.g. ``lambda y: (y != -100).sum()``, its token
    count. The reference is then the weighted full-batch gradient, the
    weighted mean (or sum) of the per-sample gradients, each sample run alone.
    A step that divides each rank's loss by the rank's own token count fails,
    and the report names the counts per rank; one that all-reduces the count
    passes (see ``examples/test_fsdp_step.py``).

    The reference and the diagnosis call ``loss_fn``/``step_fn`` in this
    process, which has no process group (``torch.distributed.is_initialized()``
    is False here): a loss that normalises by a global count must guard its
    collectives with it (see ``examples/test_ddp_uneven_shards.py``).

    ``start_method``: ``"auto"`` (default) uses a *forkserver* where the
    platform has one: it imports torch once per session and forks every rank
    from it, ready to run (a spawned rank imports torch itself);
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
    :class:`~pytest_gradcheck.errors.DDPTimeoutError` is raised. Dropout is
    switched off in every rank and in the reference. A float32 mismatch is
    re-checked in float64 (the ranks run both steps; ``float64_recheck=False``
    skips it).

    Returns a :class:`~pytest_gradcheck.report.GradEquivReport` (``check="ddp"``);
    raises :class:`~pytest_gradcheck.errors.GradEquivError` on mismatch,
    :class:`~pytest_gradcheck.errors.InvalidArgument` on bad arguments, and
    :class:`~pytest_gradcheck.errors.DDPWorkerError` when a rank fails.

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
    launch = check_launch(world_size=world_size, backend=backend, timeout=timeout, start_method=start_method)
    verdict = check_verdict(
        reduction=reduction,
        rtol=rtol,
        atol=atol,
        float64_recheck=float64_recheck,
        rtol_float64=rtol_float64,
        atol_float64=atol_float64,
    )
    options = check_ddp_options(ddp_options)
    work = check_workload(make_model, loss_fn, inputs, targets, step_fn)
    plan = plan_shards(work.batch_size, launch.world_size, shards=shards, sampler=sampler, micro_batches=micro_batches)
    cfg = DDPConfig(launch, replace(verdict, weights=check_weights(weights, work)), work, plan, options)
    return run_data_parallel(cfg, Reference(work), _job)


def run_data_parallel(
    cfg: DDPConfig, ref: Reference, make_job: Callable[[DDPConfig, Reference], RankJob]
) -> GradEquivReport:
    """The steps every data-parallel check takes once its arguments are valid: the reference (bad
    losses fail here, before any process starts), the ranks, the verdict through ``run_check``."""
    __tracebackhide__ = True
    inferred = None
    if cfg.verdict.reduction == "auto":
        inferred = ref.infer_reduction()
        cfg = replace(cfg, verdict=replace(cfg.verdict, reduction=inferred))
    ref.gradient(False)
    weights = None if cfg.verdict.weights is None else np.asarray(cfg.verdict.weights, dtype=np.float64)
    if weights is not None:
        ref.weighted(weights, False)  # a model that cannot run per sample fails here too
    results = run_ranks(cfg.launch, make_job(cfg, ref))
    if results and results[0].rank == 0 and results[0].init_state is not None:
        ref.adopt(results[0].init_state)
    problem = DDPProblem(cfg, ref, results, inferred)
    return run_check(
        problem,
        reduction=cfg.verdict.reduction,
        weights=weights,
        rtol=cfg.verdict.rtol,
        atol=cfg.verdict.atol,
        rtol_float64=cfg.verdict.rtol_float64,
        atol_float64=cfg.verdict.atol_float64,
        float64_recheck=cfg.verdict.float64_recheck,
        check=cfg.check,
        notes=problem.notes(),
    )


def detached(batch: Any) -> Any:
    """The batch with every tensor detached (to pickle for the ranks)."""
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, batch)


def _job(cfg: DDPConfig, ref: Reference) -> DDPJob:
    """What every rank runs: the same model, step and batch (detached, to pickle), its own shard."""
    return DDPJob(
        make_model=cfg.work.make_model,
        step=cfg.work.step,
        batch=detached(cfg.work.batch),
        shards=tuple(tuple(int(i) for i in s) for s in cfg.plan.shards),
        micro_batches=cfg.plan.micro_batches,
        float64=cfg.verdict.float64_recheck and ref.dtype != "float64",
        expected_hash=ref.hash,
        ddp_options=cfg.ddp_options,
    )
