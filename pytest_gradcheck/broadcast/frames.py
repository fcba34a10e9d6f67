"""Whose code ran an op, and where: user, library and transparent frames, source lines, records.

An op is attributed to the user's code, the first frame outside torch, numpy,
``pytest_gradcheck``, the standard library and installed libraries (files under
``site-packages``/``dist-packages``: the ``sysconfig`` ``purelib``/``platlib``
paths, :func:`site.getsitepackages`, the user site and any such directory on
``sys.path``). torch, numpy, ``pytest_gradcheck`` and the standard library are
*machinery*, transparent: an op they run for the caller is the caller's. An op
run by an installed library's own code (transformers' causal and padding
masks, rotary embeddings) is the library's deliberate broadcast and is not
recorded at all, even when the user's code called the library; a user
function the library calls back is user code again. A project tested from an
installed (non-editable) copy in ``site-packages`` counts as a library too.

A record is built once per call site (code object and instruction), op,
shapes and kind of operands, and reused: a training loop runs the same op
every step, and reading the source and parsing it for a suggestion is what a
record costs.

Importing this module imports neither torch nor numpy.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import itertools
import linecache
import os
import sys
from types import CodeType, FrameType, ModuleType
from typing import Iterable, Sequence

from ..report.format import fmt_shape
from .rule import BroadcastRecord, Shape
from .suggest import suggest_fix

__all__ = [
    "LIBRARY",
    "MACHINERY",
    "USER",
    "FrameKind",
    "find_user_frame",
    "frame_kind",
    "library_roots",
    "make_record",
    "op_site",
    "record_at",
    "site_record",
    "user_frame",
]


class FrameKind(enum.IntEnum):
    """What a frame's file is, for attributing an op to its author."""

    #: torch, numpy, functorch, pytest_gradcheck, the standard library:
    #: transparent, an op it runs is its caller's.
    MACHINERY = 0
    #: An installed library: an op it runs is its own.
    LIBRARY = 1
    #: The user's code.
    USER = 2


MACHINERY, LIBRARY, USER = FrameKind.MACHINERY, FrameKind.LIBRARY, FrameKind.USER

#: Directories whose files count as library code besides the site-packages
#: directories found from ``sysconfig``, :mod:`site` and ``sys.path`` (a hook:
#: tests and vendored code may set it to a tuple of directories).
extra_library_roots: tuple[str, ...] = ()

#: ``pytest_gradcheck/``: every module of the package is machinery.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_SKIP_FILES = frozenset(f for f in (getattr(contextlib, "__file__", None), getattr(functools, "__file__", None)) if f)
_SITE_DIR_NAMES = ("site-packages", "dist-packages")


def _dir_prefixes(paths: Iterable[str | None]) -> list[str]:
    """``normcase``d absolute and real forms of ``paths``, each ending in a separator."""
    out: list[str] = []
    for p in paths:
        if not p or not isinstance(p, str):
            continue
        for q in (os.path.abspath(p), os.path.realpath(p)):
            q = os.path.normcase(q)
            if os.path.dirname(q) == q:
                continue  # a filesystem root would swallow everything
            out.append(q.rstrip(os.sep) + os.sep)
    return out


def _library_dirs() -> list[str | None]:
    """Where installed third-party code lives, for this interpreter and its base."""
    import site
    import sysconfig

    dirs: list[str | None] = []
    for config_vars in (None, {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}):
        paths = sysconfig.get_paths(vars=config_vars)
        dirs += [paths.get("purelib"), paths.get("platlib")]
    getsitepackages = getattr(site, "getsitepackages", None)  # absent in old virtualenvs
    if getsitepackages is not None:
        dirs += list(getsitepackages())
    if getattr(site, "ENABLE_USER_SITE", False):
        dirs.append(site.getusersitepackages())
    for entry in sys.path:
        if isinstance(entry, str) and os.path.basename(entry.rstrip("/" + os.sep)) in _SITE_DIR_NAMES:
            dirs.append(entry)
    dirs += list(extra_library_roots)
    return dirs


def _stdlib_dirs() -> list[str | None]:
    import sysconfig

    paths = sysconfig.get_paths()
    return [os.path.dirname(os.__file__), paths.get("stdlib"), paths.get("platstdlib")]


