"""The parent side: start the ranks, collect what they send, and always stop them.

:func:`run_ranks` starts ``world_size`` processes (``multiprocessing``'s
*forkserver* context, or *spawn*: either way the ranks get the job by pickle,
never by inheritance), serves their rendezvous store on a socket bound to the
loopback interface only, on a port the OS picks, reads their progress, results
and errors until every rank has reported or the time is up, and on every path
out, failures and ``KeyboardInterrupt`` included, stops (terminate, then kill)
and joins them and closes the store.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import io
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from typing import Any, Optional, Union

import numpy as np

from ..errors import DDPTimeoutError, DDPWorkerError, GradCheckError, InvalidArgument, UnsupportedModelError, first_line
from ..report.format import fmt_and
from .config import LaunchOptions
from .worker import LOOPBACK, RankJob, RankSpec, main

__all__ = ["EXIT_GRACE", "PRELOAD", "TERM_GRACE", "RankResult", "listening_socket", "modules_to_ship", "run_ranks"]

#: Modules the forkserver imports once, so that no rank imports them itself
#: (DDP's constructor alone imports torch._dynamo). One that cannot be imported
#: (a torch without ``fully_shard``) is skipped by the forkserver.
PRELOAD = (
    "torch",
    "torch.distributed",
    "torch.nn.parallel",
    "torch._dynamo",
    "numpy",
    "torch.distributed.fsdp",
    "pytest_gradcheck.ddp",
    "pytest_gradcheck.ddp.worker",
    "pytest_gradcheck.ddp.fsdp",
)
#: Seconds a rank that has sent its results gets to exit on its own before it is stopped.
EXIT_GRACE = 10.0
#: Seconds between SIGTERM and SIGKILL when stopping a rank.
TERM_GRACE = 2.0


@dataclass
class RankResult:
    """What one rank sent back: its initial parameters' digest (and rank 0's parameters when they
    differ from the parent's), its gradients after the step, and those of the float64 re-run."""

    rank: int
    init_hash: str
    grads: dict[str, np.ndarray]
    missing: list[str]
    init_state: Optional[bytes] = None
    grads64: Optional[dict[str, np.ndarray]] = None
    f64_error: Optional[str] = None
    losses: list[float] = field(default_factory=list)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> RankResult:
        return cls(
            rank=payload["rank"],
            init_hash=payload["init_hash"],
            grads=payload["grads"],
            missing=payload["missing"],
            init_state=payload.get("init_state"),
            grads64=payload.get("grads64"),
            f64_error=payload.get("f64_error"),
            losses=payload.get("losses", []),
        )


Context = Union[SpawnContext, ForkServerContext]


