"""One check of a NumPy gradient function, as :func:`pytest_gradcheck.verdict.run_check` drives it.

:class:`NumpyProblem` calls ``grad_fn`` on fresh copies: on the whole batch (with the inputs
and targets tracked for pairing broadcasts, see :mod:`.tracking`) and on each sample alone,
in the working dtype and in float64; it keeps what it learns about ``grad_fn`` along the way
(writes into its own params, draws from NumPy's global generator) as the report's notes.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from ..broadcast import BroadcastRecord
from ..diagnosis import IGNORE_INDEX, MAX_PER_SAMPLE_ENTRIES
from ..errors import BroadcastError, GradCheckError, InvalidArgument, first_line
from .arguments import (
    Array,
    Arrays,
    GradFn,
    LossFn,
    Params,
    as_loss,
    batch_size_of,
    copy_array,
    rng_fingerprint,
    same_bytes,
)
from .tracking import TrackedArray, recording_pairings

__all__ = ["NumpyProblem"]

#: Per-sample gradients are kept in memory (instead of recomputed for the
#: diagnosis) when the batch holds at most this many gradient entries.
_CACHE_ENTRIES = 4_000_000

#: The target value a loss ignores by default (``ignore_index`` of torch's losses).

_RANDOM_NOTE = (
    "grad_fn draws from NumPy's global random generator (dropout? noise?): the batch "
    "call and the per-sample calls drew different numbers, which alone makes their "
    "gradients differ. Make grad_fn deterministic for the check (pass the dropout mask "
    "or the noise in as an input, or switch dropout off)."
)


class NumpyProblem:
    """``grad_fn`` on ``params``, ``inputs`` and ``targets``: the batch gradient and the per-sample ones.

    ``notes`` is what the report should say about the run; it is kept current as the calls
    run (``run_check`` copies it into the report once the gradients are in): that ``grad_fn``
    wrote into the params it was given (pass or fail), and, once the gradients disagree,
    that it drew from NumPy's global random generator.
    """

    backend = "numpy"
    broadcast_scope = "grad_fn"
    device = "cpu"
    reference_method = "per-sample calls"
    fallback_reason: Optional[str] = None
    dropout_disabled: tuple[str, ...] = ()

    def __init__(
        self,
        grad_fn: GradFn,
        params: Params,
        inputs: Arrays,
        targets: Optional[Arrays],
        *,
        loss_fn: Optional[LossFn] = None,
        watch_broadcast: bool = True,
    ) -> None:
        self.grad_fn = grad_fn
        self.params = params
        self.inputs = inputs
        self.targets = targets
        self.batch_size = batch_size_of(inputs, targets)
        self.loss_fn = loss_fn
        self.watch_broadcast = watch_broadcast
        self.dtype = min((a.dtype for a in params.arrays), key=lambda d: d.itemsize).name
        self.broadcasts: tuple[BroadcastRecord, ...] = ()
        self.n_entries = sum(int(a.size) for a in params.arrays)
        self.notes: list[str] = []
        self.modified: dict[str, None] = {}  # labels of the copies grad_fn wrote into (ordered set)
        self.random_draws = False  # grad_fn drew from np.random's global generator
        self._mismatch = False  # run_check found the gradients to disagree
        self._samples: dict[bool, list[dict[str, Array]]] = {}
        self._losses: dict[bool, tuple[float, Array]] = {}

    def sample_targets(self, i: int) -> Any:
        """The targets of sample ``i`` alone (a batch of one), as a ``weights`` callable gets them."""
        return None if self.targets is None else self.targets.sample(i)

    # -- calls ---------------------------------------------------------------------------------
    def _arguments(self, float64: bool, index: Optional[int], track: bool) -> tuple[list[Array], Any, Any, Any]:
        p_arrays = self.params.copies(float64)

        def batch_arrays(group: Optional[Arrays]) -> Any:
            if group is None:
                return None
            arrays = []
            for a in group.arrays:
                c = copy_array(a if index is None else a[index : index + 1], float64)
                arrays.append(TrackedArray.of_batch(c) if track else c)
            return group.build(arrays)

        return p_arrays, self.params.build(p_arrays), batch_arrays(self.inputs), batch_arrays(self.targets)

    def _note_modified(self, p_arrays: Sequence[Array], float64: bool) -> None:
        for label, mine, theirs in zip(self.params.labels, p_arrays, self.params.arrays):
            if float64 and theirs.dtype != np.float64:
                same = np.array_equal(mine, theirs.astype(np.float64), equal_nan=True)
            else:
                same = same_bytes(mine, theirs)
            if not same:
                self.modified[label] = None

    def _call(self, float64: bool, index: Optional[int]) -> dict[str, Array]:
        __tracebackhide__ = True
        if index is None:
            where = "the float64 batch call" if float64 else "the batch call"
        else:
            where = f"the call on sample {index} alone" + (" in float64" if float64 else "")
        track = index is None and not float64 and self.watch_broadcast
        p_arrays, p, x, y = self._arguments(float64, index, track)
        rng_before = rng_fingerprint()
        try:
            if track:
                return self._tracked_call(p_arrays, p, x, y, where)
            out = self._plain_call(index, p, x, y)
            self._note_modified(p_arrays, float64)
            return self.params.collect(out, where)
        finally:
            if rng_fingerprint() != rng_before:
                self.random_draws = True
            self._update_notes()

    def _plain_call(self, index: Optional[int], p: Any, x: Any, y: Any) -> object:
        __tracebackhide__ = True
        if index is None:
            return self.grad_fn(p, x, y)
        try:
            return self.grad_fn(p, x, y)
        except GradCheckError:
            raise
        except Exception as exc:
            raise InvalidArgument(
                f"grad_fn failed on sample {index} alone (a batch of one), which the per-sample "
                f"reference needs: {type(exc).__name__}: {first_line(exc)}. A gradient function "
                "that squeezes the batch axis away or needs several samples cannot be checked "
                "per sample."
            ) from exc

    def _tracked_call(self, p_arrays: list[Array], p: Any, x: Any, y: Any, where: str) -> dict[str, Array]:
        """The batch call with the inputs and targets tracked: pairing broadcasts are recorded."""
        __tracebackhide__ = True
        try:
            with recording_pairings() as records:
                out = self.grad_fn(p, x, y)
        except GradCheckError:
            raise
        except Exception as exc:
            if records:
                what = f"grad_fn then raised {type(exc).__name__}: {first_line(exc)}"
                raise BroadcastError(_broken_by_broadcast(records, what), records) from exc
            raise
        self.broadcasts = tuple(records)
        self._note_modified(p_arrays, False)
        try:
            return self.params.collect(out, where)
        except InvalidArgument as exc:
            if records:
                raise BroadcastError(_broken_by_broadcast(records, str(exc)), records) from exc
            raise

    def _per_sample(self, float64: bool) -> Iterable[dict[str, Array]]:
        """The B per-sample gradients: kept in memory when small, else recomputed on demand."""
        cached = self._samples.get(float64)
        if cached is not None:
            return cached
        if self.batch_size * self.n_entries > _CACHE_ENTRIES:
            return (self._call(float64, i) for i in range(self.batch_size))
        kept = [self._call(float64, i) for i in range(self.batch_size)]
        self._samples[float64] = kept
        return kept

    # -- GradientProblem -------------------------------------------------------------------------
    def batch_gradient(self, float64: bool) -> dict[str, Array]:
        __tracebackhide__ = True
        return self._call(float64, None)

    def reference_gradient(self, coeffs: Array, float64: bool) -> dict[str, Array]:
        acc = {n: np.zeros(a.shape, dtype=np.float64) for n, a in zip(self.params.names, self.params.arrays)}
        for c, g in zip(coeffs, self._per_sample(float64)):
            for n in acc:
                acc[n] += float(c) * g[n]
        return acc

    def per_sample_gradients(self, float64: bool) -> Optional[dict[str, Array]]:
        if self.batch_size * self.n_entries > MAX_PER_SAMPLE_ENTRIES:
            return None
        samples = list(self._per_sample(float64))
        return {n: np.stack([g[n] for g in samples]) for n in self.params.names}

    def weight_candidates(self) -> list[tuple[str, Array]]:
        out: list[tuple[str, Array]] = []
        if self.targets is None:
            return out
        for a in self.targets.arrays:
            if np.issubdtype(a.dtype, np.integer) and a.ndim >= 2:
                valid = (a != IGNORE_INDEX).reshape(a.shape[0], -1).sum(axis=1).astype(np.float64)
                out.append((f"their number of non-ignored targets (targets != {IGNORE_INDEX})", valid))
        return out

    def loss_values(self, float64: bool) -> Optional[tuple[float, Array]]:
        if self.loss_fn is None:
            return None
        if float64 not in self._losses:
            _, p, x, y = self._arguments(float64, None, False)
            batch = as_loss(self.loss_fn(p, x, y), "the batch")
            losses = []
            for i in range(self.batch_size):
                _, p, x, y = self._arguments(float64, i, False)
                losses.append(as_loss(self.loss_fn(p, x, y), f"sample {i}"))
            self._losses[float64] = (batch, np.asarray(losses, dtype=np.float64))
        return self._losses[float64]

    def confirm_deterministic(self, g: Optional[Mapping[str, Array]] = None) -> bool:
        """``run_check`` found the gradients to disagree, before any diagnosis.

        From now on the notes say whether ``grad_fn`` drew random numbers, which alone makes
        the batch and per-sample calls differ. Nothing needs computing again: returns False.
        """
        self._mismatch = True
        self._update_notes()
        return False

    # -- report ----------------------------------------------------------------------------------
    def run_notes(self, passed: bool) -> list[str]:
        """The notes for the report, once the verdict is known: random draws matter only on a failure."""
        notes = [n for n in self.notes if n != _RANDOM_NOTE]
        if self.random_draws and self._mismatch and not passed:
            notes.insert(0, _RANDOM_NOTE)
        return notes

    def _update_notes(self) -> None:
        notes = []
        if self.random_draws and self._mismatch:
            notes.append(_RANDOM_NOTE)
        if self.modified:
            notes.append(
                f"grad_fn wrote into the params it was given ({', '.join(self.modified)}); every call "
                "got fresh copies, so the check is unaffected and your arrays are as they were. If "
                "grad_fn also applies the update, move the update out of it."
            )
        self.notes[:] = notes


def _broken_by_broadcast(records: Sequence[BroadcastRecord], what: str) -> str:
    lines = [f"grad_fn broadcast samples against each other in the batch call, and it broke the gradient: {what}"]
    lines += ["  " + r.message() for r in records[:3]]
    lines.append(
        "Each sample was paired with every other sample (harmless with a batch of one, which is why "
        "it hides). Give predictions and targets the same shape (e.g. y[..., None] or "
        "y.reshape(out.shape)), or wrap an intended pairwise term in pytest_gradcheck.allow_broadcast()."
    )
    return "\n".join(lines)
