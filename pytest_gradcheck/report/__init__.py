"""The report of a gradient-equivalence check: figures in dataclasses, words in one renderer.

The verdict path (:mod:`pytest_gradcheck.verdict`) fills a :class:`GradEquivReport`;
``str(report)`` renders it the way ``torch.testing.assert_close`` messages read:
a one-line verdict, a small table per parameter, the cause, then what to do.
Importing this module imports neither torch nor numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["CAUSE_KEYS", "ParamComparison", "Comparison", "Finding", "GradEquivReport", "cause_key", "render"]


def render(report: "GradEquivReport") -> str:
    """Render ``report`` as text (the ``GradEquivError`` message, ``str(report)``)."""
    from .render import render as _render

    return _render(report)


@dataclass(frozen=True)
class ParamComparison:
    """Figures comparing one parameter's batch gradient with its reference.

    ``rel_err`` is ``max_abs_err`` divided by the parameter's gradient scale
    (the largest magnitude of either gradient); ``allowed`` is
    ``atol + rtol * scale``, the largest ``max_abs_err`` that passes.
    """

    name: str
    shape: tuple[int, ...]
    max_abs_err: float
    rel_err: float
    allowed: float
    cosine: float
    ratio: float
    mismatched: int
    numel: int
    #: the float64 re-check only: the error exceeds ``allowed`` but shrank from the
    #: working dtype as rounding error does (see ``verdict.rounding_shrink_limit``)
    rounding: bool = False

    @property
    def passed(self) -> bool:
        return self.max_abs_err <= self.allowed or self.rounding


@dataclass(frozen=True)
class Comparison:
    """The batch gradient against one reference, at one precision."""

    reduction: str  # "mean", "sum", "weighted mean", "weighted sum"
    precision: str  # dtype the gradients were computed in, e.g. "float32"
    rtol: float
    atol: float
    params: tuple[ParamComparison, ...]
    #: the largest gradient entry of the whole problem (every parameter, both sides)
    scale: float = 0.0

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.params)

    @property
    def failing(self) -> tuple[ParamComparison, ...]:
        return tuple(p for p in self.params if not p.passed)

    @property
    def max_rel_err(self) -> float:
        return max((p.rel_err for p in self.params), default=0.0)


@dataclass(frozen=True)
class Finding:
    """One diagnosed cause of a mismatch (figures only; words are the renderer's).

    kinds:
      ``factor``        the batch gradient is ``factor`` times the reference
                        (``matched`` names the reduction that would have held);
      ``known-weights`` it matches when samples are weighted by ``label``;
      ``weights``       it is a positive weighted combination of per-sample
                        gradients with the ``weights`` found (mean 1);
      ``coupled``       it is a combination of per-sample gradients only with
                        weights of both signs (``weights``): samples are coupled;
      ``not-combination`` it is no combination of per-sample gradients at all;
      ``broadcast``     an implicit broadcast was recorded in the loss (``records``);
      ``sample-mixing`` a module that mixes samples was found (``label``);
      ``parameter-scale`` only some parameters are off, each by a pure scale
                        (``scales``: ``(name, factor)`` pairs); the others match;
      ``unweighted``    declared weights do not match, but the plain (unweighted)
                        ``matched`` reduction does.

    ``counts``: the weights as small integers (``weights`` proportional to them),
    when they are: a count per sample (tokens, valid targets).
    """

    kind: str
    factor: Optional[float] = None
    matched: Optional[str] = None
    weights: Optional[tuple[float, ...]] = None
    label: Optional[str] = None
    records: tuple[Any, ...] = ()
    scales: tuple[tuple[str, float], ...] = ()
    counts: Optional[tuple[int, ...]] = None


#: A finding's kind -> the stable key of the cause (``report.cause``); the first finding decides.
#: Kinds not listed (a DDP cause: ``ddp-batchnorm``, ...) are their own key.
CAUSE_KEYS: dict[str, str] = {
    "broadcast": "broadcast",
    "factor": "reduction-factor",
    "known-weights": "weights",
    "weights": "weights",
    "unweighted": "unweighted",
    "parameter-scale": "parameter-scale",
    "coupled": "coupling",
    "sample-mixing": "coupling",
    "not-combination": "not-combination",
    "grad-sample": "grad-sample",
    "unidentifiable": "unidentified",
}


def cause_key(passed: bool, findings: "tuple[Finding, ...]") -> Optional[str]:
    """The stable key of why a check failed, from its findings (``None`` for a pass).

    ``"mismatch"`` when a failure has no diagnosis.

    >>> cause_key(False, (Finding("broadcast"), Finding("coupled")))
    'broadcast'
    """
    if passed:
        return None
    if not findings:
        return "mismatch"
    return CAUSE_KEYS.get(findings[0].kind, findings[0].kind)


@dataclass
class GradEquivReport:
    """Everything a gradient-equivalence check measured. ``str(report)`` renders it.

    >>> import torch, torch.nn.functional as F
    >>> from pytest_gradcheck import assert_gradequiv
    >>> report = assert_gradequiv(torch.nn.Linear(3, 1), F.mse_loss,
    ...                           torch.randn(8, 3), torch.randn(8, 1))
    >>> report.passed, report.matched
    (True, 'mean')
    """

    passed: bool
    check: str  # "per-sample" | "step" | "accumulation" | "ddp" | "grad-sample"
    backend: str  # "torch" | "numpy"
    batch_size: int
    dtype: str
    device: str
    reduction: str  # as declared: "mean" | "sum" | "auto"
    weighted: bool
    matched: Optional[str]  # the accumulation that holds ("mean", "sum", "weighted mean"...)
    working: Comparison  # in the working dtype
    float64: Optional[Comparison] = None  # the float64 re-check, when it ran
    rounding: bool = False  # mismatch in working dtype vanished in float64
    float64_error: Optional[str] = None  # the re-check could not run: why
    reference_method: str = "vmap"  # "vmap" | "loop" | "per-sample calls" | "micro-batches"
    fallback_reason: Optional[str] = None
    #: samples per call (vmap) or per backward (loop) of the reference; None: the whole batch at once
    chunk_size: Optional[int] = None
    dropout_disabled: tuple[str, ...] = ()
    broadcasts: tuple[Any, ...] = ()  # BroadcastRecord objects seen in the loss
    findings: tuple[Finding, ...] = ()
    notes: list[str] = field(default_factory=list)
    weights: Optional[tuple[float, ...]] = None  # declared per-sample/micro-batch weights
    would_match: Optional[str] = None  # on failure: the accumulation that would have matched
    broadcast_scope: str = "the loss"  # the code the broadcast guard watched
    #: every gradient was zero, or rounding noise (it vanished in float64): the check saw nothing
    vacuous: bool = False
    #: under ``fuzz_gradequiv``: the smallest failing example Hypothesis found (shapes, sizes)
    example: Optional[str] = None
    #: with ``per_sample=True``: ``{name: (B, *shape)}`` tensors, each sample's gradient run alone
    per_sample_gradients: Optional[dict[str, Any]] = field(default=None, repr=False)

    @property
    def cause(self) -> Optional[str]:
        """Why the check failed, as a stable key (``broadcast``, ``reduction-factor``, ``weights``,
        ``unweighted``, ``parameter-scale``, ``coupling``, ``not-combination``, ``grad-sample``,
        ``unidentified``, ``mismatch``, a DDP cause); ``None`` for a pass."""
        return cause_key(self.passed, self.findings)

    @property
    def location(self) -> Optional[str]:
        """``path:line`` of the user's broadcast behind a failure (relative to pytest's rootdir), or ``None``."""
        if self.passed:
            return None
        for f in self.findings:
            for rec in f.records:
                loc = getattr(rec, "location", None)
                if callable(loc):
                    return str(loc())
        return None

    @property
    def reference_reason(self) -> Optional[str]:
        """Why the reference was computed the way it was, in words: vmap's failure when the check
        fell back to the per-sample loop, ``"requested (reference='loop')"`` when the caller asked
        for the loop, ``None`` for the common path (vmap) and the fixed methods of other checks."""
        if self.fallback_reason:
            return f"torch.func.vmap could not run the model: {self.fallback_reason}"
        if self.reference_method == "loop":
            return "requested (reference='loop')"
        return None

    @property
    def parameters(self) -> tuple[ParamComparison, ...]:
        """The per-parameter figures of the comparison the verdict rests on."""
        return self.final.params

    @property
    def final(self) -> Comparison:
        """The comparison the verdict rests on (float64 when the re-check ran)."""
        return self.float64 if self.float64 is not None else self.working

    def summary(self) -> str:
        """The first line of the report: the verdict of a pass, the cause of a failure."""
        from .render import cause_headline, headline

        return headline(self) if self.passed else cause_headline(self)

    def __str__(self) -> str:
        from .render import render

        return render(self)
