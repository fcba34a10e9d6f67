"""The Hypothesis settings profile for reproducible CI runs: :func:`register_profiles`."""

from __future__ import annotations

__all__ = ["CI_PROFILE", "register_profiles"]

#: Name of the Hypothesis settings profile that :func:`register_profiles` registers.
CI_PROFILE = "gradequiv-ci"


def register_profiles() -> None:
    """Register the ``"gradequiv-ci"`` Hypothesis settings profile.

    The profile is ``derandomize=True`` (the same examples on every run, so a
    CI failure reproduces locally), ``deadline=None`` (a model's first call is
    slow, and timing is not what is tested), ``database=None`` (no
    ``.hypothesis/`` directory written by CI), ``print_blob=True`` (a
    failure prints the ``@reproduce_failure`` line), and every phase but
    ``Phase.explain``: after a failure, explaining re-runs the failing check
    about a hundred times, which for a gradient check costs far more than the
    search itself (tens of seconds) and adds little to the gradient report.
    pytest-gradcheck never loads a profile itself; call this in
    ``conftest.py`` and choose it::

        # conftest.py
        from pytest_gradcheck import strategies as gst
        gst.register_profiles()

        $ pytest --hypothesis-profile=gradequiv-ci

    or ``settings.load_profile(gst.CI_PROFILE)`` in the same ``conftest.py``,
    e.g. when ``os.environ.get("CI")`` is set. Calling it again is harmless.

    >>> from hypothesis import settings
    >>> register_profiles()
    >>> settings.get_profile(CI_PROFILE).derandomize
    True
    """
    from hypothesis import Phase, settings

    settings.register_profile(
        CI_PROFILE,
        derandomize=True,
        deadline=None,
        database=None,
        print_blob=True,
        phases=tuple(phase for phase in Phase if phase is not Phase.explain),
    )
