"""DistributedDataParallel: does one DDP step compute the full-batch gradient?

DDP averages the ranks' gradients. With a loss that is a mean over each rank's own
shard, that is the full-batch mean only when every shard has the same size: with
shards of 5 and 3 samples, a sample on the small rank counts 1/6 and one on the large
rank 1/10, instead of 1/8 each (a "mean of means").

The fix normalises by the global sample count: the sum over the shard divided by the
global batch size, times world_size because DDP divides by it again. In this process
(the single-process reference) there is no process group, world_size is 1 and the
global count is the local one, so the same loss is the plain mean there.

Run with ``pytest examples/test_ddp_uneven_shards.py``. The factories and losses are module-level
functions: the ranks are separate processes that import this file to unpickle them.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pytest_gradcheck import GradEquivError, assert_ddp_equiv

_g = torch.Generator().manual_seed(0)
X = torch.randn(8, 3, generator=_g)
Y = torch.randn(8, 1, generator=_g)
UNEVEN_SHARDS = [[0, 1, 2, 3, 4], [5, 6, 7]]  # e.g. the last batch of an epoch


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))


def per_rank_mean_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The bug: a mean over this rank's shard only."""
    return F.mse_loss(out, y)


def global_count_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The fix: sum over the shard / global sample count, times world_size (DDP averages)."""
    count = torch.tensor(float(y.shape[0]))
    world_size = 1
    if dist.is_initialized():
        dist.all_reduce(count)  # the global number of samples in this step
        world_size = dist.get_world_size()
    return ((out - y) ** 2).sum() / count * world_size


def test_even_shards_a_plain_mean_is_right() -> None:
    assert_ddp_equiv(make_model, F.mse_loss, X, Y, world_size=2)


@pytest.mark.xfail(strict=True, raises=GradEquivError, reason="mean of per-rank means over uneven shards")
def test_uneven_shards_mean_of_means() -> None:
    assert_ddp_equiv(make_model, per_rank_mean_loss, X, Y, shards=UNEVEN_SHARDS)


def test_uneven_shards_global_count_normalisation() -> None:
    assert_ddp_equiv(make_model, global_count_loss, X, Y, shards=UNEVEN_SHARDS)
