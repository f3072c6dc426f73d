"""nvdiffrec's image losses, as one function `torch.compile` can fuse (see `recon.compiled`).

Plain torch: no Lightning here. At 8 x 800^2 every elementwise step of the tonemapped loss reads and writes whole
images; fused, the composite, tonemap, L1 and alpha MSE are a handful of kernels forward and backward.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from recon.color import tonemap_srgb
from recon.compiled import fused
from recon.optional import triton_importable


def composite(rgb: Tensor, alpha: Tensor, img: Tensor, bg: Tensor) -> tuple[Tensor, Tensor]:
    """Rendered (premultiplied ``rgb`` [B,H,W,3], ``alpha`` [B,H,W,1]) and reference (straight RGBA ``img``
    [B,H,W,4]) colours over the same background ``bg`` [B,H,W,3], linear."""
    color = rgb + (1 - alpha) * bg
    ref = img[..., :3] * img[..., 3:] + (1 - img[..., 3:]) * bg
    return color, ref


@fused
def image_losses(rgb: Tensor, alpha: Tensor, img: Tensor, bg: Tensor) -> tuple[Tensor, Tensor]:
    """(colour, alpha) losses of a render against reference RGBA ``img`` over background ``bg``: L1 of the
    log-tonemapped sRGB colours inside the reference mask, and the MSE of the coverage against the reference alpha."""
    color, ref = composite(rgb, alpha, img, bg)
    ref_a = img[..., 3:]
    color_loss = (tonemap_srgb(color * ref_a) - tonemap_srgb(ref * ref_a)).abs().mean()
    alpha_loss = (alpha - ref_a).square().mean()
    return color_loss, alpha_loss


def image_loss_function(fused_kernel: bool, device: torch.device) -> Callable[..., tuple[Tensor, Tensor]]:
    """`image_losses`, or (``model.loss.fused_kernel`` on a CUDA device where Triton imports) its twin of one Triton
    kernel forward and one backward, `recon.losses_triton.image_losses_triton`."""
    if fused_kernel and device.type == "cuda" and triton_importable():
        from recon.losses_triton import image_losses_triton

        return image_losses_triton
    return image_losses
