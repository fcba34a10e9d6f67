"""Numbers, shapes, factors and tables as every report prints them (one place for the vocabulary).

Pure Python: importing it imports neither torch nor numpy.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["fmt_number", "fmt_ratio", "fmt_shape", "fmt_factor", "fmt_weights", "fmt_counts", "close_to", "columns"]


def fmt_number(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if math.isinf(x):
        return "inf"
    if x == 0:
        return "0"
    return f"{x:.2e}"


def fmt_ratio(x: float) -> str:
    if math.isnan(x):
        return "—"
    if math.isinf(x):
        return "inf"
    return f"{x:.4g}"


def fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def fmt_factor(f: float) -> str:
    if abs(f - round(f)) < 1e-6 * max(1.0, abs(f)):
        return str(int(round(f)))
    return f"{f:.4g}"


def fmt_weights(weights: Sequence[float], limit: int = 8) -> str:
    shown = ", ".join(f"{w:.3g}" for w in weights[:limit])
    if len(weights) > limit:
        shown += f", ... ({len(weights)} in all)"
    return "[" + shown + "]"


def fmt_counts(counts: Sequence[int], limit: int = 12) -> str:
    shown = ", ".join(str(c) for c in counts[:limit])
    return shown + (f", ... ({len(counts)} in all)" if len(counts) > limit else "")


def close_to(x: float, target: float, rel: float = 1e-3) -> bool:
    return abs(x - target) <= rel * max(abs(target), 1e-12)


def columns(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Rows of cells as left-aligned columns (the first row is the header).

    >>> columns([("a", "bb"), ("ccc", "d")])
    ['  a    bb', '  ccc  d']
    """
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))] if rows else []
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
