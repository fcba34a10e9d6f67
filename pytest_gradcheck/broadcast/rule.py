"""The broadcast rule, from shapes alone: is an op an implicit broadcast, does it pair samples.

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

This module also holds :class:`BroadcastRecord` (what is kept of a flagged op)
and the names of the ops the torch guard watches. Importing it imports neither
torch nor numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import InvalidArgument
from ..report.format import display_path, fmt_shape

__all__ = [
    "DUNDERS",
    "ELEMENTWISE_OPS",
    "LOSS_OPERANDS",
    "MODES",
    "SPECIAL_OPS",
    "BroadcastRecord",
    "Shape",
    "broadcast_shape",
    "check_batch_size",
    "is_implicit_broadcast",
    "numel",
    "pairing_result",
    "pairs_samples",
]

Shape = tuple[int, ...]

#: The modes of :class:`~pytest_gradcheck.broadcast.no_implicit_broadcast`.
MODES = ("error", "warn", "record", "off")


def numel(shape: Sequence[int]) -> int:
    """The number of elements of a tensor of ``shape``."""
    n = 1
    for d in shape:
        n *= d
    return n


# --------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class BroadcastRecord:
    """One op that broadcast both (all) of its tensor operands.

    ``loss_inputs`` is True when the operands were the loss's inputs (an
    elementwise loss's input and target, or a prediction computed from the
    model's parameters against a target that is not), and when that cannot be
    told (no tensors seen, no parameters involved); False for a term between
    predictions only (in-batch pairs). Only the former get a reshape suggestion.

    >>> r = BroadcastRecord("sub", ((4, 1), (4,)), (4, 4), "test_xor.py", 21,
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
        """``path:line`` of the user's statement, the path relative to pytest's rootdir (or the
        working directory), e.g. ``"tests/test_xor.py:21"``; a file outside it keeps its full path."""
        return f"{display_path(self.filename)}:{self.lineno}"

    def describe(self) -> str:
        """``"sub((4, 1), (4,)) -> (4, 4): both operands were expanded"``."""
        args = ", ".join(fmt_shape(s) for s in self.shapes)
        big = [s for s in self.shapes if numel(s) != 1]
        if len(big) == 2:
            what = "both operands" if len(self.shapes) == 2 else "both non-scalar operands"
        elif len(big) == len(self.shapes):
            what = f"all {len(big)} operands"
        else:
            what = f"all {len(big)} non-scalar operands"
        return f"{self.op}({args}) -> {fmt_shape(self.result)}: {what} were expanded"

    def message(self) -> str:
        """Location, description and suggestion in one line."""
        text = f"{self.location()}: {self.describe()}"
        if self.suggestion:
            text += f"; {self.suggestion}"
        return text

    def __str__(self) -> str:
        return self.message()


# --------------------------------------------------------------------------
# The rule
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
    if numel(result) == 0:
        return False
    n = len(result)
    counted = 0
    for s in shapes:
        s = tuple(s)
        if numel(s) == 1:
            continue
        if len(s) > n:
            return False  # not a broadcast of these shapes: do not guess
        if (1,) * (n - len(s)) + s == result:
            return False  # this operand already had the result's shape
        counted += 1
    return counted >= 2


def check_batch_size(batch_size: object, where: str) -> int | None:
    """``batch_size`` if it is None or a positive int; else :class:`InvalidArgument` naming ``where``."""
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
    batch_size = check_batch_size(batch_size, "pairs_samples")
    if not is_implicit_broadcast(shapes, result):
        return False
    result = tuple(result)
    n = len(result)
    big = [tuple(s) for s in shapes if numel(s) != 1]
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


def pairing_result(shapes: Sequence[Sequence[int]], batch_size: int | None = None) -> Shape | None:
    """The broadcast result of ``shapes`` if the op is flagged (:func:`pairs_samples`), else ``None``.

    ``None`` too when the shapes do not broadcast (the op itself will fail).

    >>> pairing_result([(4, 1), (4,)])
    (4, 4)
    >>> pairing_result([(1, 7), (5, 1)], batch_size=5) is None   # a length mask
    True
    """
    result = broadcast_shape(shapes)
    if result is None or not pairs_samples(shapes, result, batch_size=batch_size):
        return None
    return result


# --------------------------------------------------------------------------
# The ops the torch guard watches (names only: the guard looks them up in torch)
# --------------------------------------------------------------------------

#: Elementwise ops, watched in function, method and in-place (``name_``) forms.
ELEMENTWISE_OPS = (
    "add", "sub", "subtract", "rsub", "mul", "multiply", "div", "divide", "true_divide",
    "floor_divide", "pow", "float_power", "atan2", "arctan2", "maximum", "minimum", "fmax",
    "fmin", "fmod", "remainder", "eq", "ne", "not_equal", "lt", "less", "le", "less_equal",
    "gt", "greater", "ge", "greater_equal", "isclose", "logical_and", "logical_or",
    "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_left_shift",
    "bitwise_right_shift", "where", "lerp", "addcmul", "addcdiv", "hypot", "copysign",
    "xlogy", "logaddexp", "logaddexp2", "nextafter", "heaviside", "ldexp", "clamp", "clip",
    "clamp_min", "clamp_max", "igamma", "igammac",
)  # fmt: skip

#: Elementwise ops of ``torch.special``.
SPECIAL_OPS = ("xlogy", "xlog1py", "zeta")

#: Operator dunder -> (op name, operands reversed).
DUNDERS: dict[str, tuple[str, bool]] = {
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

#: Elementwise losses of ``torch.nn.functional`` -> their elementwise operands
#: (position, keyword). Class-index losses (``cross_entropy``, ``nll_loss``,
#: ``multi_margin_loss``, ...) are deliberately absent.
LOSS_OPERANDS: dict[str, tuple[tuple[int, str], ...]] = {
    name: ((0, "input"), (1, "target"))
    for name in (
        "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
        "binary_cross_entropy_with_logits", "kl_div", "poisson_nll_loss", "soft_margin_loss",
        "hinge_embedding_loss", "multilabel_soft_margin_loss",
    )
}  # fmt: skip
LOSS_OPERANDS["margin_ranking_loss"] = ((0, "input1"), (1, "input2"), (2, "target"))
LOSS_OPERANDS["gaussian_nll_loss"] = ((0, "input"), (1, "target"), (2, "var"))
