"""Declared per-sample weights, read and validated the same way by every backend (torch-free).

A backend turns its own tensors into NumPy first (``to_number`` for what a weights
callable returns); the forms accepted, the messages and the rules are shared: one
number per sample, finite and >= 0, not all zero.
"""

from __future__ import annotations

import numbers
import re
from typing import Any, Callable, Optional

import numpy as np

from .errors import InvalidArgument, first_line

__all__ = ["read_weights"]


def read_weights(
    weights: Any,
    b: int,
    sample_of: Callable[[int], Any],
    *,
    forms: str,
    to_array: Callable[[Any], Optional[np.ndarray]] = lambda w: None,
    to_number: Callable[[Any], Optional[float]] = lambda v: None,
) -> Optional[np.ndarray]:
    """``weights`` as a float64 ``(b,)`` array, or None; a clear ``InvalidArgument`` otherwise.

    ``forms`` names what the backend accepts ("a tensor, array or sequence");
    ``to_array``/``to_number`` convert the backend's own types (a tensor), returning
    None for anything else.

    >>> read_weights([1, 2], 2, lambda i: None, forms="an array or sequence").tolist()
    [1.0, 2.0]
    """
    if weights is None:
        return None
    converted = to_array(weights)
    if converted is not None:
        w = converted
    elif callable(weights) and not isinstance(weights, np.ndarray):
        w = np.asarray([_number(weights(sample_of(i)), i, to_number) for i in range(b)], dtype=np.float64)
    elif isinstance(weights, (np.ndarray, list, tuple, range)):
        try:
            w = np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(
                f"weights cannot be read as numbers ({type(exc).__name__}: {first_line(exc)}): pass one "
                f"number per sample, shape ({b},)"
            ) from None
    else:
        raise InvalidArgument(
            f"weights is a {type(weights).__name__}: pass one number per sample ({forms} of {b}), or a "
            "callable that returns the weight of one sample (a batch of one)"
        )
    if w.shape != (b,):
        raise InvalidArgument(
            f"weights has shape {tuple(w.shape)}: expected one weight per sample, ({b},): a 1-d "
            f"{re.sub(r'^an? ', '', forms)} of {b} numbers"
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InvalidArgument(f"weights must be finite and >= 0, got {w.tolist()[:8]}")
    if w.sum() <= 0:
        raise InvalidArgument("weights sum to 0: at least one sample must count")
    return w


def _number(value: Any, i: int, to_number: Callable[[Any], Optional[float]]) -> float:
    """The number a ``weights`` callable returned for sample ``i``, or a clear error."""
    converted = to_number(value)
    if converted is not None:
        return converted
    if isinstance(value, np.ndarray) and value.size == 1 and not np.iscomplexobj(value):
        return float(value.reshape(()))
    if isinstance(value, numbers.Real):
        return float(value)
    shape = getattr(value, "shape", None)
    if shape is None:
        what = f"a {type(value).__name__}"
    else:
        what = f"{'an array' if isinstance(value, np.ndarray) else 'a tensor'} of shape {tuple(shape)}"
    raise InvalidArgument(
        f"weights(sample {i}) returned {what}: the weights callable must return one number per sample "
        "(it is called on one sample, a batch of one), e.g. (targets != -100).sum()"
    )
