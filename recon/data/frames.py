"""The normalized frame set every data source becomes: images, masks, intrinsics and camera-to-world poses."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


class DataError(ValueError):
    """Bad input data: the message names the file or setting and the fix."""


def read_json_object(path, expected: str) -> dict:
    """Parse ``path`` as a JSON object; a DataError names the file, the line and column of a syntax error, or
    ``expected`` (what the object must hold) when the file holds something else."""
    import json

    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). Fix or regenerate it.") from e
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object with {expected}.")
    return meta


def projection_from_intrinsics(
    fx: float, fy: float, cx: float, cy: float, width: int, height: int, near: float = 0.1, far: float = 1000.0
) -> Tensor:
    """OpenGL-style projection [4,4] for a pinhole camera (pixels; y flipped so image row 0 is the top).

    The camera looks down -z with y up (NeRF convention). A point projecting to pixel (u, v), v counted
    downwards from the top edge, lands at NDC x = 2u/W - 1, y = 2v/H - 1, matching the rasterizer's
    pixel-centre convention (row i at NDC y = -1 + (2i+1)/H).
    """
    return torch.tensor(
        [
            [2 * fx / width, 0.0, 1 - 2 * cx / width, 0.0],
            [0.0, -2 * fy / height, 1 - 2 * cy / height, 0.0],
            [0.0, 0.0, -(far + near) / (far - near), -2 * far * near / (far - near)],
            [0.0, 0.0, -1.0, 0.0],
        ],
        dtype=torch.float32,
    )


@dataclass
class Frames:
    """A split of posed RGBA frames.

    images: [N,H,W,4] float32, linear RGB (straight, not premultiplied) + alpha coverage in [0,1].
    c2w: [N,4,4] camera-to-world, NeRF convention (x right, y up, looking down -z).
    intrinsics: [N,4] (fx, fy, cx, cy) in pixels of ``images``.
    paths: the image file of each frame, for error messages.
    depth: optional [N,H,W] float32 reference depth: camera-space distance along the viewing axis (-z), scene
    units, 0 where unknown.
    """

    images: Tensor
    c2w: Tensor
    intrinsics: Tensor
    paths: list[str] = field(default_factory=list)
    depth: Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def resolution(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def mvp(self, near: float = 0.1, far: float = 1000.0) -> Tensor:
        """Model-view-projection matrices [N,4,4] (world -> clip)."""
        h, w = self.resolution
        proj = torch.stack([projection_from_intrinsics(*k.tolist(), w, h, near, far) for k in self.intrinsics])
        return proj @ torch.linalg.inv(self.c2w)

    def resized(self, resolution: tuple[int, int]) -> "Frames":
        """Resample images to (H, W) (area filter on premultiplied colour when shrinking), scaling intrinsics.

        Depth is resampled by nearest neighbour: each output pixel takes one input pixel's depth, so no value
        mixes the near and far sides of a silhouette or depth edge (an average there is a surface that is not
        in the scene).
        """
        h, w = self.resolution
        if (h, w) == tuple(resolution):
            return self
        rh, rw = resolution
        rgb, a = self.images[..., :3], self.images[..., 3:]
        premul = torch.cat([rgb * a, a], -1).permute(0, 3, 1, 2)
        mode = "area" if rh <= h and rw <= w else "bilinear"
        out = F.interpolate(premul, size=(rh, rw), mode=mode, **({} if mode == "area" else {"align_corners": False}))
        out = out.permute(0, 2, 3, 1)
        alpha = out[..., 3:].clamp(0, 1)
        rgb = torch.where(alpha > 1e-6, out[..., :3] / alpha.clamp_min(1e-6), torch.zeros_like(out[..., :3]))
        scale = torch.tensor([rw / w, rh / h, rw / w, rh / h])
        depth = None
        if self.depth is not None:
            depth = F.interpolate(self.depth[:, None], size=(rh, rw), mode="nearest-exact")[:, 0]
        return Frames(torch.cat([rgb.clamp(0, 1), alpha], -1), self.c2w, self.intrinsics * scale, self.paths, depth)

    def transformed(self, scale: float, translation: Tensor) -> "Frames":
        """The same frames in a world scaled by ``scale`` and shifted by ``translation`` [3] (x -> s x + t).

        Camera positions map like points; rotations stay; depth (a distance) scales by ``scale``.
        """
        c2w = self.c2w.clone()
        c2w[:, :3, 3] = scale * c2w[:, :3, 3] + translation.to(c2w)
        depth = self.depth * scale if self.depth is not None else None
        return Frames(self.images, c2w, self.intrinsics, self.paths, depth)


class FrameDataset(Dataset):
    """Serves frames as dicts: ``img`` [H,W,4], ``mvp`` [4,4], ``cam_pos`` [3], ``index``, and ``depth`` [H,W,1]
    (scene units along -z, 0 = unknown) when the frames have depth."""

    def __init__(self, frames: Frames, near: float = 0.1, far: float = 1000.0):
        self.frames = frames
        self.mvp = frames.mvp(near, far)
        self.cam_pos = frames.c2w[:, :3, 3].clone()

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> dict:
        item = {"img": self.frames.images[i], "mvp": self.mvp[i], "cam_pos": self.cam_pos[i], "index": i}
        if self.frames.depth is not None:
            item["depth"] = self.frames.depth[i, ..., None]
        return item
