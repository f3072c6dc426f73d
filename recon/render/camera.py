"""Camera matrices: OpenGL-style projection (y flipped so image row 0 is the top), NeRF-convention poses.

Cameras follow the NeRF convention: camera x right, y up, looking down -z; `c2w` maps camera to world.
`perspective` flips y like nvdiffrec's `util.perspective`, so with the rasterizer's pixel convention
(row i at NDC y = -1 + (2i+1)/H) the top of the picture lands in row 0, as in NeRF/Blender images.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def perspective(fovy: float, aspect: float = 1.0, near: float = 0.1, far: float = 1000.0) -> Tensor:
    """Projection matrix [4,4] float32 (camera space -> clip space).

    fovy: vertical field of view, radians. aspect: width / height. near, far: clip distances, scene units.
    Row 1 is [0, -1/tan(fovy/2), 0, 0]: camera +y maps to NDC -y, i.e. to the top image rows.
    """
    y = math.tan(fovy / 2)
    return torch.tensor(
        [
            [1 / (y * aspect), 0.0, 0.0, 0.0],
            [0.0, -1 / y, 0.0, 0.0],
            [0.0, 0.0, -(far + near) / (far - near), -(2 * far * near) / (far - near)],
            [0.0, 0.0, -1.0, 0.0],
        ],
        dtype=torch.float32,
    )


def look_at(
    eye: Tensor | Sequence[float],
    target: Tensor | Sequence[float] = (0.0, 0.0, 0.0),
    up: Tensor | Sequence[float] = (0.0, 1.0, 0.0),
) -> Tensor:
    """Camera-to-world matrix [...,4,4] of a camera at `eye` looking at `target` (NeRF convention).

    eye, target, up: [...,3] world space (broadcast against each other); `up` must not be parallel to
    the viewing direction. The camera's -z axis points at the target, +y is as close to `up` as possible.
    The dtype is eye's when it is a floating tensor, else float32.
    """
    eye_t = torch.as_tensor(eye)
    dtype = eye_t.dtype if eye_t.is_floating_point() else torch.float32
    eye_t = eye_t.to(dtype)
    target_t = torch.as_tensor(target, dtype=dtype, device=eye_t.device)
    up_t = torch.as_tensor(up, dtype=dtype, device=eye_t.device)
    eye_t, target_t, up_t = torch.broadcast_tensors(eye_t, target_t, up_t)
    z = F.normalize(eye_t - target_t, dim=-1)  # camera looks down -z
    x = F.normalize(torch.linalg.cross(up_t, z), dim=-1)
    y = torch.linalg.cross(z, x)
    c2w = torch.zeros(*eye_t.shape[:-1], 4, 4, dtype=dtype, device=eye_t.device)
    c2w[..., :3, 0] = x
    c2w[..., :3, 1] = y
    c2w[..., :3, 2] = z
    c2w[..., :3, 3] = eye_t
    c2w[..., 3, 3] = 1.0
    return c2w


def mvp_from_c2w(c2w: Tensor, proj: Tensor) -> Tensor:
    """Model-view-projection matrices [B,4,4] = proj @ inverse(c2w).

    c2w: [B,4,4] camera-to-world. proj: [4,4] or [B,4,4] from `perspective`.
    """
    return proj.to(c2w) @ torch.linalg.inv(c2w)


def transform_pos(mvp: Tensor, verts: Tensor) -> Tensor:
    """Clip-space positions [B,Nv,4] of world-space points.

    mvp: [B,4,4] (a [4,4] matrix counts as B=1). verts: [Nv,3] shared by all views, or [B,Nv,3].
    """
    if mvp.dim() == 2:
        mvp = mvp[None]
    homog = torch.cat([verts, torch.ones_like(verts[..., :1])], dim=-1)
    return homog @ mvp.to(verts).transpose(-1, -2)
