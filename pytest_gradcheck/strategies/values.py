"""Tensors whose values come from a seeded torch generator: :func:`tensors`, :func:`make_tensor`.

Hypothesis draws one seed per tensor, never thousands of floats, so drawing is
fast and shrinking spends its effort on the shapes. torch is imported when a
tensor is made, not when this module is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from .validate import check_bounds, check_device, check_shape, dtype_kind, dtype_name

if TYPE_CHECKING:
    import torch

__all__ = ["SEED_MAX", "Device", "make_tensor", "seeds", "tensors"]

#: The largest seed drawn (seeds are drawn from ``0..SEED_MAX``).
SEED_MAX = 2**32 - 1

#: A device: its name or a ``torch.device``.
Device = Union[str, "torch.device"]


def seeds() -> st.SearchStrategy[int]:
    """The seeds of the generator, ``0..SEED_MAX``; shrinks towards 0 (other values, not smaller ones)."""
    return st.integers(min_value=0, max_value=SEED_MAX)


def tensors(
    shape: Sequence[int] | st.SearchStrategy[tuple[int, ...]],
    *,
    dtype: str | torch.dtype = "float32",
    min_value: float | None = None,
    max_value: float | None = None,
    device: str | torch.device = "cpu",
    requires_grad: bool = False,
) -> st.SearchStrategy[torch.Tensor]:
    """Tensors of ``shape`` whose values come from a seeded torch generator.

    Hypothesis draws only the seed (``st.integers(0, 2**32 - 1)``) and, if
    ``shape`` is a strategy, the shape. Shrinking therefore acts on the shape
    (towards what the shape strategy shrinks to); the seed shrinks towards 0,
    which gives *other* values, not smaller ones. The same seed and shape give
    the same tensor on every run, dtype aside (values are drawn in float64 on
    the CPU, then cast and moved to ``device``).

    Values are always finite:

    - floating dtypes: standard normal, or uniform in
      ``[min_value, max_value]`` when both are given;
    - integer dtypes: uniform integers in ``[min_value, max_value]``, both
      inclusive; ``max_value`` is required and ``min_value`` defaults to 0
      (class indices for ``C`` classes: ``min_value=0, max_value=C - 1``);
    - ``"bool"``: fair coin flips (no bounds).

    ``requires_grad=True`` (floating dtypes only) gives leaf tensors.

    >>> from hypothesis import find
    >>> from pytest_gradcheck.strategies import shapes
    >>> t = find(tensors(shapes(max_dims=2)), lambda t: t.ndim == 2)
    >>> tuple(t.shape)
    (1, 1)
    >>> y = find(tensors((5,), dtype="int64", max_value=2), lambda t: True)
    >>> bool(((y >= 0) & (y <= 2)).all())
    True
    """
    if isinstance(shape, st.SearchStrategy):
        shape_strategy: st.SearchStrategy[tuple[int, ...]] = shape
    else:
        shape_strategy = st.just(check_shape(shape, "shape"))
    name = dtype_name(dtype, "dtype")
    low, high = check_bounds(name, min_value, max_value)
    if requires_grad and dtype_kind(name) != "float":
        raise InvalidArgument(f"requires_grad=True needs a floating dtype, not dtype={dtype!r}")
    check_device(device)
    return _tensors(shape_strategy, name, low, high, device, bool(requires_grad))


@st.composite
def _tensors(
    draw: st.DrawFn,
    shape: st.SearchStrategy[tuple[int, ...]],
    dtype: str,
    low: float | None,
    high: float | None,
    device: Device,
    requires_grad: bool,
) -> torch.Tensor:
    size = draw(shape)
    seed = draw(seeds())
    return make_tensor(size, seed, dtype, low, high, device, requires_grad)


def make_tensor(
    size: tuple[int, ...],
    seed: int,
    dtype: str,
    low: float | None = None,
    high: float | None = None,
    device: Device = "cpu",
    requires_grad: bool = False,
) -> torch.Tensor:
    """The tensor that ``seed`` gives: of ``size``, canonical ``dtype`` name, in ``[low, high]``.

    Values are drawn in float64 (or int64) on the CPU from a generator seeded
    with ``seed``, then cast and moved to ``device``: the same arguments give
    the same tensor on every run. Arguments are not validated (see :func:`tensors`).
    """
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    kind = dtype_kind(dtype)
    target = getattr(torch, dtype)
    if kind == "float":
        if low is None or high is None:
            values = torch.randn(size, generator=generator, dtype=torch.float64)
        else:
            values = torch.rand(size, generator=generator, dtype=torch.float64)
            values = (values * (high - low) + low).clamp_(low, high)
        values = values.to(target)
    elif kind == "int":
        lo, hi = int(low or 0), int(high or 0)
        if hi - lo < 2**63 - 1:
            values = torch.randint(lo, hi + 1, size, generator=generator, dtype=torch.int64)
        else:  # the whole int64 range: randint's exclusive bound would overflow
            values = torch.randint(-(2**63), 2**63 - 1, size, generator=generator, dtype=torch.int64)
        values = values.to(target)
    else:
        values = torch.randint(0, 2, size, generator=generator, dtype=torch.int64).to(torch.bool)
    values = values.to(device)
    if requires_grad:
        values.requires_grad_(True)
    return values
