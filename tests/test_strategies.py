"""Tests of ``pytest_gradcheck.strategies`` (imported as ``gst``)."""

from __future__ import annotations

import doctest
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument, NoSuchExample

from pytest_gradcheck import strategies as gst

FAST = settings(
    max_examples=25,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def minimal(strategy: st.SearchStrategy[Any], condition: Callable[[Any], bool] = lambda x: True) -> Any:
    """The example Hypothesis shrinks to, deterministically."""
    no_explain = [phase for phase in Phase if phase is not Phase.explain]
    return find(strategy, condition, settings=settings(database=None, derandomize=True, phases=no_explain))


# --------------------------------------------------------------------------- #
# batch_sizes
# --------------------------------------------------------------------------- #


@FAST
@given(gst.batch_sizes())
def test_batch_sizes_default_never_one(b: int) -> None:
    assert 2 <= b <= 64


@FAST
@given(gst.batch_sizes(min_value=3, max_value=5))
def test_batch_sizes_respect_bounds(b: int) -> None:
    assert 3 <= b <= 5


def test_batch_sizes_shrink_to_two_and_one_only_when_asked() -> None:
    assert minimal(gst.batch_sizes()) == 2
    assert minimal(gst.batch_sizes(min_value=1)) == 1


# --------------------------------------------------------------------------- #
# shapes
# --------------------------------------------------------------------------- #


@FAST
@given(gst.shapes(min_dims=2, max_dims=4, min_side=2, max_side=5))
def test_shapes_respect_bounds(shape: tuple[int, ...]) -> None:
    assert isinstance(shape, tuple)
    assert 2 <= len(shape) <= 4
    assert all(2 <= side <= 5 for side in shape)


def test_shapes_shrink_to_fewest_dims_and_side_one() -> None:
    assert minimal(gst.shapes()) == (1,)
    assert minimal(gst.shapes(), lambda s: len(s) >= 2) == (1, 1)
    assert minimal(gst.shapes(min_dims=0)) == ()


# --------------------------------------------------------------------------- #
# tensors
# --------------------------------------------------------------------------- #


@FAST
@given(gst.tensors(gst.shapes(max_dims=3, max_side=6)))
def test_float_tensors_are_finite_with_drawn_shape(t: torch.Tensor) -> None:
    assert t.dtype == torch.float32
    assert 1 <= t.ndim <= 3
    assert torch.isfinite(t).all()
    assert not t.requires_grad


@FAST
@given(gst.tensors((4, 3), dtype="float16", min_value=-2.5, max_value=7.0))
def test_bounded_float_tensors(t: torch.Tensor) -> None:
    assert t.shape == (4, 3) and t.dtype == torch.float16
    assert torch.isfinite(t).all()
    assert ((t >= -2.5) & (t <= 7.0)).all()


@FAST
@given(gst.tensors((50,), dtype=torch.int64, min_value=0, max_value=2))
def test_integer_tensors_are_inclusive_class_indices(t: torch.Tensor) -> None:
    assert t.dtype == torch.int64
    assert ((t >= 0) & (t <= 2)).all()


@FAST
@given(gst.tensors((3,), dtype="bool"), gst.tensors((2, 2), dtype="float64", requires_grad=True))
def test_bool_and_requires_grad(mask: torch.Tensor, leaf: torch.Tensor) -> None:
    assert mask.dtype == torch.bool
    assert leaf.dtype == torch.float64 and leaf.requires_grad and leaf.is_leaf


def test_values_come_from_the_seeded_torch_generator() -> None:
    # The minimal example has seed 0: the values are torch's for seed 0.
    t = minimal(gst.tensors((3, 2)))
    expected = torch.randn((3, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(t, expected.float())


def test_same_seed_same_tensor() -> None:
    first = minimal(gst.tensors((5,)), lambda t: bool(t[0] > 1.0))
    second = minimal(gst.tensors((5,)), lambda t: bool(t[0] > 1.0))
    assert torch.equal(first, second)
    a = gst.make_tensor((4, 4), 1234, "float32", None, None, "cpu", False)
    b = gst.make_tensor((4, 4), 1234, "float32", None, None, "cpu", False)
    c = gst.make_tensor((4, 4), 1235, "float32", None, None, "cpu", False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tensors_shrink_on_shape() -> None:
    t = minimal(gst.tensors(gst.shapes(max_dims=3)), lambda t: t.ndim >= 2)
    assert tuple(t.shape) == (1, 1)


# --------------------------------------------------------------------------- #
# eager validation
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: gst.batch_sizes(min_value=3, max_value=2), "min_value=3 is larger than max_value=2"),
        (lambda: gst.batch_sizes(min_value=0), "min_value=0 must be at least 1"),
        (lambda: gst.batch_sizes(min_value=2.5), "min_value=2.5 must be an int"),
        (lambda: gst.shapes(min_dims=3, max_dims=2), "min_dims=3 is larger than max_dims=2"),
        (lambda: gst.shapes(min_side=5, max_side=4), "min_side=5 is larger than max_side=4"),
        (lambda: gst.shapes(max_dims=33), "max_dims=33 is larger than 32"),
        (lambda: gst.tensors((2,), dtype="complex64"), "dtype='complex64' is not supported"),
        (lambda: gst.tensors((2, -1)), r"shape=\(2, -1\) must be a tuple of ints >= 0"),
        (lambda: gst.tensors((2,), min_value=1.0), "give both bounds"),
        (
            lambda: gst.tensors((2,), min_value=1.0, max_value=0.0),
            "min_value=1.0 is larger than max_value=0.0",
        ),
        (lambda: gst.tensors((2,), max_value=math.inf, min_value=0.0), "max_value=inf must be finite"),
        (
            lambda: gst.tensors((2,), dtype="float16", min_value=0.0, max_value=1e6),
            "not finite in dtype='float16'",
        ),
        (lambda: gst.tensors((2,), dtype="int64"), "needs max_value="),
        (lambda: gst.tensors((2,), dtype="uint8", max_value=300), "do not fit in dtype='uint8'"),
        (
            lambda: gst.tensors((2,), dtype="int64", max_value=3, requires_grad=True),
            "requires_grad=True needs a floating dtype",
        ),
        (lambda: gst.target_shapes(()), "must have a batch dimension first"),
        (lambda: gst.batches(input_shape=(3, 1.5)), "1.5 is not a dimension"),
        (lambda: gst.batches(input_shape=(3,), batch_size=0), "batch_size=0 must be at least 1"),
        (lambda: gst.batches(input_shape=(3,), batch_size=(5, 4)), "min_value=5 is larger than max_value=4"),
        (lambda: gst.batches(input_shape=(3,), num_classes=3), "num_classes=3 needs a target_shape"),
        (lambda: gst.batches(input_shape=(3,), dtype="int64"), "batches\\(\\) draws float inputs"),
        (
            lambda: gst.batches(input_shape=(3,), target_shape=(), num_classes=3, target_dtype="float32"),
            "target_dtype='float32' must be an integer dtype",
        ),
        (lambda: gst.batches(input_shape=(3,), target_shape=(), target_dtype="int64"), "give num_classes="),
        (lambda: gst.batches(input_shape=("f",), dims={"g": 2}), "names 'g', which no shape"),
        (lambda: gst.batches(input_shape=("f",), dims={"f": -1}), r"dims\['f'\]=-1 must be at least 0"),
        (
            lambda: gst.batches(input_shape=(3,), target_shape=(), num_classes="c", max_side=1),
            "at least 2 classes, but max_side=1",
        ),
    ],
)
def test_eager_validation_names_the_parameters(build: Callable[[], object], message: str) -> None:
    # Raised when the strategy is built, before anything is drawn.
    with pytest.raises(InvalidArgument, match=message):
        build()


# --------------------------------------------------------------------------- #
# batches
# --------------------------------------------------------------------------- #


@FAST
@given(
    gst.batches(
        input_shape=("features", None),
        target_shape=("features",),
        batch_size=gst.batch_sizes(max_value=9),
        max_side=5,
    )
)
def test_batches_share_batch_size_and_named_dims(batch: gst.Batch) -> None:
    inputs, targets, b, dims = batch
    assert b == batch.batch_size and 2 <= b <= 9
    features = dims["features"]
    assert set(dims) == {"features"} and 1 <= features <= 5
    assert inputs.shape[:2] == (b, features) and inputs.ndim == 3
    assert 1 <= inputs.shape[2] <= 5
    assert targets.shape == (b, features)
    assert inputs.dtype == targets.dtype == torch.float32
    assert not torch.equal(inputs[:, :, 0], targets)  # inputs and targets have their own values


@FAST
@given(gst.batches(input_shape=(4,), target_shape=(), num_classes="classes", dims={"classes": st.integers(3, 6)}))
def test_batches_class_index_targets(batch: gst.Batch) -> None:
    classes = batch.dims["classes"]
    assert 3 <= classes <= 6
    assert batch.targets.dtype == torch.int64 and batch.targets.shape == (batch.batch_size,)
    assert ((batch.targets >= 0) & (batch.targets < classes)).all()


@FAST
@given(gst.batches(input_shape=((3,), ("tokens", 2)), target_shape=(1,), batch_size=4, dims={"tokens": 7}))
def test_batches_several_inputs_and_fixed_sizes(batch: gst.Batch) -> None:
    first, second = batch.inputs
    assert first.shape == (4, 3) and second.shape == (4, 7, 2)
    assert batch.targets.shape == (4, 1)
    assert batch.dims == {"tokens": 7}


def test_batches_without_targets_and_shrinking() -> None:
    batch = minimal(gst.batches(input_shape=("features",)), lambda b: b.dims["features"] >= 3)
    assert batch.targets is None
    assert batch.batch_size == 2 and tuple(batch.inputs.shape) == (2, 3)
    classes = minimal(gst.batches(input_shape=(2,), target_shape=(), num_classes="c"))
    assert classes.dims == {"c": 2}  # named num_classes dims start at 2 classes


# --------------------------------------------------------------------------- #
# target_shapes
# --------------------------------------------------------------------------- #


def all_in_shrink_order(strategy: st.SearchStrategy[tuple[int, ...]]) -> list[tuple[int, ...]]:
    seen: list[tuple[int, ...]] = []
    while True:
        try:
            seen.append(minimal(strategy, lambda s: s not in seen))
        except NoSuchExample:
            return seen


@pytest.mark.parametrize(
    ("output_shape", "expected"),
    [
        ((4, 1), [(4, 1), (4,), (4, 1, 1)]),
        ((4, 3), [(4, 3), (4,), (4, 3, 1), (4, 1)]),
        ((4,), [(4,), (4, 1), (4, 1, 1)]),
        ((2, 5, 3), [(2, 5, 3), (2,), (2, 5), (2, 5, 3, 1), (2, 1), (2, 5, 1)]),
    ],
)
def test_target_shapes_contents(output_shape: tuple[int, ...], expected: list[tuple[int, ...]]) -> None:
    assert all_in_shrink_order(gst.target_shapes(output_shape)) == expected


# --------------------------------------------------------------------------- #
# import cost, profile, doctests
# --------------------------------------------------------------------------- #


def test_importing_strategies_does_not_import_torch() -> None:
    code = (
        "import sys; import pytest_gradcheck.strategies as gst; "
        "s = gst.batches(input_shape=('f',), target_shape=()); "
        "print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_register_profiles() -> None:
    gst.register_profiles()
    gst.register_profiles()  # idempotent
    profile = settings.get_profile(gst.CI_PROFILE)
    assert profile.derandomize is True
    assert profile.deadline is None
    assert profile.database is None
    assert profile.print_blob is True
    assert Phase.explain not in profile.phases and Phase.shrink in profile.phases


@pytest.fixture
def restore_hypothesis_profile() -> Iterator[None]:
    """In-process pytester runs that load a profile must not leak it into this session."""
    name = settings.get_current_profile_name()
    yield
    settings.load_profile(name)


@pytest.mark.usefixtures("restore_hypothesis_profile")
def test_ci_profile_from_conftest_makes_runs_reproducible(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        from pytest_gradcheck import strategies as gst
        gst.register_profiles()
        """
    )
    pytester.makepyfile(
        """
        from hypothesis import given
        from pytest_gradcheck import strategies as gst

        @given(gst.batches(input_shape=("features",), target_shape=()))
        def test_sizes(batch):
            print("DRAWN", batch.batch_size, batch.dims["features"], float(batch.inputs.sum()))
        """
    )
    runs = []
    for _ in range(2):
        result = pytester.runpytest("--hypothesis-profile=gradequiv-ci", "-v", "-s", "-p", "no:cacheprovider")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["*hypothesis profile 'gradequiv-ci'*"])
        runs.append([line for line in result.outlines if line.startswith("DRAWN")])
    assert runs[0] == runs[1] and len(runs[0]) > 5


def test_docstring_examples() -> None:
    failures, tried = doctest.testmod(gst, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0
