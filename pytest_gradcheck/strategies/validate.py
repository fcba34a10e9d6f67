"""Eager validation of the strategies' arguments, and the dtypes they know by name.

Plain functions: they return the checked value or raise
:class:`hypothesis.errors.InvalidArgument` naming the parameter; they build no
strategy. Importing this module imports neither torch nor numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hypothesis.errors import InvalidArgument

__all__ = [
    "DTYPES",
    "check_bounds",
    "check_counts",
    "check_device",
    "check_int",
    "check_order",
    "check_shape",
    "dtype_kind",
    "dtype_name",
]

#: dtype name -> (kind, (min, max) of finite values). Kept as plain data so that
#: a dtype given by name is validated without importing torch.
DTYPES: dict[str, tuple[str, tuple[float, float]]] = {
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


def check_int(value: object, name: str) -> int:
    """``value`` if it is an int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name}={value!r} must be an int, not {type(value).__name__}")
    return value


def check_order(name_lo: str, lo: float, name_hi: str, hi: float) -> None:
    """``min_value=3 is larger than max_value=2``."""
    if lo > hi:
        raise InvalidArgument(f"{name_lo}={lo!r} is larger than {name_hi}={hi!r}")


def check_counts(*named: tuple[str, object]) -> list[int]:
    """Each ``(name, value)`` an int >= 0, checked in order; the values."""
    out: list[int] = []
    for name, value in named:
        count = check_int(value, name)
        if count < 0:
            raise InvalidArgument(f"{name}={count!r} must be at least 0")
        out.append(count)
    return out


def dtype_name(dtype: object, name: str) -> str:
    """Canonical dtype name ("float32"), for a string or a ``torch.dtype``."""
    if isinstance(dtype, str):
        text = dtype.removeprefix("torch.")
    elif type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype":
        text = str(dtype).removeprefix("torch.")
    else:
        raise InvalidArgument(f"{name}={dtype!r} must be a torch.dtype or its name, such as 'float32'")
    text = _DTYPE_ALIASES.get(text, text)
    if text not in DTYPES:
        raise InvalidArgument(f"{name}={dtype!r} is not supported; use one of {', '.join(sorted(DTYPES))}")
    return text


def dtype_kind(name: str) -> str:
    """``"float"``, ``"int"`` or ``"bool"`` for a canonical dtype name."""
    return DTYPES[name][0]


def check_shape(shape: object, name: str) -> tuple[int, ...]:
    """``shape`` as a tuple of ints >= 0."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise InvalidArgument(f"{name}={shape!r} must be a tuple of ints")
    for side in shape:
        if isinstance(side, bool) or not isinstance(side, int) or side < 0:
            raise InvalidArgument(f"{name}={shape!r} must be a tuple of ints >= 0")
    return tuple(shape)


def check_device(device: object) -> None:
    """A device name or a ``torch.device`` (checked without importing torch)."""
    if not isinstance(device, str) and type(device).__module__ != "torch":
        raise InvalidArgument(f"device={device!r} must be a string such as 'cpu' or a torch.device")


def _check_float_bounds(dtype: str, min_value: float, max_value: float) -> tuple[float, float]:
    lo_limit, hi_limit = DTYPES[dtype][1]
    for name, value in (("min_value", min_value), ("max_value", max_value)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"{name}={value!r} must be a number")
        if not math.isfinite(value):
            raise InvalidArgument(f"{name}={value!r} must be finite")
        if not lo_limit <= value <= hi_limit:
            raise InvalidArgument(f"{name}={value!r} is not finite in dtype={dtype!r}")
    check_order("min_value", min_value, "max_value", max_value)
    return float(min_value), float(max_value)


def check_bounds(dtype: str, min_value: float | None, max_value: float | None) -> tuple[float | None, float | None]:
    """The value bounds of :func:`~pytest_gradcheck.strategies.tensors` for a canonical dtype name."""
    kind, (lo_limit, hi_limit) = DTYPES[dtype]
    if kind == "bool":
        if min_value is not None or max_value is not None:
            raise InvalidArgument("min_value and max_value cannot be used with dtype='bool'")
        return None, None
    if kind == "int":
        low = 0 if min_value is None else check_int(min_value, "min_value")
        if max_value is None:
            raise InvalidArgument(f"dtype={dtype!r} needs max_value= (the largest value to draw, e.g. num_classes - 1)")
        high = check_int(max_value, "max_value")
        check_order("min_value", low, "max_value", high)
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
    return _check_float_bounds(dtype, min_value, max_value)
