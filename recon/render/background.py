"""Random training backgrounds that depend on the view, not on the process that renders it."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def view_noise(frame_index: Tensor | list[int], step: int, height: int, width: int, seed: int, device=None) -> Tensor:
    """Per-pixel uniform noise [B,H,W,3] in [0,1), float32: each view's from (seed, step, frame index) alone.

    nvdiffrec composites training views over random noise so that the background cannot be fitted. Drawing it
    view by view from its own generator makes view ``i`` at step ``s`` get the same noise however the global
    batch is split over processes (identical on one device type; CPU and CUDA generators differ).
    frame_index: [B] int, the views' indices in the training split (a list of ints avoids reading a device tensor).
    """
    if device is None and not torch.is_tensor(frame_index):
        raise ValueError("view_noise needs device= when frame_index is a list of ints.")
    device = torch.device(device) if device is not None else frame_index.device
    indices = frame_index.tolist() if torch.is_tensor(frame_index) else [int(i) for i in frame_index]
    out = torch.empty(len(indices), height, width, 3, device=device)
    g = torch.Generator(device=device)
    for b, index in enumerate(indices):
        # SeedSequence mixes the three numbers into a well-spread 64-bit seed (no collisions between nearby triples)
        g.manual_seed(int(np.random.SeedSequence([int(seed), int(step), int(index)]).generate_state(1, np.uint64)[0]))
        torch.rand(height, width, 3, generator=g, device=device, out=out[b])
    return out
