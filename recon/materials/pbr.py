"""PBR materials as nvdiffrec models them: albedo ``kd``, ORM ``ks`` and a tangent-space normal perturbation.

Nine channels, always in this order: ``kd`` (linear RGB albedo), ``ks`` = (occlusion, roughness, metallic) and
``nrm`` = tangent-space normal (x along the tangent, y along the bitangent, z along the surface normal). The
occlusion channel follows nvdiffrec: shading is scaled by ``1 - occlusion`` (0 = unoccluded).

Two representations share that layout:
- `NeuralPBRMaterial`: a hash-grid MLP over the object's box (pass 1, any topology);
- `TexturePBRMaterial`: one learnable 9-channel 2D texture over a UV atlas (pass 2, fixed mesh).
Both squash or clamp every channel into per-channel bounds (``kd_min/max``, ``ks_min/max``, ``nrm_min/max``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recon.gather import scatter_rows
from recon.materials.mlp_texture import MLPTexture3D

CHANNELS = 9
KD, KS, NRM = slice(0, 3), slice(3, 6), slice(6, 9)

# nvdiffrec's defaults: roughness never below 0.08 (the split-sum table's useful range), normals in the upper hemisphere.
DEFAULT_BOUNDS = {
    "kd_min": (0.0, 0.0, 0.0), "kd_max": (1.0, 1.0, 1.0),
    "ks_min": (0.0, 0.08, 0.0), "ks_max": (1.0, 1.0, 1.0),
    "nrm_min": (-1.0, -1.0, 0.0), "nrm_max": (1.0, 1.0, 1.0),
}


def channel_bounds(
    kd_min: Sequence[float] = DEFAULT_BOUNDS["kd_min"], kd_max: Sequence[float] = DEFAULT_BOUNDS["kd_max"],
    ks_min: Sequence[float] = DEFAULT_BOUNDS["ks_min"], ks_max: Sequence[float] = DEFAULT_BOUNDS["ks_max"],
    nrm_min: Sequence[float] = DEFAULT_BOUNDS["nrm_min"], nrm_max: Sequence[float] = DEFAULT_BOUNDS["nrm_max"],
) -> Tensor:
    """Per-channel lower and upper bounds [2,9] from the six 3-vectors; checks that every min <= max."""
    lo = torch.tensor([*kd_min, *ks_min, *nrm_min], dtype=torch.float32)
    hi = torch.tensor([*kd_max, *ks_max, *nrm_max], dtype=torch.float32)
    if lo.numel() != CHANNELS or hi.numel() != CHANNELS:
        raise ValueError("material bounds kd_min/kd_max/ks_min/ks_max/nrm_min/nrm_max must each have 3 values.")
    if bool((lo > hi).any()):
        bad = [i for i in range(CHANNELS) if lo[i] > hi[i]]
        raise ValueError(f"material bounds: min exceeds max in channel(s) {bad} (kd 0-2, ks 3-5, nrm 6-8).")
    return torch.stack([lo, hi])


def split_channels(values: Tensor) -> dict[str, Tensor]:
    """[...,9] -> ``kd``, ``ks`` [...,3] and ``nrm`` [...,3] (views of the input). One split, not three slices: its
    backward is one concatenation, where each slice's would zero-fill and copy a gradient of the whole input."""
    kd, ks, nrm = values.split(3, dim=-1)
    return {"kd": kd, "ks": ks, "nrm": nrm}