class _Classifier:
    """Classifies files by directory; rebuilt when ``sys.path``, the hook or the modules change."""

    __slots__ = ("extra", "kinds", "library", "machinery", "mods", "path", "stdlib")

    def __init__(self, mods: tuple[ModuleType | None, ...]) -> None:
        self.mods = mods
        self.path = list(sys.path)
        self.extra = extra_library_roots
        machinery = [_PACKAGE_DIR, os.path.dirname(os.path.dirname(__file__)) + os.sep]
        for mod in mods:
            path = getattr(mod, "__file__", None) if mod is not None else None
            if path:
                machinery.append(os.path.dirname(path))
        self.machinery = tuple(dict.fromkeys(_dir_prefixes(machinery)))
        self.library = tuple(dict.fromkeys(_dir_prefixes(_library_dirs())))
        self.stdlib = tuple(dict.fromkeys(_dir_prefixes(_stdlib_dirs())))
        self.kinds: dict[str, FrameKind] = {}

    def kind(self, filename: str) -> FrameKind:
        kind = self.kinds.get(filename)
        if kind is None:
            kind = self.kinds[filename] = self._kind(filename)
        return kind

    def _kind(self, filename: str) -> FrameKind:
        if filename in _SKIP_FILES or filename.startswith("<frozen "):
            return MACHINERY
        if filename.startswith("<"):
            return USER  # "<string>", "<doctest ...>", "<stdin>": code the user ran
        forms = {os.path.normcase(os.path.abspath(filename))}
        forms.add(os.path.normcase(os.path.realpath(filename)))
        for prefixes, kind in ((self.machinery, MACHINERY), (self.library, LIBRARY), (self.stdlib, MACHINERY)):
            if any(f.startswith(prefixes) for f in forms):
                return kind
        return USER


_classifier: _Classifier | None = None


def _current_classifier() -> _Classifier:
    """The classifier for the current ``sys.path``, hook and machinery modules (checked on every call)."""
    global _classifier
    modules = sys.modules
    mods = (modules.get("torch"), modules.get("numpy"), modules.get("functorch"))
    c = _classifier
    if c is None or c.mods != mods or c.path != sys.path or c.extra != extra_library_roots:
        c = _classifier = _Classifier(mods)
    return c


def library_roots() -> tuple[str, ...]:
    """The directory prefixes whose files count as installed libraries."""
    return _current_classifier().library


def frame_kind(filename: str) -> FrameKind:
    """:data:`MACHINERY`, :data:`LIBRARY` or :data:`USER` for a code object's ``co_filename``."""
    return _current_classifier().kind(filename)


def find_user_frame(start: FrameType | None = None) -> FrameType | None:
    """The first user frame from ``start`` (default: the caller) outwards, past machinery and libraries."""
    kind = _current_classifier().kind
    f: FrameType | None = start if start is not None else sys._getframe(1)
    while f is not None:
        if kind(f.f_code.co_filename) == USER:
            return f
        f = f.f_back
    return None


def op_site(start: FrameType | None) -> tuple[FrameType | None, bool]:
    """``(user frame, False)`` for an op the user's code ran; ``(None, True)`` for a library's.

    The op belongs to the first frame outside the machinery: a library frame
    there means the library ran it (even if the user called the library).
    """
    kind = _current_classifier().kind
    f = start
    while f is not None:
        k = kind(f.f_code.co_filename)
        if k == USER:
            return f, False
        if k == LIBRARY:
            return None, True
        f = f.f_back
    return None, False


def _source_line(frame: FrameType) -> str | None:
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno, frame.f_globals).strip()
    return line or None


