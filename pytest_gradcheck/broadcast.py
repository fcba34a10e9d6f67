"""Guard against implicit broadcasting that pairs samples, like ``(4, 1) - (4,) -> (4, 4)``.

The most common silent bug in a loss term is a shape mismatch between
predictions and targets that PyTorch happily broadcasts into a pairwise
matrix::

    out = model(x)                       # (4, 1)
    loss = (out - labels).pow(2).mean()  # labels is (4,): (4, 1) - (4,) -> (4, 4)

The rule, in two steps (the batch is on dim 0 of every operand):

1. :func:`is_implicit_broadcast`: after broadcasting, **no** tensor operand
   already had the result's shape (each operand is compared right-aligned,
   i.e. rank-promoted with leading 1s, against the result). Operands that hold
   a single element (python numbers, 0-d tensors, ``(1,)``, ``(1, 1)``) never
   count. A ``(C,)`` bias over ``(B, C)``, a ``(B, T, 1)`` mask over
   ``(B, T, D)`` or a ``(T, T)`` causal mask over ``(B, H, T, T)`` are not
   flagged: one operand already has the result's shape.
2. :func:`pairs_samples`: the broadcast may put one sample against another.

   - With the batch size ``B`` known (the gradient checks pass it; so can
     ``no_implicit_broadcast(batch_size=B)``), it pairs samples when one
     operand has a size-``B`` axis that another operand is expanded along,
     and that other operand has a size-``B`` axis of its own that the first is
     expanded along: ``(4, 1) - (4,)``, ``(B, 1)`` against ``(B, 1, 1)``,
     ``(B, 1)`` against ``(1, B)``. Two operands whose dim 0 sits on the same
     axis of the result with size ``B`` have their batches aligned: whatever
     they pair, they pair within one sample. So a length mask
     ``(1, T) < (B, 1)``, rotary angles ``(1, T, 1) * (D,)`` or a loss weight
     ``(B, 1) * (1, 3)`` are not flagged. A batch of one pairs nothing. The
     test is by size, so a non-batch axis that happens to have size ``B``
     counts as a possible batch axis.
   - With the batch size unknown, every implicit broadcast is flagged, as the
     ambiguous cases must be, except when all the operands that count have
     the same rank and the same size on dim 0: then dim 0 (the batch axis) is
     neither expanded nor paired, and the op pairs values within one sample,
     like ``(B, D, 1) - (B, 1, D)`` (a Chamfer distance) or a
     ``(1, 1, T, 1) <= (1, 1, 1, T)`` causal mask.

Whose broadcast it is: an op is attributed to the user's code, the first
frame outside torch, numpy, ``pytest_gradcheck``, the standard library and
installed libraries (files under ``site-packages``/``dist-packages``: the
``sysconfig`` ``purelib``/``platlib`` paths, :func:`site.getsitepackages`, the
user site and any such directory on ``sys.path``). torch, numpy,
``pytest_gradcheck`` and the standard library are *transparent*: an op they run
for the caller is the caller's. An op run by an installed library's own code
(transformers' causal and padding masks, rotary embeddings) is the library's
deliberate broadcast and is not recorded at all, even when the user's code
called the library; a user function the library calls back is user code
again. A project tested from an installed (non-editable) copy in
``site-packages`` counts as a library too.

A record says whether the op was between the loss's inputs
(:attr:`BroadcastRecord.loss_inputs`): an elementwise loss's input and
target, or an op between a tensor computed from the model's parameters (a
prediction) and one that is not (a target). Only those get a "reshape the target" suggestion
(``labels.unsqueeze(-1)``, ``.view_as(...)``); a term between predictions
only, like in-batch pairs, is pointed at :func:`allow_broadcast` instead.

Public entry points:

- :class:`no_implicit_broadcast`: context manager and decorator, with a
  ``mode`` of ``"error"`` (default), ``"warn"``, ``"record"`` or ``"off"``.
- :func:`allow_broadcast`: opt-out for intentional pairwise terms.
- :func:`recording`: what the gradient checks use around the loss call.
- :func:`is_implicit_broadcast`, :func:`pairs_samples`, :func:`broadcast_shape`,
  :func:`suggest_fix`, :func:`user_frame`, :func:`make_record`: pure-python
  helpers shared with the NumPy backend.

Nesting and threads:

- Every active guard of the thread records each flagged op. Guards act
  innermost first, each per its own mode: a ``"warn"`` guard warns and lets the
  op run, a ``"record"`` guard only records, an ``"error"`` guard raises
  :class:`~pytest_gradcheck.errors.BroadcastError` before the op runs (so the
  guards around it do not see the op run, but they still get the record when
  their own rule flags it).
- :func:`allow_broadcast` silences the guards entered *before* it; a guard
  entered inside an ``allow_broadcast()`` block is active again.
- Guards are per thread (PyTorch's function-mode stack is thread-local): a
  guard entered in one thread never sees ops run by another thread.
- Under ``torch.func.vmap`` the shapes seen and reported are per-sample shapes
  (a ``batch_size`` then refers to those shapes).

Importing this module imports neither torch nor numpy.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import linecache
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Iterable, Iterator, Sequence

from .errors import BroadcastError, BroadcastWarning, InvalidArgument

__all__ = [
    "BroadcastRecord",
    "allow_broadcast",
    "broadcast_shape",
    "is_implicit_broadcast",
    "make_record",
    "no_implicit_broadcast",
    "pairs_samples",
    "recording",
    "report_broadcast",
    "suggest_fix",
    "user_frame",
]

Shape = tuple[int, ...]

MODES = ("error", "warn", "record", "off")


# --------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------


def _fmt(shape: Sequence[int]) -> str:
    return str(tuple(shape))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class BroadcastRecord:
    """One op that broadcast both (all) of its tensor operands.

    ``loss_inputs`` is True when the operands were the loss's inputs (an
    elementwise loss's input and target, or a prediction computed from the
    model's parameters against a target that is not), and when that cannot be
    told (no tensors seen, no parameters involved); False for a term between
    predictions only (in-batch pairs). Only the former get a reshape suggestion.

    >>> r = BroadcastRecord("sub", ((4, 1), (4,)), (4, 4), "/x/test_xor.py", 21,
    ...                     "loss = (out - labels).pow(2).mean()",
    ...                     "did you mean labels.unsqueeze(-1)?")
    >>> r.message()
    'test_xor.py:21: sub((4, 1), (4,)) -> (4, 4): both operands were expanded; did you mean labels.unsqueeze(-1)?'
    """

    op: str
    shapes: tuple[tuple[int, ...], ...]
    result: tuple[int, ...]
    filename: str
    lineno: int
    code: str | None = None
    suggestion: str | None = None
    loss_inputs: bool = True

    def location(self) -> str:
        """``basename:line`` of the user's statement, e.g. ``"test_xor.py:21"``."""
        return f"{os.path.basename(self.filename)}:{self.lineno}"

    def describe(self) -> str:
        """``"sub((4, 1), (4,)) -> (4, 4): both operands were expanded"``."""
        args = ", ".join(_fmt(s) for s in self.shapes)
        big = [s for s in self.shapes if _numel(s) != 1]
        if len(big) == 2:
            what = "both operands" if len(self.shapes) == 2 else "both non-scalar operands"
        elif len(big) == len(self.shapes):
            what = f"all {len(big)} operands"
        else:
            what = f"all {len(big)} non-scalar operands"
        return f"{self.op}({args}) -> {_fmt(self.result)}: {what} were expanded"

    def message(self) -> str:
        """Location, description and suggestion in one line."""
        text = f"{self.location()}: {self.describe()}"
        if self.suggestion:
            text += f"; {self.suggestion}"
        return text

    def __str__(self) -> str:
        return self.message()


