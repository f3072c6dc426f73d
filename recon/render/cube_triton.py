"""The light's cube-map lookups as Triton kernels: nvdiffrast's cube-mode ``texture`` (bilinear in one cube, or
trilinear in a mip chain at a per-lookup level), forward and backward.

`cube_lookup(levels, dirs, level)` computes what ``dr.texture(levels[0], dirs, mip=levels[1:], mip_level_bias=level,
filter_mode='linear-mipmap-linear', boundary_mode='cube')`` computes (``filter_mode='linear'`` without a level), with
the same conventions: a direction picks its face and face coordinates as nvdiffrast's ``indexCubeMap`` does; a
bilinear footprint that crosses a face edge takes its outer taps from the neighbouring face (nvdiffrast's
``wrapCubeMap`` tables, `recon.render.cube.wrap_tables`); at a cube corner, where three texels meet, the missing tap
is the mean of the other three; the level is clamped to the chain and blends two levels. Gradients reach every
level's texels, the directions (nvdiffrast's ``indexCubeMapGrad``: the face coordinates' derivative, the clamp to the
face ignored) and the level.

Two things differ from nvdiffrast's kernels, both in the backward pass:
  * the texel gradient of a cube corner is exact. nvdiffrast adds it in a divergent branch of its warp-coalesced
    atomics, and its sum there depends on which lookups share a warp (20-25 % off in `bench/cube_lookup.py`);
  * each block of lookups sums runs of consecutive lookups that hit the same texel before its atomic add
    (`recon.materials.hash_grid_triton._runs_add`): covered pixels come in scanline order, neighbouring pixels
    mostly read the same texels of the small cubes, and same-address atomic adds wait for one another. A small
    chain (the diffuse cube) can also be copied: blocks add into up to MAX_COPIES copies, summed after the kernel.
So texel gradients agree with nvdiffrast's up to the order of additions, away from the cube corners.

Needs `triton`; `recon.render.nvdiffrast.NvdiffrastRasterizer` uses it for ``cube_texture`` when
``model.render.cube_kernel=triton``. In a process that imported triton with TRITON_INTERPRET=1 the kernels run in
Triton's interpreter on CPU tensors (the tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from recon.materials.hash_grid_triton import _runs_add
from recon.render.cube import wrap_tables

BLOCK = 128
NUM_WARPS = 4
CHANNELS = 3  # the light's RGB: the kernels read and write three channels per texel, padded to four in registers


@triton.jit
def _face_coords(x, y, z):
    """nvdiffrast's indexCubeMap: face index (+x, -x, +y, -y, +z, -z), face coordinates (s, t) clamped to [0, 1], and
    whether they are finite (a zero or non-finite direction looks nothing up)."""
    ax = tl.abs(x)
    ay = tl.abs(y)
    az = tl.abs(z)
    is_z = az > tl.maximum(ax, ay)
    is_y = (az <= tl.maximum(ax, ay)) & (ay > ax)
    is_x = (az <= tl.maximum(ax, ay)) & (ay <= ax)
    c = tl.where(is_z, z, tl.where(is_y, y, x))
    face = tl.where(is_z, 4, tl.where(is_y, 2, 0)) + (c < 0).to(tl.int32)
    m = 0.5 / tl.abs(c)
    m0 = tl.where((face == 0) | (face == 5), -m, m)
    m1 = tl.where(face == 2, m, -m)
    s = tl.where(is_x, z, x) * m0 + 0.5
    t = tl.where(is_y, z, y) * m1 + 0.5
    ok = (tl.abs(s) <= 3.0e38) & (tl.abs(t) <= 3.0e38)  # false for inf and NaN
    s = tl.minimum(tl.maximum(s, 0.0), 1.0)
    t = tl.minimum(tl.maximum(t, 0.0), 1.0)
    return face, s, t, ok


@triton.jit
def _dir_grad(x, y, z, gu, gv):
    """nvdiffrast's indexCubeMapGrad: d loss / d direction from d loss / d (s, t)."""
    ax = tl.abs(x)
    ay = tl.abs(y)
    az = tl.abs(z)
    is_z = az > tl.maximum(ax, ay)
    is_y = (az <= tl.maximum(ax, ay)) & (ay > ax)
    c = tl.where(is_z, z, tl.where(is_y, y, x))
    code = tl.where(is_z, 16, tl.where(is_y, 4, 1))
    code = tl.where(c < 0, code * 2, code)  # one bit per face: +x 1, -x 2, +y 4, -y 8, +z 16, -z 32
    c0 = gu * tl.where(is_z | is_y, x, z)
    c1 = gv * tl.where(is_y, z, y)
    m = 1.0 / tl.abs(c)
    c0 = tl.where((code & 0x34) != 0, -c0, c0)
    c1 = tl.where((code & 0x2E) != 0, -c1, c1)
    gl = (c0 + c1) * m
    gx = tl.where((code & 0x03) != 0, gl, tl.where((code & 0x20) != 0, -gu, gu))
    gy = tl.where((code & 0x0C) != 0, gl, -gv)
    gz = tl.where((code & 0x30) != 0, gl, tl.where((code & 0x03) != 0, gu, gv))
    gz = tl.where((code & 0x09) != 0, -gz, gz)
    scale = m * 0.5
    gx = gx * scale
    gy = gy * scale
    gz = gz * scale
    ok = (tl.abs(gx) <= 3.0e38) & (tl.abs(gy) <= 3.0e38) & (tl.abs(gz) <= 3.0e38)
    return tl.where(ok, gx, 0.0), tl.where(ok, gy, 0.0), tl.where(ok, gz, 0.0)


