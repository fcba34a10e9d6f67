"""Data parallelism: the DDP (or FSDP) gradient of one step equals the single-process full-batch gradient.

:func:`assert_ddp_equiv` starts ``world_size`` processes, joins them in a
``torch.distributed`` process group over the loopback interface only
(``127.0.0.1``), builds the model in every rank with the same seed, wraps it in
:class:`~torch.nn.parallel.DistributedDataParallel`, gives each rank its shard
of the batch and runs one training step (``loss.backward()``, optionally
accumulated over micro-batches under ``no_sync()``). Every rank sends its
gradients back to the parent, which compares them, through the shared verdict
path (:func:`pytest_gradcheck.verdict.run_check`), with the gradient of the same
loss on the whole batch in one process.

A mismatch is explained: ranks that weight samples by ``1/shard size`` (a
per-rank mean over uneven shards), samples repeated by ``DistributedSampler``,
BatchNorm normalising per rank, ranks that end the step with different
gradients, and a ``no_sync()`` accumulation that misses its ``1/k``. Each
diagnosis is a hypothesis recomputed in the parent (the ranks' steps re-run one
at a time) and compared with the same comparator.

:func:`assert_fsdp_equiv` does the same with ``fully_shard`` (FSDP2): each
selected submodule and the root sharded over the ranks, an optional mixed
precision policy, the gradient sync off for all micro-batches but the last,
and the gradients gathered from their shards. Both take ``weights=`` (one per
sample, or a callable on a sample's targets such as its token count): the
reference is then the weighted full-batch gradient, and a loss normalised by
each rank's own token count is named as such.

The whole run is bounded (``timeout`` seconds, and the process group's own
timeout for every collective); the child processes are stopped, killed if they
must be, and joined on every path out, failures and ``KeyboardInterrupt``
included.

The modules, each one job:

- :mod:`~pytest_gradcheck.ddp.check`: :func:`assert_ddp_equiv`, the steps in order;
- :mod:`~pytest_gradcheck.ddp.config`: the arguments, validated into small frozen objects;
- :mod:`~pytest_gradcheck.ddp.step`: the user's step and model, run alike here and in the ranks;
- :mod:`~pytest_gradcheck.ddp.reference`: the single-process gradients;
- :mod:`~pytest_gradcheck.ddp.launch`: the parent: processes, the loopback rendezvous, time-outs;
- :mod:`~pytest_gradcheck.ddp.worker`: the child: one rank's step (:class:`~pytest_gradcheck.ddp.worker.DDPJob`);
- :mod:`~pytest_gradcheck.ddp.fsdp`: :func:`assert_fsdp_equiv` and its rank job
  (:class:`~pytest_gradcheck.ddp.fsdp.FSDPJob`), the ``fully_shard`` units and their refusals;
- :mod:`~pytest_gradcheck.ddp.problem`: the verdict's problem and the diagnosis, as figures;
- :mod:`pytest_gradcheck.report.ddp`: the words.
"""

from __future__ import annotations

from ..errors import DDPTimeoutError, DDPWorkerError
from . import check, config, fsdp, launch, problem, reference, step, worker
from .check import assert_ddp_equiv
from .fsdp import assert_fsdp_equiv

__all__ = [
    "DDPTimeoutError",
    "DDPWorkerError",
    "assert_ddp_equiv",
    "assert_fsdp_equiv",
    "check",
    "config",
    "fsdp",
    "launch",
    "problem",
    "reference",
    "step",
    "worker",
]
