"""Hypothesis strategies for batch sizes, shapes and batches of tensors.

Import it as ``gst``::

    from hypothesis import given
    from pytest_gradcheck import strategies as gst

    @given(gst.batches(input_shape=("features",), target_shape=()))
    def test_step(batch):
        ...

A gradient bug that mixes samples (a broadcast between a ``(B, 1)`` output and
a ``(B,)`` target, a sum where a mean was meant) is invisible at batch size 1
and at some lucky shapes. These strategies fuzz the batch size and the free
dimensions of a declared input/target layout, and Hypothesis shrinks a failure
to the smallest case: batch size 2, every free dimension 1 where it can.

Design:

- **Tensor values come from a seeded torch generator.** Hypothesis draws one
  seed (``st.integers(0, 2**32 - 1)``) per tensor (per batch, in
  :func:`batches`), never thousands of floats:
  drawing is fast, and shrinking spends its effort on the batch size and the
  shapes, which are what hide these bugs. The same seed gives the same values
  on every run and every device (values are drawn on the CPU, then moved).
- **Validation is eager**: a bad argument raises
  :class:`hypothesis.errors.InvalidArgument` when the strategy is *built*
  (``min_value=3 is larger than max_value=2``), not at the first draw.
- **torch is imported lazily**: importing this module imports Hypothesis, not
  torch (nor numpy); torch is first imported when a tensor is drawn.

For reproducible CI runs, see :func:`register_profiles`.

The package: :mod:`.sizes` (batch sizes and shapes), :mod:`.values` (seeded
tensors), :mod:`.batch` (batches for a declared layout), :mod:`.profiles` (the
CI settings profile) and :mod:`.validate` (the eager argument checks).
"""

from __future__ import annotations

from .batch import Batch, batches
from .batch import Dim as Dim
from .batch import ShapeSpec as ShapeSpec
from .batch import named_dims as named_dims
from .profiles import CI_PROFILE, register_profiles
from .sizes import batch_sizes, shapes, target_shapes
from .values import make_tensor as make_tensor
from .values import tensors

# pytest_gradcheck.fuzz imports this older private name; it is named_dims.

# doctest.testmod(strategies) also runs the examples of the functions the submodules define.
__test__ = {
    f.__name__: f for f in (batch_sizes, shapes, target_shapes, tensors, batches, named_dims, register_profiles)
}

__all__ = [
    "Batch",
    "CI_PROFILE",
    "batch_sizes",
    "batches",
    "register_profiles",
    "shapes",
    "target_shapes",
    "tensors",
]