# --------------------------------------------------------------------------
# The rule (pure python)
# --------------------------------------------------------------------------


def broadcast_shape(shapes: Sequence[Sequence[int]]) -> Shape | None:
    """The NumPy/PyTorch broadcast of ``shapes``, or ``None`` if they do not broadcast.

    >>> broadcast_shape([(4, 1), (4,)])
    (4, 4)
    >>> broadcast_shape([(3,), (4,)]) is None
    True
    """
    ndim = max((len(s) for s in shapes), default=0)
    out: list[int] = []
    for i in range(1, ndim + 1):
        d = 1
        for s in shapes:
            if len(s) >= i:
                x = s[-i]
                if x == 1:
                    continue
                if d == 1:
                    d = x
                elif d != x:
                    return None
        out.append(d)
    out.reverse()
    return tuple(out)


def is_implicit_broadcast(shapes: Sequence[Sequence[int]], result: Sequence[int]) -> bool:
    """True when broadcasting ``shapes`` to ``result`` expanded every operand.

    Operands holding one element (scalars, 0-d, ``(1, 1)``) are ignored; at
    least two operands must remain, and none of them may already have the
    result's shape (compared right-aligned). Empty results are never flagged.

    >>> is_implicit_broadcast([(4, 1), (4,)], (4, 4))
    True
    >>> is_implicit_broadcast([(8, 3), (3,)], (8, 3))     # bias over a batch
    False
    >>> is_implicit_broadcast([(4, 1), ()], (4, 1))       # scalar
    False
    """
    result = tuple(result)
    if _numel(result) == 0:
        return False
    n = len(result)
    counted = 0
    for s in shapes:
        s = tuple(s)
        if _numel(s) == 1:
            continue
        if len(s) > n:
            return False  # not a broadcast of these shapes: do not guess
        if (1,) * (n - len(s)) + s == result:
            return False  # this operand already had the result's shape
        counted += 1
    return counted >= 2


def _check_batch_size(batch_size: Any, where: str) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgument(f"{where}: batch_size must be None or a positive int, got {batch_size!r}")
    return batch_size


def pairs_samples(shapes: Sequence[Sequence[int]], result: Sequence[int], *, batch_size: int | None = None) -> bool:
    """True when broadcasting ``shapes`` to ``result`` is implicit and may pair samples.

    The batch is on dim 0. With ``batch_size`` known, samples are paired when
    two operands each have a size-``batch_size`` axis that the other is
    expanded along, unless their dim 0 are the same axis of the result (their
    batches line up). Without it, every :func:`is_implicit_broadcast` counts,
    except when the operands that count share their rank and their dim 0
    size (the op then pairs within one sample). See the module docstring.

    >>> pairs_samples([(4, 1), (4,)], (4, 4))                   # seed 000
    True
    >>> pairs_samples([(8, 5, 1), (8, 1, 5)], (8, 5, 5))        # within each sample
    False
    >>> pairs_samples([(1, 7), (5, 1)], (5, 7))                 # ambiguous without B
    True
    >>> pairs_samples([(1, 7), (5, 1)], (5, 7), batch_size=5)   # a length mask
    False
    """
    batch_size = _check_batch_size(batch_size, "pairs_samples")
    if not is_implicit_broadcast(shapes, result):
        return False
    result = tuple(result)
    n = len(result)
    big = [tuple(s) for s in shapes if _numel(s) != 1]
    if batch_size is None:
        return not (len({len(s) for s in big}) == 1 and len({s[0] for s in big}) == 1)
    if batch_size == 1:
        return False
    padded = [(1,) * (n - len(s)) + s for s in big]
    for i, a in enumerate(padded):
        for j in range(i + 1, len(padded)):
            b = padded[j]
            if len(big[i]) == len(big[j]) and big[i][0] == big[j][0] == batch_size:
                continue  # dim 0 of both on one axis: their batches are aligned
            a_over_b = any(x == batch_size and y == 1 for x, y in zip(a, b))
            b_over_a = any(y == batch_size and x == 1 for x, y in zip(a, b))
            if a_over_b and b_over_a:
                return True
    return False


# --------------------------------------------------------------------------
# Suggestions
# --------------------------------------------------------------------------

_LOSS_OPS = frozenset(
    {
        "mse_loss",
        "l1_loss",
        "smooth_l1_loss",
        "huber_loss",
        "binary_cross_entropy",
        "binary_cross_entropy_with_logits",
        "kl_div",
        "poisson_nll_loss",
        "gaussian_nll_loss",
        "soft_margin_loss",
        "margin_ranking_loss",
        "hinge_embedding_loss",
        "multilabel_soft_margin_loss",
    }
)

