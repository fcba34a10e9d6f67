"""Numbers, shapes, factors and tables as every report prints them (one place for the vocabulary).

Pure Python: importing it imports neither torch nor numpy.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

__all__ = [
    "display_path",
    "set_rootdir",
    "fmt_number",
    "fmt_ratio",
    "fmt_shape",
    "fmt_factor",
    "fmt_weights",
    "fmt_counts",
    "close_to",
    "columns",
]


_rootdir: Optional[str] = None  # pytest's rootdir, set by the plugin at configure time


def set_rootdir(path: Optional[str]) -> Optional[str]:
    """Show paths in reports relative to ``path`` (pytest's rootdir; ``None``: the working directory).

    Returns the previous setting, for the plugin to restore when its session ends.
    """
    global _rootdir
    previous, _rootdir = _rootdir, (None if path is None else os.fspath(path))
    return previous


def display_path(filename: str) -> str:
    """``filename`` relative to pytest's rootdir (or the working directory), ``/``-separated.

    A file outside that directory keeps its full path: a bare file name is ambiguous.

    >>> set_rootdir("/repo")
    >>> display_path("/repo/tests/test_model.py"), display_path("/elsewhere/model.py")
    ('tests/test_model.py', '/elsewhere/model.py')
    >>> set_rootdir(None)
    """
    if not filename or not os.path.isabs(filename):
        return filename.replace(os.sep, "/")
    root = _rootdir if _rootdir is not None else os.getcwd()
    try:
        rel = os.path.relpath(filename, root)
    except ValueError:  # another drive on Windows
        return filename
    return filename if rel.startswith("..") else rel.replace(os.sep, "/")


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


__all__ += ["section", "bullets"]


def section(title: str, items: Sequence[str]) -> list[str]:
    """A blank line, ``title: first item``, the other items indented under it; nothing for no items.

    >>> section("Cause", ["the sign is flipped.", "see above."])
    ['', 'Cause: the sign is flipped.', '  see above.']
    """
    if not items:
        return []
    return ["", f"{title}: {items[0]}", *("  " + item for item in items[1:])]


def bullets(title: str, items: Sequence[str]) -> list[str]:
    """A blank line, ``title:``, one ``  - item`` line per item; nothing for no items.

    >>> bullets("Notes", ["a", "b"])
    ['', 'Notes:', '  - a', '  - b']
    """
    if not items:
        return []
    return ["", f"{title}:", *(f"  - {item}" for item in items)]


__all__ += ["fmt_and", "fmt_indices"]


def fmt_and(items: Sequence[object]) -> str:
    """Items as a sentence lists them.

    >>> fmt_and([5, 3]), fmt_and([2, 2, 2]), fmt_and(["a"])
    ('5 and 3', '2, 2 and 2', 'a')
    """
    words = [str(i) for i in items]
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def fmt_indices(indices: Sequence[int], limit: int = 10) -> str:
    """Sample indices, a run of consecutive ones as ``[first..last]``.

    >>> fmt_indices([0, 1, 2, 3]), fmt_indices([0, 2, 4]), fmt_indices(range(0, 24, 2), limit=3)
    ('[0..3]', '[0, 2, 4]', '[0, 2, 4, ... (12 in all)]')
    """
    values = [int(i) for i in indices]
    if len(values) > 2 and values == list(range(values[0], values[0] + len(values))):
        return f"[{values[0]}..{values[-1]}]"
    shown = ", ".join(str(v) for v in values[:limit])
    if len(values) > limit:
        shown += f", ... ({len(values)} in all)"
    return f"[{shown}]"
