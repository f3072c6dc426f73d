"""The per-pixel shading arithmetic of `recon.render.shading.render_pbr` as Triton kernels, forward and backward.

Eager, the shading normal (`shading_normal`: normalise, reference tangent, tangent-space perturbation, bend towards
the geometric normal) and the split-sum inputs and combination (`recon.light.env_light`) are about a hundred
elementwise kernels forward and two hundred backward over the covered pixels. Here they are four: one kernel
computes the shading normal, the diffuse and specular colours, n.v, the reflected direction and the specular mip
level of each pixel; one combines the environment lookups into the colour; each has one backward kernel, which
recomputes the forward values it needs from the inputs (nothing but the inputs is saved).

Values and gradients follow the torch functions, with their conventions at the kinks: ``clamp``/``clamp_min``
pass the gradient at their bounds, ``where`` sends it to the chosen branch, and a length below 1e-20 (squared)
stops the normalisation's gradient as ``clamp_min`` does. The results agree with the torch path to float32
rounding (the order of a few additions differs, and lerp is evaluated as a + t (b - a)).

Needs `triton`; `recon.render.shading` imports this lazily and uses it for float32 CUDA tensors when
``model.render.fused_shading`` is on. In a process that imported triton with TRITON_INTERPRET=1 the kernels run
in Triton's interpreter on CPU tensors (the tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 128
NUM_WARPS = 4
# The kernels spell the torch functions' constants as literals: 1e-20 (`_normalize`'s clamp of the squared length),
# 0.1 (recon.render.shading.NORMAL_THRESHOLD) and 1e-4 (the n.v clamp); the tests compare with those functions.

# Bits of the backward's NEED mask: which input gradients are written (the kernel tests them as literals 1 .. 128).
G_NRM, G_SMOOTH, G_GEOM, G_POS, G_VIEW, G_TAN, G_KD, G_ARM = (1 << i for i in range(8))


@triton.jit
def _load3(ptr, row, stride, mask):
    base = ptr + row * stride
    x = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(base + 1, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(base + 2, mask=mask, other=0.0).to(tl.float32)
    return x, y, z


@triton.jit
def _store3(ptr, row, x, y, z, mask):
    tl.store(ptr + row * 3, x, mask=mask)
    tl.store(ptr + row * 3 + 1, y, mask=mask)
    tl.store(ptr + row * 3 + 2, z, mask=mask)


@triton.jit
def _mul3(x, y, z, s):
    """A vector times a scalar, component by component."""
    return x * s, y * s, z * s


@triton.jit
def _unit(x, y, z):
    """v / |v| as `_normalize` (rsqrt of the clamped squared length); also returns that rsqrt and squared length."""
    s = x * x + y * y + z * z
    r = tl.rsqrt(tl.maximum(s, 1e-20))
    return x * r, y * r, z * r, r, s


@triton.jit
def _unit_grad(x, y, z, r, s, gx, gy, gz):
    """Gradient of v * rsqrt(max(v.v, eps)) w.r.t. v, given the upstream g: g r - v (g.v) r^3 (where v.v >= eps)."""
    k = tl.where(s >= 1e-20, (gx * x + gy * y + gz * z) * (r * r * r), 0.0)
    return gx * r - x * k, gy * r - y * k, gz * r - z * k


@triton.jit(do_not_specialize=["n_rows"])  # n_rows changes every step: one compiled variant
def _shading_kernel(
    nrm_ptr, smooth_ptr, geom_ptr, pos_ptr, view_ptr, tan_ptr, hand_ptr, kd_ptr, arm_ptr,  # [N,3] rows ([N,1] hand)
    s_nrm, s_smooth, s_geom, s_pos, s_view, s_tan, s_hand, s_kd, s_arm,  # their row strides (channel stride 1)
    o_n_ptr, o_diff_ptr, o_spec_ptr, o_ndv_ptr, o_refl_ptr, o_mip_ptr,  # forward outputs, contiguous
    g_n_ptr, g_diff_ptr, g_spec_ptr, g_ndv_ptr, g_refl_ptr, g_mip_ptr,  # backward: upstream gradients, contiguous
    d_nrm_ptr, d_smooth_ptr, d_geom_ptr, d_pos_ptr, d_view_ptr, d_tan_ptr, d_kd_ptr, d_arm_ptr,  # input gradients
    n_rows, hand_value, n_levels, min_rough, max_rough,
    PERTURB: tl.constexpr,  # a tangent-space normal perturbs the interpolated normal
    TANGENT: tl.constexpr,  # per-pixel tangents (else the reference tangent cross(+y, n))
    HAND: tl.constexpr,  # per-pixel handedness (else hand_value)
    ONE_LEVEL: tl.constexpr,  # a specular chain of one level: the mip level is 0
    FORWARD: tl.constexpr,
    NEED: tl.constexpr,  # backward: bit mask of the input gradients to write (G_* above)
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = rows < n_rows
    r64 = rows.to(tl.int64)

    # ---------------------------------------------------------------- forward (recomputed in the backward)
    sx, sy, sz = _load3(smooth_ptr, r64, s_smooth, m)
    n0x, n0y, n0z, r0, q0 = _unit(sx, sy, sz)
    if PERTURB:
        nx, ny, nz = _load3(nrm_ptr, r64, s_nrm, m)
        if TANGENT:
            tgx, tgy, tgz = _load3(tan_ptr, r64, s_tan, m)
        else:  # reference_tangent: normalize(cross(+y, n)) = normalize((n.z, 0, -n.x)), else +x
            use_t = (n0z * n0z + n0x * n0x) > 1e-12
            ex = tl.where(use_t, n0z, 1.0)
            ez = tl.where(use_t, -n0x, 0.0)
            ey = tl.zeros_like(ex)
            tgx, tgy, tgz, r_ref, q_ref = _unit(ex, ey, ez)
        if HAND:
            h = tl.load(hand_ptr + r64 * s_hand, mask=m, other=1.0).to(tl.float32)
        else:
            h = tl.zeros_like(sx) + hand_value
        d1 = tgx * n0x + tgy * n0y + tgz * n0z
        ux = tgx - d1 * n0x
        uy = tgy - d1 * n0y
        uz = tgz - d1 * n0z
        tx, ty, tz, r_u, q_u = _unit(ux, uy, uz)
        bx = (n0y * tz - n0z * ty) * h
        by = (n0z * tx - n0x * tz) * h
        bz = (n0x * ty - n0y * tx) * h
        zc = tl.maximum(nz, 0.0)
        px = tx * nx + bx * ny + n0x * zc
        py = ty * nx + by * ny + n0y * zc
        pz = tz * nx + bz * ny + n0z * zc
        n1x, n1y, n1z, r_p, q_p = _unit(px, py, pz)
    else:
        n1x, n1y, n1z = n0x, n0y, n0z
    posx, posy, posz = _load3(pos_ptr, r64, s_pos, m)
    vpx, vpy, vpz = _load3(view_ptr, r64, s_view, m)
    dvx = vpx - posx
    dvy = vpy - posy
    dvz = vpz - posz
    wx, wy, wz, r_w, q_w = _unit(dvx, dvy, dvz)  # towards the camera
    gex, gey, gez = _load3(geom_ptr, r64, s_geom, m)
    sgn = tl.where(gex * wx + gey * wy + gez * wz > 0.0, 1.0, -1.0)  # bend_normal: two-sided
    shx, shy, shz = _mul3(n1x, n1y, n1z, sgn)
    gsx, gsy, gsz = _mul3(gex, gey, gez, sgn)
    q = (wx * shx + wy * shy + wz * shz) / 0.1
    tb = tl.minimum(tl.maximum(q, 0.0), 1.0)
    nsx = gsx + tb * (shx - gsx)
    nsy = gsy + tb * (shy - gsy)
    nsz = gsz + tb * (shz - gsz)
    kdx, kdy, kdz = _load3(kd_ptr, r64, s_kd, m)
    rough = tl.load(arm_ptr + r64 * s_arm + 1, mask=m, other=0.5).to(tl.float32)
    metal = tl.load(arm_ptr + r64 * s_arm + 2, mask=m, other=0.0).to(tl.float32)
    ndv_raw = wx * nsx + wy * nsy + wz * nsz
    ndv = tl.maximum(ndv_raw, 1e-4)
    rrx = 2.0 * ndv * nsx - wx
    rry = 2.0 * ndv * nsy - wy
    rrz = 2.0 * ndv * nsz - wz
    rfx, rfy, rfz, r_r, q_r = _unit(rrx, rry, rrz)
    lo_mult = tl.maximum(n_levels - 2.0, 0.0)
    if ONE_LEVEL:
        mip = tl.zeros_like(rough)
    else:
        lo = (tl.minimum(tl.maximum(rough, min_rough), max_rough) - min_rough) / (max_rough - min_rough) * lo_mult
        hi = (tl.minimum(tl.maximum(rough, max_rough), 1.0) - max_rough) / (1.0 - max_rough) + (n_levels - 2.0)
        level = tl.where(rough < max_rough, lo, hi)
        mip = tl.minimum(tl.maximum(level, 0.0), n_levels - 1.0)

    if FORWARD:
        _store3(o_n_ptr, r64, nsx, nsy, nsz, m)
        _store3(o_diff_ptr, r64, kdx * (1.0 - metal), kdy * (1.0 - metal), kdz * (1.0 - metal), m)
        _store3(o_spec_ptr, r64, (1.0 - metal) * 0.04 + kdx * metal, (1.0 - metal) * 0.04 + kdy * metal,
                (1.0 - metal) * 0.04 + kdz * metal, m)
        tl.store(o_ndv_ptr + r64, ndv, mask=m)
        _store3(o_refl_ptr, r64, rfx, rfy, rfz, m)
        tl.store(o_mip_ptr + r64, mip, mask=m)
    else:
        # ------------------------------------------------------------ backward, in reverse order
        g_nsx, g_nsy, g_nsz = _load3(g_n_ptr, r64, 3, m)
        g_dfx, g_dfy, g_dfz = _load3(g_diff_ptr, r64, 3, m)
        g_spx, g_spy, g_spz = _load3(g_spec_ptr, r64, 3, m)
        g_ndv = tl.load(g_ndv_ptr + r64, mask=m, other=0.0)
        g_rfx, g_rfy, g_rfz = _load3(g_refl_ptr, r64, 3, m)
        g_mip = tl.load(g_mip_ptr + r64, mask=m, other=0.0)
        if NEED & 128:  # arm: roughness through the mip level, metallic through the colours
            if ONE_LEVEL:
                g_rough = tl.zeros_like(rough)
            else:
                g_level = tl.where((level >= 0.0) & (level <= n_levels - 1.0), g_mip, 0.0)
                in_lo = (rough >= min_rough) & (rough <= max_rough)
                in_hi = (rough >= max_rough) & (rough <= 1.0)
                g_rough = tl.where(rough < max_rough,
                                   tl.where(in_lo, g_level * lo_mult / (max_rough - min_rough), 0.0),
                                   tl.where(in_hi, g_level / (1.0 - max_rough), 0.0))
            g_metal = (g_spx * (kdx - 0.04) + g_spy * (kdy - 0.04) + g_spz * (kdz - 0.04)
                       - (g_dfx * kdx + g_dfy * kdy + g_dfz * kdz))
            tl.store(d_arm_ptr + r64 * 3, tl.zeros_like(rough), mask=m)
            tl.store(d_arm_ptr + r64 * 3 + 1, g_rough, mask=m)
            tl.store(d_arm_ptr + r64 * 3 + 2, g_metal, mask=m)
        if NEED & 64:
            _store3(d_kd_ptr, r64, g_spx * metal + g_dfx * (1.0 - metal), g_spy * metal + g_dfy * (1.0 - metal),
                    g_spz * metal + g_dfz * (1.0 - metal), m)
        # reflvec = normalize(2 n.v ns - w)
        g_rrx, g_rry, g_rrz = _unit_grad(rrx, rry, rrz, r_r, q_r, g_rfx, g_rfy, g_rfz)
        g_ndv = g_ndv + 2.0 * (g_rrx * nsx + g_rry * nsy + g_rrz * nsz)
        g_nsx += 2.0 * ndv * g_rrx
        g_nsy += 2.0 * ndv * g_rry
        g_nsz += 2.0 * ndv * g_rrz
        g_wx = -g_rrx
        g_wy = -g_rry
        g_wz = -g_rrz
        g_ndv_raw = tl.where(ndv_raw >= 1e-4, g_ndv, 0.0)
        g_wx += g_ndv_raw * nsx
        g_wy += g_ndv_raw * nsy
        g_wz += g_ndv_raw * nsz
        g_nsx += g_ndv_raw * wx
        g_nsy += g_ndv_raw * wy
        g_nsz += g_ndv_raw * wz
        # ns = lerp(gs, sh, tb), tb = clamp(w.sh / 0.1, 0, 1)
        g_tb = g_nsx * (shx - gsx) + g_nsy * (shy - gsy) + g_nsz * (shz - gsz)
        g_q = tl.where((q >= 0.0) & (q <= 1.0), g_tb, 0.0) / 0.1
        g_shx = g_nsx * tb + g_q * wx
        g_shy = g_nsy * tb + g_q * wy
        g_shz = g_nsz * tb + g_q * wz
        g_wx += g_q * shx
        g_wy += g_q * shy
        g_wz += g_q * shz
        if NEED & 4:
            _store3(d_geom_ptr, r64, g_nsx * (1.0 - tb) * sgn, g_nsy * (1.0 - tb) * sgn, g_nsz * (1.0 - tb) * sgn, m)
        g_n1x, g_n1y, g_n1z = _mul3(g_shx, g_shy, g_shz, sgn)
        # w = normalize(view_pos - pos)
        g_dvx, g_dvy, g_dvz = _unit_grad(dvx, dvy, dvz, r_w, q_w, g_wx, g_wy, g_wz)
        if NEED & 8:
            _store3(d_pos_ptr, r64, -g_dvx, -g_dvy, -g_dvz, m)
        if NEED & 16:
            _store3(d_view_ptr, r64, g_dvx, g_dvy, g_dvz, m)
        if PERTURB:
            # n1 = normalize(p), p = t nrm.x + b nrm.y + n0 max(nrm.z, 0), b = cross(n0, t) h
            g_px, g_py, g_pz = _unit_grad(px, py, pz, r_p, q_p, g_n1x, g_n1y, g_n1z)
            if NEED & 1:
                g_zc = g_px * n0x + g_py * n0y + g_pz * n0z
                _store3(d_nrm_ptr, r64, g_px * tx + g_py * ty + g_pz * tz, g_px * bx + g_py * by + g_pz * bz,
                        tl.where(nz >= 0.0, g_zc, 0.0), m)
            g_tx, g_ty, g_tz = _mul3(g_px, g_py, g_pz, nx)
            g_n0x, g_n0y, g_n0z = _mul3(g_px, g_py, g_pz, zc)
            g_cx, g_cy, g_cz = _mul3(g_px * ny, g_py * ny, g_pz * ny, h)
            # c = n0 x t: d/dn0 = t x g_c, d/dt = g_c x n0
            g_n0x += ty * g_cz - tz * g_cy
            g_n0y += tz * g_cx - tx * g_cz
            g_n0z += tx * g_cy - ty * g_cx
            g_tx += g_cy * n0z - g_cz * n0y
            g_ty += g_cz * n0x - g_cx * n0z
            g_tz += g_cx * n0y - g_cy * n0x
            # t = normalize(u), u = tg - (tg.n0) n0
            g_ux, g_uy, g_uz = _unit_grad(ux, uy, uz, r_u, q_u, g_tx, g_ty, g_tz)
            g_d1 = -(g_ux * n0x + g_uy * n0y + g_uz * n0z)
            g_n0x += -d1 * g_ux + g_d1 * tgx
            g_n0y += -d1 * g_uy + g_d1 * tgy
            g_n0z += -d1 * g_uz + g_d1 * tgz
            g_tgx = g_ux + g_d1 * n0x
            g_tgy = g_uy + g_d1 * n0y
            g_tgz = g_uz + g_d1 * n0z
            if TANGENT:
                if NEED & 32:
                    _store3(d_tan_ptr, r64, g_tgx, g_tgy, g_tgz, m)
            else:  # tg = normalize((n0.z, 0, -n0.x)) where that is long enough, else constant
                g_ex, g_ey, g_ez = _unit_grad(ex, ey, ez, r_ref, q_ref, g_tgx, g_tgy, g_tgz)
                g_n0z += tl.where(use_t, g_ex, 0.0)
                g_n0x -= tl.where(use_t, g_ez, 0.0)
        else:
            g_n0x, g_n0y, g_n0z = g_n1x, g_n1y, g_n1z
        if NEED & 2:
            g_sx, g_sy, g_sz = _unit_grad(sx, sy, sz, r0, q0, g_n0x, g_n0y, g_n0z)
            _store3(d_smooth_ptr, r64, g_sx, g_sy, g_sz, m)


@triton.jit(do_not_specialize=["n_rows"])  # n_rows changes every step: one compiled variant
def _combine_kernel(
    irr_ptr, diff_ptr, spec_ptr, spec_col_ptr, fg_ptr, arm_ptr,  # [N,3] rows, fg [N,2]
    s_irr, s_diff, s_spec, s_spec_col, s_fg, s_arm,
    out_ptr,  # forward: [N,3] colour
    g_ptr,  # backward: [N,3] upstream gradient, contiguous
    d_irr_ptr, d_diff_ptr, d_spec_ptr, d_spec_col_ptr, d_fg_ptr, d_arm_ptr,  # backward: contiguous input gradients
    n_rows,
    FORWARD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = rows < n_rows
    r64 = rows.to(tl.int64)
    f0 = tl.load(fg_ptr + r64 * s_fg, mask=m, other=0.0).to(tl.float32)
    f1 = tl.load(fg_ptr + r64 * s_fg + 1, mask=m, other=0.0).to(tl.float32)
    keep = 1.0 - tl.load(arm_ptr + r64 * s_arm, mask=m, other=0.0).to(tl.float32)  # 1 - occlusion
    g_f0 = tl.zeros_like(f0)
    g_f1 = tl.zeros_like(f0)
    g_keep = tl.zeros_like(f0)
    for c in tl.static_range(3):
        irr = tl.load(irr_ptr + r64 * s_irr + c, mask=m, other=0.0).to(tl.float32)
        diff = tl.load(diff_ptr + r64 * s_diff + c, mask=m, other=0.0).to(tl.float32)
        spec = tl.load(spec_ptr + r64 * s_spec + c, mask=m, other=0.0).to(tl.float32)
        spec_col = tl.load(spec_col_ptr + r64 * s_spec_col + c, mask=m, other=0.0).to(tl.float32)
        a = spec_col * f0 + f1
        shaded = irr * diff + spec * a
        if FORWARD:
            tl.store(out_ptr + r64 * 3 + c, shaded * keep, mask=m)
        else:
            g = tl.load(g_ptr + r64 * 3 + c, mask=m, other=0.0)
            g_keep += g * shaded
            gs = g * keep
            g_a = gs * spec
            tl.store(d_irr_ptr + r64 * 3 + c, gs * diff, mask=m)
            tl.store(d_diff_ptr + r64 * 3 + c, gs * irr, mask=m)
            tl.store(d_spec_ptr + r64 * 3 + c, gs * a, mask=m)
            tl.store(d_spec_col_ptr + r64 * 3 + c, g_a * f0, mask=m)
            g_f0 += g_a * spec_col
            g_f1 += g_a
    if not FORWARD:
        tl.store(d_fg_ptr + r64 * 2, g_f0, mask=m)
        tl.store(d_fg_ptr + r64 * 2 + 1, g_f1, mask=m)
        tl.store(d_arm_ptr + r64 * 3, -g_keep, mask=m)
        tl.store(d_arm_ptr + r64 * 3 + 1, tl.zeros_like(g_keep), mask=m)
        tl.store(d_arm_ptr + r64 * 3 + 2, tl.zeros_like(g_keep), mask=m)


def _rows(t: Tensor, channels: int) -> Tensor:
    """[N, channels] with unit channel stride (a view when it already has one), float32."""
    t = t.reshape(-1, channels)
    if t.dtype != torch.float32:
        t = t.float()
    return t if t.stride(1) == 1 or channels == 1 else t.contiguous()


def _run(kernel, n: int, *args, **meta) -> None:
    grid = (triton.cdiv(n, BLOCK),)
    if not args[0].is_cuda:  # Triton's interpreter (TRITON_INTERPRET=1): the CPU tests
        kernel[grid](*args, BLOCK=BLOCK, **meta)
        return
    with torch.cuda.device(args[0].device):
        kernel[grid](*args, BLOCK=BLOCK, num_warps=NUM_WARPS, **meta)


class _ShadingInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, nrm, smooth, geom, pos, view, tangent, hand, kd, arm, hand_value, levels):
        n = smooth.shape[0]
        inputs = [nrm, smooth, geom, pos, view, tangent, hand, kd, arm]
        rows = [smooth if t is None else _rows(t, t.shape[-1]) for t in inputs]  # None: an unused pointer
        outs = [torch.empty(n, c, device=smooth.device, dtype=torch.float32) for c in (3, 3, 3, 1, 3)]
        outs.append(torch.empty(n, device=smooth.device, dtype=torch.float32))
        flags = dict(PERTURB=nrm is not None, TANGENT=tangent is not None, HAND=hand is not None,
                     ONE_LEVEL=levels[0] == 1)
        ctx.save_for_backward(*rows)
        ctx.flags, ctx.scalars = flags, (float(hand_value), float(levels[0]), float(levels[1]), float(levels[2]))
        ctx.dtypes = [None if t is None else t.dtype for t in inputs]
        if n > 0:
            _run(_shading_kernel, n, *rows, *(t.stride(0) for t in rows), *outs, *([smooth] * 14), n, *ctx.scalars,
                 FORWARD=True, NEED=0, **flags)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_n, g_diff, g_spec, g_ndv, g_refl, g_mip):
        rows = ctx.saved_tensors
        n = rows[1].shape[0]
        need_bits = [G_NRM, G_SMOOTH, G_GEOM, G_POS, G_VIEW, G_TAN, 0, G_KD, G_ARM]
        need = 0
        grads = []
        for i, bit in enumerate(need_bits):
            wanted = bit and ctx.needs_input_grad[i] and ctx.dtypes[i] is not None
            need |= bit if wanted else 0
            grads.append(torch.empty(n, 3, device=rows[1].device, dtype=torch.float32) if wanted else None)
        if need and n > 0:
            ups = [g.reshape(n, -1).float().contiguous() for g in (g_n, g_diff, g_spec, g_ndv, g_refl, g_mip)]
            dummy = rows[1]
            out_grads = [g if g is not None else dummy for i, g in enumerate(grads) if i != 6]
            _run(_shading_kernel, n, *rows, *(t.stride(0) for t in rows), *([dummy] * 6), *ups, *out_grads, n,
                 *ctx.scalars, FORWARD=False, NEED=need, **ctx.flags)
        result = [None if g is None else g.to(ctx.dtypes[i]) for i, g in enumerate(grads)]
        return (*result, None, None)


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, irr, diff, spec, spec_col, fg, arm):
        rows = [_rows(t, c) for t, c in ((irr, 3), (diff, 3), (spec, 3), (spec_col, 3), (fg, 2), (arm, 3))]
        n = rows[0].shape[0]
        out = torch.empty(n, 3, device=irr.device, dtype=torch.float32)
        if n > 0:
            _run(_combine_kernel, n, *rows, *(t.stride(0) for t in rows), out, *([out] * 7), n, FORWARD=True)
        ctx.save_for_backward(*rows)
        ctx.shapes = [t.shape for t in (irr, diff, spec, spec_col, fg, arm)]
        ctx.dtype = irr.dtype
        return out.reshape(*irr.shape[:-1], 3).to(irr.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        rows = ctx.saved_tensors
        n = rows[0].shape[0]
        grads = [torch.empty(n, c, device=rows[0].device, dtype=torch.float32) for c in (3, 3, 3, 3, 2, 3)]
        if n > 0:
            _run(_combine_kernel, n, *rows, *(t.stride(0) for t in rows), grads[0], g.reshape(n, 3).float().contiguous(),
                 *grads, n, FORWARD=False)
        return tuple(d.reshape(s).to(ctx.dtype) for d, s in zip(grads, ctx.shapes))


def shading_inputs(nrm_ts: Tensor | None, smooth: Tensor, geometric: Tensor, pos: Tensor, view_pos: Tensor,
                   tangent: Tensor | None, handedness: Tensor | float, kd: Tensor, arm: Tensor,
                   levels: tuple[int, float, float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`shading_normal` followed by `recon.light.env_light._split_sum_inputs` (specular), in one kernel each way.

    nrm_ts (None: unperturbed), smooth, geometric, pos, view_pos, tangent (None: the reference tangent), kd, arm:
    [N,3]; handedness: [N,1] or a float. levels: (specular levels, min_roughness, max_roughness) of the light.
    Returns the shading normal, diffuse colour, specular colour [N,3], n.v [N,1], reflected direction [N,3] and
    the fractional mip level [N], float32.
    """
    n = smooth.shape[0]
    for name, t in (("nrm_ts", nrm_ts), ("smooth", smooth), ("geometric", geometric), ("pos", pos),
                    ("view_pos", view_pos), ("tangent", tangent), ("kd", kd), ("arm", arm)):
        if t is not None and tuple(t.shape) != (n, 3):
            raise ValueError(f"fused shading: {name} must be [{n}, 3] like smooth, got {tuple(t.shape)}.")
    if nrm_ts is None:  # the tangent frame only serves the perturbation
        tangent, handedness = None, 1.0
    hand = handedness if torch.is_tensor(handedness) else None
    if hand is not None and tuple(hand.shape) != (n, 1):
        raise ValueError(f"fused shading: handedness must be [{n}, 1] or a float, got {tuple(hand.shape)}.")
    hand_value = 1.0 if hand is not None else float(handedness)
    return _ShadingInputs.apply(nrm_ts, smooth, geometric, pos, view_pos, tangent, hand, kd, arm, hand_value,
                                tuple(levels))


def split_sum_combine(irradiance: Tensor, diff_col: Tensor, spec: Tensor, spec_col: Tensor, fg: Tensor,
                      arm: Tensor) -> Tensor:
    """`recon.light.env_light._split_sum_combine` (specular) in one kernel each way: all [N,3] but fg [N,2]."""
    return _Combine.apply(irradiance, diff_col, spec, spec_col, fg, arm)
