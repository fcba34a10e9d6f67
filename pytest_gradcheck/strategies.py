"""Hypothesis strategies for batch sizes, shapes and batches of tensors.

Import it as ``gst``::

    from hypothesis import given
    from pytest_gradcheck import strategies as gst

    @given(gst.batches(input_shape=("features",), target_shape=()))
    def test_step(batch):
        ...

A gradient bug that mixes samples (a broadcast between a ``(B, 1)`` output and
a ``(B,)`` target, a sum where a mean was meant) is invisible at batch size 1
and at some lucky shapes. These strategies fuzz the batch size and the free
dimensions of a declared input/target layout, and Hypothesis shrinks a failure
to the smallest case: batch size 2, every free dimension 1 where it can.

Design:

- **Tensor values come from a seeded torch generator.** Hypothesis draws one
  seed (``st.integers(0, 2**32 - 1)``) per tensor (per batch, in
  :func:`batches`), never thousands of floats:
  drawing is fast, and shrinking spends its effort on the batch size and the
  shapes, which are what hide these bugs. The same seed gives the same values
  on every run and every device (values are drawn on the CPU, then moved).
- **Validation is eager**: a bad argument raises
  :class:`hypothesis.errors.InvalidArgument` when the strategy is *built*
  (``min_value=3 is larger than max_value=2``), not at the first draw.
- **torch is imported lazily**: importing this module imports Hypothesis, not
  torch (nor numpy); torch is first imported when a tensor is drawn.

For reproducible CI runs, see :func:`register_profiles`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Union

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

__all__ = [
    "Batch",
    "CI_PROFILE",
    "batch_sizes",
    "batches",
    "register_profiles",
    "shapes",
    "target_shapes",
    "tensors",
]

#: Name of the Hypothesis settings profile that :func:`register_profiles` registers.
CI_PROFILE = "gradequiv-ci"

#: One entry of a per-sample shape in :func:`batches`: a fixed size (``int``),
#: a named free dimension (``str``) or an anonymous free dimension (``None``).
Dim = Union[int, str, None]
ShapeSpec = Sequence[Dim]

_SEED_MAX = 2**32 - 1

# dtype name -> (kind, (min, max) of finite values). Kept as plain data so that
# a dtype given by name is validated without importing torch.
_DTYPES: dict[str, tuple[str, tuple[float, float]]] = {
    "float16": ("float", (-65504.0, 65504.0)),
    "bfloat16": ("float", (-3.3895313892515355e38, 3.3895313892515355e38)),
    "float32": ("float", (-3.4028234663852886e38, 3.4028234663852886e38)),
    "float64": ("float", (-math.inf, math.inf)),
    "uint8": ("int", (0, 2**8 - 1)),
    "int8": ("int", (-(2**7), 2**7 - 1)),
    "int16": ("int", (-(2**15), 2**15 - 1)),
    "int32": ("int", (-(2**31), 2**31 - 1)),
    "int64": ("int", (-(2**63), 2**63 - 1)),
    "bool": ("bool", (0, 1)),
}
_DTYPE_ALIASES = {
    "half": "float16",
    "float": "float32",
    "double": "float64",
    "short": "int16",
    "int": "int32",
    "long": "int64",
}


# --------------------------------------------------------------------------- #
# validation helpers (plain functions: they raise, they do not build strategies)
# --------------------------------------------------------------------------- #


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name}={value!r} must be an int, not {type(value).__name__}")
    return value


def _check_order(name_lo: str, lo: float, name_hi: str, hi: float) -> None:
    if lo > hi:
        raise InvalidArgument(f"{name_lo}={lo!r} is larger than {name_hi}={hi!r}")


def _dtype_name(dtype: object, name: str) -> str:
    """Canonical dtype name ("float32"), for a string or a ``torch.dtype``."""
    if isinstance(dtype, str):
        text = dtype.removeprefix("torch.")
    elif type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype":
        text = str(dtype).removeprefix("torch.")
    else:
        raise InvalidArgument(f"{name}={dtype!r} must be a torch.dtype or its name, such as 'float32'")
    text = _DTYPE_ALIASES.get(text, text)
    if text not in _DTYPES:
        raise InvalidArgument(f"{name}={dtype!r} is not supported; use one of {', '.join(sorted(_DTYPES))}")
    return text


def _check_shape(shape: object, name: str) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise InvalidArgument(f"{name}={shape!r} must be a tuple of ints")
    for side in shape:
        if isinstance(side, bool) or not isinstance(side, int) or side < 0:
            raise InvalidArgument(f"{name}={shape!r} must be a tuple of ints >= 0")
    return tuple(shape)


def _check_batch_size(batch_size: object, name: str = "batch_size") -> st.SearchStrategy[int]:
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


# --------------------------------------------------------------------------- #
# batch sizes and shapes
# --------------------------------------------------------------------------- #


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
    _check_int(min_value, "min_value")
    _check_int(max_value, "max_value")
    if min_value < 1:
        raise InvalidArgument(f"min_value={min_value!r} must be at least 1")
    _check_order("min_value", min_value, "max_value", max_value)
    return st.integers(min_value=min_value, max_value=max_value)


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
    for name, value in (
        ("min_dims", min_dims),
        ("max_dims", max_dims),
        ("min_side", min_side),
        ("max_side", max_side),
    ):
        _check_int(value, name)
        if value < 0:
            raise InvalidArgument(f"{name}={value!r} must be at least 0")
    _check_order("min_dims", min_dims, "max_dims", max_dims)
    _check_order("min_side", min_side, "max_side", max_side)
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
    shape = _check_shape(output_shape, "output_shape")
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


# --------------------------------------------------------------------------- #
# tensors
# --------------------------------------------------------------------------- #


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
        shape_strategy = st.just(_check_shape(shape, "shape"))
    name = _dtype_name(dtype, "dtype")
    low, high = _check_bounds(name, min_value, max_value)
    if requires_grad and _DTYPES[name][0] != "float":
        raise InvalidArgument(f"requires_grad=True needs a floating dtype, not dtype={dtype!r}")
    _check_device(device)
    return _tensors(shape_strategy, name, low, high, device, bool(requires_grad))


def _check_device(device: object) -> None:
    if not isinstance(device, str) and type(device).__module__ != "torch":
        raise InvalidArgument(f"device={device!r} must be a string such as 'cpu' or a torch.device")


def _check_bounds(dtype: str, min_value: float | None, max_value: float | None) -> tuple[float | None, float | None]:
    kind, (lo_limit, hi_limit) = _DTYPES[dtype]
    if kind == "bool":
        if min_value is not None or max_value is not None:
            raise InvalidArgument("min_value and max_value cannot be used with dtype='bool'")
        return None, None
    if kind == "int":
        low = 0 if min_value is None else _check_int(min_value, "min_value")
        if max_value is None:
            raise InvalidArgument(f"dtype={dtype!r} needs max_value= (the largest value to draw, e.g. num_classes - 1)")
        high = _check_int(max_value, "max_value")
        _check_order("min_value", low, "max_value", high)
        if low < lo_limit or high > hi_limit:
            raise InvalidArgument(
                f"min_value={low!r}, max_value={high!r} do not fit in dtype={dtype!r} "
                f"([{int(lo_limit)}, {int(hi_limit)}])"
            )
        return low, high
    if (min_value is None) != (max_value is None):
        raise InvalidArgument(
            f"min_value={min_value!r}, max_value={max_value!r}: give both bounds "
            "(uniform values) or neither (standard normal values)"
        )
    if min_value is None or max_value is None:
        return None, None
    for name, value in (("min_value", min_value), ("max_value", max_value)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"{name}={value!r} must be a number")
        if not math.isfinite(value):
            raise InvalidArgument(f"{name}={value!r} must be finite")
        if not lo_limit <= value <= hi_limit:
            raise InvalidArgument(f"{name}={value!r} is not finite in dtype={dtype!r}")
    _check_order("min_value", min_value, "max_value", max_value)
    return float(min_value), float(max_value)


@st.composite
def _tensors(
    draw: st.DrawFn,
    shape: st.SearchStrategy[tuple[int, ...]],
    dtype: str,
    low: float | None,
    high: float | None,
    device: Any,
    requires_grad: bool,
) -> torch.Tensor:
    size = draw(shape)
    seed = draw(st.integers(min_value=0, max_value=_SEED_MAX))
    return _make_tensor(size, seed, dtype, low, high, device, requires_grad)


def _make_tensor(
    size: tuple[int, ...],
    seed: int,
    dtype: str,
    low: float | None,
    high: float | None,
    device: Any,
    requires_grad: bool,
) -> torch.Tensor:
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    kind = _DTYPES[dtype][0]
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


# --------------------------------------------------------------------------- #
# batches
# --------------------------------------------------------------------------- #


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
    specs = list(spec) if _is_multi(spec) else [spec]  # type: ignore[call-overload]
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


def _named_dims(*specs: object) -> list[str]:
    """Names of the free dimensions in shape specs, in order of first appearance.

    >>> _named_dims(("features",), ("features", "classes"), 3)
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
    :func:`batch_sizes` (2 to 64). Inputs are standard normal values of a
    floating ``dtype``. Targets have ``target_dtype``, which defaults to ``dtype``,
    or to ``"int64"`` when ``num_classes`` is given; with ``num_classes``
    (an int, or the name of a free dimension, which is then drawn from
    ``max(2, min_side)`` up) targets are class indices in
    ``[0, num_classes)``. Every tensor is on ``device``.

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
    batch_strategy = batch_sizes() if batch_size is None else _check_batch_size(batch_size)
    input_dtype = _dtype_name(dtype, "dtype")
    if _DTYPES[input_dtype][0] != "float":
        raise InvalidArgument(
            f"dtype={dtype!r}: batches() draws float inputs; for integer inputs such as "
            "token ids, draw them with tensors(..., dtype='int64', max_value=...)"
        )
    if num_classes is not None:
        if isinstance(num_classes, str):
            if not num_classes:
                raise InvalidArgument("num_classes='' must name a free dimension")
        else:
            _check_int(num_classes, "num_classes")
            if num_classes < 1:
                raise InvalidArgument(f"num_classes={num_classes!r} must be at least 1")
        if target_specs is None:
            raise InvalidArgument(f"num_classes={num_classes!r} needs a target_shape")
    if target_dtype is None:
        out_dtype = "int64" if num_classes is not None else input_dtype
    else:
        out_dtype = _dtype_name(target_dtype, "target_dtype")
    if num_classes is not None and _DTYPES[out_dtype][0] != "int":
        raise InvalidArgument(
            f"num_classes={num_classes!r} gives class indices: target_dtype={target_dtype!r} "
            "must be an integer dtype such as 'int64'"
        )
    if target_specs is not None and num_classes is None and _DTYPES[out_dtype][0] == "int":
        raise InvalidArgument(
            f"target_dtype={target_dtype!r} is an integer dtype: give num_classes= for the range of the class indices"
        )
    for name, value in (("min_side", min_side), ("max_side", max_side)):
        _check_int(value, name)
        if value < 0:
            raise InvalidArgument(f"{name}={value!r} must be at least 0")
    _check_order("min_side", min_side, "max_side", max_side)

    _check_device(device)
    names = _named_dims(input_shape, target_shape, num_classes)
    given_dims = dict(dims or {})
    for name, value in given_dims.items():
        if name not in names:
            raise InvalidArgument(
                f"dims={dims!r} names {name!r}, which no shape and no num_classes uses (named free dims: {names})"
            )
        if not isinstance(value, st.SearchStrategy):
            _check_int(value, f"dims[{name!r}]")
            if value < 0:
                raise InvalidArgument(f"dims[{name!r}]={value!r} must be at least 0")
    dim_strategies: dict[str, st.SearchStrategy[int]] = {}
    for name in names:
        value = given_dims.get(name)
        if isinstance(value, st.SearchStrategy):
            dim_strategies[name] = value
        elif value is not None:
            dim_strategies[name] = st.just(value)
        elif name == num_classes:
            low = max(2, min_side)
            if low > max_side:
                raise InvalidArgument(
                    f"num_classes={num_classes!r} is drawn from at least 2 classes, but "
                    f"max_side={max_side!r}; raise max_side or give dims={{{num_classes!r}: ...}}"
                )
            dim_strategies[name] = st.integers(low, max_side)
        else:
            dim_strategies[name] = st.integers(min_side, max_side)

    return _batches(
        input_specs,
        _is_multi(input_shape),
        target_specs,
        _is_multi(target_shape),
        batch_strategy,
        dim_strategies,
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
    device: Any,
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
    seed = draw(st.integers(min_value=0, max_value=_SEED_MAX))
    inputs = tuple(
        _make_tensor(size, seed * 1024 + k, input_dtype, None, None, device, False)
        for k, size in enumerate(input_sizes)
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
            _make_tensor(size, seed * 1024 + offset + k, target_dtype, low, high, device, False)
            for k, size in enumerate(target_sizes)
        )
        targets = drawn_targets if multi_target else drawn_targets[0]
    return Batch(
        inputs=inputs if multi_input else inputs[0],
        targets=targets,
        batch_size=size,
        dims=drawn,
    )


# --------------------------------------------------------------------------- #
# settings profile
# --------------------------------------------------------------------------- #


def register_profiles() -> None:
    """Register the ``"gradequiv-ci"`` Hypothesis settings profile.

    The profile is ``derandomize=True`` (the same examples on every run, so a
    CI failure reproduces locally), ``deadline=None`` (a model's first call is
    slow, and timing is not what is tested), ``database=None`` (no
    ``.hypothesis/`` directory written by CI), ``print_blob=True`` (a
    failure prints the ``@reproduce_failure`` line), and every phase but
    ``Phase.explain``: after a failure, explaining re-runs the failing check
    about a hundred times, which for a gradient check costs far more than the
    search itself (tens of seconds) and adds little to the gradient report.
    pytest-gradcheck never loads a profile itself; call this in
    ``conftest.py`` and choose it::

        # conftest.py
        from pytest_gradcheck import strategies as gst
        gst.register_profiles()

        $ pytest --hypothesis-profile=gradequiv-ci

    or ``settings.load_profile(gst.CI_PROFILE)`` in the same ``conftest.py``,
    e.g. when ``os.environ.get("CI")`` is set. Calling it again is harmless.

    >>> from hypothesis import settings
    >>> register_profiles()
    >>> settings.get_profile(CI_PROFILE).derandomize
    True
    """
    from hypothesis import Phase, settings

    settings.register_profile(
        CI_PROFILE,
        derandomize=True,
        deadline=None,
        database=None,
        print_blob=True,
        phases=tuple(phase for phase in Phase if phase is not Phase.explain),
    )
