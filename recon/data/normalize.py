"""Scene normalization: a similarity that puts the object, found from the training cameras and masks, in the tet grid.

Captures come in arbitrary units and frames (COLMAP/SfM models, phone captures); DMTet needs the object inside
its grid cube (``model.geometry.scale`` edge, centred at ``model.geometry.center``). :func:`fit_normalization`
finds the object's bounding box as the visual hull of the training masks: a voxel grid around the cameras'
look-at point is carved at half the resolution (a voxel survives when it projects inside the object mask in every view that sees
it, allowing 5 % of those views to disagree for noisy masks, and at least half the views see it), then
carved again at full resolution in the surviving box (grown by two coarse cells) for a finer bound. The similarity
``x -> scale * x + translation`` maps the box's centre to the grid centre and its largest half-extent to
``(1 - margin)`` of the grid's half edge. When the masks carry no silhouette (every frame fully covered) or
nothing survives, it falls back to the look-at point (the least-squares meeting point of the optical axes)
and the extent the views cover there.

Positions scale and shift, rotations stay, depths scale by ``scale``; :meth:`Normalization.to_world` maps
normalized points (an exported mesh) back to the input's coordinates.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from recon.data.frames import Frames

log = logging.getLogger(__name__)


@dataclass
class Normalization:
    """The similarity from input coordinates to normalized (tet-grid) coordinates: ``x_n = scale * x + translation``.

    scale: float > 0; translation: [3] (scene units after scaling). method: how it was found ('none',
    'visual_hull' or 'look_at'); bbox_min / bbox_max: the object's box in input coordinates, when estimated.
    """

    scale: float = 1.0
    translation: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    method: str = "none"
    bbox_min: list[float] | None = None
    bbox_max: list[float] | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and not any(self.translation)

    def to_normalized(self, points: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """Input-coordinate points [...,3] -> normalized coordinates (the frames' and the mesh's)."""
        t = torch.as_tensor(self.translation, dtype=points.dtype, device=points.device) if isinstance(points, Tensor) \
            else np.asarray(self.translation, dtype=points.dtype)
        return points * self.scale + t

    def to_world(self, points: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """Normalized points [...,3] (e.g. mesh vertices) -> the input's original coordinates."""
        t = torch.as_tensor(self.translation, dtype=points.dtype, device=points.device) if isinstance(points, Tensor) \
            else np.asarray(self.translation, dtype=points.dtype)
        return (points - t) / self.scale

    def matrix(self) -> np.ndarray:
        """The similarity as a [4,4] matrix (input -> normalized)."""
        m = np.eye(4) * self.scale
        m[3, 3] = 1.0
        m[:3, 3] = self.translation
        return m

    def as_dict(self) -> dict:
        """JSON-able: scale, translation, method, bbox_min, bbox_max."""
        return {"scale": float(self.scale), "translation": [float(x) for x in self.translation], "method": self.method,
                "bbox_min": self.bbox_min, "bbox_max": self.bbox_max}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(float(d["scale"]), [float(x) for x in d["translation"]], d.get("method", "none"),
                   d.get("bbox_min"), d.get("bbox_max"))


def look_at_point(c2w: Tensor) -> np.ndarray:
    """The point [3] closest (least squares) to every camera's optical axis; c2w [N,4,4] NeRF convention.

    Falls back to the cameras' mean position pushed along their mean viewing direction by their spread when
    the axes are (nearly) parallel, so the problem is degenerate.
    """
    c = c2w[:, :3, 3].double().numpy()
    d = -c2w[:, :3, 2].double().numpy()
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    proj = np.eye(3)[None] - d[:, :, None] * d[:, None, :]  # projects onto the plane normal to each axis
    a, b = proj.sum(0), np.einsum("nij,nj->i", proj, c)
    if np.linalg.eigvalsh(a / len(c)).min() > 1e-3:
        return np.linalg.solve(a, b)
    mean_dir = d.mean(0) / max(np.linalg.norm(d.mean(0)), 1e-12)
    spread = max(float(np.linalg.norm(c - c.mean(0), axis=1).max()), 1.0)
    return c.mean(0) + mean_dir * spread