# op name (without a trailing "_") -> names of the ast operator and call forms
_AST_BINOPS: dict[str, str] = {
    "add": "Add",
    "sub": "Sub",
    "subtract": "Sub",
    "rsub": "Sub",
    "mul": "Mult",
    "multiply": "Mult",
    "div": "Div",
    "divide": "Div",
    "true_divide": "Div",
    "floor_divide": "FloorDiv",
    "pow": "Pow",
    "power": "Pow",
    "remainder": "Mod",
    "mod": "Mod",
    "bitwise_and": "BitAnd",
    "bitwise_or": "BitOr",
    "bitwise_xor": "BitXor",
    "bitwise_left_shift": "LShift",
    "left_shift": "LShift",
    "bitwise_right_shift": "RShift",
    "right_shift": "RShift",
}
_AST_CMPOPS: dict[str, str] = {
    "eq": "Eq",
    "equal": "Eq",
    "ne": "NotEq",
    "not_equal": "NotEq",
    "lt": "Lt",
    "less": "Lt",
    "le": "LtE",
    "less_equal": "LtE",
    "gt": "Gt",
    "greater": "Gt",
    "ge": "GtE",
    "greater_equal": "GtE",
}
_CALL_ALIASES: dict[str, frozenset[str]] = {
    "sub": frozenset({"sub", "subtract"}),
    "subtract": frozenset({"sub", "subtract"}),
    "mul": frozenset({"mul", "multiply"}),
    "multiply": frozenset({"mul", "multiply"}),
    "div": frozenset({"div", "divide", "true_divide"}),
    "divide": frozenset({"div", "divide", "true_divide"}),
    "true_divide": frozenset({"div", "divide", "true_divide"}),
}
_OPERAND_KEYWORDS = frozenset(
    {
        "input",
        "other",
        "target",
        "input1",
        "input2",
        "condition",
        "end",
        "tensor1",
        "tensor2",
        "exponent",
        "var",
        "x",
        "y",
    }
)


def _parse(code: str) -> Any:
    import ast

    for text, mode in ((code, "eval"), (code, "exec"), ("(\n" + code + "\n)", "eval")):
        try:
            return ast.parse(text, mode=mode)
        except SyntaxError:
            continue
    return None


def _candidate_operands(node: Any, op: str | None, n: int) -> list[Any] | None:
    """The operand expressions of ``node`` if it is a plausible form of ``op``."""
    import ast

    base = op[:-1] if op and op.endswith("_") and not op.endswith("__") else op
    binop = _AST_BINOPS.get(base or "")
    cmpop = _AST_CMPOPS.get(base or "")
    if isinstance(node, ast.BinOp) and (base is None or type(node.op).__name__ == binop):
        return [node.left, node.right]
    if isinstance(node, ast.AugAssign) and (base is None or type(node.op).__name__ == binop):
        return [node.target, node.value]
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and (base is None or type(node.ops[0]).__name__ == cmpop):
        return [node.left, node.comparators[0]]
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute):
            name = func.attr
        elif isinstance(func, ast.Name):
            name = func.id
        else:
            return None
        names = _CALL_ALIASES.get(base or "", frozenset({base}))
        if base is None or name in names or name.rstrip("_") in names:
            pass
        elif base in _LOSS_OPS and ("loss" in name.lower() or "crit" in name.lower()):
            pass  # criterion(out, y), self.loss_fn(y_hat, y)
        else:
            return None
        args = [a for a in node.args if not isinstance(a, (ast.Constant, ast.Starred))]
        kws = [k.value for k in node.keywords if k.arg in _OPERAND_KEYWORDS and not isinstance(k.value, ast.Constant)]
        if isinstance(func, ast.Attribute) and len(args) + len(kws) == n - 1:
            return [func.value, *args, *kws]  # method form: a.sub(b)
        operands = [*args, *kws]
        return operands if len(operands) == n else None
    return None


def _operand_names(code: str | None, op: str | None, n: int) -> list[str] | None:
    """Source text of the ``n`` operands of ``op`` in ``code``, if unambiguous."""
    if not code:
        return None
    import ast

    tree = _parse(code)
    if tree is None:
        return None
    body = tree.body if isinstance(tree, ast.Module) else [tree.body]
    found: list[list[Any]] = []
    # A precise expression (from the frame's positions) is its own root.
    for top in body:
        root = top.value if isinstance(top, ast.Expr) else top
        ops = _candidate_operands(root, op, n)
        if ops is not None and len(body) == 1:
            found = [ops]
            break
    if not found:
        for top in body:
            for node in ast.walk(top):
                ops = _candidate_operands(node, op, n)
                if ops is not None and len(ops) == n:
                    found.append(ops)
        if len(found) != 1:
            return None
    names: list[str] = []
    for node in found[0]:
        text = ast.unparse(node)
        if not isinstance(node, (ast.Name, ast.Attribute, ast.Subscript, ast.Call)):
            text = f"({text})"
        if len(text) > 40 or "\n" in text:
            return None
        names.append(text)
    return names


def _reshape_expr(wrong: Shape, right: Shape, right_name: str | None) -> str:
    if wrong + (1,) == right:
        return ".unsqueeze(-1)"
    if wrong == right + (1,):
        return ".squeeze(-1)"
    if right_name is not None:
        return f".view_as({right_name})"
    return f".view({', '.join(str(d) for d in right)})"


