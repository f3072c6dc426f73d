"""Python's cyclic garbage collector during start-up: `pause` it while the imports and the fit's set-up build their
long-lived objects, `resume` it once the first training step is done.

Start-up builds about 430k objects that live as long as the process (modules, classes, functions: torch, Lightning,
Hydra, Triton). With the collector on, each time the objects surviving earlier collections grow by a quarter it
traverses them all again: seven full collections before the first step of a small fit on two CPU cores, 0.97 s
together, each longer than the last (29 to 319 ms). Paused, nothing is traversed; `resume` moves everything alive
to the permanent generation (``gc.freeze``: later collections skip it) and switches collection back on. Collecting
once before freezing would cost one more full traversal (0.48 s there) to free start-up's cyclic garbage: 32.6k
small objects (dicts, tuples, closures; no arrays, no tensors), which stay allocated instead. At exit the frozen
objects are handed back (``gc.unfreeze``), so that the interpreter's final collection sees them as it would have
(extension modules such as Triton's report the objects still alive at shutdown as leaks). A process forked while
collection is paused (DataLoader workers with ``data.num_workers`` > 0) resumes it at once. Plain Python: no torch
here.
"""
from __future__ import annotations

import atexit
import gc
import os

_paused = False
_fork_hook = False


def pause() -> None:
    """Switch automatic collection off until `resume` (nothing if it is already off: the caller's choice stands)."""
    global _paused, _fork_hook
    if gc.isenabled():
        gc.disable()
        _paused = True
        if not _fork_hook and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=resume)  # a forked worker collects its own garbage
            _fork_hook = True


def paused() -> bool:
    """Whether `pause` switched collection off and `resume` has not yet switched it back on."""
    return _paused


def resume() -> None:
    """Freeze every object alive and switch automatic collection back on; nothing unless `pause` paused it. Safe to
    call any number of times."""
    global _paused
    if not _paused:
        return
    _paused = False
    gc.freeze()
    gc.enable()
    atexit.register(gc.unfreeze)
