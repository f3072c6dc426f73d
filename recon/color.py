"""Colour transfer functions (IEC 61966-2-1 sRGB) and the tonemap used by the image loss."""
from __future__ import annotations

import torch
from torch import Tensor


def srgb_to_linear(srgb: Tensor) -> Tensor:
    """sRGB-encoded values in [0,1] -> linear RGB, elementwise."""
    return torch.where(srgb <= 0.04045, srgb / 12.92, ((srgb.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear: Tensor) -> Tensor:
    """Linear RGB -> sRGB encoding, elementwise; negative input maps to 0 (clamp_min keeps the pow's gradient finite)."""
    return torch.where(
        linear <= 0.0031308, 12.92 * linear.clamp_min(0), 1.055 * linear.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055
    )


def tonemap_srgb(linear: Tensor) -> Tensor:
    """HDR linear radiance -> sRGB of a log tonemap (nvdiffrec's ``tonemap_srgb``): compresses highlights."""
    return linear_to_srgb(torch.log(linear.clamp(0, 65535) + 1))