@triton.jit
def _wrapped_tap(code, flips, k: tl.constexpr, cu, cv, res):
    """Texel index (within the level) of tap k of a footprint that crosses a face edge, from nvdiffrast's tables;
    -1 where the tap falls off a cube corner."""
    xc = (code >> (2 * k)) & 3
    yc = (code >> (8 + 2 * k)) & 3
    xx = tl.where(xc == 1, cu, tl.where(xc == 2, cv, 0))
    yy = tl.where(yc == 1, cu, tl.where(yc == 2, cv, 0))
    xx = tl.where(((flips >> k) & 1) != 0, res - 1 - xx, xx)
    yy = tl.where(((flips >> (4 + k)) & 1) != 0, res - 1 - yy, yy)
    tap_face = ((code >> (16 + 4 * k)) & 15) - 1
    return tl.where(tap_face < 0, -1, xx + (yy + tap_face * res) * res)


@triton.jit
def _footprint(face, s, t, ok, level, wrap1_ptr, wrap2_ptr, R0: tl.constexpr, MAX_LEVEL: tl.constexpr,
               C: tl.constexpr):
    """The bilinear footprint of (face, s, t) on ``level``: the element offsets of its four taps in the flat chain
    (00, 10, 01, 11; -1: none), the fractions (fu, fv) and the level's size."""
    res = (level * 0 + R0) >> level
    offset = tl.zeros_like(level).to(tl.int64)
    for j in tl.static_range(MAX_LEVEL):  # the levels before this one, 6 * (R0 >> j)^2 * C elements each
        offset += tl.where(level > j, 6 * C * (R0 >> j) * (R0 >> j), 0).to(tl.int64)
    u = s * res.to(tl.float32) - 0.5
    v = t * res.to(tl.float32) - 0.5
    u0 = tl.floor(u)
    v0 = tl.floor(v)
    fu = u - u0
    fv = v - v0
    iu0 = u0.to(tl.int32)
    iv0 = v0.to(tl.int32)
    iu1 = iu0 + 1
    iv1 = iv0 + 1
    wrap = (iu0 < 0) | (iv0 < 0) | (iu1 >= res) | (iv1 >= res)
    case = tl.where(iu0 < 0, 0, tl.where(iu1 >= res, 2, 1)) + tl.where(iv0 < 0, 0, tl.where(iv1 >= res, 6, 3))
    case = face * 8 + tl.where(case >= 5, case - 1, case)
    case = tl.where(wrap & ok, case, 0)
    code = tl.load(wrap1_ptr + case, mask=wrap & ok, other=0)
    flips = tl.load(wrap2_ptr + case, mask=wrap & ok, other=0)
    base = (face * res + iv0) * res + iu0
    t0 = tl.where(wrap, _wrapped_tap(code, flips, 0, iu0, iv0, res), base)
    t1 = tl.where(wrap, _wrapped_tap(code, flips, 1, iu1, iv0, res), base + 1)
    t2 = tl.where(wrap, _wrapped_tap(code, flips, 2, iu0, iv1, res), base + res)
    t3 = tl.where(wrap, _wrapped_tap(code, flips, 3, iu1, iv1, res), base + res + 1)
    t0 = tl.where(ok & (t0 >= 0), offset + t0.to(tl.int64) * C, -1)
    t1 = tl.where(ok & (t1 >= 0), offset + t1.to(tl.int64) * C, -1)
    t2 = tl.where(ok & (t2 >= 0), offset + t2.to(tl.int64) * C, -1)
    t3 = tl.where(ok & (t3 >= 0), offset + t3.to(tl.int64) * C, -1)
    return t0, t1, t2, t3, fu, fv, res


