"""``torch.compile`` for the elementwise-heavy pure functions of a training step (shading, material decode, losses).

A training step at 800 px runs a few hundred small elementwise kernels over millions of pixels (normal bending,
the split-sum terms, the tonemapped loss); each reads and writes whole images. Compiled, the ones of a function
fuse into a few kernels, forward and backward, and the host launches far fewer. The functions stay plain torch:
`fused` wraps one and decides per call whether the compiled version runs.

Modes (`set_mode`, ``model.render.compile`` in the config, or the ``RECON_COMPILE`` environment variable):
  ``off``  never compile: the configuration's default. Measured at nvdiffrec's settings (nerf800, 5000 + 5000
           steps, one H200): compiling saves 3.3 ms per pass-1 step and 4 ms per pass-2 step, about 36 s, and costs
           more: 22 s at the pass switch alone, and in pass 1's first 20 steps 92 s against 7 s eager (the eager
           run found Triton's kernels cached, an estimated 10-20 s of the difference);
           with Inductor's cache warm the first 12 steps still took 48 s. Compiling pays off only for much longer
           runs;
  ``auto`` compile for CUDA tensors when Triton imports and gradients are on (the CPU stays eager: no C++
           compiler is assumed; no-grad calls, validation and the bake, stay eager instead of compiling again);
  ``on``   compile on any device.
A function whose compilation fails runs eagerly from then on, with one warning naming it; an error the eager
function raises as well is raised as it is. Shapes are dynamic (the covered-pixel count changes every step), so a
function compiles once per process; Inductor's on-disk cache shortens later processes' start but does not remove
it (the first 12 steps of nerf800 took 82 s on a fresh machine and 48 s with every cache warm).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Callable, TypeVar

import torch

from recon.optional import triton_importable

log = logging.getLogger(__name__)
MODES = ("auto", "on", "off")
F = TypeVar("F", bound=Callable)

_state = {"mode": os.environ.get("RECON_COMPILE", "off"), "backend": "inductor"}
_registry: list = []  # every fused function, to drop compiled versions when the mode changes


def mode_name(mode: str | bool) -> str:
    """``model.render.compile`` as one of MODES (True/False and 'true'/'false' mean on/off: YAML 1.1 reads an
    unquoted off as false); a ValueError naming the setting otherwise."""
    if isinstance(mode, bool):
        mode = "on" if mode else "off"
    mode = {"false": "off", "true": "on"}.get(str(mode).lower(), str(mode).lower())
    if mode not in MODES:
        raise ValueError(f"model.render.compile={mode!r}: use one of {', '.join(MODES)}.")
    return mode


def set_mode(mode: str | bool, backend: str = "inductor") -> None:
    """Select when `fused` functions run compiled: 'auto', 'on' or 'off' (see `mode_name`).

    backend: torch.compile's backend ('inductor' generates kernels; 'aot_eager' only traces, for tests)."""
    mode = mode_name(mode)
    if (mode, backend) != (_state["mode"], _state["backend"]):
        for f in _registry:
            f.reset()
    _state["mode"], _state["backend"] = mode, backend


def get_mode() -> str:
    return _state["mode"]


def _wants_compile(args, kwargs) -> bool:
    mode = _state["mode"]
    if mode == "off" or torch.compiler.is_compiling():
        return False
    if mode == "on":
        return True
    if not torch.is_grad_enabled():  # validation, the bake, evaluation: a few renders, not worth a no-grad compile
        return False
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    return first is not None and _compiles_on(first)


def _compiles_on(t: torch.Tensor) -> bool:
    return t.is_cuda and triton_importable()


class _Fused:
    """A function that runs through torch.compile when `_wants_compile` says so, eagerly otherwise."""

    def __init__(self, fn: Callable) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.reset()
        _registry.append(self)

    def reset(self) -> None:
        self.compiled, self.failed = None, False

    def __call__(self, *args, **kwargs):
        if self.failed or not _wants_compile(args, kwargs):
            return self.fn(*args, **kwargs)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True, backend=_state["backend"])
        try:
            return self.compiled(*args, **kwargs)
        except Exception as err:  # a compiler failure: the eager function decides whether the inputs were at fault
            out = self.fn(*args, **kwargs)
            self.failed = True
            log.warning("torch.compile failed for %s (%s: %s); it runs uncompiled from now on. Set "
                        "model.render.compile=off to skip compiling.", self.fn.__qualname__, type(err).__name__,
                        str(err).splitlines()[0] if str(err) else "")
            return out


def fused(fn: F) -> F:
    """Decorator: ``fn`` (plain torch, no data-dependent Python control flow on tensor values) runs compiled
    according to the mode (see the module docstring)."""
    return _Fused(fn)  # type: ignore[return-value]
