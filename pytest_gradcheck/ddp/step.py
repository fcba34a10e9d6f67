"""The user's step and model, run the same way in this process and in every rank.

:class:`Step` is the picklable description of the loss call that the ranks
receive; the loss call itself is the package's one
(:func:`pytest_gradcheck._torch.loss.loss_step_builder`). The helpers build the
model, take a shard of the batch and read the gradients back, on both sides.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .._torch.loss import as_scalar_loss, loss_step_builder
from ..errors import InvalidArgument

__all__ = [
    "Step",
    "build_model",
    "convert",
    "gradients_of",
    "seeded",
    "state_hash",
    "take",
    "trainable",
]

#: ``step(model, batch, where)``: the loss of one batch, a scalar tensor.
LossCall = Callable[[torch.nn.Module, Any, str], torch.Tensor]
#: ``build(record, float64) -> step(model, batch)``, as :class:`pytest_gradcheck._torch.problem.TorchProblem` takes it.
StepBuilder = Callable[[Optional[list[Any]], bool], Callable[[torch.nn.Module, Any], Any]]


@dataclass(frozen=True)
class Step:
    """``loss_fn(model(*inputs), targets)`` on a batch ``(inputs, targets)``, or
    ``step_fn(model, batch)``: what every rank and the reference run. Picklable."""

    loss_fn: Optional[Callable[..., Any]] = None
    step_fn: Optional[Callable[[torch.nn.Module, Any], Any]] = None
    has_targets: bool = False
    targets_is_tuple: bool = False

    def builder(self) -> StepBuilder:
        """``build(record, float64) -> step(model, batch)``: the step as the torch checks build it
        (the per-sample reference of a weighted check runs it)."""
        step_fn = self.step_fn
        if step_fn is not None:
            return lambda record, float64: step_fn
        if self.loss_fn is not None:
            return loss_step_builder(self.loss_fn, has_targets=self.has_targets, targets_is_tuple=self.targets_is_tuple)
        raise InvalidArgument("neither loss_fn nor step_fn was given")  # pragma: no cover - excluded by config

    def build(self, float64: bool) -> LossCall:
        """The loss call; with ``float64`` a loss module runs on a float64 copy (as in every check)."""
        run = self.builder()(None, float64)

        def loss(model: torch.nn.Module, batch: Any, where: str) -> torch.Tensor:
            return as_scalar_loss(run(model, batch), where=where)

        return loss


def take(batch: Any, idx: np.ndarray) -> Any:
    """The samples ``idx`` of every tensor in ``batch`` (dim 0), as detached copies."""
    index = torch.as_tensor(idx, dtype=torch.long)

    def one(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.detach().index_select(0, index.to(x.device)).clone()
        return x

    return pytree.tree_map(one, batch)


def convert(batch: Any, float64: bool, device: Optional[torch.device] = None) -> Any:
    """Detached copies of the tensors of ``batch`` on ``device``, floats in float64 if ``float64``."""

    def one(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        y = x.detach()
        if device is not None:
            y = y.to(device)
        if float64 and y.is_floating_point():
            y = y.to(torch.float64)
        return y.clone()

    return pytree.tree_map(one, batch)


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def state_hash(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer: equal models, equal digests."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        data = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(data.dtype).encode())
        h.update(str(tuple(data.shape)).encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def gradients_of(model: torch.nn.Module) -> tuple[dict[str, np.ndarray], list[str]]:
    """The ``.grad`` of every trainable parameter as float64 arrays (zeros where there is none),
    and the names of the parameters that had none."""
    out: dict[str, np.ndarray] = {}
    missing: list[str] = []
    for name, p in trainable(model):
        if p.grad is None:
            missing.append(name)
            out[name] = np.zeros(tuple(p.shape), dtype=np.float64)
        else:
            out[name] = p.grad.detach().to("cpu", torch.float64).numpy().copy()
    return out, missing


@contextlib.contextmanager
def seeded() -> Iterator[None]:
    """``torch.manual_seed(0)`` for the block; the caller's RNG states are restored afterwards."""
    cpu = torch.get_rng_state()
    cuda = (
        torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        else None
    )
    torch.manual_seed(0)
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def build_model(make_model: Callable[[], Any], where: str) -> torch.nn.Module:
    """``make_model()``, checked: a plain module with something to train."""
    model = make_model()
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgument(f"make_model() must return a torch.nn.Module, got {type(model).__name__} ({where})")
    if not trainable(model):
        raise InvalidArgument("the model has no parameter that requires grad: there is no gradient to check")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise InvalidArgument("make_model() must return the plain model: the check wraps it in DDP itself")
    return model