def run_ranks(launch: LaunchOptions, job: RankJob) -> list[RankResult]:
    """Start the ranks, collect their results (sorted by rank); always stop and join them."""
    __tracebackhide__ = True
    deadline = time.monotonic() + launch.timeout
    # The rendezvous store lives here, on a socket bound to 127.0.0.1 only (TCPStore would
    # listen on every interface), on a port the OS picks: no race for a free port.
    sock = listening_socket()
    port = sock.getsockname()[1]
    try:
        spec = RankSpec(
            job=job,
            world_size=launch.world_size,
            backend=launch.backend,
            port=port,
            timeout=launch.timeout,
            ifname=loopback_interface(),
            environ=dict(os.environ),
        )
        blob, module_names = record_modules(spec)
    except Exception as exc:
        sock.close()
        raise InvalidArgument(
            f"the check's arguments cannot be sent to the spawned processes: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    modules = modules_to_ship(module_names)
    with _store(sock, port, launch.timeout), _processes() as (procs, conns):
        ctx = _context(launch.start_method)
        for rank in range(launch.world_size):
            procs.append(_start_rank(ctx, rank, conns, blob, modules))
        results = _Collector(launch, job, procs, conns, deadline).run()
        # Every rank has sent its results: let them leave the process group and exit.
        end = time.monotonic() + min(EXIT_GRACE, max(1.0, deadline - time.monotonic()))
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
    return results


def _context(method: str) -> Context:
    if method == "forkserver":
        ctx = multiprocessing.get_context("forkserver")
        # The server imports torch once; every later rank is forked from it, ready to run.
        ctx.set_forkserver_preload(list(PRELOAD))
        return ctx
    return multiprocessing.get_context("spawn")


def _start_rank(
    ctx: Context, rank: int, conns: dict[int, Connection], blob: bytes, modules: list[tuple[str, str]]
) -> BaseProcess:
    recv, send = ctx.Pipe(duplex=False)
    conns[rank] = recv
    p = ctx.Process(
        target=main,
        args=(rank, send, blob, list(sys.path), modules),
        name=f"gradcheck-ddp-rank{rank}",
        daemon=False,
    )
    try:
        p.start()
    finally:
        send.close()
    return p


@contextlib.contextmanager
def _store(sock: socket.socket, port: int, timeout: float) -> Iterator[None]:
    """The rendezvous ``TCPStore`` served on ``sock`` (which it takes over); closed on the way out."""
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    fd = sock.detach()
    try:
        store = TCPStore(
            LOOPBACK, port, None, True, timedelta(seconds=timeout), wait_for_workers=False, master_listen_fd=fd
        )
    except BaseException:
        os.close(fd)
        raise
    try:
        yield
    finally:
        del store


@contextlib.contextmanager
def _processes() -> Iterator[tuple[list[BaseProcess], dict[int, Connection]]]:
    """The rank processes and their pipes: every process stopped and joined, every pipe closed, on exit."""
    procs: list[BaseProcess] = []
    conns: dict[int, Connection] = {}
    try:
        yield procs, conns
    finally:
        stop(procs)
        for c in conns.values():
            c.close()


class _Collector:
    """Reads every rank's messages (progress, results, errors) until all have reported."""

    def __init__(
        self,
        launch: LaunchOptions,
        job: RankJob,
        procs: Sequence[BaseProcess],
        conns: Mapping[int, Connection],
        deadline: float,
    ) -> None:
        self.launch, self.job, self.procs, self.deadline = launch, job, procs, deadline
        self.pending = dict(conns)
        self.stages = {r: "starting up (process start, joining the process group)" for r in conns}
        self.results: dict[int, RankResult] = {}
        self.errors: list[tuple[int, dict[str, Any]]] = []

    def run(self) -> list[RankResult]:
        __tracebackhide__ = True
        while self.pending and not self.errors:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise self.timeout_error(sorted(self.pending), [])
            waitables: list[Any] = list(self.pending.values()) + [self.procs[r].sentinel for r in self.pending]
            ready = multiprocessing.connection.wait(waitables, timeout=remaining)
            for rank in sorted(self.pending):
                self._read(rank, ready)
        if self.errors:
            raise self.failure()
        return [self.results[r] for r in sorted(self.results)]

    def _read(self, rank: int, ready: Sequence[Any]) -> None:
        conn, proc = self.pending[rank], self.procs[rank]
        if conn not in ready and proc.sentinel not in ready:
            return
        try:
            if not conn.poll():
                if proc.sentinel in ready:
                    raise EOFError
                return
            kind, _rank, payload = conn.recv()
        except (EOFError, OSError):
            proc.join(1.0)
            died = {"type": "ProcessDied", "message": exit_text(proc.exitcode), "traceback": ""}
            self.errors.append((rank, {**died, "invalid": False, "collective": False}))
            del self.pending[rank]
            return
        if kind == "stage":
            self.stages[rank] = payload
            return
        del self.pending[rank]
        if kind == "ok":
            self.results[rank] = RankResult.from_payload(payload)
        else:
            self.errors.append((rank, payload))

    def failure(self) -> GradCheckError:
        others = [(r, e) for r, e in self.errors if not e.get("collective_timeout")]
        if others:
            # the first failure that is not a peer's broken connection is the cause
            rank, info = min(others, key=lambda x: (bool(x[1].get("collective")), x[0]))
            return worker_error(self.launch, rank, info)
        waited = [r for r, _ in self.errors]
        unfinished = [r for r in range(self.launch.world_size) if r not in self.results and r not in waited]
        return self.timeout_error(unfinished, waited)

    def timeout_error(self, unfinished: Sequence[int], waited: Sequence[int]) -> DDPTimeoutError:
        """``unfinished``: ranks still at work (their last progress message says where)."""
        timeout = self.launch.timeout
        parts = [f"rank {r} was {self.stages[r]}" for r in sorted(unfinished)]
        if waited:
            parts.append(
                f"rank{'s' if len(waited) != 1 else ''} {fmt_and(list(waited))} waited {timeout:g} s in a "
                "collective for the others and gave up"
            )
        done = sorted(self.results)
        if done:
            parts.append(f"rank{'s' if len(done) != 1 else ''} {fmt_and(done)} finished")
        return DDPTimeoutError(
            f"{self.job.check} ran out of time (timeout={timeout:g} s) before every rank finished the step: "
            + "; ".join(parts)
            + ". The child processes were stopped. A rank that never reaches the all-reduce (an endless loop, "
            "a collective that only some ranks call, a deadlock in the model or the loss) blocks the others, "
            f"which wait in {self.job.collective}; if the step is merely slow, pass a larger timeout=.",
            ranks_done=done,
            ranks_pending=sorted({*unfinished, *waited}),
        )


def exit_text(code: Optional[int]) -> str:
    if code is None:
        return "the process ended its connection without reporting"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the process was killed by {name} without reporting (a crash in native code?)"
    return f"the process exited with code {code} without reporting"


def worker_error(launch: LaunchOptions, rank: int, info: Mapping[str, Any]) -> GradCheckError:
    message = info.get("message", "")
    if info.get("invalid"):
        error = UnsupportedModelError if info.get("unsupported") else InvalidArgument
        return error(f"rank {rank} of {launch.world_size}: {message}")
    tb = info.get("traceback", "")
    text = f"rank {rank} of {launch.world_size} failed: {info.get('type', 'Error')}: {message}"
    if tb:
        text += f"\n\nTraceback in rank {rank}:\n{tb.rstrip()}"
    return DDPWorkerError(text, rank, tb)


def stop(procs: Sequence[BaseProcess]) -> None:
    """Terminate, then kill, then join every child that is still running."""
    for p in procs:
        if p.is_alive():
            with contextlib.suppress(Exception):
                p.terminate()
    end = time.monotonic() + TERM_GRACE
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


# --------------------------------------------------------------------------- network and modules


def listening_socket() -> socket.socket:
    """A TCP socket listening on 127.0.0.1, on a port the OS picks."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def loopback_interface() -> Optional[str]:
    """The name of the loopback network interface (``lo``, ``lo0``), if there is one."""
    try:
        names = [n for _, n in socket.if_nameindex()]
    except OSError:  # pragma: no cover - platforms without if_nameindex
        return None
    for n in ("lo", "lo0"):
        if n in names:
            return n
    return next((n for n in names if n.startswith("lo")), None)


def record_modules(obj: Any) -> tuple[bytes, set[str]]:
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
    path: Optional[Sequence[str]] = None
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


def modules_to_ship(names: set[str]) -> list[tuple[str, str]]:
    """Modules the children cannot import by name (pytest's importlib mode): ship their files."""
    stdlib: frozenset[str] = getattr(sys, "stdlib_module_names", frozenset())
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
