"""Checks that run in another thread count for the test that started them (issue 15, class 10).

A test marked ``gradequiv`` whose check runs in a ``threading.Thread`` or a
``ThreadPoolExecutor`` worker ran a check: it must not be failed as "ran no
gradient check", and the session summary counts that check. Each xdist worker
is its own process, so tests running side by side there do not mix.
"""

from __future__ import annotations

import textwrap

import pytest

HEADER = """
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pytest_gradcheck import GradEquivError, assert_gradequiv


def check(sum_bug=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    loss = (lambda o, t: ((o - t) ** 2).sum()) if sum_bug else F.mse_loss
    return assert_gradequiv(model, loss, x, y)
"""

BODY = """
@pytest.mark.gradequiv
def test_in_a_thread():
    out = []
    worker = threading.Thread(target=lambda: out.append(check()))
    worker.start()
    worker.join()
    assert out and out[0].passed


@pytest.mark.gradequiv
def test_in_a_thread_pool():
    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = list(pool.map(lambda _: check(), range(3)))
    assert all(r.passed for r in reports)


@pytest.mark.gradequiv
def test_fixture_in_a_thread_pool(gradequiv):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(gradequiv, model, F.mse_loss, x, y).result().passed


@pytest.mark.gradequiv
def test_failure_in_a_thread_pool_is_raised_by_result():
    with ThreadPoolExecutor(max_workers=1) as pool:
        with pytest.raises(GradEquivError):
            pool.submit(check, True).result()


@pytest.mark.gradequiv
def test_marked_but_checks_nothing():
    threading.Thread(target=lambda: None).start()
"""


@pytest.fixture(params=["in-process", "xdist"])
def run_mode(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "xdist":
        pytest.importorskip("xdist")
        return ["-n", "2"]
    return []


def test_checks_in_threads_count_for_their_test(pytester: pytest.Pytester, run_mode: list[str]) -> None:
    pytester.makepyfile(test_user=HEADER + textwrap.dedent(BODY))
    result = pytester.runpytest("-p", "no:cacheprovider", "-v", *run_mode)
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*test_marked_but_checks_nothing*marked gradequiv but ran no gradient check*"])
    assert "test_in_a_thread ran no" not in result.stdout.str()
    # 1 + 3 + 1 + 1 checks in 4 tests, one of them failed (inside pytest.raises)
    result.stdout.fnmatch_lines(["*6 gradient checks in 4 tests: 5 passed, 1 failed*"])


def test_a_check_in_a_thread_is_not_counted_for_a_later_test(pytester: pytest.Pytester) -> None:
    """The slot is per test: a check that ends before the next test starts is not counted there."""
    pytester.makepyfile(
        test_user=HEADER
        + textwrap.dedent(
            """
            def test_first():
                worker = threading.Thread(target=check)
                worker.start()
                worker.join()


            @pytest.mark.gradequiv
            def test_second_checks_nothing():
                pass
            """
        )
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_second_checks_nothing is marked gradequiv but ran no gradient check*"])


def test_recording_from_another_thread_reaches_the_open_scope() -> None:
    import threading
    import types

    from pytest_gradcheck._tracking import collecting, record

    report = types.SimpleNamespace(passed=True)  # the plugin's own scope around this test sees it too
    with collecting() as reports:
        worker = threading.Thread(target=record, args=(report,))
        worker.start()
        worker.join()
    assert reports == [report]
    record(report)  # after the scope closed: not in it
    assert reports == [report]
