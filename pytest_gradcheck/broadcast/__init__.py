"""Guard against implicit broadcasting that pairs samples, like ``(4, 1) - (4,) -> (4, 4)``.

The most common silent bug in a loss term is a shape mismatch between
predictions and targets that PyTorch happily broadcasts into a pairwise
matrix::

    out = model(x)                       # (4, 1)
    loss = (out - labels).pow(2).mean()  # labels is (4,): (4, 1) - (4,) -> (4, 4)

The package, one job per module:

- :mod:`.rule`: the rule, from shapes alone (is an op an implicit broadcast,
  does it pair samples), the :class:`BroadcastRecord` kept of a flagged op, and
  the names of the watched ops;
- :mod:`.frames`: whose code ran an op (the user's, an installed library's, or
  transparent machinery such as torch and the standard library) and where, and
  the record built there;
- :mod:`.suggest`: the operands' names in the source, and the fix to suggest;
- :mod:`.guard`: the guards (:class:`no_implicit_broadcast`,
  :func:`allow_broadcast`, :func:`recording`), their per-thread state, and what
  a flagged op or a finished check does to them;
- :mod:`.torch_mode`: the ``TorchFunctionMode`` that watches torch ops.

A record says whether the op was between the loss's inputs
(:attr:`BroadcastRecord.loss_inputs`): an elementwise loss's input and
target, or an op between a tensor computed from the model's parameters (a
prediction) and one that is not (a target). Only those get a "reshape the
target" suggestion (``labels.unsqueeze(-1)``, ``.view_as(...)``); a term
between predictions only, like in-batch pairs, is pointed at
:func:`allow_broadcast` instead.

Public entry points:

- :class:`no_implicit_broadcast`: context manager and decorator, with a
  ``mode`` of ``"error"`` (default), ``"warn"``, ``"record"`` or ``"off"``.
- :func:`allow_broadcast`: opt-out for intentional pairwise terms.
- :func:`recording`: what the gradient checks use around the loss call.
- :func:`is_implicit_broadcast`, :func:`pairs_samples`, :func:`broadcast_shape`,
  :func:`suggest_fix`, :func:`user_frame`, :func:`make_record`: pure-python
  helpers shared with the NumPy backend.

Importing this package imports neither torch nor numpy (only
:mod:`.torch_mode` does, when a guard that watches torch ops is entered).
"""

from __future__ import annotations

from ..errors import BroadcastError as BroadcastError
from ..errors import BroadcastWarning as BroadcastWarning
from .frames import LIBRARY as LIBRARY
from .frames import MACHINERY as MACHINERY
from .frames import USER as USER
from .frames import FrameKind as FrameKind
from .frames import frame_kind as frame_kind
from .frames import library_roots as library_roots
from .frames import make_record, user_frame
from .guard import CheckedReport as CheckedReport
from .guard import allow_broadcast, no_implicit_broadcast, recording, report_broadcast
from .guard import emit_after_check as emit_after_check
from .rule import MODES as MODES
from .rule import BroadcastRecord, broadcast_shape, is_implicit_broadcast, pairs_samples
from .rule import Shape as Shape
from .suggest import suggest_fix

# ``__all__`` is what ``import *`` gives, as before; the names imported ``as``
# themselves are shared with the other modules of pytest_gradcheck and tests.
__all__ = [
    "BroadcastRecord",
    "allow_broadcast",
    "broadcast_shape",
    "is_implicit_broadcast",
    "make_record",
    "no_implicit_broadcast",
    "pairs_samples",
    "recording",
    "report_broadcast",
    "suggest_fix",
    "user_frame",
]