def suggest_fix(
    shapes: Sequence[Sequence[int]],
    result: Sequence[int],
    code: str | None = None,
    *,
    op: str | None = None,
) -> str | None:
    """A one-line hint for fixing an implicit broadcast, or ``None`` if there is none.

    With two operands holding as many elements, the hint reshapes the second
    operand (the target, usually) to the first one's shape. ``code`` (the
    source line or expression) lets it name the variable; ``op`` helps find it.

    >>> suggest_fix([(4, 1), (4,)], (4, 4), "loss = (out - labels).pow(2).mean()", op="sub")
    'did you mean labels.unsqueeze(-1)?'
    >>> suggest_fix([(4, 1), (4,)], (4, 4))
    'reshape the (4,) operand to (4, 1), e.g. .unsqueeze(-1) or .view_as(other)'
    """
    shapes_t = [tuple(s) for s in shapes]
    result_t = tuple(result)
    if not is_implicit_broadcast(shapes_t, result_t):
        return None
    intended = f"or wrap it in allow_broadcast() if the {_fmt(result_t)} result is intended"
    if len(shapes_t) != 2:
        return f"make the operand shapes agree (e.g. .view_as(...)), {intended}"
    first, second = shapes_t
    if _numel(first) != _numel(second):
        return f"the operands hold different numbers of elements: make their shapes agree, {intended}"
    names = _operand_names(code, op, 2)
    if names is not None:
        return f"did you mean {names[1]}{_reshape_expr(second, first, names[0])}?"
    fix = _reshape_expr(second, first, None)
    return f"reshape the {_fmt(second)} operand to {_fmt(first)}, e.g. {fix} or .view_as(other)"


# --------------------------------------------------------------------------
# The user's frame
# --------------------------------------------------------------------------

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SKIP_FILES = frozenset(f for f in (getattr(contextlib, "__file__", None), getattr(functools, "__file__", None)) if f)

#: What a frame's file is: machinery (torch, numpy, functorch, pytest_gradcheck,
#: the standard library: transparent, an op it runs is its caller's), an
#: installed library (an op it runs is its own), or the user's code.
_MACHINERY, _LIBRARY, _USER = 0, 1, 2

#: Directories whose files count as library code besides the site-packages
#: directories found from ``sysconfig``, :mod:`site` and ``sys.path`` (a
#: private hook: tests and vendored code may set it to a tuple of directories).
_EXTRA_LIBRARY_ROOTS: tuple[str, ...] = ()

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
    dirs += list(_EXTRA_LIBRARY_ROOTS)
    return dirs


def _stdlib_dirs() -> list[str | None]:
    import sysconfig

    paths = sysconfig.get_paths()
    return [os.path.dirname(os.__file__), paths.get("stdlib"), paths.get("platstdlib")]


class _Classifier:
    """Classifies files by directory; rebuilt when ``sys.path`` or the hooks change."""

    __slots__ = ("key", "kinds", "library", "machinery", "stdlib")

    def __init__(self, key: tuple[Any, ...], mods: Sequence[Any]) -> None:
        self.key = key
        machinery = [_PACKAGE_DIR, os.path.dirname(__file__) + os.sep]
        for mod in mods:
            path = getattr(mod, "__file__", None) if mod is not None else None
            if path:
                machinery.append(os.path.dirname(path))
        self.machinery = tuple(dict.fromkeys(_dir_prefixes(machinery)))
        self.library = tuple(dict.fromkeys(_dir_prefixes(_library_dirs())))
        self.stdlib = tuple(dict.fromkeys(_dir_prefixes(_stdlib_dirs())))
        self.kinds: dict[str, int] = {}

    def kind(self, filename: str) -> int:
        kind = self.kinds.get(filename)
        if kind is None:
            kind = self.kinds[filename] = self._kind(filename)
        return kind

    def _kind(self, filename: str) -> int:
        if filename in _SKIP_FILES or filename.startswith("<frozen "):
            return _MACHINERY
        if filename.startswith("<"):
            return _USER  # "<string>", "<doctest ...>", "<stdin>": code the user ran
        forms = {os.path.normcase(os.path.abspath(filename))}
        forms.add(os.path.normcase(os.path.realpath(filename)))
        for prefixes, kind in ((self.machinery, _MACHINERY), (self.library, _LIBRARY), (self.stdlib, _MACHINERY)):
            if any(f.startswith(prefixes) for f in forms):
                return kind
        return _USER


_classifier: _Classifier | None = None


def _current_classifier() -> _Classifier:
    global _classifier
    mods = tuple(sys.modules.get(name) for name in ("torch", "numpy", "functorch"))
    key = (tuple(id(m) for m in mods), tuple(sys.path), _EXTRA_LIBRARY_ROOTS)
    c = _classifier
    if c is None or c.key != key:
        c = _classifier = _Classifier(key, mods)
    return c


def _library_roots() -> tuple[str, ...]:
    """The directory prefixes whose files count as installed libraries."""
    return _current_classifier().library


def _frame_kind(filename: str) -> int:
    """``_MACHINERY``, ``_LIBRARY`` or ``_USER`` for a code object's ``co_filename``."""
    return _current_classifier().kind(filename)


def _find_user_frame(start: FrameType | None = None) -> FrameType | None:
    """The first user frame from ``start`` outwards, past machinery and libraries."""
    kind = _current_classifier().kind
    f: FrameType | None = start if start is not None else sys._getframe(1)
    while f is not None:
        if kind(f.f_code.co_filename) == _USER:
            return f
        f = f.f_back
    return None


def _op_site(start: FrameType | None) -> tuple[FrameType | None, bool]:
    """``(user frame, False)`` for an op the user's code ran; ``(None, True)`` for a library's.

    The op belongs to the first frame outside the machinery: a library frame
    there means the library ran it (even if the user called the library).
    """
    kind = _current_classifier().kind
    f = start
    while f is not None:
        k = kind(f.f_code.co_filename)
        if k == _USER:
            return f, False
        if k == _LIBRARY:
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
    frame = _find_user_frame(sys._getframe(1))
    if frame is None:
        return ("<unknown>", 0, None)
    try:
        return (frame.f_code.co_filename, frame.f_lineno or 0, _source_line(frame))
    finally:
        del frame


def _record_at(
    op: str,
    shapes: Sequence[Sequence[int]],
    result: Sequence[int],
    frame: FrameType | None,
    loss_inputs: bool = True,
) -> BroadcastRecord:
    shapes_t = tuple(tuple(int(d) for d in s) for s in shapes)
    result_t = tuple(int(d) for d in result)
    if frame is None:
        filename, lineno, code, expr = "<unknown>", 0, None, None
    else:
        filename, lineno = frame.f_code.co_filename, frame.f_lineno or 0
        code = _source_line(frame)
        expr = _current_expression(frame)
    suggestion = None
    if not loss_inputs:
        # Not predictions against targets: a reshape would be a guess.
        suggestion = f"wrap it in allow_broadcast() if the {_fmt(result_t)} result is intended"
    else:
        if expr is not None:
            suggestion = suggest_fix(shapes_t, result_t, expr, op=op)
        if suggestion is None or not suggestion.startswith("did you mean"):
            suggestion = suggest_fix(shapes_t, result_t, code, op=op)
    return BroadcastRecord(op, shapes_t, result_t, filename, lineno, code, suggestion, loss_inputs)