def _carve(frames: Frames, lo: np.ndarray, hi: np.ndarray, resolution: int, tolerance: float) -> Tensor:
    """Voxel centres [M,3] (of a resolution^3 grid over [lo, hi]) that survive carving by the frames' masks."""
    axes = [torch.linspace(float(lo[i]), float(hi[i]), resolution + 1, dtype=torch.float32) for i in range(3)]
    axes = [(a[:-1] + a[1:]) / 2 for a in axes]
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    homog = torch.cat([pts, torch.ones_like(pts[:, :1])], -1)
    seen = torch.zeros(len(pts), dtype=torch.int32)
    inside = torch.zeros(len(pts), dtype=torch.int32)
    h, w = frames.resolution
    w2c = torch.linalg.inv(frames.c2w.double()).float()
    # a pixel with any coverage counts as object: carving must not remove thin parts smaller than a pixel
    masks = frames.images[..., 3] > 0.0
    for i in range(len(frames)):
        cam = homog @ w2c[i].T
        depth = -cam[:, 2]
        fx, fy, cx, cy = frames.intrinsics[i].tolist()
        z = depth.clamp_min(1e-9)
        u, v = fx * cam[:, 0] / z + cx, cy - fy * cam[:, 1] / z
        vis = (depth > 1e-6) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
        ui, vi = u.clamp(0, w - 1).long(), v.clamp(0, h - 1).long()
        seen += vis.int()
        inside += (vis & masks[i][vi, ui]).int()
    keep = (seen >= max(1, math.ceil(0.5 * len(frames)))) & (inside >= torch.ceil(seen.double() * (1 - tolerance)).int())
    return pts[keep].double()


def fit_normalization(
    frames: Frames,
    grid_scale: float = 2.1,
    grid_center: tuple[float, float, float] = (0.0, 0.0, 0.0),
    margin: float = 0.1,
    resolution: int = 64,
    tolerance: float = 0.05,
) -> Normalization:
    """Fit the similarity that puts the object seen by ``frames`` (training views) inside the tet grid.

    grid_scale: the grid cube's edge (``model.geometry.scale``); grid_center: its centre. margin: fraction of the
    half edge left free around the object's largest half-extent. resolution: voxels per side of each carving pass.
    tolerance: fraction of the views that see a voxel that may put it outside their mask.
    """
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"data.normalize_margin={margin} must lie in [0, 1).")
    centre_pt = look_at_point(frames.c2w)
    cams = frames.c2w[:, :3, 3].double().numpy()
    radius = float(np.linalg.norm(cams - centre_pt, axis=1).max())
    alpha = frames.images[..., 3]
    has_silhouette = bool(((alpha < 0.5).flatten(1).float().mean(1) > 1e-3).any())
    lo = hi = None
    if has_silhouette:
        coarse = max(8, resolution // 2)  # the first pass only finds the region the second one resolves
        pts = _carve(frames, centre_pt - radius, centre_pt + radius, coarse, tolerance)
        if len(pts):
            cell = 2 * radius / coarse
            lo, hi = pts.min(0).values.numpy() - 2 * cell, pts.max(0).values.numpy() + 2 * cell
            fine = _carve(frames, lo, hi, resolution, tolerance)
            if len(fine):
                # a voxel is tested at its centre, so the object may reach up to sqrt(3)/2 cells past the last
                # surviving centre: grow by a full cell to keep the box a bound
                cell = (hi - lo) / resolution
                lo, hi = fine.min(0).values.numpy() - cell, fine.max(0).values.numpy() + cell
    if lo is not None:
        method = "visual_hull"
    else:
        # no silhouette: the object fills the views; take the extent a view covers at the look-at distance
        dist = np.linalg.norm(cams - centre_pt, axis=1)
        tan_half = (frames.resolution[1] / 2) / frames.intrinsics[:, 0].double().numpy()
        half = float(np.median(dist * tan_half))
        lo, hi = centre_pt - half, centre_pt + half
        method = "look_at"
        log.warning("data.normalize=auto: %s; centring on the cameras' look-at point %s with half-extent %.3g",
                    "no silhouette in the masks" if not has_silhouette else "the visual hull is empty",
                    np.round(centre_pt, 4).tolist(), half)
    centre = (lo + hi) / 2
    half_extent = float((hi - lo).max() / 2)
    scale = (grid_scale / 2) * (1 - margin) / half_extent
    translation = np.asarray(grid_center, dtype=np.float64) - scale * centre
    return Normalization(scale, translation.tolist(), method, lo.tolist(), hi.tolist())
