"""Cube maps: texel directions, direction -> (face, uv) and a bilinear / trilinear (mip-mapped) lookup in PyTorch.

Cube-map convention (OpenGL, as nvdiffrast's boundary_mode='cube'): faces are ordered +x,-x,+y,-y,+z,-z and
`cube[f, row, col]` sits at face coordinates s = (col+0.5)/R, t = (row+0.5)/R, with (a = 2s-1, b = 2t-1):
    +x: ( 1, -b, -a)   -x: (-1, -b,  a)   +y: ( a,  1,  b)
    -y: ( a, -1, -b)   +z: ( a, -b,  1)   -z: (-a, -b, -1)
The lookups here are the pure-PyTorch reference; `Rasterizer.cube_texture` runs them on the torch backend and
nvdiffrast's cube-mode `texture` on CUDA.
"""
from __future__ import annotations

import torch
from torch import Tensor

from recon.gather import take_rows

# Row f: the (x, y, z) direction of face f is sum_k M[f,k] * (a, b, 1)[k].
_FACE_AXES = torch.tensor(
    [
        [[0, 0, 1], [0, -1, 0], [-1, 0, 0]],
        [[0, 0, -1], [0, -1, 0], [1, 0, 0]],
        [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
        [[1, 0, 0], [0, 0, -1], [0, -1, 0]],
        [[1, 0, 0], [0, -1, 0], [0, 0, 1]],
        [[-1, 0, 0], [0, -1, 0], [0, 0, -1]],
    ],
    dtype=torch.float32,
)  # [6, 3 (x,y,z), 3 (a,b,1)]


def normalize(v: Tensor, eps: float = 1e-20) -> Tensor:
    return v * torch.rsqrt((v * v).sum(-1, keepdim=True).clamp_min(eps))


def cube_to_dir(res: int, device: torch.device | str | None = None, face: int | None = None) -> Tensor:
    """Unit directions through texel centres: [6,R,R,3] (or [R,R,3] for one `face` index), float32."""
    c = (torch.arange(res, dtype=torch.float32, device=device) + 0.5) / res * 2 - 1
    b, a = torch.meshgrid(c, c, indexing="ij")
    abc = torch.stack((a, b, torch.ones_like(a)), dim=-1)  # [R,R,3]
    axes = _FACE_AXES.to(device)
    dirs = torch.einsum("fij,hwj->fhwi", axes, abc)
    dirs = normalize(dirs)
    return dirs if face is None else dirs[face]


def dir_to_cube(dirs: Tensor) -> tuple[Tensor, Tensor]:
    """Directions [...,3] (any length > 0) -> face index [...] int64 and (s, t) [...,2] in [0,1] (s: column)."""
    x, y, z = dirs.unbind(-1)
    ax, ay, az = x.abs(), y.abs(), z.abs()
    # Ties go to x, then y (a fixed, deterministic rule for directions on cube edges).
    is_x = (ax >= ay) & (ax >= az)
    is_y = ~is_x & (ay >= az)
    face = torch.where(is_x, (x < 0).long(), torch.where(is_y, 2 + (y < 0).long(), 4 + (z < 0).long()))
    ma = torch.where(is_x, ax, torch.where(is_y, ay, az)).clamp_min(1e-20)
    sc = torch.where(is_x, torch.where(x >= 0, -z, z), torch.where(is_y, x, torch.where(z >= 0, x, -x)))
    tc = torch.where(is_x, -y, torch.where(is_y, torch.where(y >= 0, z, -z), -y))
    uv = torch.stack(((sc / ma + 1) * 0.5, (tc / ma + 1) * 0.5), dim=-1)
    return face, uv


def cube_taps(res: int, face: Tensor, uv: Tensor) -> tuple[Tensor, Tensor]:
    """The four bilinear taps of a res^2 cube at (face, uv) from `dir_to_cube`: flat texel indices [...,4] into the
    cube reshaped to [6*R*R, C], and their weights [...,4] (summing to one)."""
    p = (uv * res - 0.5).clamp(0, res - 1)
    p0 = p.floor().long().clamp(max=max(res - 2, 0))
    f = p - p0
    p1 = (p0 + 1).clamp(max=res - 1)
    base = face * (res * res)
    fx, fy = f[..., 0], f[..., 1]
    x0, y0, x1, y1 = p0[..., 0], p0[..., 1], p1[..., 0], p1[..., 1]
    idx = torch.stack((y0 * res + x0, y0 * res + x1, y1 * res + x0, y1 * res + x1), dim=-1) + base[..., None]
    w = torch.stack(((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy), dim=-1)
    return idx, w


def sample_cube(cube: Tensor, dirs: Tensor, coords: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Bilinear lookup of cube [6,R,R,C] along dirs [...,3] -> [...,C]; differentiable w.r.t. cube.

    Filtering stays inside the face the direction hits, clamped at its border: within half a texel of a cube
    edge the result is the edge texel row rather than a blend across faces (nvdiffrast's 'cube' mode blends),
    a seam error that shrinks with resolution and that the GGX prefilter and diffuse convolution smooth over.
    """
    res, ch = cube.shape[1], cube.shape[-1]
    face, uv = dir_to_cube(dirs.detach()) if coords is None else coords  # coords: dir_to_cube(dirs), reused
    idx, w = cube_taps(res, face, uv)
    return (take_rows(cube.reshape(-1, ch), idx) * w.to(cube.dtype)[..., None]).sum(-2)  # the 4 taps: [...,4,C]


def sample_cube_mips(levels: list[Tensor], dirs: Tensor, level: Tensor | None = None) -> Tensor:
    """Trilinear lookup in a cube mip chain: levels[k] is [6,R_k,R_k,C] (each half the previous), dirs [...,3],
    level [...] the fractional level (clamped to the chain; None: level 0, bilinear). Returns [...,C].

    Differentiable w.r.t. every level and ``level`` (the direction only selects texels: no gradient reaches it).
    """
    if level is None or len(levels) == 1:
        return sample_cube(levels[0], dirs)
    level = level.clamp(0, len(levels) - 1)
    coords = dir_to_cube(dirs.detach())  # shared by every level
    out = None
    for k, cube in enumerate(levels):
        w = (1 - (level - k).abs()).clamp_min(0)[..., None]
        if not bool((w > 0).any()):  # a host sync, cheap on the CPU where this path runs; skips unused levels
            continue
        term = sample_cube(cube, dirs, coords) * w
        out = term if out is None else out + term
    return out