def make_record(op: str, shapes: Sequence[Sequence[int]], result: Sequence[int]) -> BroadcastRecord:
    """A :class:`BroadcastRecord` located at the caller's user frame, with a suggestion.

    The frame is found as by :func:`user_frame` (library frames are skipped).

    >>> r = make_record("subtract", [(4, 1), (4,)], (4, 4))
    >>> r.describe()
    'subtract((4, 1), (4,)) -> (4, 4): both operands were expanded'
    """
    frame = _find_user_frame(sys._getframe(1))
    try:
        return _record_at(op, shapes, result, frame)
    finally:
        del frame


# --------------------------------------------------------------------------
# Per-thread guard state
# --------------------------------------------------------------------------

_tls = threading.local()
_seq = itertools.count(1)
_allow_blocks = 0  # allow_broadcast() blocks open, all threads together (a fast-path hint)
_allow_lock = threading.Lock()


class _Guard:
    """One entered guard: its mode, its records, its batch size (or None) and its entry order."""

    __slots__ = ("batch_size", "mode", "records", "seq")

    def __init__(self, mode: str, records: list[BroadcastRecord], batch_size: int | None = None) -> None:
        self.mode = mode
        self.records = records
        self.batch_size = batch_size
        self.seq = next(_seq)

    def active(self) -> bool:
        if not _allow_blocks:  # no allow_broadcast() block open in any thread
            return True
        return getattr(_tls, "allow", 0) < self.seq


def _guards() -> list[_Guard]:
    stack = getattr(_tls, "guards", None)
    if stack is None:
        stack = _tls.guards = []
    return stack


def _remove_guard(guard: _Guard) -> None:
    stack = _guards()
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is guard:
            del stack[i]
            return


@contextlib.contextmanager
def allow_broadcast() -> Iterator[None]:
    """Let ops inside the block broadcast freely (contrastive, ranking losses).

    Silences every guard entered before it in this thread; nothing inside is
    flagged or recorded by them.

    >>> import torch
    >>> a, b = torch.ones(3, 1), torch.ones(1, 3)
    >>> with no_implicit_broadcast("error"):
    ...     with allow_broadcast():
    ...         pairwise = a - b          # intended (3, 3)
    """
    global _allow_blocks
    prev = getattr(_tls, "allow", 0)
    _tls.allow = next(_seq)
    with _allow_lock:
        _allow_blocks += 1
    try:
        yield
    finally:
        _tls.allow = prev
        with _allow_lock:
            _allow_blocks -= 1


def _warn(record: BroadcastRecord, frame: FrameType | None) -> None:
    if frame is None:
        warnings.warn(record.message(), BroadcastWarning, stacklevel=3)
        return
    module_globals = frame.f_globals
    registry = module_globals.setdefault("__warningregistry__", {})
    warnings.warn_explicit(
        record.message(),
        BroadcastWarning,
        record.filename,
        record.lineno,
        module=module_globals.get("__name__", "<string>"),
        registry=registry,
        module_globals=module_globals,
    )


def report_broadcast(op: str, shapes: Sequence[Sequence[int]], result: Sequence[int]) -> BroadcastRecord | None:
    """Hand a broadcast found by another backend (NumPy) to this thread's guards.

    Returns ``None`` when the op is not an implicit broadcast, no active
    guard wants it, or an installed library's code ran it (see the module
    docstring). Otherwise every active guard records it, ``"warn"`` guards
    warn, and if any active guard is in ``"error"`` mode a
    :class:`~pytest_gradcheck.errors.BroadcastError` is raised. The caller has
    decided that the op pairs samples (the NumPy backend tracks batch axes).

    >>> report_broadcast("subtract", [(4, 1), (4,)], (4, 4)) is None   # no guard
    True
    """
    __tracebackhide__ = True
    if not is_implicit_broadcast(shapes, result):
        return None
    guards = [g for g in reversed(_guards()) if g.active() and g.mode != "off"]
    if not guards:
        return None
    frame, library = _op_site(sys._getframe(1))
    if library:
        return None
    try:
        record = _record_at(op, shapes, result, frame)
        for g in guards:
            g.records.append(record)
        if any(g.mode == "error" for g in guards):
            raise BroadcastError(record.message(), [record])
        for g in guards:
            if g.mode == "warn":
                _warn(record, frame)
    finally:
        del frame
    return record


# --------------------------------------------------------------------------
# PyTorch integration (built lazily: importing this module does not import torch)
# --------------------------------------------------------------------------