def _current_expression(frame: FrameType) -> str | None:
    """The exact source span of the instruction ``frame`` is executing (3.11+)."""
    positions = getattr(frame.f_code, "co_positions", None)
    if positions is None:
        return None
    try:
        pos = next(itertools.islice(positions(), frame.f_lasti // 2, None), None)
    except (ValueError, TypeError):  # pragma: no cover - defensive
        return None
    if pos is None or None in pos:
        return None
    start, end, col, end_col = pos
    filename = frame.f_code.co_filename
    lines = [linecache.getline(filename, i, frame.f_globals) for i in range(start, end + 1)]
    if not all(lines):
        return None
    encoded = [line.encode("utf-8") for line in lines]
    try:
        if len(encoded) == 1:
            text = encoded[0][col:end_col].decode("utf-8")
        else:
            parts = [encoded[0][col:], *encoded[1:-1], encoded[-1][:end_col]]
            text = b"".join(parts).decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.strip() or None


def user_frame() -> tuple[str, int, str | None]:
    """``(filename, lineno, source line)`` of the first frame outside torch, numpy,
    pytest_gradcheck, the standard library and installed libraries.

    >>> filename, lineno, code = user_frame()
    >>> isinstance(lineno, int)
    True
    """
    frame = find_user_frame(sys._getframe(1))
    if frame is None:
        return ("<unknown>", 0, None)
    try:
        return (frame.f_code.co_filename, frame.f_lineno or 0, _source_line(frame))
    finally:
        del frame


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------

#: (id of the call site's code, instruction), op, shapes, result, loss_inputs -> (that code, its record).
#: Keyed by identity (equal code objects may come from different files); holding
#: the code keeps its id from being reused while the entry lives.
_records: dict[tuple[int, int, str, tuple[Shape, ...], Shape, bool], tuple[CodeType | None, BroadcastRecord]] = {}
_RECORDS_MAX = 4096


def _build_record(
    op: str, shapes: tuple[Shape, ...], result: Shape, frame: FrameType | None, loss_inputs: bool
) -> BroadcastRecord:
    if frame is None:
        filename, lineno, code, expr = "<unknown>", 0, None, None
    else:
        filename, lineno = frame.f_code.co_filename, frame.f_lineno or 0
        code = _source_line(frame)
        expr = _current_expression(frame)
    suggestion = None
    if not loss_inputs:
        # Not predictions against targets: a reshape would be a guess.
        suggestion = f"wrap it in allow_broadcast() if the {fmt_shape(result)} result is intended"
    else:
        if expr is not None:
            suggestion = suggest_fix(shapes, result, expr, op=op)
        if suggestion is None or not suggestion.startswith("did you mean"):
            suggestion = suggest_fix(shapes, result, code, op=op)
    return BroadcastRecord(op, shapes, result, filename, lineno, code, suggestion, loss_inputs)


def record_at(
    op: str,
    shapes: Sequence[Sequence[int]],
    result: Sequence[int],
    frame: FrameType | None,
    loss_inputs: bool = True,
) -> BroadcastRecord:
    """The record of ``op`` run at ``frame`` (``None``: unknown location), with a suggestion."""
    shapes_t = tuple(tuple(map(int, s)) for s in shapes)
    return site_record(op, shapes_t, tuple(map(int, result)), frame, loss_inputs)


def site_record(
    op: str, shapes: tuple[Shape, ...], result: Shape, frame: FrameType | None, loss_inputs: bool = True
) -> BroadcastRecord:
    """:func:`record_at` for shapes that are already tuples of ints, built once per call site.

    The same op at the same instruction with the same shapes gives the same
    (frozen) record, without reading and parsing the source again.
    """
    code = None if frame is None else frame.f_code
    key = (id(code), -1 if frame is None else frame.f_lasti, op, shapes, result, loss_inputs)
    hit = _records.get(key)
    if hit is not None and hit[0] is code:
        return hit[1]
    record = _build_record(op, shapes, result, frame, loss_inputs)
    if len(_records) >= _RECORDS_MAX:
        _records.clear()
    _records[key] = (code, record)
    return record


def make_record(op: str, shapes: Sequence[Sequence[int]], result: Sequence[int]) -> BroadcastRecord:
    """A :class:`BroadcastRecord` located at the caller's user frame, with a suggestion.

    The frame is found as by :func:`user_frame` (library frames are skipped).

    >>> r = make_record("subtract", [(4, 1), (4,)], (4, 4))
    >>> r.describe()
    'subtract((4, 1), (4,)) -> (4, 4): both operands were expanded'
    """
    frame = find_user_frame(sys._getframe(1))
    try:
        return record_at(op, shapes, result, frame)
    finally:
        del frame
