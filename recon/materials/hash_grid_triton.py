"""Fused Triton kernels for `HashGridEncoding` (backend `triton`).

One kernel serves the forward and the backward pass. For BLOCK points and one level it computes
the lattice cell, the 2^D corner rows (dense or hashed) and the D-linear weights in registers,
then either gathers and sums the corner features (forward) or atomically adds weight * upstream
gradient into the table gradient and, when the points need a gradient, accumulates d out / d x
over the corners. Nothing but the inputs is saved between the passes. The table gradient of a
corner is first summed over each run of consecutive points that share it (a segmented scan,
`_runs_add`, for the RUN_LEVELS coarsest levels): one atomic add per run instead of per point.
An optional row mask leaves points out: they load, gather and add nothing, and their output and point-gradient
rows are zero (the padding rows of a fixed-size batch, `hash_grid_encode`'s row_mask).

Two launch layouts compute the same values. Each pass takes the layout its encoding names
(`HashGridEncoding(triton_layout=...)`, model.material.encoding.triton_layout) or else LAUNCH_LAYOUT's
(module-level, read at every call; "levels" for both passes):

- `levels`: a program handles BLOCK points of one level, grid = [ceil(N / BLOCK), L]; consecutive
  programs share a level, so the level's rows stay in L2. The levels of a point meet in atomic
  adds into the point gradient.
- `points`: a program handles BLOCK_POINTS points for all L levels in a loop, grid =
  [ceil(N / BLOCK)]; x is loaded and clamped once, each program reads and writes whole rows of
  the [N, L * F] output and upstream gradient, and the point gradient is summed over the levels
  in registers and stored once (no atomics, no zero-initialisation).

The maths is that of the `torch` backend in `hash_grid.py` (tiny-cuda-nn's conventions, see that
module's docstring), operation for operation: lattice position (clamp(x, 0, 1) * s_l) + 0.5 with
two roundings (floating-point contraction into fused multiply-adds is disabled), cell = floor,
weight of a corner = ((w_0 * w_1) * w_2), dense rows wrapped once modulo the level size, hashed
rows the XOR of uint32 products masked to the level size. Outputs then agree with the torch
backend up to the order of the corner sum; table gradients up to the order of the atomic adds,
point gradients up to the order of the sum over the levels.

This module needs `triton` (present wherever CUDA builds of PyTorch are installed); `hash_grid.py`
imports it lazily. Kernels are compiled for CUDA tensors; in a process that imported triton with
TRITON_INTERPRET=1 in its environment they run in Triton's interpreter instead (numpy, CPU
tensors too; for tests). Triton fixes that choice when it is first imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_INPUT_DIMS = 3  # the kernel unrolls dimensions 0..2; 1-D, 2-D and 3-D inputs are supported

# Launch layouts (see the module docstring), chosen per pass; read at every call, so a caller may
# change them between calls (bench/hash_grid.py times each combination).
LAUNCH_LAYOUTS = ("levels", "points")
LAUNCH_LAYOUT = {"forward": "levels", "backward": "levels"}

# Points per program and warps per program on the GPU. A program of the `points` layout covers all
# L levels of its points, so it takes fewer points. The interpreter runs one program at a time in
# numpy, where a few large programs are much faster than many small ones.
BLOCK_FORWARD = 256
BLOCK_BACKWARD = 256
BLOCK_POINTS = 128
NUM_WARPS = 4
BLOCK_INTERPRETER = 1024

# The backward pass of the RUN_LEVELS coarsest levels (None: all of them) sums the table gradient over runs of
# consecutive points in the same cell corner before adding it (`_runs_add`): covered pixels come in scanline order,
# so at coarse levels long runs of points fall in one cell, and atomic adds on one address run one after another.
# On one H200 with 1.3M points in scanline order the backward took 6.07 ms with no level summed over runs, 2.72 ms
# with 5 and 2.23 ms with all 16 (bench/results/hash-grid-runs-cuda-nvidia-h200.json). Triton's interpreter runs
# the scan as a slow Python loop: there None means no level (tests ask for runs explicitly). Read at every call.
RUN_LEVELS: int | None = None
# `tl.gather` (Triton 3.2 on) finds each point's neighbours in the block; older Triton adds point by point.
RUNS_SUPPORTED = hasattr(tl, "gather")


@triton.jit
def _load_clamped(ptr, valid, table_ptr):
    """BLOCK coordinates in the table's dtype clamped to [0, 1], and where they were inside (gradient mask)."""
    x = tl.load(ptr, mask=valid, other=0.0).to(table_ptr.dtype.element_ty)
    inside = (x >= 0.0) & (x <= 1.0)
    return tl.minimum(tl.maximum(x, 0.0), 1.0), inside


