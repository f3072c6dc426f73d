"""GGX microfacet helpers and the split-sum BSDF lookup table (Karis 2013, "Real Shading in Unreal Engine 4").

Roughness is the perceptual roughness r in [0,1]; the GGX width is alpha = r^2 throughout (Disney/Karis),
matching nvdiffrec. Directions live in a tangent frame with the normal along +z unless stated otherwise.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from recon.cache import cached_tensor

_LUT_CACHE: dict[tuple[int, int], Tensor] = {}


def hammersley(n: int, device: torch.device | str | None = None) -> Tensor:
    """Hammersley point set: [n,2] float32 in [0,1)^2, (i/n, radical inverse base 2 of i)."""
    i = torch.arange(n, dtype=torch.int64, device=device)
    bits = i.clone()
    # Reverse 32 bits of i (van der Corput sequence in base 2).
    bits = ((bits << 16) | (bits >> 16)) & 0xFFFFFFFF
    bits = ((bits & 0x55555555) << 1) | ((bits & 0xAAAAAAAA) >> 1)
    bits = ((bits & 0x33333333) << 2) | ((bits & 0xCCCCCCCC) >> 2)
    bits = ((bits & 0x0F0F0F0F) << 4) | ((bits & 0xF0F0F0F0) >> 4)
    bits = ((bits & 0x00FF00FF) << 8) | ((bits & 0xFF00FF00) >> 8)
    radical = bits.double() / 2.0**32
    return torch.stack((i.double() / n, radical), dim=-1).float()


def ggx_ndf(n_dot_h: Tensor, roughness: Tensor | float) -> Tensor:
    """GGX/Trowbridge-Reitz normal distribution D(h), alpha = roughness^2; units 1/sr."""
    a2 = torch.as_tensor(roughness, dtype=n_dot_h.dtype, device=n_dot_h.device) ** 4
    d = n_dot_h * n_dot_h * (a2 - 1) + 1
    return a2 / (math.pi * d * d).clamp_min(1e-20)


def smith_g_ibl(n_dot_v: Tensor, n_dot_l: Tensor, roughness: Tensor | float) -> Tensor:
    """Schlick-Smith masking-shadowing G with Karis' image-based-lighting remap k = alpha/2."""
    k = torch.as_tensor(roughness, dtype=n_dot_v.dtype, device=n_dot_v.device) ** 2 / 2
    return n_dot_v / (n_dot_v * (1 - k) + k) * n_dot_l / (n_dot_l * (1 - k) + k)


def importance_sample_ggx(xi: Tensor, roughness: Tensor | float) -> Tensor:
    """GGX half vectors in tangent space (+z = normal), distributed with pdf D(h)*cos(theta_h).

    xi: [...,2] uniform in [0,1); roughness broadcastable to xi[...,0]. Returns [...,3] unit vectors.
    """
    a2 = torch.as_tensor(roughness, dtype=xi.dtype, device=xi.device) ** 4
    phi = 2 * math.pi * xi[..., 0]
    cos_t = torch.sqrt((1 - xi[..., 1]) / (1 + (a2 - 1) * xi[..., 1]))
    sin_t = torch.sqrt((1 - cos_t * cos_t).clamp_min(0))
    return torch.stack((sin_t * torch.cos(phi), sin_t * torch.sin(phi), cos_t), dim=-1)


def _lut_entry(n_dot_v: Tensor, roughness: Tensor, xi: Tensor) -> Tensor:
    """(scale, bias) of the split-sum BRDF integral for n_dot_v, roughness [K] with samples xi [S,2] -> [K,2]."""
    v = torch.stack((torch.sqrt(1 - n_dot_v * n_dot_v), torch.zeros_like(n_dot_v), n_dot_v), dim=-1)[:, None]
    h = importance_sample_ggx(xi[None], roughness[:, None])  # [K,S,3]
    v_dot_h = (v * h).sum(-1)
    l_z = 2 * v_dot_h * h[..., 2] - v[..., 2]
    n_dot_l, n_dot_h = l_z.clamp_min(0), h[..., 2]
    n_dot_v_ = n_dot_v[:, None]
    # Estimator of int f*cos dl with pdf(l) = D*n_dot_h/(4 v_dot_h): G*v_dot_h/(n_dot_h*n_dot_v), F factored out.
    g_vis = smith_g_ibl(n_dot_v_, n_dot_l, roughness[:, None]) * v_dot_h / (n_dot_h * n_dot_v_).clamp_min(1e-8)
    g_vis = torch.where(l_z > 0, g_vis, torch.zeros_like(g_vis))
    fc = (1 - v_dot_h).clamp_min(0) ** 5
    return torch.stack((((1 - fc) * g_vis).mean(-1), (fc * g_vis).mean(-1)), dim=-1)


def ggx_lut(resolution: int = 256, samples: int = 512) -> Tensor:
    """Split-sum environment BRDF table: [R,R,2] float32 (scale, bias) so that int f*cos = F0*scale + bias.

    Entry [i,j] is at n_dot_v = (i+0.5)/R, roughness = (j+0.5)/R (texel centres). Computed by GGX importance
    sampling over a Hammersley set (Karis), cached in memory per (resolution, samples) and on disk
    (`recon.cache.cached_tensor`: the default 256^2 x 512 samples take seconds of CPU time); returned on CPU.
    """
    key = (resolution, samples)
    if key not in _LUT_CACHE:
        _LUT_CACHE[key] = cached_tensor(f"ggx_lut_r{resolution}_s{samples}_v1", lambda: _compute_lut(resolution, samples))
    return _LUT_CACHE[key]


def _compute_lut(resolution: int, samples: int) -> Tensor:
    xi = hammersley(samples)
    c = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    n_dot_v, rough = torch.meshgrid(c, c, indexing="ij")
    n_dot_v, rough = n_dot_v.reshape(-1), rough.reshape(-1)
    chunk = max(1, 2**20 // samples)
    out = torch.cat([_lut_entry(n_dot_v[k : k + chunk], rough[k : k + chunk], xi)
                     for k in range(0, n_dot_v.numel(), chunk)])
    return out.reshape(resolution, resolution, 2).float()


def lookup_lut(lut: Tensor, n_dot_v: Tensor, roughness: Tensor) -> Tensor:
    """Bilinear, edge-clamped lookup of a [R,R,C] table at n_dot_v, roughness [...] in [0,1] -> [...,C]."""
    res = lut.shape[0]
    x = (n_dot_v.clamp(0, 1) * res - 0.5).clamp(0, res - 1)
    y = (roughness.clamp(0, 1) * res - 0.5).clamp(0, res - 1)
    x0, y0 = x.floor().long().clamp(max=res - 2), y.floor().long().clamp(max=res - 2)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    return ((lut[x0, y0] * (1 - fy) + lut[x0, y0 + 1] * fy) * (1 - fx)
            + (lut[x0 + 1, y0] * (1 - fy) + lut[x0 + 1, y0 + 1] * fy) * fx)
