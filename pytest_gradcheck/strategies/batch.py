"""Batches for a declared input/target layout: :func:`batches` and :class:`Batch`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Union, cast

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from .sizes import batch_size_strategy, batch_sizes
from .validate import check_counts, check_device, check_int, check_order, dtype_kind, dtype_name
from .values import Device, make_tensor, seeds

if TYPE_CHECKING:
    import torch

__all__ = ["Batch", "Dim", "ShapeSpec", "batches", "named_dims"]

#: One entry of a per-sample shape in :func:`batches`: a fixed size (``int``),
#: a named free dimension (``str``) or an anonymous free dimension (``None``).
Dim = Union[int, str, None]
ShapeSpec = Sequence[Dim]


class Batch(NamedTuple):
    """One drawn batch: ``inputs`` and ``targets`` share the batch size on dim 0.

    ``inputs`` (and ``targets``) is a tensor, or a tuple of tensors when the
    spec declared several; ``targets`` is ``None`` when no ``target_shape``
    was given. ``dims`` maps each *named* free dimension to its drawn size,
    e.g. ``{"features": 3}``, ready to build a model of the right size with
    ``make_model(**batch.dims)``.
    """

    inputs: Any
    targets: Any
    batch_size: int
    dims: dict[str, int]


def _is_multi(spec: object) -> bool:
    return (
        isinstance(spec, Sequence)
        and not isinstance(spec, (str, bytes))
        and len(spec) > 0
        and all(isinstance(s, Sequence) and not isinstance(s, (str, bytes)) for s in spec)
    )


def _check_spec(spec: object, name: str) -> list[tuple[Dim, ...]]:
    """A shape spec, or several, as a list of tuples; raises on anything else."""
    specs = list(cast("Sequence[object]", spec)) if _is_multi(spec) else [spec]
    out = []
    for one in specs:
        if isinstance(one, (str, bytes)) or not isinstance(one, Sequence):
            raise InvalidArgument(
                f"{name}={spec!r} must be a tuple of ints, strings (named free dims) and "
                "None (anonymous free dims), or a tuple of such tuples"
            )
        for dim in one:
            ok = (
                dim is None or isinstance(dim, str) or (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0)
            )
            if not ok or dim == "":
                raise InvalidArgument(
                    f"{name}={spec!r}: {dim!r} is not a dimension; use an int >= 0, "
                    "a non-empty string (a named free dim) or None (an anonymous free dim)"
                )
        out.append(tuple(one))
    return out


def named_dims(*specs: object) -> list[str]:
    """Names of the free dimensions in shape specs, in order of first appearance.

    >>> named_dims(("features",), ("features", "classes"), 3)
    ['features', 'classes']
    """
    names: dict[str, None] = {}
    for spec in specs:
        if spec is None or isinstance(spec, int):
            continue
        if isinstance(spec, str):
            names.setdefault(spec)
            continue
        for one in _check_spec(spec, "shape"):
            for dim in one:
                if isinstance(dim, str):
                    names.setdefault(dim)
    return list(names)


def _dtypes(dtype: object, target_dtype: object, num_classes: int | str | None, has_targets: bool) -> tuple[str, str]:
    """The canonical input and target dtype names, checked against ``num_classes``."""
    input_dtype = dtype_name(dtype, "dtype")
    if dtype_kind(input_dtype) != "float":
        raise InvalidArgument(
            f"dtype={dtype!r}: batches() draws float inputs; for integer inputs such as "
            "token ids, draw them with tensors(..., dtype='int64', max_value=...)"
        )
    if num_classes is not None:
        if isinstance(num_classes, str):
            if not num_classes:
                raise InvalidArgument("num_classes='' must name a free dimension")
        else:
            check_int(num_classes, "num_classes")
            if num_classes < 1:
                raise InvalidArgument(f"num_classes={num_classes!r} must be at least 1")
        if not has_targets:
            raise InvalidArgument(f"num_classes={num_classes!r} needs a target_shape")
    if target_dtype is None:
        out_dtype = "int64" if num_classes is not None else input_dtype
    else:
        out_dtype = dtype_name(target_dtype, "target_dtype")
    if num_classes is not None and dtype_kind(out_dtype) != "int":
        raise InvalidArgument(
            f"num_classes={num_classes!r} gives class indices: target_dtype={target_dtype!r} "
            "must be an integer dtype such as 'int64'"
        )
    if has_targets and num_classes is None and dtype_kind(out_dtype) == "int":
        raise InvalidArgument(
            f"target_dtype={target_dtype!r} is an integer dtype: give num_classes= for the range of the class indices"
        )
    return input_dtype, out_dtype


def _dim_strategies(
    names: list[str],
    dims: Mapping[str, int | st.SearchStrategy[int]] | None,
    num_classes: int | str | None,
    min_side: int,
    max_side: int,
) -> dict[str, st.SearchStrategy[int]]:
    """One strategy per named free dimension: given in ``dims``, or drawn from the side range."""
    given = dict(dims or {})
    for name, value in given.items():
        if name not in names:
            raise InvalidArgument(
                f"dims={dims!r} names {name!r}, which no shape and no num_classes uses (named free dims: {names})"
            )
        if not isinstance(value, st.SearchStrategy):
            check_int(value, f"dims[{name!r}]")
            if value < 0:
                raise InvalidArgument(f"dims[{name!r}]={value!r} must be at least 0")
    out: dict[str, st.SearchStrategy[int]] = {}
    for name in names:
        chosen = given.get(name)
        if isinstance(chosen, st.SearchStrategy):
            out[name] = chosen
        elif chosen is not None:
            out[name] = st.just(chosen)
        elif name == num_classes:
            low = max(2, min_side)
            if low > max_side:
                raise InvalidArgument(
                    f"num_classes={num_classes!r} is drawn from at least 2 classes, but "
                    f"max_side={max_side!r}; raise max_side or give dims={{{num_classes!r}: ...}}"
                )
            out[name] = st.integers(low, max_side)
        else:
            out[name] = st.integers(min_side, max_side)
    return out


def batches(
    *,
    input_shape: ShapeSpec | Sequence[ShapeSpec],
    target_shape: ShapeSpec | Sequence[ShapeSpec] | None = None,
    batch_size: int | tuple[int, int] | st.SearchStrategy[int] | None = None,
    dtype: str | torch.dtype = "float32",
    target_dtype: str | torch.dtype | None = None,
    num_classes: int | str | None = None,
    dims: Mapping[str, int | st.SearchStrategy[int]] | None = None,
    min_side: int = 1,
    max_side: int = 8,
    device: str | torch.device = "cpu",
) -> st.SearchStrategy[Batch]:
    """Batches ``Batch(inputs, targets, batch_size, dims)`` for a declared layout.

    Shapes are given **per sample**; the batch dimension is always dim 0 and
    is prepended: ``input_shape=(3,)`` gives inputs of shape ``(B, 3)``,
    ``target_shape=()`` gives targets of shape ``(B,)``. Each entry of a shape
    is one of:

    - an ``int``: a fixed size;
    - a ``str``: a **named free dimension**, drawn once per batch and shared by
      every shape that names it (``input_shape=("features",)`` with
      ``target_shape=("features",)`` gives ``(B, F)`` and ``(B, F)`` with the
      same ``F``); the drawn sizes are in ``batch.dims``;
    - ``None``: an anonymous free dimension, drawn independently each time.

    Several inputs (or targets): a tuple of shapes, e.g.
    ``input_shape=((3,), ("tokens",))`` gives a tuple of two tensors.

    Free dimensions are drawn from ``min_side..max_side`` unless ``dims``
    gives a size or a strategy for a name (``dims={"classes": 10}``).

    ``batch_size``: an int, a ``(min, max)`` tuple or a strategy; default
    :func:`~pytest_gradcheck.strategies.batch_sizes` (2 to 64). Inputs are
    standard normal values of a floating ``dtype``. Targets have
    ``target_dtype``, which defaults to ``dtype``, or to ``"int64"`` when
    ``num_classes`` is given; with ``num_classes`` (an int, or the name of a
    free dimension, which is then drawn from ``max(2, min_side)`` up) targets
    are class indices in ``[0, num_classes)``. Every tensor is on ``device``.

    Shrinks towards batch size 2 (or the strategy's minimum), then towards
    free dimensions of ``min_side`` (named ``num_classes`` dims: 2).

    >>> from hypothesis import find
    >>> b = find(
    ...     batches(input_shape=("features",), target_shape=()),
    ...     lambda b: b.dims["features"] >= 2,
    ... )
    >>> b.batch_size, tuple(b.inputs.shape), tuple(b.targets.shape), b.dims
    (2, (2, 2), (2,), {'features': 2})
    """
    input_specs = _check_spec(input_shape, "input_shape")
    target_specs = None if target_shape is None else _check_spec(target_shape, "target_shape")
    batch_strategy = batch_sizes() if batch_size is None else batch_size_strategy(batch_size)
    input_dtype, out_dtype = _dtypes(dtype, target_dtype, num_classes, target_specs is not None)
    check_counts(("min_side", min_side), ("max_side", max_side))
    check_order("min_side", min_side, "max_side", max_side)
    check_device(device)
    names = named_dims(input_shape, target_shape, num_classes)
    return _batches(
        input_specs,
        _is_multi(input_shape),
        target_specs,
        _is_multi(target_shape),
        batch_strategy,
        _dim_strategies(names, dims, num_classes, min_side, max_side),
        st.integers(min_side, max_side),
        input_dtype,
        out_dtype,
        num_classes,
        device,
    )


@st.composite
def _batches(
    draw: st.DrawFn,
    input_specs: list[tuple[Dim, ...]],
    multi_input: bool,
    target_specs: list[tuple[Dim, ...]] | None,
    multi_target: bool,
    batch_strategy: st.SearchStrategy[int],
    dim_strategies: dict[str, st.SearchStrategy[int]],
    side_strategy: st.SearchStrategy[int],
    input_dtype: str,
    target_dtype: str,
    num_classes: int | str | None,
    device: Device,
) -> Batch:
    size = draw(batch_strategy)
    drawn = {name: draw(strategy) for name, strategy in dim_strategies.items()}

    def resolve(spec: tuple[Dim, ...]) -> tuple[int, ...]:
        out = [size]
        for dim in spec:
            if dim is None:
                out.append(draw(side_strategy))
            elif isinstance(dim, str):
                out.append(drawn[dim])
            else:
                out.append(dim)
        return tuple(out)

    input_sizes = [resolve(s) for s in input_specs]
    target_sizes = None if target_specs is None else [resolve(s) for s in target_specs]
    # One seed for the whole batch; tensor k uses seed * 1024 + k, so inputs and
    # targets never share values, even when the seed has shrunk to 0.
    seed = draw(seeds())
    inputs = tuple(
        make_tensor(size, seed * 1024 + k, input_dtype, None, None, device, False) for k, size in enumerate(input_sizes)
    )
    targets: Any = None
    if target_sizes is not None:
        low: int | None = None
        high: int | None = None
        if num_classes is not None:
            classes = drawn[num_classes] if isinstance(num_classes, str) else num_classes
            low, high = 0, max(classes - 1, 0)
        offset = len(input_sizes)
        drawn_targets = tuple(
            make_tensor(size, seed * 1024 + offset + k, target_dtype, low, high, device, False)
            for k, size in enumerate(target_sizes)
        )
        targets = drawn_targets if multi_target else drawn_targets[0]
    return Batch(
        inputs=inputs if multi_input else inputs[0],
        targets=targets,
        batch_size=size,
        dims=drawn,
    )
