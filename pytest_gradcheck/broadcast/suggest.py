"""What to tell the user about a flagged op: its operands' names in the source, and a fix.

From the source line (or the exact expression) of the op, :func:`operand_names`
finds the operands' text (``out``, ``labels``) and :func:`suggest_fix` turns the
shapes into a one-line hint such as ``did you mean labels.unsqueeze(-1)?``.

Importing this module imports neither torch nor numpy (nor :mod:`ast`, until a
suggestion is asked for).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..report.format import fmt_shape
from .rule import LOSS_OPERANDS, Shape, is_implicit_broadcast, numel

if TYPE_CHECKING:
    import ast

__all__ = ["operand_names", "suggest_fix"]

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


def _parse(code: str) -> ast.Module | ast.Expression | None:
    import ast

    for text, mode in ((code, "eval"), (code, "exec"), ("(\n" + code + "\n)", "eval")):
        try:
            tree = ast.parse(text, mode=mode)
        except SyntaxError:
            continue
        if isinstance(tree, (ast.Module, ast.Expression)):
            return tree
    return None


def _call_operands(node: ast.Call, base: str | None, n: int) -> list[ast.expr] | None:
    """The operand expressions of a call ``f(a, b)`` or ``a.f(b)`` if it is a form of ``base``."""
    import ast

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
    elif base in LOSS_OPERANDS and ("loss" in name.lower() or "crit" in name.lower()):
        pass  # criterion(out, y), self.loss_fn(y_hat, y)
    else:
        return None
    args = [a for a in node.args if not isinstance(a, (ast.Constant, ast.Starred))]
    kws = [k.value for k in node.keywords if k.arg in _OPERAND_KEYWORDS and not isinstance(k.value, ast.Constant)]
    if isinstance(func, ast.Attribute) and len(args) + len(kws) == n - 1:
        return [func.value, *args, *kws]  # method form: a.sub(b)
    operands = [*args, *kws]
    return operands if len(operands) == n else None


def _candidate_operands(node: ast.AST, op: str | None, n: int) -> list[ast.expr] | None:
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
        return _call_operands(node, base, n)
    return None


def operand_names(code: str | None, op: str | None, n: int) -> list[str] | None:
    """Source text of the ``n`` operands of ``op`` in ``code``, if unambiguous.

    >>> operand_names("loss = (out - labels).pow(2).mean()", "sub", 2)
    ['out', 'labels']
    """
    if not code:
        return None
    import ast

    tree = _parse(code)
    if tree is None:
        return None
    body: list[ast.AST] = list(tree.body) if isinstance(tree, ast.Module) else [tree.body]
    found: list[list[ast.expr]] = []
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
    intended = f"or wrap it in allow_broadcast() if the {fmt_shape(result_t)} result is intended"
    if len(shapes_t) != 2:
        return f"make the operand shapes agree (e.g. .view_as(...)), {intended}"
    first, second = shapes_t
    if numel(first) != numel(second):
        return f"the operands hold different numbers of elements: make their shapes agree, {intended}"
    names = operand_names(code, op, 2)
    if names is not None:
        return f"did you mean {names[1]}{_reshape_expr(second, first, names[0])}?"
    fix = _reshape_expr(second, first, None)
    return f"reshape the {fmt_shape(second)} operand to {fmt_shape(first)}, e.g. {fix} or .view_as(other)"
