"""The child side: one rank, from its start to the gradients it sends back to the parent.

:func:`main` is the entry point of every rank process (forked from the
forkserver or spawned): it loads the modules the parent shipped, joins the
process group over the loopback interface, runs the :class:`RankJob` it was
sent and reports progress, the result or the error on its pipe. A
:class:`RankJob` is one data-parallel step: build the model, wrap it, run the
rank's micro-batches with the gradient sync off for all but the last, read the
gradients; :class:`DDPJob` wraps in ``DistributedDataParallel``, and other
wrappers subclass :class:`RankJob` the same way
(:class:`~pytest_gradcheck.ddp.fsdp.FSDPJob`: ``fully_shard``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any, Callable, ClassVar, ContextManager, Optional

import numpy as np
import torch

from .._torch.loss import default_dtype
from .._torch.state import disable_dropout_modules
from ..errors import InvalidArgument, UnsupportedModelError, first_line
from .step import Step, build_model, convert, gradients_of, state_hash, take, trainable

__all__ = ["DDPJob", "LOOPBACK", "RankJob", "RankSpec", "main"]

#: The only address the ranks and the rendezvous store listen on.
LOOPBACK = "127.0.0.1"
#: The package's own files: their frames are left out of a rank's traceback.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))

Stage = Callable[[str], None]
Gradients = tuple[dict[str, np.ndarray], list[str]]


@dataclass(frozen=True, eq=False)
class RankJob:
    """One data-parallel step, run in every rank; picklable.

    ``shards[r]`` are rank ``r``'s sample indices, split into ``micro_batches``;
    ``float64`` runs the step a second time in float64 (for the re-check);
    ``expected_hash`` is the parent's initial parameters (rank 0 sends its own
    when they differ). Subclasses provide :meth:`wrap` and :meth:`sync_off`, and
    may read the gradients another way (:meth:`gradients`).
    """

    make_model: Callable[[], torch.nn.Module]
    step: Step
    batch: Any
    shards: tuple[tuple[int, ...], ...]
    micro_batches: int
    float64: bool
    expected_hash: str

    #: the public check, the wrapper, how the sync is turned off, the collective that waits for all
    #: ranks: the words of progress messages and time-outs
    check: ClassVar[str] = "the check"
    wrapper: ClassVar[str] = "the wrapper"
    sync_off_name: ClassVar[str] = "the sync turned off"
    collective: ClassVar[str] = "the gradient reduction"

    def wrap(
        self, model: torch.nn.Module, rank: int, backend: str, float64: bool = False
    ) -> tuple[torch.nn.Module, torch.device]:
        """The model ready for the step, and the device its batch goes to (``float64``: the re-run)."""
        raise NotImplementedError

    def sync_off(self, wrapped: torch.nn.Module) -> ContextManager[Any]:
        """A context in which backward() accumulates without synchronising the ranks."""
        raise NotImplementedError

    def gradients(self, model: torch.nn.Module) -> Gradients:
        """The gradients after the step (as float64 arrays) and the parameters without one."""
        return gradients_of(model)

    def micro_splits(self, rank: int) -> list[np.ndarray]:
        shard = np.asarray(self.shards[rank], dtype=np.int64)
        return [np.asarray(a, dtype=np.int64) for a in np.array_split(shard, self.micro_batches)]

    def run(self, rank: int, backend: str, stage: Stage) -> dict[str, Any]:
        """Build the model as every rank does, run the step (and its float64 twin); the payload."""
        stage("building the model (make_model())")
        torch.manual_seed(0)
        model = build_model(self.make_model, f"in rank {rank}")
        disable_dropout_modules(model)
        init_hash = state_hash(model)
        init_state = None
        if rank == 0 and init_hash != self.expected_hash:
            buf = io.BytesIO()
            torch.save(model.state_dict(), buf)
            init_state = buf.getvalue()
        model64 = copy.deepcopy(model).to(torch.float64) if self.float64 else None
        (grads, missing), losses = self._one_step(model, rank, backend, False, stage)
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
                payload["grads64"] = self._one_step(model64, rank, backend, True, stage)[0][0]
            except Exception as exc:
                if type(exc).__name__.startswith("Dist"):
                    raise
                payload["f64_error"] = f"{type(exc).__name__}: {first_line(exc)}"
        return payload

    def _one_step(
        self, model: torch.nn.Module, rank: int, backend: str, float64: bool, stage: Stage
    ) -> tuple[Gradients, list[float]]:
        tag = "in the float64 re-run, " if float64 else "in "
        stage(f"{tag}{self.wrapper}")
        wrapped, device = self.wrap(model, rank, backend, float64)
        loss_call = self.step.build(float64)
        micro = self.micro_splits(rank)
        losses = []
        with default_dtype(float64):
            torch.manual_seed(0)
            for j, idx in enumerate(micro):
                last = j == len(micro) - 1
                of = f"micro-batch {j + 1} of {len(micro)}"
                with contextlib.nullcontext() if last else self.sync_off(wrapped):
                    stage(f"{tag}the forward pass and the loss ({of})")
                    loss = loss_call(wrapped, convert(take(self.batch, idx), float64, device), f"rank {rank}")
                    if last:
                        stage(f"{tag}backward() ({of}), whose gradient all-reduce waits for every rank")
                    else:
                        stage(f"{tag}backward() under {self.sync_off_name} ({of})")
                    torch.autograd.backward(loss)
                    losses.append(float(loss.detach()))
        return self.gradients(model), losses


@dataclass(frozen=True, eq=False)
class DDPJob(RankJob):
    """The step under ``DistributedDataParallel(model, **ddp_options)``, accumulated under ``no_sync()``."""

    ddp_options: dict[str, Any] = field(default_factory=dict)

    check: ClassVar[str] = "assert_ddp_equiv"
    wrapper: ClassVar[str] = "DistributedDataParallel(model) (it broadcasts rank 0's parameters to every rank)"
    sync_off_name: ClassVar[str] = "no_sync()"
    collective: ClassVar[str] = "DDP's gradient all-reduce"

    def wrap(
        self, model: torch.nn.Module, rank: int, backend: str, float64: bool = False
    ) -> tuple[torch.nn.Module, torch.device]:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
            model.to(device)
            return DDP(model, device_ids=[rank], **self.ddp_options), device
        device = next(p for _, p in trainable(model)).device
        return DDP(model, **self.ddp_options), device

    def sync_off(self, wrapped: torch.nn.Module) -> ContextManager[Any]:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if not isinstance(wrapped, DDP):  # pragma: no cover - wrap() returns one
            raise TypeError("no_sync() needs the DistributedDataParallel module")
        return wrapped.no_sync()


@dataclass(frozen=True, eq=False)
class RankSpec:
    """What a rank receives: the job, and where and how to join the process group."""

    job: RankJob
    world_size: int
    backend: str
    port: int
    timeout: float
    ifname: Optional[str]  # the loopback interface, for gloo
    environ: dict[str, str]  # the parent's environment now, not the forkserver's


# --------------------------------------------------------------------------- the process


def main(rank: int, conn: Connection, blob: bytes, sys_path: list[str], modules: list[tuple[str, str]]) -> None:
    """Entry point of one rank (runs in a forked-from-forkserver or spawned process)."""
    die_with_parent()
    sys.path[:] = sys_path
    code = 1
    try:
        load_modules(modules)
        spec: RankSpec = pickle.loads(blob)
        os.environ.clear()
        os.environ.update(spec.environ)
        if spec.ifname:
            os.environ["GLOO_SOCKET_IFNAME"] = spec.ifname  # gloo listens on loopback only
        join_process_group(rank, spec)
        payload = spec.job.run(rank, spec.backend, lambda stage: conn.send(("stage", rank, stage)))
        conn.send(("ok", rank, payload))
        code = 0
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    except BaseException as exc:  # report everything, KeyboardInterrupt included
        # No clean-up that could block on the other ranks: the parent stops them all.
        with contextlib.suppress(Exception):
            conn.send(("error", rank, describe_error(exc)))
    finally:
        with contextlib.suppress(Exception):
            conn.close()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)  # skip interpreter teardown: nothing is left to clean up


def join_process_group(rank: int, spec: RankSpec) -> None:
    """Share the CPUs among the ranks, connect to the parent's store on loopback, join the group."""
    import torch.distributed as dist
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    if hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // spec.world_size))
    else:  # pragma: no cover - not Linux
        torch.set_num_threads(1)
    timeout = timedelta(seconds=spec.timeout)
    client = TCPStore(LOOPBACK, spec.port, None, False, timeout)
    dist.init_process_group(spec.backend, store=client, rank=rank, world_size=spec.world_size, timeout=timeout)


