"""Shape fuzzing: ``@given(gst.batches(...))`` with the ``gradequiv`` fixture, and ``fuzz_gradequiv``."""

from __future__ import annotations

import doctest
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings
from torch import nn

from pytest_gradcheck import GradEquivError, InvalidArgument, fuzz, fuzz_gradequiv
from pytest_gradcheck import strategies as gst  # noqa: F401

# Imported above, not only inside the pytester runs: in-process runs restore
# sys.modules afterwards, and a Hypothesis imported anew in each run would not
# recognise the strategies built by the previous one.

# A user's test file: the XOR-style bug of seed 000, labels (b,) against outputs (b, 1).
USER_TESTS = """
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from pytest_gradcheck import strategies as gst

torch.manual_seed(0)
MODEL = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def buggy_loss(out, y):
    return (out - y).pow(2).mean()  # (b, 1) - (b,) broadcasts to (b, b)


def fixed_loss(out, y):
    return (out.squeeze(1) - y).pow(2).mean()


@pytest.mark.gradequiv
@settings(max_examples=10, deadline=None, database=None)
@given(batch=gst.batches(input_shape=(3,), target_shape=()))
def test_buggy(gradequiv, batch):
    gradequiv(MODEL, {loss}, batch.inputs, batch.targets)
"""


def outcome_lines(result: pytest.RunResult) -> list[str]:
    return [line for line in result.outlines if line.startswith(("E ", "Falsifying", "    batch="))]


def test_given_batches_fixed_loss_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(USER_TESTS.format(loss="fixed_loss"))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


@pytest.fixture
def restore_hypothesis_profile() -> Iterator[None]:
    """In-process pytester runs that load a profile must not leak it into this session."""
    name = settings.get_current_profile_name()
    yield
    settings.load_profile(name)


@pytest.mark.usefixtures("restore_hypothesis_profile")
def test_given_batches_shrinks_the_target_shape_bug_to_b2_reproducibly(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest("from pytest_gradcheck import strategies as gst\ngst.register_profiles()\n")
    pytester.makepyfile(USER_TESTS.format(loss="buggy_loss"))
    runs = []
    for _ in range(2):
        result = pytester.runpytest("--hypothesis-profile=gradequiv-ci", "-v", "--tb=short", "-p", "no:cacheprovider")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["*hypothesis profile 'gradequiv-ci'*", "*GradEquivError*", "*@reproduce_failure*"])
        # Hypothesis names the minimal example "Falsifying example" (before 6.16x) or
        # "Failing test case" (later releases): accept either heading.
        out = result.stdout.str()
        heading = re.search(r"(Falsifying example|Failing test case): test_buggy\(", out)
        assert heading, out
        falsifying = out[heading.end() :]
        assert re.search(r"batch_size=2\b", falsifying), falsifying
        runs.append(outcome_lines(result))
    assert runs[0] and runs[0] == runs[1]


# --------------------------------------------------------------------------- fuzz_gradequiv


def buggy_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).pow(2).mean()


def regression(features: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, 4), nn.Tanh(), nn.Linear(4, 1))


def test_fuzz_gradequiv_reports_the_smallest_failing_shapes() -> None:
    with pytest.raises(GradEquivError) as info:
        fuzz_gradequiv(regression, buggy_loss, input_shape=("features",), target_shape=(), max_examples=10)
    first, *rest = str(info.value).splitlines()
    assert first.startswith("implicit broadcast in the loss at tests/test_fuzz.py:")  # the cause first
    assert "smallest failing example: batch_size=2, features=1, input (2, 1), target (2,)" in rest[:3]
    assert "Gradients are NOT equivalent" in "\n".join(rest)
    assert info.value.report is not None


def test_fuzz_gradequiv_shrinks_the_free_dimensions() -> None:
    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # correct, except that from 3 features on one term sums over the batch
        extra = out[:, 2:].sum() if out.shape[1] >= 3 else out.new_zeros(())
        return F.mse_loss(out, y) + extra

    expected = r"^.*\n\nsmallest failing example: batch_size=2, features=3, input \(2, 3\), target \(2, 3\)\n"
    with pytest.raises(GradEquivError, match=expected):
        fuzz_gradequiv(
            lambda features: nn.Linear(features, features),
            loss,
            input_shape=("features",),
            target_shape=("features",),
            batch_size=(2, 16),
            max_examples=40,
        )


def test_fuzz_gradequiv_passes_correct_models() -> None:
    fuzz_gradequiv(regression, F.mse_loss, input_shape=("features",), target_shape=(1,), max_examples=5)
    # class-index targets, number of classes drawn and passed to the factory
    fuzz_gradequiv(
        lambda features, classes: nn.Linear(features, classes),
        F.cross_entropy,
        input_shape=("features",),
        target_shape=(),
        num_classes="classes",
        max_examples=5,
    )
    # several inputs; a factory that takes no dimension; an int seed
    fuzz_gradequiv(
        lambda: Pair(),
        F.mse_loss,
        input_shape=((3,), (2,)),
        target_shape=(1,),
        max_examples=5,
        seed=7,
    )


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 1), nn.Linear(2, 1)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(z)


def test_fuzz_gradequiv_is_deterministic_and_leaves_the_rng() -> None:
    state = torch.random.get_rng_state()
    messages = []
    for seed in (None, None, 3):
        with pytest.raises(GradEquivError) as info:
            fuzz_gradequiv(
                regression, buggy_loss, input_shape=("features",), target_shape=(), max_examples=10, seed=seed
            )
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert messages[2].splitlines()[2].startswith("smallest failing example: batch_size=2,")
    assert torch.equal(state, torch.random.get_rng_state())


def test_fuzz_gradequiv_passes_options_to_check() -> None:
    calls: list[dict[str, Any]] = []

    def check(model: nn.Module, loss_fn: Any, inputs: Any, targets: Any, **options: Any) -> None:
        calls.append({"shape": tuple(inputs.shape), **options})

    fuzz_gradequiv(
        lambda: nn.Linear(3, 1),
        F.mse_loss,
        input_shape=(3,),
        target_shape=(1,),
        batch_size=5,
        max_examples=3,
        check=check,
        rtol=1e-3,
        reduction="sum",
    )
    assert calls and all(c == {"shape": (5, 3), "reduction": "sum", "rtol": 1e-3} for c in calls)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"make_model": lambda hidden: nn.Linear(3, 1)}, "make_model requires 'hidden'"),
        ({"make_model": nn.Linear(3, 1), "input_shape": ("features",)}, "pass a factory such as `lambda features"),
        ({"max_examples": 0}, "max_examples=0 must be an int >= 1"),
        ({"batch_size": (4, 3)}, "batch_size=(4, 3): min_value=4 is larger than max_value=3"),
        ({"seed": "x"}, "seed='x' must be an int"),
    ],
)
def test_fuzz_gradequiv_rejects_bad_arguments_before_running(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {
        "make_model": regression,
        "loss_fn": F.mse_loss,
        "input_shape": ("features",),
        "target_shape": (1,),
    }
    args.update(kwargs)
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        fuzz_gradequiv(**args)


def test_fuzz_gradequiv_prefixes_invalid_argument_with_the_example() -> None:
    def bad_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out - y.unsqueeze(1)).pow(2)  # not a scalar

    with pytest.raises(InvalidArgument, match=r"^smallest failing example: batch_size=2, input \(2, 3\)"):
        fuzz_gradequiv(nn.Linear(3, 1), bad_loss, input_shape=(3,), target_shape=(), max_examples=3)


def test_docstring_examples() -> None:
    failures, tried = doctest.testmod(fuzz)
    assert tried > 0 and failures == 0
