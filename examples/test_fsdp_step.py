"""Sharded data parallel (FSDP2, ``fully_shard``): does one step compute the full-batch gradient?

A token-level language-model loss is a mean over the tokens of the whole batch. Sharded
over ranks, each rank sees only its own sequences; if it divides the sum of its token
losses by its **own** token count, the ranks' gradients are averaged with the wrong
weights: here rank 0 holds 21 tokens and rank 1 holds 17, so a token on rank 0 counts
1/42 and one on rank 1 1/34 instead of 1/38 each (transformers issue 34242; its fix,
``average_tokens_across_devices``, all-reduces the count).

``weights=token_count`` declares that weighting: the reference is then the token-level
mean over the whole batch (each sequence's loss weighted by its number of tokens). The
fix divides by the count all-reduced over the ranks, times world_size because FSDP
averages the ranks' gradients. In this process (the single-process reference) there is
no process group, and the same loss is the plain token mean.

Run with ``pytest examples/test_fsdp_step.py``. The factories and losses are module-level
functions: the ranks are separate processes that import this file to unpickle them.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pytest_gradcheck import GradEquivError, assert_fsdp_equiv
from pytest_gradcheck.ddp.fsdp import fully_shard_available

pytestmark = pytest.mark.skipif(not fully_shard_available(), reason="needs torch.distributed.fsdp.fully_shard")

VOCAB, IGNORE = 50, -100
_g = torch.Generator().manual_seed(0)
IDS = torch.randint(0, VOCAB, (4, 12), generator=_g)
LABELS = torch.randint(0, VOCAB, (4, 12), generator=_g)
for i, n in enumerate([10, 11, 9, 8]):  # padding: rank 0 gets 10 + 11 = 21 tokens, rank 1 9 + 8 = 17
    LABELS[i, n:] = IGNORE


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(ids)))


def token_count(labels: torch.Tensor) -> torch.Tensor:
    """One sequence's weight: its number of tokens that count."""
    return (labels != IGNORE).sum()


def per_rank_token_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The bug: the mean over this rank's tokens only."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


def global_token_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fix: the sum over this rank's tokens / the token count of all ranks, times world_size."""
    total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    count = (labels != IGNORE).sum().to(total.dtype)
    world_size = 1
    if dist.is_initialized():
        dist.all_reduce(count)  # the number of tokens in this step, over every rank
        world_size = dist.get_world_size()
    return total / count * world_size


def test_a_correct_fsdp_step_with_a_bfloat16_gradient_reduction() -> None:
    assert_fsdp_equiv(
        TinyLM, global_token_mean, IDS, LABELS, weights=token_count, mp_policy={"reduce_dtype": torch.bfloat16}
    )


@pytest.mark.xfail(strict=True, raises=GradEquivError, reason="each rank divides by its own token count")
def test_per_rank_token_count() -> None:
    assert_fsdp_equiv(TinyLM, per_rank_token_mean, IDS, LABELS, weights=token_count)


def test_token_count_all_reduced_over_the_ranks() -> None:
    assert_fsdp_equiv(TinyLM, global_token_mean, IDS, LABELS, weights=token_count)