class NeuralPBRMaterial(nn.Module):
    """nvdiffrec's ``kd_ks_normal`` field: one hash-grid MLP predicting all nine channels.

    aabb: [2,3] box of the field, world space. bounds: [2,9] (see `channel_bounds`). Remaining keyword arguments
    go to `MLPTexture3D` (``n_neurons``, ``n_hidden_layers``, ``encoding``, ``backend``).
    ``smoothness_jitter`` is the standard deviation (scene units) of the offset used by `sample`'s
    albedo-smoothness term (nvdiffrec: 0.01).
    ``position_grad``: whether gradients flow from the material back into the points (nvdiffrec: yes; the surface
    then also moves to look up other material values). False treats the points as constants: the encoding's
    backward skips its input gradient.
    ``smoothness_fraction``: the share of the points that the albedo-smoothness term evaluates at a jittered copy
    (nvdiffrec: all, 1.0). Below 1 a systematic sample, every k-th point from a random start (k = round(1 /
    fraction)), is jittered and its differences are scaled by N / (sampled points): the term's expectation is
    unchanged, and the network evaluates 1 + 1/k times the points instead of twice.
    """

    def __init__(self, aabb: Tensor, bounds: Tensor | None = None, smoothness_jitter: float = 0.01,
                 position_grad: bool = True, smoothness_fraction: float = 1.0, **mlp):
        super().__init__()
        bounds = channel_bounds() if bounds is None else torch.as_tensor(bounds, dtype=torch.float32)
        if not 0.0 < float(smoothness_fraction) <= 1.0:
            raise ValueError(f"model.material.smoothness_fraction={smoothness_fraction}: use a share in (0, 1].")
        self.field = MLPTexture3D(aabb, channels=CHANNELS, min_max=bounds, **mlp)
        self.smoothness_jitter = float(smoothness_jitter)
        self.position_grad = bool(position_grad)
        self.smoothness_stride = max(1, round(1.0 / float(smoothness_fraction)))

    @property
    def bounds(self) -> Tensor:
        return self.field.min_max

    def forward(self, points: Tensor, smoothness: bool = False, generator: torch.Generator | None = None,
                draws: tuple[Tensor | None, Tensor] | None = None, row_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Material at world points [N,3]: ``kd``, ``ks``, ``nrm`` [N,3]; with ``smoothness`` also ``kd_grad`` [N,1],
        the mean absolute albedo change over a random offset of ``smoothness_jitter`` (nvdiffrec's kd regulariser),
        drawn from ``generator`` (on the points' device; None: torch's global generator) or given as ``draws``
        (`smoothness_draws` for N points: a function of the points and parameters alone, as a CUDA graph needs).
        With a ``smoothness_fraction`` below 1, ``kd_grad`` is zero but at the sampled points, whose values are
        scaled so that its mean estimates the full term's. row_mask: [N] bool, the points whose values matter (None:
        all; e.g. the covered rows of a fixed-size batch): the hash grid skips the others (`MLPTexture3D.sample`),
        whose values are then the network's at zero features."""
        if not self.position_grad:
            points = points.detach()
        if not smoothness:
            return split_channels(self.field.sample(points, row_mask))
        n = points.shape[0]
        start, offset = self.smoothness_draws(n, generator, points.device, points.dtype) if draws is None else draws
        sampled = None
        if start is not None:
            sampled = torch.arange(n // self.smoothness_stride, device=points.device) * self.smoothness_stride + start
        anchors = points if sampled is None else points.index_select(0, sampled)  # sampled < n: start < stride
        if row_mask is not None:  # the jittered copies matter where their anchors do
            row_mask = torch.cat([row_mask, row_mask if sampled is None else row_mask.index_select(0, sampled)])
        both = self.field.sample(torch.cat([points, anchors + offset * self.smoothness_jitter]), row_mask)  # one pass
        values, values_j = both.split([n, both.shape[0] - n])
        out = split_channels(values)
        base = out["kd"] if sampled is None else out["kd"].index_select(0, sampled)
        change = (values_j.split([3, CHANNELS - 3], dim=-1)[0] - base).abs().mean(-1, keepdim=True)
        if sampled is not None:
            change = scatter_rows(change * (n / sampled.shape[0]), sampled, n)
        out["kd_grad"] = change
        return out

    def smoothness_draws(self, n: int, generator: torch.Generator | None = None, device=None,
                         dtype: torch.dtype = torch.float32) -> tuple[Tensor | None, Tensor]:
        """The random draws of `forward`'s albedo-smoothness term for ``n`` points: the systematic sample's start
        ([1] int64 below the stride; None when every point is jittered) and the unit-normal offsets [n // stride, 3]
        (or [n, 3]) of the jittered points, drawn from ``generator`` in that order, on ``device`` (None: the
        generator's)."""
        if device is None and generator is not None:
            device = generator.device
        stride = self.smoothness_stride
        start = None
        if stride > 1 and n > stride:
            start = torch.randint(stride, (1,), generator=generator, device=device)
        m = n if start is None else n // stride
        return start, torch.randn((m, 3), generator=generator, device=device, dtype=dtype)

    def sample(self, points: Tensor) -> Tensor:
        """All nine channels at world points [N,3] -> [N,9] (for baking)."""
        return self.field.sample(points)


class TexturePBRMaterial(nn.Module):
    """Learnable 9-channel texture [1,R,R,9] over a mesh's UV atlas, sampled with mip-mapping (pass 2).

    texture: initial values [R,R,9] or [1,R,R,9] (usually baked from `NeuralPBRMaterial`). bounds: [2,9].
    Call `clamp_()` after each optimiser step: values stay inside the bounds and normals unit length.
    """

    def __init__(self, texture: Tensor, bounds: Tensor | None = None):
        super().__init__()
        texture = texture.detach().float()
        if texture.dim() == 3:
            texture = texture[None]
        if texture.dim() != 4 or texture.shape[0] != 1 or texture.shape[-1] != CHANNELS:
            raise ValueError(f"a PBR texture must be [R,R,{CHANNELS}] or [1,R,R,{CHANNELS}], got {tuple(texture.shape)}.")
        bounds = channel_bounds() if bounds is None else torch.as_tensor(bounds, dtype=torch.float32)
        self.register_buffer("bounds", bounds.to(texture.device).clone())
        self.texture = nn.Parameter(texture.clone())

    @property
    def resolution(self) -> int:
        return int(self.texture.shape[1])

    def forward(self, rasterizer, gb_uv: Tensor, gb_uv_da: Tensor | None) -> dict[str, Tensor]:
        """Sample at G-buffer UVs [B,H,W,2] (derivatives [B,H,W,4] select the mip level) -> ``kd``/``ks``/``nrm``
        [B,H,W,3]; or at N points, UVs [N,2] and derivatives [N,4] -> [N,3] each (the covered pixels alone: each
        pixel's lookup depends on its own UV and derivatives only, so the values are the same)."""
        mode = "linear-mipmap-linear" if gb_uv_da is not None else "linear"
        if gb_uv.dim() != 2:
            return split_channels(rasterizer.texture(self.texture, gb_uv, gb_uv_da, filter_mode=mode))
        n = gb_uv.shape[0]
        if n == 0:  # an empty slice keeps the texture in the graph (a zero gradient, as for uncovered images)
            return split_channels(self.texture.reshape(-1, CHANNELS)[:0])
        uv_da = None if gb_uv_da is None else gb_uv_da.reshape(1, n, 1, 4)
        values = rasterizer.texture(self.texture, gb_uv.reshape(1, n, 1, 2), uv_da, filter_mode=mode)
        return split_channels(values.reshape(n, CHANNELS))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep values in bounds and tangent-space normals unit length (nvdiffrec clamps after each step).

        In place, three passes over the texture (clamp, the normals' length, their division): at 2048² × 9 channels
        the out-of-place ``minimum``/``maximum``/``copy_``/``normalize`` this replaces took 0.54 ms of every pass-2
        step on an H200. The same values as ``F.normalize(clamp(t), eps=1e-8)`` on the normal channels."""
        t = self.texture
        t.clamp_(self.bounds[0], self.bounds[1])
        nrm = t[..., NRM]
        nrm.div_(torch.linalg.vector_norm(nrm, dim=-1, keepdim=True).clamp_min_(1e-8))

    def split(self) -> dict[str, Tensor]:
        """The texture as ``kd``, ``ks``, ``nrm`` images [R,R,3] (detached)."""
        return split_channels(self.texture.detach()[0])