_ELEMENTWISE = (
    "add", "sub", "subtract", "rsub", "mul", "multiply", "div", "divide", "true_divide",
    "floor_divide", "pow", "float_power", "atan2", "arctan2", "maximum", "minimum", "fmax",
    "fmin", "fmod", "remainder", "eq", "ne", "not_equal", "lt", "less", "le", "less_equal",
    "gt", "greater", "ge", "greater_equal", "isclose", "logical_and", "logical_or",
    "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_left_shift",
    "bitwise_right_shift", "where", "lerp", "addcmul", "addcdiv", "hypot", "copysign",
    "xlogy", "logaddexp", "logaddexp2", "nextafter", "heaviside", "ldexp", "clamp", "clip",
    "clamp_min", "clamp_max", "igamma", "igammac",
)  # fmt: skip
_SPECIAL = ("xlogy", "xlog1py", "zeta")
# dunder -> (op name, operands reversed)
_DUNDERS: dict[str, tuple[str, bool]] = {
    "__add__": ("add", False), "__radd__": ("add", True), "__iadd__": ("add_", False),
    "__sub__": ("sub", False), "__rsub__": ("sub", True), "__isub__": ("sub_", False),
    "__mul__": ("mul", False), "__rmul__": ("mul", True), "__imul__": ("mul_", False),
    "__truediv__": ("div", False), "__rtruediv__": ("div", True), "__itruediv__": ("div_", False),
    "__div__": ("div", False), "__rdiv__": ("div", True), "__idiv__": ("div_", False),
    "__floordiv__": ("floor_divide", False), "__rfloordiv__": ("floor_divide", True),
    "__ifloordiv__": ("floor_divide_", False),
    "__pow__": ("pow", False), "__rpow__": ("pow", True), "__ipow__": ("pow_", False),
    "__mod__": ("remainder", False), "__rmod__": ("remainder", True), "__imod__": ("remainder_", False),
    "__eq__": ("eq", False), "__ne__": ("ne", False), "__lt__": ("lt", False),
    "__le__": ("le", False), "__gt__": ("gt", False), "__ge__": ("ge", False),
    "__and__": ("bitwise_and", False), "__rand__": ("bitwise_and", True), "__iand__": ("bitwise_and_", False),
    "__or__": ("bitwise_or", False), "__ror__": ("bitwise_or", True), "__ior__": ("bitwise_or_", False),
    "__xor__": ("bitwise_xor", False), "__rxor__": ("bitwise_xor", True), "__ixor__": ("bitwise_xor_", False),
    "__lshift__": ("bitwise_left_shift", False), "__rlshift__": ("bitwise_left_shift", True),
    "__ilshift__": ("bitwise_left_shift_", False),
    "__rshift__": ("bitwise_right_shift", False), "__rrshift__": ("bitwise_right_shift", True),
    "__irshift__": ("bitwise_right_shift_", False),
}  # fmt: skip
# loss -> its elementwise operands (position, keyword); class-index losses
# (cross_entropy, nll_loss, multi_margin_loss, ...) are deliberately absent.
_LOSSES: dict[str, tuple[tuple[int, str], ...]] = {
    name: ((0, "input"), (1, "target"))
    for name in (
        "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
        "binary_cross_entropy_with_logits", "kl_div", "poisson_nll_loss", "soft_margin_loss",
        "hinge_embedding_loss", "multilabel_soft_margin_loss",
    )
}  # fmt: skip
_LOSSES["margin_ranking_loss"] = ((0, "input1"), (1, "input2"), (2, "target"))
_LOSSES["gaussian_nll_loss"] = ((0, "input"), (1, "target"), (2, "var"))

_KIND_ELEMENTWISE = 0
_KIND_LOSS = 1


class _Spec:
    __slots__ = ("name", "kind", "reverse", "operands")

    def __init__(self, name: str, kind: int, reverse: bool = False, operands: tuple[tuple[int, str], ...] = ()) -> None:
        self.name = name
        self.kind = kind
        self.reverse = reverse
        self.operands = operands


_WATCHED: dict[Any, _Spec] | None = None
_MODE_CLASS: type | None = None
_TENSOR: type | None = None


def _build_watched() -> dict[Any, _Spec]:
    import torch
    import torch.nn.functional as F

    watched: dict[Any, _Spec] = {}

    def add(obj: Any, spec: _Spec) -> None:
        if obj is None or not callable(obj):
            return
        try:
            watched.setdefault(obj, spec)
        except TypeError:  # pragma: no cover - unhashable callable
            pass

    owners = (torch.Tensor, torch._C.TensorBase)
    for name in _ELEMENTWISE:
        spec = _Spec(name, _KIND_ELEMENTWISE)
        add(getattr(torch, name, None), spec)
        add(getattr(torch._C._VariableFunctions, name, None), spec)
        for owner in owners:
            add(getattr(owner, name, None), spec)
            add(getattr(owner, name + "_", None), _Spec(name + "_", _KIND_ELEMENTWISE))
    for name in _SPECIAL:
        add(getattr(torch.special, name, None), _Spec(name, _KIND_ELEMENTWISE))
    for dunder, (name, reverse) in _DUNDERS.items():
        spec = _Spec(name, _KIND_ELEMENTWISE, reverse)
        for owner in owners:
            add(getattr(owner, dunder, None), spec)
    for name, operands in _LOSSES.items():
        add(getattr(F, name, None), _Spec(name, _KIND_LOSS, operands=operands))
    return watched


def _covers(big: Any, small: Any) -> bool:
    """True when ``small`` broadcasts into ``big`` without expanding ``big``."""
    nb, ns = len(big), len(small)
    if ns > nb:
        return False
    for x, y in zip(big[nb - ns :], small):
        if y != 1 and y != x:
            return False
    return True