def load_modules(modules: Sequence[tuple[str, str]]) -> None:
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


def die_with_parent() -> None:
    """Linux: have the kernel kill this rank if its parent (the check, or the forkserver) dies."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def user_traceback(exc: BaseException) -> str:
    """The rank's traceback without this package's own frames (the user's frames are what matter)."""
    te = traceback.TracebackException.from_exception(exc)
    frames = [f for f in te.stack if not os.path.realpath(f.filename).startswith(_PACKAGE_DIR + os.sep)]
    if frames:
        te.stack = traceback.StackSummary.from_list(frames)
    return "".join(te.format())


def describe_error(exc: BaseException) -> dict[str, Any]:
    """What the parent needs to raise the right error for a rank's exception."""
    text = str(exc)
    lowered = text.lower()
    dist_error = type(exc).__name__.startswith("Dist") or "gloo" in lowered or "connection" in lowered
    return {
        "type": type(exc).__name__,
        "message": first_line(exc) if not isinstance(exc, InvalidArgument) else text,
        "traceback": user_traceback(exc),
        "invalid": isinstance(exc, InvalidArgument),
        "unsupported": isinstance(exc, UnsupportedModelError),
        "collective": dist_error,
        "collective_timeout": dist_error and ("timed out" in lowered or "timeout" in lowered),
    }
