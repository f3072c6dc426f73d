"""Depth supervision: the loss between a rendered and a reference depth map (plain torch, no Lightning)."""
from __future__ import annotations

import torch
from torch import Tensor


def depth_loss(pred_depth: Tensor, ref_depth: Tensor, pred_mask: Tensor, ref_mask: Tensor) -> Tensor:
    """Mean absolute depth error over the pixels where both depths are valid.

    pred_depth: [B,H,W,1] rendered depth along the camera's -z axis, scene units.
    ref_depth: [B,H,W,1] reference depth (``batch["depth"]``), same units; 0 = unknown.
    pred_mask: [B,H,W,1] rendered coverage in [0,1]; ref_mask: [B,H,W,1] reference coverage (image alpha).
    Returns a scalar: L1 averaged over pixels covered (> 0.5) in both masks with a known reference depth, 0
    (still attached to pred_depth's graph) when there are none. L1 rather than L2 because reference depth
    from sensors or monocular estimators has heavy-tailed errors (flying pixels at silhouettes, holes);
    the masks keep silhouette disagreements, which the image and alpha losses already handle, out of it.
    """
    valid = (ref_depth > 0) & torch.isfinite(ref_depth) & (ref_mask > 0.5) & (pred_mask > 0.5) & torch.isfinite(pred_depth)
    zero = pred_depth.new_zeros(())
    # select before subtracting: invalid pixels (NaN or background values) then send no gradient, not NaN * 0
    err = (torch.where(valid, pred_depth, zero) - torch.where(valid, ref_depth, zero)).abs()
    return err.sum() / valid.sum().clamp_min(1)