def _operands(spec: _Spec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The tensor operands of a watched op, in the user's order."""
    tensor: Any = _TENSOR
    if spec.kind == _KIND_ELEMENTWISE:
        tensors = [a for a in args if isinstance(a, tensor)]
        if kwargs:
            tensors += [v for k, v in kwargs.items() if k != "out" and isinstance(v, tensor)]
        if spec.reverse and len(tensors) == 2:
            tensors.reverse()  # x.__rsub__(y) is y - x: report in the user's order
        return tensors
    tensors = []
    for pos, key in spec.operands:
        v = args[pos] if len(args) > pos else kwargs.get(key)
        if isinstance(v, tensor):
            tensors.append(v)
    return tensors


def _depends_on_parameter(t: Any, budget: int = 10_000) -> bool:
    """Whether ``t`` is, or was computed from, an ``nn.Parameter`` (a model's weights).

    Walks the autograd graph breadth first, so the nearest weight is found in a
    few steps; a graph larger than ``budget`` nodes counts as a prediction.
    """
    from collections import deque

    from torch.nn import Parameter

    if isinstance(t, Parameter):
        return True
    fn = getattr(t, "grad_fn", None)
    if fn is None:
        return False
    seen = {fn}
    queue = deque([fn])
    while queue:
        node = queue.popleft()
        if isinstance(getattr(node, "variable", None), Parameter):
            return True
        for nxt, _ in getattr(node, "next_functions", ()):
            if nxt is not None and nxt not in seen:
                if len(seen) >= budget:
                    return True
                seen.add(nxt)
                queue.append(nxt)
    return False


def _between_loss_inputs(spec: _Spec, tensors: Sequence[Any]) -> bool:
    """Whether the operands are the loss's inputs: predictions against targets.

    An elementwise loss's input and target are. Otherwise the floating-point
    operands tell: one computed from the model's parameters (a prediction)
    against one that is not (a target, a mask, data). When all of them come
    from parameters the op is a term of predictions only (in-batch pairs).
    When none does, or there are fewer than two, it cannot be told: True.
    (``requires_grad`` would not tell: the checks pass the batch as aliases
    that require grad.)
    """
    if spec.kind == _KIND_LOSS:
        return True
    floats = [t for t in tensors if (t.dtype.is_floating_point or t.dtype.is_complex) and t.numel() != 1]
    if len(floats) < 2:
        return True
    try:
        return not all(_depends_on_parameter(t) for t in floats)
    except (RuntimeError, TypeError, AttributeError):  # pragma: no cover - an exotic tensor subclass
        return True


def _operand_shapes(spec: _Spec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Shape] | None:
    """Shapes of the tensor operands, or None when the op cannot be an implicit broadcast."""
    tensor: Any = _TENSOR
    shapes: list[Any]
    if spec.kind == _KIND_ELEMENTWISE:
        if not kwargs and len(args) == 2:  # the common binary case, kept lean
            x, y = args
            if not (isinstance(x, tensor) and isinstance(y, tensor)):
                return None
            s0, s1 = x.shape, y.shape
            if s0 == s1 or _covers(s0, s1) or _covers(s1, s0):
                return None
            shapes = [s1, s0] if spec.reverse else [s0, s1]
        else:
            shapes = [t.shape for t in _operands(spec, args, kwargs)]
    else:
        shapes = [t.shape for t in _operands(spec, args, kwargs)]
        if spec.name == "gaussian_nll_loss" and len(shapes) == 3:
            inp, var = shapes[0], shapes[2]
            if var != inp and tuple(inp)[:-1] == tuple(var):
                shapes[2] = tuple(var) + (1,)  # torch unsqueezes a homoscedastic var
    if len(shapes) < 2:
        return None
    if len(shapes) == 2:
        s0, s1 = shapes
        if s0 == s1 or _covers(s0, s1) or _covers(s1, s0):
            return None
    out: list[Shape] = []
    for s in shapes:
        t = tuple(s)
        for d in t:
            if type(d) is not int:  # symbolic sizes: stay out of the way
                return None
        out.append(t)
    return out


def _mode_class() -> type:
    global _MODE_CLASS, _WATCHED, _TENSOR
    if _MODE_CLASS is not None:
        return _MODE_CLASS
    import torch
    from torch.overrides import TorchFunctionMode

    _TENSOR = tensor = torch.Tensor
    _WATCHED = _build_watched()
    watched_get = _WATCHED.get
    covers = _covers

    class _BroadcastGuardMode(TorchFunctionMode):
        """Torch function mode of one entered guard (see :class:`no_implicit_broadcast`)."""

        def __init__(self, guard: _Guard) -> None:
            super().__init__()
            self.guard = guard

        def __torch_function__(
            self,
            func: Callable[..., Any],
            types: Any,
            args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None,
        ) -> Any:
            __tracebackhide__ = True
            try:
                spec = watched_get(func)
            except TypeError:  # pragma: no cover - unhashable callable
                spec = None
            if spec is None:
                if kwargs:
                    return func(*args, **kwargs)
                return func(*args)
            if not kwargs and len(args) == 2 and spec.kind == _KIND_ELEMENTWISE:
                x, y = args  # fast path: a binary op where one operand covers the other
                if isinstance(x, tensor) and isinstance(y, tensor):
                    s0, s1 = x.shape, y.shape
                    if s0 == s1 or covers(s0, s1) or covers(s1, s0):
                        return func(x, y)
                else:
                    return func(x, y)  # a python number: never flagged
            return _check_and_call(self.guard, spec, func, args, kwargs or {})

    _MODE_CLASS = _BroadcastGuardMode
    return _MODE_CLASS


def _check_and_call(
    guard: _Guard, spec: _Spec, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    __tracebackhide__ = True
    shapes = _operand_shapes(spec, args, kwargs)
    if shapes is not None and guard.active():
        result = broadcast_shape(shapes)
        if result is not None and pairs_samples(shapes, result, batch_size=guard.batch_size):
            _flag(guard, spec, shapes, result, args, kwargs)
            if spec.kind == _KIND_LOSS:
                with warnings.catch_warnings():
                    # torch's own "Using a target size ... different to the input size"
                    warnings.filterwarnings("ignore", message="Using a target size", category=UserWarning)
                    return func(*args, **kwargs)
    return func(*args, **kwargs)


def _flag(
    guard: _Guard, spec: _Spec, shapes: list[Shape], result: Shape, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    __tracebackhide__ = True
    frame, library = _op_site(sys._getframe(1))
    if library:
        return  # an installed library's own, deliberate broadcast
    try:
        loss_inputs = _between_loss_inputs(spec, _operands(spec, args, kwargs))
        record = _record_at(spec.name, shapes, result, frame, loss_inputs)
        guard.records.append(record)
        if guard.mode == "error":
            # The op will not run, so the guards around this one would never
            # see it: give them the record before raising.
            for other in _guards():
                if (
                    other.seq < guard.seq
                    and other.active()
                    and other.records is not guard.records
                    and pairs_samples(shapes, result, batch_size=other.batch_size)
                ):
                    other.records.append(record)
            raise BroadcastError(record.message(), [record])
        if guard.mode == "warn":
            _warn(record, frame)
    finally:
        del frame


# --------------------------------------------------------------------------
# Public context managers
# --------------------------------------------------------------------------


class no_implicit_broadcast(contextlib.ContextDecorator):
    """Flag ops that broadcast both of their operands, like ``(4, 1) - (4,) -> (4, 4)``.

    ``mode``: ``"error"`` (default) raises
    :class:`~pytest_gradcheck.errors.BroadcastError` at the offending op;
    ``"warn"`` emits a :class:`~pytest_gradcheck.errors.BroadcastWarning`
    pointing at the user's line; ``"record"`` only records; ``"off"`` installs
    nothing. ``with`` yields :attr:`records`, filled in every mode.

    ``batch_size``: the batch size of the tensors in the block, if known; then
    only broadcasts that pair samples are flagged (a ``(1, T) < (B, 1)`` length
    mask is not). Without it the ambiguous cases are flagged; see
    :func:`pairs_samples`. Broadcasts run by installed libraries' own code
    (transformers' masks, rotary embeddings) are never flagged.

    Watched: elementwise/binary ops (``add``, ``sub``, ``mul``, ``div``,
    ``pow``, comparisons, logical/bitwise ops, ``where``, ``lerp``,
    ``addcmul``, ... in function, method, operator and in-place forms) and the
    elementwise losses of ``torch.nn.functional`` (``mse_loss``, ``l1_loss``,
    ``binary_cross_entropy``, ``kl_div``, ...). Class-index losses
    (``cross_entropy``, ``nll_loss``) are never flagged.

    >>> import torch
    >>> out, labels = torch.zeros(4, 1), torch.zeros(4)
    >>> with no_implicit_broadcast("record") as records:
    ...     loss = (out - labels).pow(2).mean()
    >>> records[0].describe()
    'sub((4, 1), (4,)) -> (4, 4): both operands were expanded'

    As a decorator, each call gets its own guard; all calls share ``records``.
    """

    def __init__(self, mode: str = "error", *, batch_size: int | None = None) -> None:
        if not isinstance(mode, str) or mode not in MODES:
            raise InvalidArgument(
                f"no_implicit_broadcast(mode={mode!r}): mode must be one of " + ", ".join(repr(m) for m in MODES)
            )
        self.mode = mode
        self.batch_size = _check_batch_size(batch_size, "no_implicit_broadcast")
        self.records: list[BroadcastRecord] = []
        self._entered: list[tuple[_Guard, Any]] = []

    def _recreate_cm(self) -> no_implicit_broadcast:
        fresh = type(self).__new__(type(self))
        fresh.mode = self.mode
        fresh.batch_size = self.batch_size
        fresh.records = self.records
        fresh._entered = []
        return fresh

    def __enter__(self) -> list[BroadcastRecord]:
        if self.mode == "off" or any(g.records is self.records and g.active() for g in _guards()):
            # "off", or this guard re-entered (a recursive decorated call): the
            # enclosing entry already watches this thread.
            self._entered.append((None, None))  # type: ignore[arg-type]
            return self.records
        guard = _Guard(self.mode, self.records, self.batch_size)
        torch_mode = _mode_class()(guard)
        stack = _guards()
        stack.append(guard)
        try:
            torch_mode.__enter__()
        except BaseException:
            _remove_guard(guard)
            raise
        self._entered.append((guard, torch_mode))
        return self.records

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if not self._entered:
            raise InvalidArgument("no_implicit_broadcast.__exit__ called without a matching __enter__")
        guard, torch_mode = self._entered.pop()
        if guard is None:
            return False
        try:
            torch_mode.__exit__(exc_type, exc, tb)
        finally:
            _remove_guard(guard)
        return False

    def __repr__(self) -> str:
        if self.batch_size is None:
            return f"no_implicit_broadcast(mode={self.mode!r})"
        return f"no_implicit_broadcast(mode={self.mode!r}, batch_size={self.batch_size})"


@contextlib.contextmanager
def recording(
    enabled: bool = True, *, torch_ops: bool = True, batch_size: int | None = None
) -> Iterator[list[BroadcastRecord]]:
    """Record implicit broadcasts in the block; never raise, never warn.

    Used by the gradient checks around the loss call (or the whole step),
    with the ``batch_size`` of the batch run so that only broadcasts that pair
    samples are recorded (see :func:`pairs_samples`). Honours
    :func:`allow_broadcast`. With ``enabled=False`` it installs nothing and
    yields an empty list. With ``torch_ops=False`` it watches no torch op (and
    imports no torch): it only joins this thread's guard stack, so broadcasts
    handed over with :func:`report_broadcast` (the NumPy backend's) are recorded.

    >>> import torch
    >>> with recording() as records:
    ...     _ = torch.ones(2, 1) * torch.ones(1, 2)
    >>> [r.op for r in records]
    ['mul']
    """
    batch_size = _check_batch_size(batch_size, "recording")
    if not enabled:
        yield []
        return
    if not torch_ops:
        records: list[BroadcastRecord] = []
        guard = _Guard("record", records, batch_size)
        _guards().append(guard)
        try:
            yield records
        finally:
            _remove_guard(guard)
        return
    with no_implicit_broadcast("record", batch_size=batch_size) as records:
        yield records


def emit_after_check(report: Any, mode: str, where: str = "the loss") -> None:
    """Apply the ``broadcast=`` policy to the broadcasts a gradient check recorded.

    Shared by every backend, after a check whose gradients agree (when they
    disagree the broadcast is the report's stated cause instead): ``"error"``
    raises :class:`~pytest_gradcheck.errors.BroadcastError` with the report,
    ``"warn"`` emits a :class:`~pytest_gradcheck.errors.BroadcastWarning` at each
    user line, ``"off"`` does nothing. ``where`` names the code that was watched.
    """
    __tracebackhide__ = True
    records = list(getattr(report, "broadcasts", ()))
    if not records:
        return
    if mode == "error":
        lines = [
            f"implicit broadcast in {where} (broadcast='error'): "
            f"{len(records)} op{'s' if len(records) != 1 else ''} expanded both operands."
        ]
        lines += ["  " + r.message() for r in records]
        if any(getattr(r, "loss_inputs", True) for r in records):
            lines.append(
                "Give predictions and targets the same shape, or wrap an intended pairwise term in "
                "pytest_gradcheck.allow_broadcast()."
            )
        else:
            lines.append("Wrap an intended pairwise term in pytest_gradcheck.allow_broadcast().")
        lines.append("")
        lines.append(str(report))
        raise BroadcastError("\n".join(lines), records)
    if mode == "warn":
        for r in records:
            if getattr(r, "loss_inputs", True):
                why = f"{where} broadcasts predictions against targets; this usually breaks at other batch sizes"
            else:
                why = f"this term of {where} expands both of its operands, which can pair samples"
            warnings.warn_explicit(
                r.message() + f" (the gradients agree here, but {why})",
                BroadcastWarning,
                r.filename,
                r.lineno,
            )
