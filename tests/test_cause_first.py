"""The first line of a failure names the cause and where (what pytest's short summary, JUnit and CI logs show).

``report.cause`` is a stable key decided once from the findings; ``report.location`` the user's
``path:line`` relative to pytest's rootdir; the float64 re-check that agrees with the working
table is one line, not a second table.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from realistic_models import CustomOpNet

from pytest_gradcheck import GradEquivError, assert_accumulation_equiv, assert_batch_independent, assert_gradequiv
from pytest_gradcheck.errors import BatchLeakError


def mlp(d: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 1))


def failure(*args: object, **kwargs: object) -> GradEquivError:
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(*args, **kwargs)  # type: ignore[arg-type]
    return info.value


def test_summed_loss_reads_sum_and_factor_first() -> None:
    err = failure(mlp(), lambda out, y: F.mse_loss(out, y, reduction="sum"), torch.randn(20, 3), torch.randn(20, 1))
    first, verdict = str(err).splitlines()[:2]
    assert first == "the batch gradient is the SUM of per-sample gradients, 20 times their mean (declared: mean)"
    assert verdict.startswith("Gradients are NOT equivalent:")
    assert err.report.cause == "reduction-factor" and err.report.location is None
    assert err.report.summary() == first


def test_broadcast_reads_op_shapes_and_path_first() -> None:
    x, y = torch.randn(8, 3), torch.randn(8)
    err = failure(mlp(), lambda out, t: (out - t).pow(2).mean(), x, y)  # <- the broadcast
    first = str(err).splitlines()[0]
    assert first.startswith("implicit broadcast in the loss at tests/test_cause_first.py:")
    assert first.endswith(": sub((8, 1), (8,)) -> (8, 8); did you mean t.unsqueeze(-1)?")
    assert err.report.cause == "broadcast"
    assert err.report.location is not None and err.report.location.startswith("tests/test_cause_first.py:")
    assert err.report.location in first


def test_a_parameter_scale_names_the_parameters_first() -> None:
    torch.manual_seed(0)
    err = failure(CustomOpNet(), F.mse_loss, torch.randn(8, 6), torch.randn(8, 1))
    first = str(err).splitlines()[0]
    assert first == "fc1.weight is B times the reference (B=8); every other parameter matches"
    assert err.report.cause == "parameter-scale"


def test_weights_stay_below_the_first_line() -> None:
    """A coupling loss: the least-squares weights are detail, not the first line."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(4, 3), torch.randn(4, 2)

    def coupled(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, t) + 0.5 * (out.mean(0) ** 2).sum()  # a batch statistic in the loss

    err = failure(model, coupled, x, y)
    first = str(err).splitlines()[0]
    assert err.report.cause in ("coupling", "weights", "not-combination")
    assert "[" not in first  # no weight vector in the first line
    assert first != str(err).splitlines()[1]


def test_the_same_float64_table_is_one_line() -> None:
    err = failure(mlp(), lambda out, y: F.mse_loss(out, y, reduction="sum"), torch.randn(8, 3), torch.randn(8, 1))
    text = str(err)
    assert "float64 re-check: the mismatch survives in float64 with the same errors (rtol=1e-07): a bug" in text
    assert text.count("max abs err") == 1  # one table


def test_accumulation_and_independence_lead_with_their_cause() -> None:
    model = mlp()
    with pytest.raises(GradEquivError) as info:
        assert_accumulation_equiv(
            model, lambda o, t: F.mse_loss(o, t, reduction="sum"), torch.randn(8, 3), torch.randn(8, 1), micro_batches=4
        )
    assert info.value.report.cause == "reduction-factor"
    assert str(info.value).splitlines()[0].startswith("the batch gradient is the SUM of micro-batch gradients")

    class Pool(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x - x.mean(0)

    with pytest.raises(BatchLeakError) as leak:
        assert_batch_independent(nn.Sequential(nn.Linear(3, 3), Pool()), torch.randn(4, 3))
    first = str(leak.value).splitlines()[0]
    assert first.startswith("output of sample 0 depends on input of sample 1")
    assert leak.value.report.cause is not None and leak.value.report.location is None


def test_short_summary_shows_the_cause_with_a_path_from_the_rootdir(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # the short summary line is cut at the terminal width
    pytester.mkdir("tests")
    pytester.path.joinpath("tests", "test_model.py").write_text(
        textwrap.dedent(
            """
            import torch, torch.nn as nn
            from pytest_gradcheck import assert_gradequiv

            def test_broadcast():
                torch.manual_seed(0)
                model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
                target = torch.randn(8)
                assert_gradequiv(model, lambda out, t: (out - t).pow(2).mean(), torch.randn(8, 3), target)
            """
        )
    )
    result = pytester.runpytest("-rf", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "FAILED tests/test_model.py::test_broadcast - *GradEquivError: implicit broadcast in the loss at "
            "tests/test_model.py:9: sub((8, 1), (8,)) -> (8, 8)*"
        ]
    )


def test_the_reference_reason_tells_a_requested_loop_from_a_fallback() -> None:
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    assert assert_gradequiv(mlp(), F.mse_loss, x, y).reference_reason is None  # vmap
    report = assert_gradequiv(mlp(), F.mse_loss, x, y, reference="loop")
    assert (report.reference_method, report.fallback_reason) == ("loop", None)
    assert report.reference_reason == "requested (reference='loop')"

    class Item(nn.Module):  # .item() in forward: vmap cannot run it
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * (1.0 if x.sum().item() > -1e9 else 0.0)

    fallback = assert_gradequiv(Item(), F.mse_loss, x, y)
    assert fallback.reference_method == "loop" and fallback.reference_reason is not None
    assert fallback.reference_reason.startswith("torch.func.vmap could not run the model: ")
