"""The NumPy backend: checks for hand-written gradient functions.

Two checks, for the two classic bugs of hand-written backprop:

- :func:`assert_gradequiv_numpy`: the batch gradient returned by
  ``grad_fn(params, inputs, targets)`` must equal the accumulation (mean, sum or
  weighted) of the gradients ``grad_fn`` returns for each sample run alone (a
  batch of one). It catches a gradient that is *summed* over the batch where the
  loss averages (the step grows with the batch size) and samples paired with
  other samples by broadcasting. The comparison, the float64 re-check, the
  diagnosis and the report are the ones the torch check uses
  (:func:`pytest_gradcheck.verdict.run_check`).
- :func:`assert_grad_numpy`: the gradient returned by ``grad_fn`` must equal
  central finite differences of ``loss_fn`` in float64. It catches a wrong
  derivative formula, which the first check cannot see (a formula that is wrong
  for every sample is wrong the same way in the batch).

The modules: ``check`` (:func:`assert_gradequiv_numpy`), ``finite_differences``
(:func:`assert_grad_numpy`), ``arguments`` (params, inputs, targets, weights and what
``grad_fn`` returns, validated), ``problem`` (the check as ``run_check`` drives it) and
``tracking`` (:class:`TrackedArray`: which ops in ``grad_fn`` pair samples).

This package imports numpy (it is only imported when a NumPy check is used) and
never imports torch.
"""

from __future__ import annotations

from ..report.finite_differences import FDEntry, FDParam, FiniteDifferenceReport
from .check import assert_gradequiv_numpy
from .finite_differences import assert_grad_numpy
from .tracking import TrackedArray

__all__ = [
    "assert_gradequiv_numpy",
    "assert_grad_numpy",
    "FiniteDifferenceReport",
    "FDParam",
    "FDEntry",
    "TrackedArray",
]
