"""Validation of the check options shared by the plugin (marker, CLI, ini) and the engine.

Pure Python: importing it imports neither torch nor numpy. Every value is
checked here once, with a message that says where the bad value came from
(``from marker``, ``from --gradequiv-rtol``, ``from ini gradequiv_rtol``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from .errors import InvalidArgument

REDUCTIONS = ("mean", "sum", "auto")
BROADCAST_MODES = ("off", "warn", "error")
REFERENCE_METHODS = ("auto", "vmap", "loop")

#: Options the ``gradequiv`` marker accepts (they become the fixture's defaults).
MARKER_OPTIONS = (
    "rtol",
    "atol",
    "reduction",
    "weights",
    "broadcast",
    "reference",
    "float64_recheck",
    "per_sample",
)


def check_tolerance(value: Any, name: str, source: str = "argument") -> float | None:
    """Return ``value`` as a non-negative finite float (``None`` passes through).

    >>> check_tolerance("1e-4", "rtol")
    0.0001
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidArgument(f"Invalid {name}={value!r} from {source}: expected a number >= 0")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"Invalid {name}={value!r} from {source}: expected a number >= 0") from None
    if not math.isfinite(number) or number < 0:
        raise InvalidArgument(f"Invalid {name}={value!r} from {source}: expected a finite number >= 0")
    return number


def check_choice(value: Any, name: str, choices: tuple[str, ...], source: str = "argument") -> str:
    """Return ``value`` if it is one of ``choices``, else raise naming them.

    >>> check_choice("sum", "reduction", REDUCTIONS)
    'sum'
    """
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise InvalidArgument(f"Invalid {name}={value!r} from {source}: expected one of {allowed}")
    return value


def check_bool(value: Any, name: str, source: str = "argument") -> bool:
    if isinstance(value, bool):
        return value
    raise InvalidArgument(f"Invalid {name}={value!r} from {source}: expected True or False")


def check_batch_sizes(sizes: "list[tuple[str, int]]", *, axis: str = "dim 0", min_size: int = 2) -> int:
    """The common batch size of ``sizes`` (``[(description, size), ...]``), or a clear error.

    Shared by every backend: sizes that disagree, an empty batch, and a batch
    smaller than ``min_size`` (a batch of one hides every cross-sample bug) are
    refused, naming the tensors.

    >>> check_batch_sizes([("inputs (shape (4, 2))", 4), ("targets (shape (4,))", 4)])
    4
    """
    if not sizes:
        raise InvalidArgument("the batch holds no tensor or array: nothing to split into samples")
    first, b = sizes[0]
    for desc, n in sizes[1:]:
        if n != b:
            raise InvalidArgument(
                f"batch sizes disagree: {first} has {b} samples but {desc} has {n}; "
                f"every tensor must carry the same batch on {axis}"
            )
    if b == 0:
        raise InvalidArgument(f"empty batch: {first} has no samples")
    if b < min_size:
        raise InvalidArgument(
            f"batch size {b} ({first}): a batch of one hides every cross-sample bug "
            "(a (1, 1) - (1,) broadcast is harmless and the mean equals the sum); "
            f"use at least {min_size} samples"
        )
    return b


def validate_options(options: Mapping[str, Any], source: str = "argument") -> dict[str, Any]:
    """Validate a mapping of check options; unknown names are rejected.

    >>> validate_options({"rtol": 1e-3, "reduction": "sum"}, source="marker")
    {'rtol': 0.001, 'reduction': 'sum'}
    """
    unknown = sorted(set(options) - set(MARKER_OPTIONS))
    if unknown:
        known = ", ".join(MARKER_OPTIONS)
        raise InvalidArgument(
            f"Unknown gradequiv option(s) {', '.join(map(repr, unknown))} from {source}; known options: {known}"
        )
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in ("rtol", "atol"):
            out[key] = check_tolerance(value, key, source)
        elif key == "reduction":
            out[key] = check_choice(value, key, REDUCTIONS, source)
        elif key == "broadcast":
            out[key] = check_choice(value, key, BROADCAST_MODES, source)
        elif key == "reference":
            out[key] = check_choice(value, key, REFERENCE_METHODS, source)
        elif key in ("float64_recheck", "per_sample"):
            out[key] = check_bool(value, key, source)
        else:  # weights: a tensor, a sequence or a callable, checked by the engine
            out[key] = value
    return out
