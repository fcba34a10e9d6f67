"""The one comparison and verdict path, shared by every backend (torch, NumPy, DDP).

A backend describes its check as a :class:`GradientProblem`: it can compute the
batch gradient and the weighted accumulation ``sum_i c_i * grad(loss_i)`` of
per-sample gradients (each sample run alone), in the working dtype and in
float64, as arrays of its own library (torch tensors on their device, or NumPy
arrays), which the comparison reduces where they are. :func:`run_check` then compares, re-checks in float64
before calling a mismatch a bug, diagnoses the cause, and returns a
:class:`~pytest_gradcheck.report.GradEquivReport` or raises
:class:`~pytest_gradcheck.errors.GradEquivError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol, Sequence

from ._tracking import record as record_check
from .compare import (
    DEFAULT_RTOL,
    FlatGrads,
    Pair,
    Side,
    compare_gradients,
    default_tolerances,
    mark_rounding,
    rounding_shrink_limit,
)
from .diagnosis import diagnose, reduction_label, references
from .errors import GradEquivError, InvalidArgument
from .report import Comparison, GradEquivReport

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "DEFAULT_RTOL",
    "FlatGrads",
    "GradientProblem",
    "default_tolerances",
    "compare_gradients",
    "run_check",
]


class GradientProblem(Protocol):
    """What a backend provides to :func:`run_check`.

    Gradients are returned as ``{parameter name: array}``: torch tensors (on the
    parameters' device, in their dtype, as autograd returned them) or NumPy arrays.
    """

    @property
    def backend(self) -> str: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def dtype(self) -> str: ...

    @property
    def device(self) -> str: ...

    @property
    def reference_method(self) -> str: ...

    @property
    def fallback_reason(self) -> Optional[str]: ...

    @property
    def dropout_disabled(self) -> tuple[str, ...]: ...

    @property
    def broadcasts(self) -> tuple[Any, ...]: ...

    def batch_gradient(self, float64: bool) -> Mapping[str, Any]: ...

    def reference_gradient(self, coeffs: "np.ndarray", float64: bool) -> Mapping[str, Any]: ...

    def per_sample_gradients(self, float64: bool) -> Optional[dict[str, "np.ndarray"]]: ...

    def weight_candidates(self) -> list[tuple[str, "np.ndarray"]]: ...

    def loss_values(self, float64: bool) -> Optional[tuple[float, "np.ndarray"]]:
        """The batch loss and the per-sample losses of the last evaluation, if known."""
        ...


def _raise_non_finite(side: "Side", what: str, why: str) -> None:
    """A clear error naming the first parameter whose ``what`` has NaN or inf entries, and ``why``."""
    for name in side.g:
        if not side.finite(name):
            n_bad = side.non_finite(name)
            raise InvalidArgument(
                f"the {what} of parameter {name!r} has {n_bad} non-finite entr"
                f"{'y' if n_bad == 1 else 'ies'} (NaN or inf){why}"
            )


_OVERFLOW = ": gradients cannot be compared. Check the inputs and the loss for overflow, log(0) or division by zero."
_WHOLE_BATCH = (
    " but the batch gradient is finite: the loss (or the model) depends on the whole batch, most likely "
    "through a statistic over the batch dimension (x.std(0), x.var(0), normalising by the batch), which is "
    "undefined for a batch of one (the std of one sample is NaN), so per-sample gradients do not exist. "
    "Compute the statistic per sample, or pass it in as a constant, to check the rest."
)


def _why_not(exc: BaseException) -> str:
    """Why the float64 re-check could not run, in words (lack of memory said plainly)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text:
        return (
            "not enough memory (it holds float64 copies of the parameters and of both gradients): "
            f"{type(exc).__name__}: {text}"
        )
    return f"{type(exc).__name__}: {text}"


def _run_notes(problem: GradientProblem, passed: bool) -> list[str]:
    """What the problem has to say about its runs, once the verdict is known (``run_notes(passed)``)."""
    run_notes = getattr(problem, "run_notes", None)
    return list(run_notes(passed)) if run_notes is not None else []


#: the options of :func:`run_check` that a check passes through from its validated options
VERDICT_OPTIONS = ("rtol", "atol", "rtol_float64", "atol_float64", "float64_recheck")


def verdict_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The tolerances and the float64 re-check switch of validated check options, for :func:`run_check`.

    >>> verdict_options({"rtol": 1e-3, "reduction": "sum", "float64_recheck": False})
    {'rtol': 0.001, 'float64_recheck': False}
    """
    return {k: opts[k] for k in VERDICT_OPTIONS if k in opts}


def run_check(
    problem: GradientProblem,
    *,
    reduction: str = "mean",
    weights: Optional["np.ndarray"] = None,
    rtol: float | None = None,
    atol: float | None = None,
    rtol_float64: float | None = None,
    atol_float64: float | None = None,
    float64_recheck: bool = True,
    check: str = "per-sample",
    notes: Sequence[str] = (),
) -> GradEquivReport:
    """Compare, re-check in float64, diagnose; return the report or raise ``GradEquivError``.

    ``rtol``/``atol`` are the working dtype's tolerances; the float64 re-check keeps float64's
    own (``DEFAULT_RTOL["float64"]``) unless ``rtol_float64``/``atol_float64`` are given.
    """
    __tracebackhide__ = True
    import numpy as np

    b = problem.batch_size
    weighted = weights is not None
    coeffs = np.ones(b, dtype=np.float64) if weights is None else np.asarray(weights, dtype=np.float64)
    hyps = ["mean", "sum"] if reduction == "auto" else [reduction]

    # supplied gradients (per-sample checks) keep their dtype: the float64 re-check can only
    # make the reference exact, so their own dtype's tolerance holds there too
    fixed = getattr(problem, "fixed_batch_precision", False)

    def evaluate(float64: bool) -> tuple[Mapping[str, Any], Mapping[str, Any], dict[str, Comparison]]:
        precision = "float64" if float64 else problem.dtype
        if float64 and not fixed and problem.dtype != "float64":
            r, a = default_tolerances("float64", rtol_float64, atol_float64)
        else:
            r, a = default_tolerances(problem.dtype if fixed else precision, rtol, atol)
        g = problem.batch_gradient(float64)
        g_side = Side(g, list(g))
        _raise_non_finite(g_side, "batch gradient", _OVERFLOW)  # before the reference is computed
        s = problem.reference_gradient(coeffs, float64)
        # each hypothesis scales the one reference (1 for sum, 1/sum(c) for mean): no copies, and
        # every scale's errors come from the one pass that reads both gradients
        total = float(coeffs.sum())
        ks = {h: 1.0 if h == "sum" else 1.0 / total for h in hyps}
        pair = Pair(g, s, batch_side=g_side, ks=list(ks.values()))
        _raise_non_finite(
            pair.r, "per-sample reference gradient", _WHOLE_BATCH
        )  # the batch gradient is finite (checked above)
        comps = {h: pair.compare(ks[h], r, a, reduction_label(h, weighted), precision) for h in hyps}
        return g, s, comps

    def first_pass(comps: Mapping[str, Comparison]) -> Optional[str]:
        return next((h for h in hyps if comps[h].passed), None)

    g, s, comps = evaluate(False)
    matched = first_pass(comps)
    confirm = getattr(problem, "confirm_deterministic", None)
    # randomness is refused as randomness, before any diagnosis; state the forward writes
    # (found only now, by value) means the comparison is run again from the saved state
    if matched is None and confirm is not None and confirm(g):
        g, s, comps = evaluate(False)
        matched = first_pass(comps)
    working = comps[matched or hyps[0]]
    f64: Optional[Comparison] = None
    f64_error: Optional[str] = None
    used_f64 = problem.dtype == "float64"
    vacuous = working.scale == 0.0  # every gradient exactly zero: nothing to compare
    shortfall = getattr(problem, "float64_shortfall", None)
    if matched is None and float64_recheck and problem.dtype != "float64":
        try:
            f64_error = shortfall() if shortfall is not None else None  # refused before it could crash
            if f64_error is None:
                g64, s64, comps64 = evaluate(True)
        except InvalidArgument:
            raise
        except Exception as exc:  # the re-check is best effort: say why it could not run
            f64_error = _why_not(exc)
        if f64_error is None:
            limit = rounding_shrink_limit(problem.dtype)
            comps64 = {h: mark_rounding(comps64[h], comps[h], limit) for h in hyps}
            matched = first_pass(comps64)
            f64 = comps64[matched or hyps[0]]
            g, s, used_f64 = g64, s64, True
            # every gradient shrank like rounding: the model's gradients are all zero
            vacuous = f64.scale <= limit * comps[matched or hyps[0]].scale
    report = GradEquivReport(
        passed=matched is not None,
        check=check,
        backend=problem.backend,
        batch_size=b,
        dtype=problem.dtype,
        device=problem.device,
        reduction=reduction,
        weighted=weighted,
        matched=reduction_label(matched, weighted) if matched else None,
        working=working,
        float64=f64,
        rounding=matched is not None and f64 is not None,
        float64_error=f64_error,
        reference_method=problem.reference_method,
        fallback_reason=problem.fallback_reason,
        chunk_size=getattr(problem, "chunk_size", None),
        dropout_disabled=tuple(problem.dropout_disabled),
        broadcasts=tuple(problem.broadcasts),
        broadcast_scope=getattr(problem, "broadcast_scope", "the loss"),
        notes=[*notes, *_run_notes(problem, matched is not None)],
        weights=tuple(float(x) for x in coeffs) if weighted else None,
        vacuous=vacuous and matched is not None,
    )
    record_check(report)  # the plugin counts every check, pass or fail
    if report.passed:
        return report
    final = report.final
    declared = references(s, coeffs, hyps[:1])[hyps[0]]
    own = getattr(problem, "diagnose_mismatch", None)  # a check with its own unit of comparison (per-sample rows)
    if own is not None:
        findings = own(g, declared, final.rtol, final.atol, final.precision)
    else:
        findings = diagnose(problem, g, declared, coeffs, hyps[0], weighted, final.rtol, final.atol, used_f64)
    report.findings = tuple(findings)
    report.would_match = next(
        (
            f"{f.matched} (unweighted)" if f.kind == "unweighted" else f.matched
            for f in report.findings
            if f.matched and f.kind != "grad-sample"
        ),
        None,
    )
    raise GradEquivError(report)
