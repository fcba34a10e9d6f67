"""Shared test configuration.

torch and numpy are imported here, in the outer test session, so that
pytester's in-process runs (which snapshot and restore ``sys.modules``) keep
them: a C extension like torch cannot be imported a second time in a process.
The start-up tests that prove the plugin does not import torch run pytest in a
subprocess instead.
"""

import numpy  # noqa: F401
import torch  # noqa: F401
