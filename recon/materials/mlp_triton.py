"""Fully fused material MLP on CUDA (Triton): input -> two ReLU hidden layers -> output, no bias (nvdiffrec's
tiny-cuda-nn network), one kernel forward and one backward.

Unfused, each layer writes its [N, width] activations to memory and reads them back in the backward pass; with
millions of points per step those transfers, not the arithmetic, take the time. Here a program holds BLOCK points'
activations in registers: the forward pass stores only the output; the backward pass recomputes the hidden layers,
propagates the output gradient to the input, and sums the weight gradients of ITERS blocks of points before one
atomic add per weight and program. Products run on TensorFloat-32 tensor cores (float32 storage and accumulation,
inputs rounded to a 10-bit mantissa; tiny-cuda-nn runs this network in float16): values match ``torch.nn.Linear``
to about 1e-3 relative.

Needs `triton`; `mlp_texture.py` imports this lazily and keeps the torch layers for other devices, dtypes and shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 64
# Products on TensorFloat-32 tensor cores (10-bit mantissa, float32 range and accumulation): tiny-cuda-nn runs this
# network in float16; "ieee" (exact float32) measured several times slower, on the FMA units.
PRECISION = "tf32"
NUM_WARPS = 4
ITERS = 16  # backward: blocks per program, whose weight gradients it sums before adding them once


@triton.jit
def _load_t(w_ptr, rows: tl.constexpr, cols: tl.constexpr, ROWS_PAD: tl.constexpr, COLS_PAD: tl.constexpr):
    """W^T [COLS_PAD, ROWS_PAD] of a row-major W [rows, cols] (zero padded)."""
    r = tl.arange(0, ROWS_PAD)
    c = tl.arange(0, COLS_PAD)
    return tl.load(w_ptr + r[None, :] * cols + c[:, None], mask=(r[None, :] < rows) & (c[:, None] < cols), other=0.0)


@triton.jit
def _load(w_ptr, rows: tl.constexpr, cols: tl.constexpr, ROWS_PAD: tl.constexpr, COLS_PAD: tl.constexpr):
    """W [ROWS_PAD, COLS_PAD] of a row-major W [rows, cols] (zero padded)."""
    r = tl.arange(0, ROWS_PAD)
    c = tl.arange(0, COLS_PAD)
    return tl.load(w_ptr + r[:, None] * cols + c[None, :], mask=(r[:, None] < rows) & (c[None, :] < cols), other=0.0)


@triton.jit(do_not_specialize=["n_points"])  # n_points changes every step: one compiled variant
def _mlp_forward_kernel(x_ptr, w0_ptr, w1_ptr, w2_ptr, y_ptr, n_points, IN: tl.constexpr, H: tl.constexpr,
                        OUT: tl.constexpr, OUT_PAD: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = n < n_points
    n64 = n.to(tl.int64)
    i = tl.arange(0, IN)
    o = tl.arange(0, OUT_PAD)
    x = tl.load(x_ptr + n64[:, None] * IN + i[None, :], mask=valid[:, None], other=0.0)
    h0 = tl.maximum(tl.dot(x, _load_t(w0_ptr, H, IN, H, IN), input_precision=PRECISION), 0.0)
    h1 = tl.maximum(tl.dot(h0, _load_t(w1_ptr, H, H, H, H), input_precision=PRECISION), 0.0)
    y = tl.dot(h1, _load_t(w2_ptr, OUT, H, OUT_PAD, H), input_precision=PRECISION)
    tl.store(y_ptr + n64[:, None] * OUT + o[None, :], y, mask=valid[:, None] & (o[None, :] < OUT))


@triton.jit(do_not_specialize=["n_points"])  # n_points changes every step: one compiled variant
def _mlp_backward_kernel(x_ptr, w0_ptr, w1_ptr, w2_ptr, gy_ptr, gx_ptr, gw0_ptr, gw1_ptr, gw2_ptr, n_points,
                         IN: tl.constexpr, H: tl.constexpr, OUT: tl.constexpr, OUT_PAD: tl.constexpr,
                         BLOCK: tl.constexpr, ITERS: tl.constexpr, INPUT_GRAD: tl.constexpr,
                         PRECISION: tl.constexpr):
    i = tl.arange(0, IN)
    h = tl.arange(0, H)
    o = tl.arange(0, OUT_PAD)
    w0t = _load_t(w0_ptr, H, IN, H, IN)  # [IN, H]
    w1t = _load_t(w1_ptr, H, H, H, H)  # [H, H]
    w0 = _load(w0_ptr, H, IN, H, IN)  # [H, IN]
    w1 = _load(w1_ptr, H, H, H, H)
    w2 = _load(w2_ptr, OUT, H, OUT_PAD, H)  # [OUT_PAD, H]
    gw0 = tl.zeros([H, IN], dtype=tl.float32)
    gw1 = tl.zeros([H, H], dtype=tl.float32)
    gw2 = tl.zeros([OUT_PAD, H], dtype=tl.float32)
    for j in range(0, ITERS):  # ITERS consecutive blocks per program (past the end: masked out)
        n = (tl.program_id(0) * ITERS + j) * BLOCK + tl.arange(0, BLOCK)
        valid = n < n_points
        n64 = n.to(tl.int64)
        x = tl.load(x_ptr + n64[:, None] * IN + i[None, :], mask=valid[:, None], other=0.0)
        gy = tl.load(gy_ptr + n64[:, None] * OUT + o[None, :], mask=valid[:, None] & (o[None, :] < OUT), other=0.0)
        h0 = tl.maximum(tl.dot(x, w0t, input_precision=PRECISION), 0.0)
        h1 = tl.maximum(tl.dot(h0, w1t, input_precision=PRECISION), 0.0)
        gw2 += tl.dot(tl.trans(gy), h1, input_precision=PRECISION)
        g1 = tl.where(h1 > 0, tl.dot(gy, w2, input_precision=PRECISION), 0.0)
        gw1 += tl.dot(tl.trans(g1), h0, input_precision=PRECISION)
        g0 = tl.where(h0 > 0, tl.dot(g1, w1, input_precision=PRECISION), 0.0)
        gw0 += tl.dot(tl.trans(g0), x, input_precision=PRECISION)
        if INPUT_GRAD:
            gx = tl.dot(g0, w0, input_precision=PRECISION)
            tl.store(gx_ptr + n64[:, None] * IN + i[None, :], gx, mask=valid[:, None])
    tl.atomic_add(gw0_ptr + h[:, None] * IN + i[None, :], gw0, sem="relaxed")
    tl.atomic_add(gw1_ptr + h[:, None] * H + h[None, :], gw1, sem="relaxed")
    tl.atomic_add(gw2_ptr + o[:, None] * H + h[None, :], gw2, mask=o[:, None] < OUT, sem="relaxed")


def interpreting() -> bool:
    """True when this process runs Triton kernels in the interpreter (triton imported with TRITON_INTERPRET=1)."""
    return not isinstance(_mlp_forward_kernel, triton.runtime.JITFunction)


def _meta(x: Tensor, w0: Tensor, w2: Tensor) -> dict:
    return dict(IN=x.shape[1], H=w0.shape[0], OUT=w2.shape[0], OUT_PAD=max(16, triton.next_power_of_2(w2.shape[0])),
                BLOCK=BLOCK, PRECISION=PRECISION)


def _launch(kernel, grid: tuple, device: torch.device, *args, **meta) -> None:
    if interpreting():
        kernel[grid](*args, **meta)
        return
    with torch.cuda.device(device):
        kernel[grid](*args, **meta, num_warps=NUM_WARPS)


class _FusedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w0: Tensor, w1: Tensor, w2: Tensor) -> Tensor:  # noqa: D102
        x, w0, w1, w2 = (t.contiguous() for t in (x, w0, w1, w2))
        y = torch.empty(x.shape[0], w2.shape[0], device=x.device, dtype=torch.float32)
        if x.shape[0] > 0:
            grid = (triton.cdiv(x.shape[0], BLOCK),)
            _launch(_mlp_forward_kernel, grid, x.device, x, w0, w1, w2, y, x.shape[0], **_meta(x, w0, w2))
        ctx.save_for_backward(x, w0, w1, w2)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):  # noqa: D102
        x, w0, w1, w2 = ctx.saved_tensors
        gw = [torch.zeros_like(w) for w in (w0, w1, w2)]
        need_x = ctx.needs_input_grad[0]
        gx = torch.empty_like(x) if need_x else None
        if x.shape[0] > 0:
            grid = (triton.cdiv(x.shape[0], BLOCK * ITERS),)
            _launch(_mlp_backward_kernel, grid, x.device, x, w0, w1, w2, gy.contiguous().float(),
                    gx if need_x else x, *gw, x.shape[0], **_meta(x, w0, w2), ITERS=ITERS, INPUT_GRAD=need_x)
        return gx, *gw


def supports(x: Tensor, weights: list[Tensor]) -> bool:
    """Whether the fused kernels handle this network and input: CUDA (or, interpreting, any) float32, two hidden layers, input and hidden
    widths powers of two in [16, 64], at most 16 outputs."""
    on_device = interpreting() or x.is_cuda  # the interpreter runs CPU tensors (tests)
    if len(weights) != 3 or not on_device or x.dtype != torch.float32 or x.dim() != 2:
        return False
    if any(w.dtype != torch.float32 or w.device != x.device for w in weights):
        return False
    (h, n_in), (h1, h1_in), (n_out, h2_in) = (w.shape for w in weights)

    def pow2(v: int) -> bool:
        return 16 <= v <= 64 and v & (v - 1) == 0

    return pow2(n_in) and pow2(h) and h1 == h1_in == h2_in == h and x.shape[1] == n_in and 1 <= n_out <= 16


def fused_mlp(x: Tensor, w0: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """relu(relu(x w0^T) w1^T) w2^T for x [N, IN] and bias-free weights [H, IN], [H, H], [OUT, H]; see `supports`."""
    if not supports(x, [w0, w1, w2]):
        raise ValueError(f"fused_mlp cannot handle x {list(x.shape)} {x.dtype} with weights "
                         f"{[list(w.shape) for w in (w0, w1, w2)]}: use the torch layers.")
    return _FusedMLP.apply(x, w0, w1, w2)
