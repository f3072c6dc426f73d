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


# nvdiffrast's cube-map wrapping tables (common/texture.cu, c_cubeWrapMask1/2), indexed by face * 8 + the case of the
# bilinear footprint (left/inside/right x above/inside/below, the all-inside case left out). Word 1 per footprint
# tap k = 0..3: bits 2k and 8 + 2k pick each tap's column and row from (0, the footprint's column, its row), bits
# 16 + 4k its face plus one (0: none, a cube corner). Word 2: bits k and 4 + k mirror the tap's column and row.
_WRAP_TAPS = (
    0x1530A440, 0x1133A550, 0x6103A110, 0x1515AA44, 0x6161AA11, 0x40154A04, 0x44115A05, 0x04611A01,
    0x2630A440, 0x2233A550, 0x5203A110, 0x2626AA44, 0x5252AA11, 0x40264A04, 0x44225A05, 0x04521A01,
    0x32608064, 0x3366A055, 0x13062091, 0x32328866, 0x13132299, 0x50320846, 0x55330A55, 0x05130219,
    0x42508064, 0x4455A055, 0x14052091, 0x42428866, 0x14142299, 0x60420846, 0x66440A55, 0x06140219,
    0x5230A044, 0x5533A055, 0x1503A011, 0x5252AA44, 0x1515AA11, 0x40520A44, 0x44550A55, 0x04150A11,
    0x6130A044, 0x6633A055, 0x2603A011, 0x6161AA44, 0x2626AA11, 0x40610A44, 0x44660A55, 0x04260A11,
)
_WRAP_FLIPS = (
    0x26, 0x33, 0x11, 0x05, 0x00, 0x09, 0x0C, 0x04, 0x04, 0x00, 0x00, 0x05, 0x00, 0x81, 0xC0, 0x40,
    0x02, 0x03, 0x09, 0x00, 0x0A, 0x00, 0x00, 0x02, 0x64, 0x30, 0x90, 0x55, 0xA0, 0x99, 0xCC, 0x64,
    0x24, 0x30, 0x10, 0x05, 0x00, 0x01, 0x00, 0x00, 0x06, 0x03, 0x01, 0x05, 0x00, 0x89, 0xCC, 0x44,
)
_wrap_tables: dict = {}


def wrap_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """`_WRAP_TAPS` and `_WRAP_FLIPS` as int64 tensors on ``device``, made once per device."""
    device = torch.device(device)
    key = (device.type, device.index)
    if key not in _wrap_tables:
        _wrap_tables[key] = (torch.tensor(_WRAP_TAPS, dtype=torch.int64, device=device),
                             torch.tensor(_WRAP_FLIPS, dtype=torch.int64, device=device))
    return _wrap_tables[key]


def cube_taps_wrapped(res: int, face: Tensor, uv: Tensor) -> tuple[Tensor, Tensor]:
    """`cube_taps` as nvdiffrast's cube mode filters: a footprint that crosses a face edge takes its outer taps from
    the neighbouring face, and at a cube corner, where only three texels meet, the missing tap is the mean of the
    other three (its weight goes to them in equal parts). Flat texel indices [...,4] into [6*R*R, C] and weights
    [...,4] (summing to one; a corner's missing tap repeats another's index with weight 0)."""
    p = uv * res - 0.5
    p0 = p.floor()
    f = p - p0
    iu0, iv0 = p0[..., 0].long(), p0[..., 1].long()
    iu1, iv1 = iu0 + 1, iv0 + 1
    fx, fy = f[..., 0], f[..., 1]
    w = torch.stack(((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy), dim=-1)
    inside = torch.stack((iu0 + res * iv0, iu1 + res * iv0, iu0 + res * iv1, iu1 + res * iv1), dim=-1)
    idx = inside + (face * (res * res))[..., None]
    wrap = (iu0 < 0) | (iv0 < 0) | (iu1 >= res) | (iv1 >= res)
    if not bool(wrap.any()):
        return idx, w
    # nvdiffrast's wrapCubeMap, for every footprint (used where it crosses an edge)
    case = torch.where(iu0 < 0, 0, torch.where(iu1 >= res, 2, 1)) + torch.where(iv0 < 0, 0, torch.where(iv1 >= res, 6, 3))
    case = face * 8 + torch.where(case >= 5, case - 1, case)
    taps, flips = (table[case] for table in wrap_tables(uv.device))
    zero = torch.zeros_like(iu0)
    col_src = ((iu0, iv0), (iu1, iv0), (iu0, iv1), (iu1, iv1))  # (footprint column, row) each tap may copy
    wrapped = []
    for k, (cu, cv) in enumerate(col_src):
        x_code, y_code = (taps >> (2 * k)) & 3, (taps >> (8 + 2 * k)) & 3
        x = torch.where(x_code == 1, cu, torch.where(x_code == 2, cv, zero))
        y = torch.where(y_code == 1, cu, torch.where(y_code == 2, cv, zero))
        x = torch.where((flips >> k) & 1 == 1, res - 1 - x, x)
        y = torch.where((flips >> (4 + k)) & 1 == 1, res - 1 - y, y)
        tap_face = ((taps >> (16 + 4 * k)) & 15) - 1
        wrapped.append(torch.where(tap_face < 0, -1, x + (y + tap_face * res) * res))
    wrapped = torch.stack(wrapped, dim=-1)
    missing = wrapped < 0  # a cube corner: at most one tap of a footprint
    spread = (w * missing).sum(-1, keepdim=True) / 3
    w_wrapped = torch.where(missing, 0.0, w + spread)
    stand_in = torch.where(missing, wrapped.max(-1, keepdim=True).values, wrapped)  # any real tap, weight 0
    return torch.where(wrap[..., None], stand_in, idx), torch.where(wrap[..., None], w_wrapped, w)


def sample_cube(cube: Tensor, dirs: Tensor, coords: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Bilinear lookup of cube [6,R,R,C] along dirs [...,3] -> [...,C]; differentiable w.r.t. cube.

    Filters across face edges and corners as nvdiffrast's 'cube' mode does (`cube_taps_wrapped`), so the CPU and
    CUDA lookups agree at the seams too.
    """
    res, ch = cube.shape[1], cube.shape[-1]
    face, uv = dir_to_cube(dirs.detach()) if coords is None else coords  # coords: dir_to_cube(dirs), reused
    idx, w = cube_taps_wrapped(res, face, uv)
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
