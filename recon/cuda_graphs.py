"""CUDA graphs for the fixed-shape parts of a training step: one launch replays a function's forward, one its backward.

A training step at nvdiffrec's settings launches a few hundred kernels, and in pass 2 (a fixed mesh) the host takes
longer to launch them than the GPU to run them. Some parts keep every shape from step to step: the light's mip
chain (the cube map's size never changes), pass 2's mesh (vertex normals, tangents; fixed topology) and pass 2's
shading after the rasterization (a fixed number of shaded rows, `recon.render.graphed`). Captured once
with `torch.cuda.make_graphed_callables`, each becomes one graph replay forward and one backward, so the host
issues two launches where it issued dozens of operations and their autograd nodes. Values and gradients are those
of the function run eagerly (tests/test_cuda_graphs_gpu.py).

`GraphCache.call(name, fn, *tensors)` runs ``fn(*tensors)`` (a pure function of its tensor arguments returning a
tuple of tensors) through its graphs when all of this holds, eagerly otherwise:
  - graphs are on (`set_enabled`, ``model.render.cuda_graphs`` in the config; the default);
  - every argument is a CUDA tensor, gradients are on and one of them requires grad (training; validation and
    exports run eagerly, and a function recomputed once needs no graph);
  - no other capture is in progress.
A change of any argument's shape, dtype, device or requires_grad captures again. An argument at a new address is
copied into the captured one before each replay, so arguments should be tensors that persist (parameters and
buffers: no copy). The outputs are the graph's own buffers, overwritten by the next replay: use them within the step.
A capture that fails (an operation that synchronizes with the host cannot be captured) logs one warning naming the
function, which runs eagerly from then on. Plain torch: no Lightning here.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)
_state = {"enabled": True}


def set_enabled(enabled: bool) -> None:
    """Turn the graphs of every `GraphCache` on or off (``model.render.cuda_graphs``)."""
    _state["enabled"] = bool(enabled)


def enabled() -> bool:
    return _state["enabled"]


def applies(args: tuple[Tensor, ...]) -> bool:
    """Whether `GraphCache.call` would replay graphs for these arguments now (see the module's conditions)."""
    if not _state["enabled"] or not torch.is_grad_enabled() or not args:
        return False
    if not all(isinstance(a, Tensor) and a.is_cuda for a in args) or not any(a.requires_grad for a in args):
        return False
    return not torch.cuda.is_current_stream_capturing()


class _Graphed:
    """One function's captured forward and backward, for one signature of its arguments."""

    def __init__(self, name: str):
        self.name = name
        self.key = None
        self.graphed = None
        self.failed = False
        self.captures = 0  # how many times the function was captured (tests)

    def __call__(self, fn: Callable[..., tuple[Tensor, ...]], *args: Tensor) -> tuple[Tensor, ...]:
        """Replays the graphs of ``fn``, capturing ``fn`` first when the arguments' signature is new."""
        key = tuple((tuple(a.shape), a.dtype, a.device, a.requires_grad) for a in args)
        if key != self.key:
            # captured on detached copies of the arguments (the same memory): the captured backward ends at the
            # arguments, and autograd carries each argument's gradient on through its own history at every replay
            # (an argument computed from another, e.g. rasterizer outputs and the positions, is not differentiated
            # twice, and the capture's warm-up does not consume the history of the step that captures)
            samples = tuple(a.detach().requires_grad_(a.requires_grad) for a in args)
            try:
                self.graphed = torch.cuda.make_graphed_callables(fn, samples, allow_unused_input=True)
            except Exception as err:  # noqa: BLE001 (any failure to capture: run eagerly, as before graphs)
                self.failed = True
                self.graphed = None
                log.warning("CUDA graph capture of %s failed (%s: %s); it runs without graphs from now on.",
                            self.name, type(err).__name__, err)
                return fn(*args)
            self.key = key
            self.captures += 1
        return self.graphed(*args)


class GraphCache:
    """A module's graphed functions, by name. Copies and pickles start empty (graphs belong to one process and
    device; they are captured again on first use)."""

    def __init__(self) -> None:
        self._graphs: dict[str, _Graphed] = {}

    def __deepcopy__(self, memo) -> GraphCache:
        return GraphCache()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def call(self, name: str, fn: Callable[..., tuple[Tensor, ...]], *args: Tensor) -> tuple[Tensor, ...]:
        """``fn(*args)``, through CUDA graphs where `applies`. The graphs replay the ``fn`` of the call that captured
        them: a function whose work depends on anything but its arguments' values and signature must not be graphed."""
        graph = self._graphs.get(name)
        if (graph is not None and graph.failed) or not applies(args):
            return tuple(fn(*args))
        if graph is None:
            graph = self._graphs[name] = _Graphed(name)
        return tuple(graph(fn, *args))

    def failed(self, name: str) -> bool:
        """Whether capturing ``name`` failed (it runs eagerly from then on)."""
        graph = self._graphs.get(name)
        return graph is not None and graph.failed

    def drop(self, name: str) -> None:
        """Forget ``name``'s graphs (and free their memory once nothing else holds it)."""
        self._graphs.pop(name, None)

    def captures(self, name: str) -> int:
        """How many times ``name`` was captured (0: it never ran through graphs)."""
        graph = self._graphs.get(name)
        return 0 if graph is None else graph.captures
