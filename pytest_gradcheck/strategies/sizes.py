"""Strategies for batch sizes and shapes: :func:`batch_sizes`, :func:`shapes`, :func:`target_shapes`."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from .validate import check_counts, check_int, check_order, check_shape

__all__ = ["batch_size_strategy", "batch_sizes", "shapes", "target_shapes"]


def batch_sizes(*, min_value: int = 2, max_value: int = 64) -> st.SearchStrategy[int]:
    """Batch sizes between ``min_value`` and ``max_value`` inclusive.

    Shrinks towards ``min_value``, so a failure is reported at the smallest
    batch size that shows it.

    The default minimum is **2, not 1**, on purpose: at batch size 1 every
    cross-sample bug is invisible. A broadcast ``(1, 1) - (1,) -> (1, 1)``
    changes nothing, a mean equals a sum, and the batch gradient equals the
    single per-sample gradient whatever the loss does. Ask for
    ``min_value=1`` only to test code paths that special-case B=1.

    >>> from hypothesis import find
    >>> find(batch_sizes(), lambda b: b > 3)  # the smallest batch size that passes
    4
    """
    check_int(min_value, "min_value")
    check_int(max_value, "max_value")
    if min_value < 1:
        raise InvalidArgument(f"min_value={min_value!r} must be at least 1")
    check_order("min_value", min_value, "max_value", max_value)
    return st.integers(min_value=min_value, max_value=max_value)


def batch_size_strategy(batch_size: object, name: str = "batch_size") -> st.SearchStrategy[int]:
    """A strategy of batch sizes from an int, a ``(min, max)`` tuple or a strategy of ints."""
    if isinstance(batch_size, st.SearchStrategy):
        return batch_size
    if isinstance(batch_size, tuple) and len(batch_size) == 2:
        try:
            return batch_sizes(min_value=batch_size[0], max_value=batch_size[1])
        except InvalidArgument as err:
            raise InvalidArgument(f"{name}={batch_size!r}: {err}") from None
    if isinstance(batch_size, int) and not isinstance(batch_size, bool):
        if batch_size < 1:
            raise InvalidArgument(f"{name}={batch_size!r} must be at least 1")
        return st.just(batch_size)
    raise InvalidArgument(f"{name}={batch_size!r} must be an int, a (min, max) tuple or a strategy of ints")


def shapes(
    *, min_dims: int = 1, max_dims: int = 3, min_side: int = 1, max_side: int = 8
) -> st.SearchStrategy[tuple[int, ...]]:
    """Feature shapes (one sample, without the batch dimension).

    A thin, eagerly validated wrapper around
    :func:`hypothesis.extra.numpy.array_shapes`. Shrinks towards fewer
    dimensions (``min_dims``) and towards sides of ``min_side``.

    >>> from hypothesis import find
    >>> find(shapes(), lambda s: len(s) >= 2 and s[-1] >= 3)
    (1, 3)
    """
    check_counts(("min_dims", min_dims), ("max_dims", max_dims), ("min_side", min_side), ("max_side", max_side))
    check_order("min_dims", min_dims, "max_dims", max_dims)
    check_order("min_side", min_side, "max_side", max_side)
    if max_dims > 32:
        raise InvalidArgument(f"max_dims={max_dims!r} is larger than 32, the most a tensor allows")

    from hypothesis.extra.numpy import array_shapes  # imports numpy: keep it lazy

    return array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


def target_shapes(output_shape: Sequence[int]) -> st.SearchStrategy[tuple[int, ...]]:
    """The shapes a user's targets plausibly have, for outputs of ``output_shape``.

    Use it to test that a loss function either handles, or cleanly rejects,
    every target layout it may be handed. ``output_shape[0]`` is the batch
    size ``B``; for outputs ``(B, *rest)`` the candidates are, in this order
    (duplicates dropped):

    1. ``(B, *rest)``: the outputs' own shape (the correct one);
    2. ``(B,)``: one value per sample (a squeezed regression target, or class indices);
    3. ``(B, *rest[:-1])``: the last dimension dropped (class indices per position);
    4. ``(B, *rest, 1)``: an extra trailing singleton (noise built as ``(n, 1, 1)``);
    5. ``(B, 1)``: a single column;
    6. ``(B, *rest[:-1], 1)``: the last dimension collapsed to 1;
    7. ``(B, 1, 1)``: when every dimension of ``rest`` is 1 or there is none.

    So ``(B, 1)`` gives ``(B, 1)``, ``(B,)``, ``(B, 1, 1)``; ``(B, C)`` gives
    ``(B, C)``, ``(B,)``, ``(B, C, 1)``, ``(B, 1)``; ``(B,)`` gives ``(B,)``,
    ``(B, 1)``, ``(B, 1, 1)``. Shrinks towards the first, the outputs' own
    shape, so a falsifying example shows a target layout that really fails.
    Float targets suit every shape; class indices only the ones with the last
    dimension dropped.

    >>> from hypothesis import find
    >>> find(target_shapes((4, 1)), lambda s: len(s) != 2)
    (4,)
    """
    shape = check_shape(output_shape, "output_shape")
    if not shape:
        raise InvalidArgument(f"output_shape={output_shape!r} must have a batch dimension first, e.g. (4, 1)")
    batch, rest = shape[0], shape[1:]
    candidates = [
        (batch, *rest),
        (batch,),
        (batch, *rest[:-1]),
        (batch, *rest, 1),
        (batch, 1),
        (batch, *rest[:-1], 1),
    ]
    if all(side == 1 for side in rest):
        candidates.append((batch, 1, 1))
    return st.sampled_from(list(dict.fromkeys(candidates)))
