"""What the checks are given, validated: models, tensor tuples, batch sizes, weights, and the
weightings worth naming (non-ignored targets, tokens after a causal LM's shift)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .._options import check_batch_sizes
from .._weights import read_weights
from ..diagnosis import IGNORE_INDEX
from ..errors import InvalidArgument

NamedModules = Sequence[tuple[str, torch.nn.Module]]  # model.named_modules(), walked once


TensorOrTuple = Union[torch.Tensor, Sequence[torch.Tensor]]
WeightsArg = Union[None, torch.Tensor, Sequence[float], np.ndarray, Callable[[Any], Any]]


def loss_call_arguments(
    model: Any, loss_fn: Any, inputs: Any, targets: Any
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], bool]:
    """Validate the ``(model, loss_fn, inputs, targets)`` form; return the tensors as tuples.

    Returns ``(inputs, targets, targets_is_tuple)``; ``targets`` is ``()`` for None.
    """
    check_model(model)
    if isinstance(loss_fn, type) and issubclass(loss_fn, torch.nn.Module):
        name = class_name(loss_fn)
        raise InvalidArgument(f"loss_fn is the class {name}; pass an instance: {name}()")
    if not callable(loss_fn):
        raise InvalidArgument(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    inputs_t = _as_tensor_tuple(inputs, "inputs")
    targets_is_tuple = isinstance(targets, (tuple, list))
    targets_t = () if targets is None else _as_tensor_tuple(targets, "targets")
    _check_loss_form_batch(inputs_t, targets_t, loss_form_paths(inputs, targets))
    return inputs_t, targets_t, targets_is_tuple


def loss_form_paths(inputs: Any, targets: Any) -> list[str]:
    """The names of the tensors of ``(inputs, targets)`` as the user passed them, in order:
    ``inputs`` or ``inputs[i]``, then ``targets`` or ``targets[i]``."""
    out = [f"inputs[{i}]" for i in range(len(inputs))] if isinstance(inputs, (tuple, list)) else ["inputs"]
    if isinstance(targets, (tuple, list)):
        out += [f"targets[{i}]" for i in range(len(targets))]
    elif targets is not None:
        out.append("targets")
    return out


def _check_loss_form_batch(
    inputs_t: Sequence[torch.Tensor], targets_t: Sequence[torch.Tensor], paths: Sequence[str]
) -> None:
    """The batch sizes of ``inputs``/``targets``, checked with the names the user knows them by."""
    tensors = [*inputs_t, *targets_t]
    if all(t.dim() > 0 for t in tensors) and len({int(t.shape[0]) for t in tensors}) == 1 and tensors[0].shape[0] >= 2:
        return  # the common case, without building the descriptions an error message needs
    sizes = []
    for path, t in zip(paths, tensors):
        if t.dim() == 0:
            raise InvalidArgument(zero_dim_message(path))
        sizes.append((describe_leaf(path, t), int(t.shape[0])))
    check_batch_sizes(sizes)


def check_model(model: Any) -> None:
    if isinstance(model, type) and issubclass(model, torch.nn.Module):
        name = class_name(model)
        raise InvalidArgument(f"model is the class {name}; pass an instance: {name}(...)")
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgument(f"model must be a torch.nn.Module, got {type(model).__name__}")


def class_name(cls: type) -> str:
    """``nn.MSELoss`` for torch's own modules (as users write them), else the class's name."""
    if cls.__module__.startswith("torch.nn") and getattr(torch.nn, cls.__name__, None) is cls:
        return f"nn.{cls.__name__}"
    return cls.__name__


def _as_tensor_tuple(value: Any, name: str) -> tuple[torch.Tensor, ...]:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not items:
        raise InvalidArgument(f"{name} is empty: pass a tensor or a tuple of tensors with the batch on dim 0")
    for i, t in enumerate(items):
        label = f"{name}[{i}]" if isinstance(value, (tuple, list)) else name
        if not isinstance(t, torch.Tensor):
            raise InvalidArgument(
                f"{label} is a {type(t).__name__}, not a tensor: every entry of {name} must be a "
                "tensor with the batch on dim 0 (use assert_gradequiv_step for other arguments)"
            )
        if t.layout != torch.strided:
            raise InvalidArgument(sparse_input_message(label, t))
    return items


def zero_dim_message(path: str) -> str:
    return (
        f"{path} is a 0-d tensor (a single number): every tensor needs the batch on dim 0, one value "
        "per sample (shape (B, ...))"
    )


def sparse_input_message(path: str, t: torch.Tensor) -> str:
    return (
        f"{path} is a sparse tensor (layout {t.layout}): the check slices every tensor into single "
        "samples and runs them through torch.func.vmap, which sparse tensors do not support; pass "
        f"{path}.to_dense() for the check"
    )


def describe_leaf(path: str, t: torch.Tensor) -> str:
    return f"{path} (shape {tuple(t.shape)})"


def batch_size_of(batch: Any, allow_non_tensor: bool, leaves: Optional[list[Any]] = None) -> int:
    if leaves is None:
        leaves, _ = pytree.tree_flatten(batch)
    # the common case, without building the leaf descriptions an error message needs
    if all(isinstance(x, torch.Tensor) and x.dim() > 0 and x.layout == torch.strided for x in leaves):
        sizes0 = {int(x.shape[0]) for x in leaves}
        if len(sizes0) == 1 and min(sizes0) >= 2:
            return sizes0.pop()
    paths = leaf_paths(batch)
    sizes: list[tuple[str, int]] = []
    for path, leaf in zip(paths, leaves):
        if isinstance(leaf, torch.Tensor):
            if leaf.dim() == 0:
                raise InvalidArgument(zero_dim_message(path))
            if leaf.layout != torch.strided:
                raise InvalidArgument(sparse_input_message(path, leaf))
            sizes.append((describe_leaf(path, leaf), int(leaf.shape[0])))
        elif not allow_non_tensor:
            raise InvalidArgument(f"{path} is a {type(leaf).__name__}, not a tensor")
    return check_batch_sizes(sizes)


def leaf_paths(batch: Any) -> list[str]:
    """Readable paths of the leaves of ``batch``, in ``tree_flatten`` order."""
    # Batches built by assert_gradequiv are ((inputs...), (targets...)).
    out: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, (tuple, list)) and not isinstance(node, torch.Tensor):
            for i, child in enumerate(node):
                walk(child, f"{path}[{i}]")
        elif isinstance(node, dict):
            for k in sorted(node) if _sortable(node) else node:
                walk(node[k], f"{path}[{k!r}]")
        else:
            out.append(path or "batch")

    walk(batch, "batch")
    leaves, _ = pytree.tree_flatten(batch)
    if len(out) != len(leaves):  # exotic containers: fall back to indices
        return [f"batch leaf {i}" for i in range(len(leaves))]
    return out


def _sortable(d: dict[str, Any]) -> bool:
    try:
        sorted(d)
        return True
    except TypeError:
        return False


def resolve_weights(weights: WeightsArg, b: int, sample_of: Callable[[int], Any]) -> Optional[np.ndarray]:
    """The declared per-sample weights as a float64 ``(b,)`` array, or None (see :mod:`.._weights`)."""

    def tensor_array(w: Any) -> Optional[np.ndarray]:
        return w.detach().to("cpu", torch.float64).numpy() if isinstance(w, torch.Tensor) else None

    def tensor_number(v: Any) -> Optional[float]:
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex():
            return float(v.detach().reshape(()).cpu())
        return None

    return read_weights(
        weights, b, sample_of, forms="a tensor, array or sequence", to_array=tensor_array, to_number=tensor_number
    )


def ignore_index_candidates(loss_fn: Any, targets: Sequence[torch.Tensor]) -> list[tuple[str, np.ndarray]]:
    """Per-sample weightings worth naming when a loss is not a plain mean/sum.

    For every integer target tensor: its number of non-ignored entries per sample
    (``ignore_index`` of the loss, else -100), and for targets with a sequence
    dimension the same count after the one-position shift that causal language
    models apply inside the model (``labels[:, 1:]``).
    """
    out: list[tuple[str, np.ndarray]] = []
    ignore = getattr(loss_fn, "ignore_index", IGNORE_INDEX)
    for t in targets:
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dim() < 1:
            continue
        if t.dtype == torch.bool:
            continue
        if t.dim() == 1:
            kept = (t != ignore).to("cpu", torch.float64).numpy()
            if kept.all():
                continue  # every sample counts: the plain mean
            out.append(
                (
                    f"whether their target is counted (a mean over the {int(kept.sum())} of {kept.size} "
                    f"samples whose target is not ignore_index={ignore}; ignored samples weigh 0)",
                    kept,
                )
            )
            continue
        out.append((f"their number of non-ignored targets (targets != {ignore})", non_ignored_counts(t, ignore)))
        if t.dim() == 2 and t.shape[1] > 1:
            out.append((shifted_label(ignore), non_ignored_counts(t, ignore, shift=True)))
    return out


def shifted_label(ignore: int) -> str:
    return (
        "their number of non-ignored targets after the one-token shift a causal language model "
        f"applies to its labels (labels[:, 1:] != {ignore})"
    )


def non_ignored_counts(t: torch.Tensor, ignore: int, shift: bool = False) -> np.ndarray:
    """Per sample: how many entries of ``t`` are not ``ignore`` (after dropping the first
    position of dim 1, as a causal language model does with its labels, if ``shift``)."""
    if shift:
        t = t[:, 1:]
    return (t != ignore).reshape(t.shape[0], -1).sum(dim=1).to("cpu", torch.float64).numpy()
