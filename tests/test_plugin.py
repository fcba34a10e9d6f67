"""The pytest surface, as a user runs it: real pytest runs of real test files (pytester)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

MODELS = """
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)


def mlp():
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def sum_mse(out, y):
    return ((out - y) ** 2).sum()
"""


def write_tests(pytester: pytest.Pytester, body: str, name: str = "test_user") -> None:
    pytester.makepyfile(**{name: MODELS + textwrap.dedent(body)})


def test_marker_fixture_and_tuple_inputs_pass_with_strict_markers(pytester: pytest.Pytester) -> None:
    write_tests(
        pytester,
        """
        class Two(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(3, 1), nn.Linear(2, 1)

            def forward(self, u, v):
                return self.a(u) + self.b(v)

        @pytest.mark.gradequiv(rtol=1e-4)
        def test_marked(gradequiv):
            report = gradequiv(Two(), F.mse_loss, (torch.randn(6, 3), torch.randn(6, 2)), torch.randn(6, 1))
            assert report.passed and report.working.rtol == 1e-4

        def test_direct():
            from pytest_gradcheck import assert_gradequiv
            assert assert_gradequiv(mlp(), sum_mse, torch.randn(5, 3), torch.randn(5, 1), reduction="auto").matched == "sum"
        """,
    )
    result = pytester.runpytest("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_failure_report_is_the_assertion_message(pytester: pytest.Pytester) -> None:
    write_tests(
        pytester,
        """
        @pytest.mark.gradequiv
        def test_xor_labels(gradequiv):
            x = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.float32)
            labels = torch.tensor([0, 1, 1, 0], dtype=torch.float32)
            net = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1))

            def loss(outputs, labels):
                return (outputs - labels).pow(2).mean()

            gradequiv(net, loss, x, labels)
        """,
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*GradEquivError: implicit broadcast in the loss at test_user.py:*: sub((4, 1), (4,)) -> (4, 4);*",
            "*Gradients are NOT equivalent: the batch gradient is not the mean of per-sample gradients*",
            "*Reduction checked: mean*would have matched: neither mean nor sum*",
            "*Cause: implicit broadcast in the loss at test_user.py:*",
            "*sub((4, 1), (4,)) -> (4, 4): both operands were expanded*",
            "*What to do:*",
        ]
    )
    # pytest shows the user's frame, not the engine's internals
    assert "verdict.py" not in result.stdout.str()


def test_sum_bug_report_names_the_factor(pytester: pytest.Pytester) -> None:
    write_tests(
        pytester,
        """
        def test_sum(gradequiv):
            gradequiv(mlp(), sum_mse, torch.randn(20, 3), torch.randn(20, 1))
        """,
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the batch gradient is the SUM of per-sample gradients*B=20 times the mean*"])


def test_marked_test_that_checks_nothing_fails(pytester: pytest.Pytester) -> None:
    write_tests(
        pytester,
        """
        @pytest.mark.gradequiv
        def test_forgot(gradequiv):
            model = mlp()

        def test_unmarked_without_check_is_fine():
            pass
        """,
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*test_forgot is marked gradequiv but ran no gradient check*"])


def test_works_under_hypothesis_given_without_health_check(pytester: pytest.Pytester) -> None:
    write_tests(
        pytester,
        """
        from hypothesis import given, settings, strategies as st

        @pytest.mark.gradequiv
        @settings(max_examples=5, deadline=None, database=None)
        @given(b=st.integers(2, 8))
        def test_given(gradequiv, b):
            gradequiv(mlp(), F.mse_loss, torch.randn(b, 3), torch.randn(b, 1))
        """,
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "FailedHealthCheck" not in result.stdout.str()


def test_verbose_summary_and_header(pytester: pytest.Pytester) -> None:
    write_tests(
        pytester,
        """
        def test_a(gradequiv):
            gradequiv(mlp(), F.mse_loss, torch.randn(4, 3), torch.randn(4, 1))
            gradequiv(mlp(), sum_mse, torch.randn(4, 3), torch.randn(4, 1), reduction="sum")
        """,
    )
    result = pytester.runpytest("-v", "--gradequiv-broadcast=warn", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "gradcheck: rtol=by dtype, atol=0, rtol_float64=1e-07, atol_float64=0, broadcast=warn, chunk_size=the whole batch",
            "*gradequiv*",
            "2 gradient checks in 1 test: 2 passed, 0 failed, 0 passed only after the float64 re-check",
        ]
    )


def test_broadcast_option_error_fails_a_passing_check(pytester: pytest.Pytester) -> None:
    write_tests(
        pytester,
        """
        def loss(out, y):
            return ((out - y) * torch.ones(1, len(y))).pow(2).mean()

        def test_bc(gradequiv):
            gradequiv(mlp(), loss, torch.randn(4, 3), torch.randn(4, 1))
        """,
    )
    result = pytester.runpytest("--gradequiv-broadcast=error", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*BroadcastError: implicit broadcast in the loss (broadcast='error')*",
            "*test_user.py:*: mul((4, 1), (1, 4)) -> (4, 4)*",
        ]
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "error::pytest_gradcheck.BroadcastWarning")
    result.assert_outcomes(failed=1)


def test_xdist(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    write_tests(
        pytester,
        """
        @pytest.mark.parametrize("b", [2, 3, 4, 5])
        def test_many(gradequiv, b):
            gradequiv(mlp(), F.mse_loss, torch.randn(b, 3), torch.randn(b, 1))

        def test_sum_bug(gradequiv):
            gradequiv(mlp(), sum_mse, torch.randn(6, 3), torch.randn(6, 1))
        """,
    )
    result = pytester.runpytest_subprocess("-n", "2", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(
        ["*SUM of per-sample gradients*", "5 gradient checks in 5 tests: 4 passed, 1 failed, *"]
    )


def test_startup_imports_neither_torch_nor_numpy(pytester: pytest.Pytester) -> None:
    """Like Hypothesis's own test: a project that does not use the plugin pays nothing."""
    pytester.makepyfile(
        test_plain="""
        import sys

        def test_no_heavy_imports():
            assert "torch" not in sys.modules
            assert "numpy" not in sys.modules
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=1)


def test_entry_point_module_does_not_import_torch() -> None:
    code = (
        "import importlib.metadata as m, sys\n"
        "[e.load() for e in m.entry_points(group='pytest11') if 'gradcheck' in e.value]\n"
        "import pytest_gradcheck\n"
        "from pytest_gradcheck import GradEquivError, InvalidArgument\n"
        "print('torch' in sys.modules, 'numpy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_fixture_methods_for_the_other_checks(pytester: pytest.Pytester) -> None:
    write_tests(
        pytester,
        """
        import numpy as np

        @pytest.mark.gradequiv(rtol=1e-3)
        def test_accumulation(gradequiv):
            report = gradequiv.accumulation(mlp(), F.mse_loss, torch.randn(8, 3), torch.randn(8, 1), micro_batches=4)
            assert report.passed and report.working.rtol == 1e-3

        @pytest.mark.gradequiv
        def test_independent(gradequiv):
            gradequiv.independent(mlp(), torch.randn(5, 3))

        @pytest.mark.gradequiv
        def test_step(gradequiv):
            gradequiv.step(lambda m, b: F.mse_loss(m(b["x"]), b["y"]), mlp(), {"x": torch.randn(4, 3), "y": torch.randn(4, 1)})

        @pytest.mark.gradequiv
        def test_numpy(gradequiv):
            w = np.ones((3, 1))
            def grad_fn(params, x, y):
                return {"w": x.T @ (x @ params["w"] - y) / len(x)}
            gradequiv.numpy(grad_fn, {"w": w}, np.random.rand(6, 3), np.random.rand(6, 1))

        @pytest.mark.gradequiv
        def test_leak_is_caught(gradequiv):
            class Leak(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.fc = nn.Linear(3, 1)
                def forward(self, x):
                    return self.fc(x.roll(1, dims=0))
            gradequiv.independent(Leak(), torch.randn(4, 3))
        """,
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*output of sample * depends on input of sample *"])