@triton.jit
def _axis(xc, scale, mult):
    """Weights (1 - frac, frac) of the low / high vertex along one axis and their index terms
    (vertex * multiplier in uint32 arithmetic: wraps like tiny-cuda-nn's hash; dense terms stay
    below 2^31)."""
    pos = xc * scale + 0.5
    cell = pos.to(tl.int32)  # pos >= 0.5, so truncation is floor
    hi_w = pos - cell.to(xc.dtype)
    lo_w = 1.0 - hi_w
    lo_t = cell.to(tl.uint32) * mult
    hi_t = lo_t + mult
    return lo_w, hi_w, lo_t, hi_t


@triton.jit
def _segment_add(start_a, sum_a, start_b, sum_b):
    """Segmented sum (associative): a run restarts where `start` is set."""
    return start_a | start_b, tl.where(start_b != 0, sum_b, sum_a + sum_b)


@triton.jit
def _runs_add(ptr, rows, values, valid, F: tl.constexpr, F_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Atomically adds values [BLOCK, F_PAD] into rows [BLOCK] of ptr ([rows, F] elements) with one atomic add per
    run of equal consecutive rows: each run's values are summed first (a segmented scan) and its last point adds
    the sum. Neighbouring points share cells at the coarse levels, whose atomic adds on one address would
    otherwise run one after another."""
    idx = tl.arange(0, BLOCK)
    rows = tl.where(valid, rows, -1 - idx.to(tl.int64))  # masked points: runs of their own, never added
    prev = tl.gather(rows, tl.maximum(idx - 1, 0), 0)
    nxt = tl.gather(rows, tl.minimum(idx + 1, BLOCK - 1), 0)
    start = ((idx == 0) | (rows != prev)).to(tl.int32)
    last = (idx == BLOCK - 1) | (rows != nxt)
    feat = tl.arange(0, F_PAD)
    start2 = tl.broadcast_to(start[:, None], (BLOCK, F_PAD))
    _, sums = tl.associative_scan((start2, values), 0, _segment_add)
    mask = (last & valid)[:, None] & (feat < F)[None, :]
    tl.atomic_add(ptr + rows[:, None] * F + feat[None, :], sums, mask=mask, sem="relaxed")


@triton.jit
def _level(
    level,  # scalar level index
    xc0, xc1, xc2,  # [BLOCK] clamped coordinates (xc1, xc2 unused below D = 2, 3)
    n64,  # [BLOCK] int64 point indices
    valid,  # [BLOCK] n < n_points and the row mask set: the points computed
    stored,  # [BLOCK] n < n_points: the rows the forward stores (zeros where not valid)
    table_ptr, out_ptr, grad_out_ptr, grad_table_ptr,
    scale_ptr, mult_ptr, size_ptr, offset_ptr, n_dense, grad_scale, n_runs,
    D: tl.constexpr,
    F: tl.constexpr,
    F_PAD: tl.constexpr,
    L: tl.constexpr,
    BLOCK: tl.constexpr,
    FORWARD: tl.constexpr,
    TABLE_GRAD: tl.constexpr,
    INPUT_GRAD: tl.constexpr,
    RUNS: tl.constexpr,
):
    """One level of BLOCK points. Forward: stores the level's [BLOCK, F] slice of the output.
    Backward: adds the table gradient atomically (levels below n_runs: once per run of points in one
    cell corner, `_runs_add`) and returns this level's d out / d x (dimensions 0..2, times s_l, not
    yet masked to the cube; zeros where not computed)."""
    feat = tl.arange(0, F_PAD)
    valid_f = valid[:, None] & (feat < F)[None, :]
    dtype = table_ptr.dtype.element_ty
    scale = tl.load(scale_ptr + level).to(dtype)
    size = tl.load(size_ptr + level).to(tl.uint32)  # <= 2^30
    first_row = tl.load(offset_ptr + level)  # int64
    hashed = level >= n_dense

    lo_w0, hi_w0, lo_t0, hi_t0 = _axis(xc0, scale, tl.load(mult_ptr + level * D).to(tl.uint32))
    if D > 1:
        lo_w1, hi_w1, lo_t1, hi_t1 = _axis(xc1, scale, tl.load(mult_ptr + level * D + 1).to(tl.uint32))
    if D > 2:
        lo_w2, hi_w2, lo_t2, hi_t2 = _axis(xc2, scale, tl.load(mult_ptr + level * D + 2).to(tl.uint32))

    dx0 = tl.zeros([BLOCK], dtype=dtype)
    dx1 = tl.zeros([BLOCK], dtype=dtype)
    dx2 = tl.zeros([BLOCK], dtype=dtype)
    if FORWARD:
        acc = tl.zeros([BLOCK, F_PAD], dtype=dtype)
    else:
        g = tl.load(grad_out_ptr + n64[:, None] * (L * F) + level * F + feat[None, :], mask=valid_f, other=0.0)
        g = g.to(dtype)
        g_table = g * grad_scale

    # Corner c takes the high vertex along dimension d when bit d of c is set (x fastest).
    for c in tl.static_range(2**D):
        if c & 1:
            w0 = hi_w0
            t0 = hi_t0
        else:
            w0 = lo_w0
            t0 = lo_t0
        weight = w0
        dense_row = t0
        hash_row = t0
        if D > 1:
            if (c >> 1) & 1:
                w1 = hi_w1
                t1 = hi_t1
            else:
                w1 = lo_w1
                t1 = lo_t1
            weight = weight * w1
            dense_row = dense_row + t1
            hash_row = hash_row ^ t1
        if D > 2:
            if (c >> 2) & 1:
                w2 = hi_w2
                t2 = hi_t2
            else:
                w2 = lo_w2
                t2 = lo_t2
            weight = weight * w2
            dense_row = dense_row + t2
            hash_row = hash_row ^ t2
        # A dense row is below 2 * size (the half-cell shift reaches one vertex past the grid),
        # so one subtraction is the modulo; hashed levels hold a power of two rows.
        dense_row = tl.where(dense_row >= size, dense_row - size, dense_row)
        row = tl.where(hashed, hash_row & (size - 1), dense_row)
        element = (first_row + row.to(tl.int64))[:, None] * F + feat[None, :]

        if FORWARD:
            values = tl.load(table_ptr + element, mask=valid_f, other=0.0)
            acc += values * weight[:, None]
        else:
            if TABLE_GRAD:
                if RUNS:  # compiled in only where some level sums over runs (and tl.gather exists)
                    if level < n_runs:
                        _runs_add(grad_table_ptr, first_row + row.to(tl.int64), g_table * weight[:, None], valid,
                                  F, F_PAD, BLOCK)
                    else:
                        tl.atomic_add(grad_table_ptr + element, g_table * weight[:, None], mask=valid_f,
                                      sem="relaxed")
                else:
                    tl.atomic_add(grad_table_ptr + element, g_table * weight[:, None], mask=valid_f, sem="relaxed")
            if INPUT_GRAD:
                values = tl.load(table_ptr + element, mask=valid_f, other=0.0)
                dot = tl.sum(values * g, axis=1)  # d loss / d weight of this corner
                # d weight / d frac_d = +-(product of the other dimensions' weights).
                if D == 1:
                    d0 = dot
                if D == 2:
                    d0 = dot * w1
                    d1 = dot * w0
                if D == 3:
                    d0 = dot * (w1 * w2)
                    d1 = dot * (w0 * w2)
                    d2 = dot * (w0 * w1)
                if c & 1:
                    dx0 += d0
                else:
                    dx0 -= d0
                if D > 1:
                    if (c >> 1) & 1:
                        dx1 += d1
                    else:
                        dx1 -= d1
                if D > 2:
                    if (c >> 2) & 1:
                        dx2 += d2
                    else:
                        dx2 -= d2

    if FORWARD:
        stored_f = stored[:, None] & (feat < F)[None, :]
        tl.store(out_ptr + n64[:, None] * (L * F) + level * F + feat[None, :], acc, mask=stored_f)
    # d frac / d x = s_l.
    return dx0 * scale, dx1 * scale, dx2 * scale


@triton.jit(do_not_specialize=["n_points"])  # n_points changes every step: one compiled variant
def _hash_grid_kernel(
    x_ptr,  # [N, D] points, any float dtype, strides (stride_xn, stride_xd)
    table_ptr,  # [n_entries * F] table, float32 or float64: the compute dtype
    out_ptr,  # forward: [N, L * F] output in the table's dtype
    grad_out_ptr,  # backward: [N, L * F] contiguous upstream gradient in the table's dtype
    grad_table_ptr,  # backward: [n_entries * F] zero-initialised, table dtype
    grad_x_ptr,  # backward: [N, D] contiguous, table dtype; zero-initialised for ALL_LEVELS false
    scale_ptr,  # [L] float32 s_l
    mult_ptr,  # [L, D] int64: R_l^d (dense levels) or hash primes (hashed levels)
    size_ptr,  # [L] int64 rows per level
    offset_ptr,  # [L] int64 first row of each level
    mask_ptr,  # [N] bool rows to compute (MASKED only): the others are zero and get no gradient
    n_points,
    stride_xn,
    stride_xd,
    n_dense,  # levels 0 .. n_dense - 1 are dense, the others hashed
    grad_scale,  # multiplies the table gradient only
    n_runs,  # backward: levels 0 .. n_runs - 1 add their table gradient once per run of points (`_runs_add`)
    D: tl.constexpr,
    F: tl.constexpr,
    F_PAD: tl.constexpr,  # F rounded up to a power of two (Triton block shapes)
    L: tl.constexpr,
    BLOCK: tl.constexpr,
    FORWARD: tl.constexpr,
    TABLE_GRAD: tl.constexpr,
    INPUT_GRAD: tl.constexpr,  # backward only
    RUNS: tl.constexpr,  # backward: run sums compiled in (n_runs > 0 and `tl.gather` available)
    ALL_LEVELS: tl.constexpr,  # `points` layout: grid [ceil(N / BLOCK)], else `levels`: [ceil(N / BLOCK), L]
    MASKED: tl.constexpr,  # mask_ptr given
):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    stored = n < n_points
    valid = stored
    if MASKED:  # rows left out load, gather and add nothing
        valid = stored & (tl.load(mask_ptr + n, mask=stored, other=0) != 0)
    n64 = n.to(tl.int64)  # N * L * F may exceed 2^31
    x_row = x_ptr + n64 * stride_xn
    # x is clamped to the cube; its gradient passes where 0 <= x <= 1, as through torch.clamp.
    xc0, inside0 = _load_clamped(x_row, valid, table_ptr)
    xc1, inside1 = xc0, inside0  # placeholders below D = 2, 3
    xc2, inside2 = xc0, inside0
    if D > 1:
        xc1, inside1 = _load_clamped(x_row + stride_xd, valid, table_ptr)
    if D > 2:
        xc2, inside2 = _load_clamped(x_row + 2 * stride_xd, valid, table_ptr)

    if ALL_LEVELS:
        # The point gradient sums over the levels in registers and is stored once.
        gx0 = tl.zeros([BLOCK], dtype=table_ptr.dtype.element_ty)
        gx1 = tl.zeros([BLOCK], dtype=table_ptr.dtype.element_ty)
        gx2 = tl.zeros([BLOCK], dtype=table_ptr.dtype.element_ty)
        for level in range(L):
            dx0, dx1, dx2 = _level(
                level, xc0, xc1, xc2, n64, valid, stored, table_ptr, out_ptr, grad_out_ptr, grad_table_ptr,
                scale_ptr, mult_ptr, size_ptr, offset_ptr, n_dense, grad_scale, n_runs,
                D, F, F_PAD, L, BLOCK, FORWARD, TABLE_GRAD, INPUT_GRAD, RUNS,
            )
            if INPUT_GRAD:
                gx0 += dx0
                if D > 1:
                    gx1 += dx1
                if D > 2:
                    gx2 += dx2
        if INPUT_GRAD:
            # every row is stored: rows left out by the mask summed zeros
            tl.store(grad_x_ptr + n64 * D, tl.where(inside0, gx0, 0.0), mask=stored)
            if D > 1:
                tl.store(grad_x_ptr + n64 * D + 1, tl.where(inside1, gx1, 0.0), mask=stored)
            if D > 2:
                tl.store(grad_x_ptr + n64 * D + 2, tl.where(inside2, gx2, 0.0), mask=stored)
    else:
        level = tl.program_id(1)
        dx0, dx1, dx2 = _level(
            level, xc0, xc1, xc2, n64, valid, stored, table_ptr, out_ptr, grad_out_ptr, grad_table_ptr,
            scale_ptr, mult_ptr, size_ptr, offset_ptr, n_dense, grad_scale, n_runs,
            D, F, F_PAD, L, BLOCK, FORWARD, TABLE_GRAD, INPUT_GRAD, RUNS,
        )
        if INPUT_GRAD:
            # The L levels of a point meet in the atomic sum.
            tl.atomic_add(grad_x_ptr + n64 * D, tl.where(inside0, dx0, 0.0), mask=valid, sem="relaxed")
            if D > 1:
                tl.atomic_add(grad_x_ptr + n64 * D + 1, tl.where(inside1, dx1, 0.0), mask=valid, sem="relaxed")
            if D > 2:
                tl.atomic_add(grad_x_ptr + n64 * D + 2, tl.where(inside2, dx2, 0.0), mask=valid, sem="relaxed")


def interpreting() -> bool:
    """True when this process runs Triton kernels in the interpreter (triton imported with TRITON_INTERPRET=1)."""
    return not isinstance(_hash_grid_kernel, triton.runtime.JITFunction)


def _launch(
    x: Tensor,
    table: Tensor,
    layout: tuple[Tensor, Tensor, Tensor, Tensor, int],
    n_features: int,
    *,
    out: Tensor | None = None,
    grad_out: Tensor | None = None,
    grad_table: Tensor | None = None,
    grad_x: Tensor | None = None,
    grad_scale: float = 1.0,
    launch_layout: str | None = None,
    run_levels: int | None = None,
    row_mask: Tensor | None = None,
) -> None:
    """One kernel launch: the forward pass when `out` is given, else the backward pass.

    launch_layout: "levels" or "points" (see the module docstring); None takes LAUNCH_LAYOUT's
    entry for the pass. grad_x must be zero-initialised for the `levels` layout only.
    run_levels: the backward's levels that add once per run of points (`_runs_add`); None: RUN_LEVELS.
    row_mask: [N] bool, the rows computed (see `hash_grid_encode`); None: all.
    """
    if run_levels is None:
        run_levels = RUN_LEVELS if RUN_LEVELS is not None or not interpreting() else 0
    if not RUNS_SUPPORTED:
        run_levels = 0
    level_scale, level_multiplier, level_size, level_offset, n_dense = layout
    n_points, n_dims = x.shape
    n_levels = level_scale.shape[0]
    n_runs = n_levels if run_levels is None else int(run_levels)
    forward = out is not None
    if launch_layout is None:
        launch_layout = LAUNCH_LAYOUT["forward" if forward else "backward"]
    if launch_layout not in LAUNCH_LAYOUTS:
        raise ValueError(f"Unknown hash-grid launch layout {launch_layout!r}; use one of {LAUNCH_LAYOUTS}.")
    all_levels = launch_layout == "points"
    interpret = interpreting()
    if interpret:
        block = BLOCK_INTERPRETER
    elif all_levels:
        block = BLOCK_POINTS
    else:
        block = BLOCK_FORWARD if forward else BLOCK_BACKWARD
    dummy = table  # pointer arguments a pass does not touch
    grid = (triton.cdiv(n_points, block),) if all_levels else (triton.cdiv(n_points, block), n_levels)
    args = (
        x, table, dummy if out is None else out, dummy if grad_out is None else grad_out,
        dummy if grad_table is None else grad_table, dummy if grad_x is None else grad_x,
        level_scale, level_multiplier, level_size, level_offset, dummy if row_mask is None else row_mask,
        n_points, x.stride(0), x.stride(1), n_dense, float(grad_scale), n_runs,
    )
    meta = dict(
        D=n_dims, F=n_features, F_PAD=triton.next_power_of_2(n_features), L=n_levels, BLOCK=block,
        FORWARD=forward, TABLE_GRAD=grad_table is not None, INPUT_GRAD=grad_x is not None, ALL_LEVELS=all_levels,
        RUNS=not forward and grad_table is not None and n_runs > 0, MASKED=row_mask is not None,
    )
    if interpret:
        _hash_grid_kernel[grid](*args, **meta)
        return
    with torch.cuda.device(x.device):
        # No fused multiply-adds: (x * s) + 0.5 must round twice, as in the torch backend, so that
        # points on cell boundaries fall into the same cell.
        _hash_grid_kernel[grid](*args, **meta, num_warps=NUM_WARPS, enable_fp_fusion=False)


class _HashGridFunction(torch.autograd.Function):
    """Triton forward and backward of the hash encoding; gradients for the table and the points."""

    @staticmethod
    def forward(ctx, x: Tensor, table: Tensor, layout: tuple, n_features: int, grad_scale: float,
                launch_layout: tuple[str, str] | None, run_levels: int | None, row_mask: Tensor | None) -> Tensor:
        n_levels = layout[0].shape[0]
        out = torch.empty(x.shape[0], n_levels * n_features, dtype=table.dtype, device=x.device)
        if x.shape[0] > 0:
            _launch(x, table, layout, n_features, out=out, launch_layout=launch_layout and launch_layout[0],
                    row_mask=row_mask)
        ctx.save_for_backward(x, table, *layout[:4], row_mask)
        ctx.n_dense, ctx.n_features, ctx.grad_scale = layout[4], n_features, grad_scale
        ctx.launch_layout = LAUNCH_LAYOUT["backward"] if launch_layout is None else launch_layout[1]
        ctx.run_levels = run_levels
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None, None, None, None]:
        x, table, *buffers, row_mask = ctx.saved_tensors
        layout = (*buffers, ctx.n_dense)
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        launch_layout = ctx.launch_layout
        grad_table = torch.zeros_like(table) if need_table else None
        grad_x = None
        if need_x:  # the `points` layout stores every entry once; `levels` adds into it
            new = torch.empty if launch_layout == "points" else torch.zeros
            grad_x = new(x.shape, dtype=table.dtype, device=x.device)
        if (need_x or need_table) and x.shape[0] > 0:
            _launch(
                x, table, layout, ctx.n_features, grad_out=grad_out.to(table.dtype).contiguous(),
                grad_table=grad_table, grad_x=grad_x, grad_scale=ctx.grad_scale, launch_layout=launch_layout,
                run_levels=ctx.run_levels, row_mask=row_mask,
            )
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_table, None, None, None, None, None, None


def hash_grid_encode(
    x: Tensor,
    table: Tensor,
    level_scale: Tensor,
    level_multiplier: Tensor,
    level_size: Tensor,
    level_offset: Tensor,
    n_dense_levels: int,
    n_features: int,
    grad_scale: float = 1.0,
    launch_layout: tuple[str, str] | None = None,
    run_levels: int | None = None,
    row_mask: Tensor | None = None,
) -> Tensor:
    """Multi-resolution hash encoding by the Triton kernels, differentiable w.r.t. table and x.

    x: [N, D] (D <= 3) in [0,1] (clamped), any float dtype, on the table's device.
    table: flat [n_entries * n_features] float32 or float64 (tiny-cuda-nn layout).
    level_scale [L] float32, level_multiplier [L, D] int64, level_size / level_offset [L] int64:
    `HashGridEncoding`'s buffers; levels below n_dense_levels are dense.
    grad_scale multiplies the table's gradient (not x's). launch_layout: (forward, backward) layouts
    (None: LAUNCH_LAYOUT's, read when each pass runs). run_levels: the backward's levels that add
    once per run of points (`_runs_add`; None: RUN_LEVELS, read when the backward runs). row_mask: [N] bool, the
    points to encode (None: all); the others give zero rows, read no table entry and get no gradient (padding rows
    of a fixed-size batch cost nothing but their launch). Returns [N, L * n_features] in the table's dtype,
    level-major.
    """
    n_dims = x.shape[1]
    if not 1 <= n_dims <= MAX_INPUT_DIMS:
        raise ValueError(f"The triton hash-grid kernel handles 1 to {MAX_INPUT_DIMS} input dims, got {n_dims}.")
    if table.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"The triton hash-grid kernel needs a float32 or float64 table, got {table.dtype}.")
    if x.device != table.device:
        raise ValueError(f"Points are on {x.device} but the hash-grid table is on {table.device}; move one of them.")
    if level_multiplier.shape != (level_scale.shape[0], n_dims):
        raise ValueError(f"level_multiplier must be [L, {n_dims}], got {list(level_multiplier.shape)}.")
    layout = (
        level_scale.contiguous(), level_multiplier.contiguous(), level_size.contiguous(),
        level_offset.contiguous(), int(n_dense_levels),
    )
    if launch_layout is not None and not set(launch_layout) <= set(LAUNCH_LAYOUTS):
        raise ValueError(f"Unknown hash-grid launch layouts {launch_layout}; use two of {LAUNCH_LAYOUTS}.")
    if row_mask is not None:
        if row_mask.dtype != torch.bool or row_mask.shape != (x.shape[0],) or row_mask.device != x.device:
            raise ValueError(f"row_mask must be a bool tensor [{x.shape[0]}] on {x.device}, got {row_mask.dtype} "
                             f"{list(row_mask.shape)} on {row_mask.device}.")
        row_mask = row_mask.contiguous()
    return _HashGridFunction.apply(x, table.contiguous(), layout, int(n_features), float(grad_scale),
                                   None if launch_layout is None else tuple(launch_layout), run_levels, row_mask)