@triton.jit
def _fetch(tex_ptr, t0, t1, t2, t3, ok, feat, C: tl.constexpr):
    """The four taps' texels [BLOCK, C_PAD] (padding channels zero); at a cube corner the missing one is the mean of
    the other three, as nvdiffrast's fetchQuad."""
    ch = (feat < C)[None, :]
    a00 = tl.load(tex_ptr + t0[:, None] + feat[None, :], mask=(t0 >= 0)[:, None] & ch, other=0.0)
    a10 = tl.load(tex_ptr + t1[:, None] + feat[None, :], mask=(t1 >= 0)[:, None] & ch, other=0.0)
    a01 = tl.load(tex_ptr + t2[:, None] + feat[None, :], mask=(t2 >= 0)[:, None] & ch, other=0.0)
    a11 = tl.load(tex_ptr + t3[:, None] + feat[None, :], mask=(t3 >= 0)[:, None] & ch, other=0.0)
    corner = ok & ((t0 < 0) | (t1 < 0) | (t2 < 0) | (t3 < 0))
    avg = (a00 + a10 + a01 + a11) * 0.33333333
    a00 = tl.where((corner & (t0 < 0))[:, None], avg, a00)
    a10 = tl.where((corner & (t1 < 0))[:, None], avg, a10)
    a01 = tl.where((corner & (t2 < 0))[:, None], avg, a01)
    a11 = tl.where((corner & (t3 < 0))[:, None], avg, a11)
    return a00, a10, a01, a11


@triton.jit
def _bilerp(a00, a10, a01, a11, fu, fv):
    top = a00 + fu[:, None] * (a10 - a00)
    bottom = a01 + fu[:, None] * (a11 - a01)
    return top + fv[:, None] * (bottom - top)


@triton.jit
def _levels(bias_ptr, rows, valid, HAS_LEVEL: tl.constexpr, MAX_LEVEL: tl.constexpr):
    """nvdiffrast's level choice from a bias alone: the level clamped to [0, MAX_LEVEL], its floor, the next level
    and the fraction between them (0 on the last level and without a level)."""
    if HAS_LEVEL:
        flevel = tl.load(bias_ptr + rows, mask=valid, other=0.0)
        flevel = tl.minimum(tl.maximum(flevel, 0.0), MAX_LEVEL * 1.0)
        flevel = tl.where(flevel == flevel, flevel, 0.0)
        level0 = tl.floor(flevel).to(tl.int32)
        level1 = tl.minimum(level0 + 1, MAX_LEVEL)
        frac = tl.where(flevel > 0.0, flevel - level0.to(tl.float32), 0.0)
    else:
        level0 = tl.zeros_like(rows).to(tl.int32)
        level1 = level0
        frac = tl.zeros_like(rows).to(tl.float32)
    return level0, level1, frac


