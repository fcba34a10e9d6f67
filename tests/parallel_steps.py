"""What the data-parallel tests share: process bookkeeping, and token-level steps for ``weights=``.

The factories and losses are module-level functions of an importable module: the ranks
import this module (by name, from the parent's ``sys.path``) to unpickle them.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pytest_gradcheck import ddp

# --------------------------------------------------------------------------- process bookkeeping


def _proc_children(pid: int) -> list[tuple[int, str, str]]:
    """(pid, state, cmdline) of the processes whose parent is ``pid`` (zombies included)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append((int(entry), fields[0], cmdline))
    return out


def leftover_ranks() -> list[tuple[int, str, str]]:
    """Rank processes still around: our own children other than multiprocessing's two
    long-lived helpers (forkserver, resource tracker), and any child of the forkserver."""
    left = []
    for pid, state, cmd in _proc_children(os.getpid()):
        if "forkserver" in cmd:
            left += _proc_children(pid)
        elif "resource_tracker" not in cmd and "multiprocessing" in cmd:
            left.append((pid, state, cmd))
    return left


def assert_no_ranks_left() -> None:
    assert multiprocessing.active_children() == []
    deadline = time.monotonic() + 5
    while leftover_ranks() and time.monotonic() < deadline:  # the forkserver reaps asynchronously
        time.sleep(0.05)
    assert leftover_ranks() == []


def record_ports(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rendezvous ports the checks of one test listen on (for a ``used_ports`` fixture)."""
    ports: list[int] = []
    original = ddp.launch.listening_socket

    def recording() -> socket.socket:
        sock = original()
        ports.append(sock.getsockname()[1])
        return sock

    monkeypatch.setattr(ddp.launch, "listening_socket", recording)
    return ports


def assert_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


# --------------------------------------------------------------------------- a token-level language-model step

VOCAB = 11
IGNORE = -100
#: non-ignored tokens per sequence: with two contiguous shards, rank 0 holds 10 + 11 = 21 and rank 1 9 + 8 = 17
TOKENS = (10, 11, 9, 8)

_g = torch.Generator().manual_seed(3)
IDS = torch.randint(0, VOCAB, (len(TOKENS), 12), generator=_g)
LABELS = torch.randint(0, VOCAB, (len(TOKENS), 12), generator=_g)
for _i, _n in enumerate(TOKENS):
    LABELS[_i, _n:] = IGNORE


class TinyLM(nn.Module):
    """Embedding, one block, a head tied to the embedding (as most language models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(ids)))


def token_count(labels: torch.Tensor) -> torch.Tensor:
    """The declared weight of one sample: its number of non-ignored tokens."""
    return (labels != IGNORE).sum()


def per_rank_token_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The bug: the mean over this rank's tokens (each rank divides by its own count)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


def all_reduced_token_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fix: the sum over this rank's tokens / the count over all ranks, times world_size
    (DDP and FSDP average the ranks' gradients). Without a process group it is the plain token mean."""
    total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    count = (labels != IGNORE).sum().to(total.dtype)
    world = 1
    if dist.is_initialized():
        dist.all_reduce(count)
        world = dist.get_world_size()
    return total / count * world