@triton.jit(do_not_specialize=["n"])
def _cube_forward_kernel(dir_ptr, bias_ptr, tex_ptr, out_ptr, wrap1_ptr, wrap2_ptr, n,
                         R0: tl.constexpr, MAX_LEVEL: tl.constexpr, HAS_LEVEL: tl.constexpr, C: tl.constexpr,
                         C_PAD: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < n
    feat = tl.arange(0, C_PAD)
    x = tl.load(dir_ptr + rows * 3, mask=valid, other=1.0)
    y = tl.load(dir_ptr + rows * 3 + 1, mask=valid, other=0.0)
    z = tl.load(dir_ptr + rows * 3 + 2, mask=valid, other=0.0)
    face, s, t, ok = _face_coords(x, y, z)
    level0, level1, frac = _levels(bias_ptr, rows, valid, HAS_LEVEL, MAX_LEVEL)
    t0, t1, t2, t3, fu, fv, res = _footprint(face, s, t, ok, level0, wrap1_ptr, wrap2_ptr, R0, MAX_LEVEL, C)
    a00, a10, a01, a11 = _fetch(tex_ptr, t0, t1, t2, t3, ok, feat, C)
    out = _bilerp(a00, a10, a01, a11, fu, fv)
    if HAS_LEVEL:
        second = frac > 0.0
        t0, t1, t2, t3, fu, fv, res = _footprint(face, s, t, ok & second, level1, wrap1_ptr, wrap2_ptr, R0,
                                                 MAX_LEVEL, C)
        b00, b10, b01, b11 = _fetch(tex_ptr, t0, t1, t2, t3, ok & second, feat, C)
        out2 = _bilerp(b00, b10, b01, b11, fu, fv)
        out = tl.where(second[:, None], out + frac[:, None] * (out2 - out), out)
    out = tl.where(ok[:, None], out, 0.0)
    tl.store(out_ptr + rows[:, None] * C + feat[None, :], out, mask=valid[:, None] & (feat < C)[None, :])


@triton.jit
def _add_tap(grad_ptr, tap, weight, dy, present, C: tl.constexpr, C_PAD: tl.constexpr, BLOCK: tl.constexpr,
             RUNS: tl.constexpr):
    values = weight[:, None] * dy
    if RUNS:
        _runs_add(grad_ptr, tap // C, values, present, C, C_PAD, BLOCK)
    else:
        feat = tl.arange(0, C_PAD)
        tl.atomic_add(grad_ptr + tap[:, None] + feat[None, :], values, mask=present[:, None] & (feat < C)[None, :],
                      sem="relaxed")


@triton.jit
def _add_taps(grad_ptr, t0, t1, t2, t3, fu, fv, ok, dy, valid, C: tl.constexpr, C_PAD: tl.constexpr,
              BLOCK: tl.constexpr, RUNS: tl.constexpr):
    """Adds one level's texel gradients: dy [BLOCK, C_PAD] times each tap's bilinear weight (nvdiffrast's), a cube
    corner's missing weight spread over the other three taps in equal parts."""
    w11 = fu * fv
    w10 = fu - w11
    w01 = fv - w11
    w00 = 1.0 - fu - w01
    spread = (tl.where(t0 < 0, w00, 0.0) + tl.where(t1 < 0, w10, 0.0) + tl.where(t2 < 0, w01, 0.0)
              + tl.where(t3 < 0, w11, 0.0)) * 0.33333333
    spread = tl.where(ok, spread, 0.0)
    ok = valid & ok
    _add_tap(grad_ptr, t0, w00 + spread, dy, ok & (t0 >= 0), C, C_PAD, BLOCK, RUNS)
    _add_tap(grad_ptr, t1, w10 + spread, dy, ok & (t1 >= 0), C, C_PAD, BLOCK, RUNS)
    _add_tap(grad_ptr, t2, w01 + spread, dy, ok & (t2 >= 0), C, C_PAD, BLOCK, RUNS)
    _add_tap(grad_ptr, t3, w11 + spread, dy, ok & (t3 >= 0), C, C_PAD, BLOCK, RUNS)


@triton.jit
def _st_grad(a00, a10, a01, a11, fu, fv, dy, res):
    """d loss / d (s, t) of one level's bilinear lookup, summed over the channels (nvdiffrast's gu, gv)."""
    ad = a11 + a00 - a10 - a01
    scale = res.to(tl.float32)
    gu = tl.sum(dy * ((a10 - a00) + fv[:, None] * ad), axis=1) * scale
    gv = tl.sum(dy * ((a01 - a00) + fu[:, None] * ad), axis=1) * scale
    return gu, gv


@triton.jit(do_not_specialize=["n"])
def _cube_backward_kernel(dir_ptr, bias_ptr, tex_ptr, grad_out_ptr, grad_tex_ptr, grad_dir_ptr, grad_bias_ptr,
                          wrap1_ptr, wrap2_ptr, n, chain_size,
                          R0: tl.constexpr, MAX_LEVEL: tl.constexpr, HAS_LEVEL: tl.constexpr, C: tl.constexpr,
                          C_PAD: tl.constexpr, BLOCK: tl.constexpr, TEX_GRAD: tl.constexpr, DIR_GRAD: tl.constexpr,
                          LEVEL_GRAD: tl.constexpr, RUNS: tl.constexpr, COPIES: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if COPIES > 1:  # this block adds into its own copy of the texel gradients (summed after the kernel)
        grad_tex_ptr += (tl.program_id(0) % COPIES).to(tl.int64) * chain_size
    valid = rows < n
    feat = tl.arange(0, C_PAD)
    ch = (feat < C)[None, :]
    x = tl.load(dir_ptr + rows * 3, mask=valid, other=1.0)
    y = tl.load(dir_ptr + rows * 3 + 1, mask=valid, other=0.0)
    z = tl.load(dir_ptr + rows * 3 + 2, mask=valid, other=0.0)
    dy = tl.load(grad_out_ptr + rows[:, None] * C + feat[None, :], mask=valid[:, None] & ch, other=0.0)
    face, s, t, ok = _face_coords(x, y, z)
    level0, level1, frac = _levels(bias_ptr, rows, valid, HAS_LEVEL, MAX_LEVEL)
    second = frac > 0.0
    dy0 = tl.where(second[:, None], (1.0 - frac)[:, None] * dy, dy)
    t0, t1, t2, t3, fu, fv, res = _footprint(face, s, t, ok, level0, wrap1_ptr, wrap2_ptr, R0, MAX_LEVEL, C)
    if TEX_GRAD:
        _add_taps(grad_tex_ptr, t0, t1, t2, t3, fu, fv, ok, dy0, valid, C, C_PAD, BLOCK, RUNS)
    if DIR_GRAD or LEVEL_GRAD:
        a00, a10, a01, a11 = _fetch(tex_ptr, t0, t1, t2, t3, ok, feat, C)
        gu, gv = _st_grad(a00, a10, a01, a11, fu, fv, dy0, res)
        a = _bilerp(a00, a10, a01, a11, fu, fv)
    if HAS_LEVEL:
        dy1 = tl.where(second[:, None], frac[:, None] * dy, 0.0)
        ok1 = ok & second
        t0, t1, t2, t3, fu, fv, res = _footprint(face, s, t, ok1, level1, wrap1_ptr, wrap2_ptr, R0, MAX_LEVEL, C)
        if TEX_GRAD:
            _add_taps(grad_tex_ptr, t0, t1, t2, t3, fu, fv, ok1, dy1, valid, C, C_PAD, BLOCK, RUNS)
        if DIR_GRAD or LEVEL_GRAD:
            b00, b10, b01, b11 = _fetch(tex_ptr, t0, t1, t2, t3, ok1, feat, C)
            gu1, gv1 = _st_grad(b00, b10, b01, b11, fu, fv, dy1, res)
            gu += tl.where(ok1, gu1, 0.0)
            gv += tl.where(ok1, gv1, 0.0)
            if LEVEL_GRAD:
                b = _bilerp(b00, b10, b01, b11, fu, fv)
                df = tl.where(ok1, tl.sum((b - a) * dy, axis=1), 0.0)
                tl.store(grad_bias_ptr + rows, df, mask=valid)
    if DIR_GRAD:
        gu = tl.where(ok, gu, 0.0)
        gv = tl.where(ok, gv, 0.0)
        gx, gy, gz = _dir_grad(x, y, z, gu, gv)
        tl.store(grad_dir_ptr + rows * 3, gx, mask=valid)
        tl.store(grad_dir_ptr + rows * 3 + 1, gy, mask=valid)
        tl.store(grad_dir_ptr + rows * 3 + 2, gz, mask=valid)


RUNS = True  # sum runs of equal texels before the atomic add (False: one atomic add per tap; for comparisons)
# A small chain (the 16² diffuse cube: 4608 values) takes every lookup's atomic adds into a few thousand addresses,
# where they wait for one another. With MAX_COPIES > 1 the blocks add into up to that many copies of their own (at
# most COPY_ELEMENTS values in all), summed once after the kernel. 1 (one copy) until a GPU measurement says more
# is faster: `python bench/cube_lookup.py --kernels triton triton:64 --orders scanline`.
MAX_COPIES = 1
COPY_ELEMENTS = 1 << 20


def gradient_copies(chain_size: int, max_copies: int | None = None) -> int:
    """How many copies of a chain of ``chain_size`` values the backward adds its texel gradients into."""
    limit = MAX_COPIES if max_copies is None else max_copies
    return int(max(1, min(limit, COPY_ELEMENTS // max(chain_size, 1))))


class _CubeLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dirs: Tensor, level: Tensor | None, *levels: Tensor) -> Tensor:
        n = dirs.shape[0]
        chain = levels[0].reshape(-1) if len(levels) == 1 else torch.cat([lv.reshape(-1) for lv in levels])
        wrap1, wrap2 = wrap_tables(dirs.device)
        out = torch.empty(n, CHANNELS, device=dirs.device, dtype=torch.float32)
        meta = dict(R0=levels[0].shape[1], MAX_LEVEL=len(levels) - 1, HAS_LEVEL=level is not None, C=CHANNELS,
                    C_PAD=4, BLOCK=BLOCK)
        if n:
            _cube_forward_kernel[(triton.cdiv(n, BLOCK),)](dirs, level if level is not None else dirs, chain, out,
                                                           wrap1, wrap2, n, **meta, num_warps=NUM_WARPS)
        ctx.save_for_backward(dirs, level if level is not None else dirs, chain)
        ctx.has_level = level is not None
        ctx.meta = meta
        ctx.sizes = [lv.numel() for lv in levels]
        ctx.shapes = [lv.shape for lv in levels]
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        dirs, level, chain = ctx.saved_tensors
        want_dir, want_level = ctx.needs_input_grad[0], ctx.has_level and ctx.needs_input_grad[1]
        want_tex = any(ctx.needs_input_grad[2:])
        n = dirs.shape[0]
        copies = gradient_copies(chain.numel()) if want_tex else 1
        grad_tex = torch.zeros(copies, chain.numel(), device=chain.device, dtype=chain.dtype) if want_tex else None
        grad_dir = torch.empty_like(dirs) if want_dir else None
        grad_level = torch.zeros_like(level) if want_level else None
        if n and (want_tex or want_dir or want_level):
            _cube_backward_kernel[(triton.cdiv(n, BLOCK),)](
                dirs, level, chain, grad_out.contiguous(), grad_tex if want_tex else chain,
                grad_dir if want_dir else dirs, grad_level if want_level else dirs, *wrap_tables(dirs.device), n,
                chain.numel(), **ctx.meta, TEX_GRAD=want_tex, DIR_GRAD=want_dir, LEVEL_GRAD=want_level, RUNS=RUNS,
                COPIES=copies, num_warps=NUM_WARPS)
        if want_tex:
            grad_tex = grad_tex[0] if copies == 1 else grad_tex.sum(0)
        grads_tex = [None] * len(ctx.sizes)
        if want_tex:
            grads_tex = [g.view(shape) for g, shape in zip(grad_tex.split(ctx.sizes), ctx.shapes)]
        return (grad_dir, grad_level, *grads_tex)


def cube_lookup(levels: list[Tensor], dirs: Tensor, level: Tensor | None = None) -> Tensor:
    """nvdiffrast's cube-mode lookup of ``levels`` (a mip chain: levels[k] is [6, R/2^k, R/2^k, 3], float32) along
    ``dirs`` [..., 3] at the fractional ``level`` [...] (clamped to the chain; None or one level: bilinear in
    levels[0]). Returns [..., 3]. Differentiable with respect to every level, the directions and the level."""
    if dirs.shape[-1] != 3:
        raise ValueError(f"cube_lookup: directions must be [..., 3], got {tuple(dirs.shape)}")
    r0 = levels[0].shape[1]
    for k, lv in enumerate(levels):
        want = (6, r0 >> k, r0 >> k, CHANNELS)
        if tuple(lv.shape) != want or r0 >> k < 1:
            raise ValueError(f"cube_lookup: level {k} is {tuple(lv.shape)}; a chain of RGB cubes halving in size from "
                             f"{tuple(levels[0].shape)} needs {want}")
        if lv.dtype != torch.float32:
            raise ValueError(f"cube_lookup: level {k} is {lv.dtype}; the kernels read float32 texels")
    shape = dirs.shape[:-1]
    flat = dirs.reshape(-1, 3).to(torch.float32).contiguous()
    lvl = None
    if level is not None and len(levels) > 1:
        lvl = level.reshape(-1).to(torch.float32).contiguous()
        if lvl.shape[0] != flat.shape[0]:
            raise ValueError(f"cube_lookup: {lvl.shape[0]} levels for {flat.shape[0]} directions")
    out = _CubeLookup.apply(flat, lvl, *[lv.contiguous() for lv in levels])
    return out.reshape(*shape, CHANNELS)
