"""nvdiffrec's image losses as two Triton kernels on CUDA: one forward, one backward (`recon.losses.image_losses`).

Eager, the composite over the background, the log-sRGB tonemap of render and reference, the L1 and the alpha MSE
are some twenty elementwise kernels forward and thirty backward, each reading and writing whole [B,H,W,3] images.
Here the forward reads each pixel's eleven inputs once and writes one partial sum of each loss per program; the
backward reads them again and writes the two input gradients. Nothing is kept between the passes but the inputs.

Values and gradients follow the torch functions, including their conventions at the kinks: ``clamp`` passes the
gradient at its bounds, ``abs`` has gradient 0 at 0, and the tonemap's sRGB curve switches branch at 0.0031308.
Needs `triton`; `recon.losses` imports this lazily and uses it only for CUDA tensors (``model.loss.fused_kernel``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _tonemap(x):
    """linear_to_srgb(log(clamp(x, 0, 65535) + 1)) and its derivative in x (recon.color.tonemap_srgb)."""
    inside = (x >= 0.0) & (x <= 65535.0)
    c = tl.minimum(tl.maximum(x, 0.0), 65535.0)
    u = tl.log(c + 1.0)
    low = u <= 0.0031308
    ul = tl.maximum(u, 0.0031308)
    powered = tl.exp(tl.log(ul) * (1.0 / 2.4))
    value = tl.where(low, 12.92 * tl.maximum(u, 0.0), 1.055 * powered - 0.055)
    slope = tl.where(low, tl.where(u >= 0.0, 12.92, 0.0), (1.055 / 2.4) * powered / ul)
    return value, tl.where(inside, slope / (c + 1.0), 0.0)


@triton.jit
def _sign(x):
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))


@triton.jit
def _image_loss_kernel(
    rgb_ptr, alpha_ptr, img_ptr, bg_ptr,  # [M,3], [M,1], [M,4], [M,3] rows (channel stride 1)
    s_rgb, s_alpha, s_img, s_bg,  # row strides
    partial_ptr,  # forward: [programs, 2] colour / alpha loss sums, scaled to the means
    g_out_ptr,  # backward: [2] upstream gradients of the two losses
    grad_rgb_ptr, grad_alpha_ptr,  # backward: [M,3], [M,1] contiguous
    n_rows, color_scale, alpha_scale,  # 1 / (3M), 1 / M
    BLOCK: tl.constexpr, FORWARD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    valid = rows < n_rows
    r = rows.to(tl.int64)
    alpha = tl.load(alpha_ptr + r * s_alpha, mask=valid, other=0.0).to(tl.float32)
    ref_a = tl.load(img_ptr + r * s_img + 3, mask=valid, other=0.0).to(tl.float32)
    color_sum = tl.zeros([BLOCK], dtype=tl.float32)
    d_alpha = tl.zeros([BLOCK], dtype=tl.float32)
    if not FORWARD:
        g_color = tl.load(g_out_ptr) * color_scale
        g_alpha = tl.load(g_out_ptr + 1) * alpha_scale
    for ch in tl.static_range(3):
        rgb = tl.load(rgb_ptr + r * s_rgb + ch, mask=valid, other=0.0).to(tl.float32)
        bg = tl.load(bg_ptr + r * s_bg + ch, mask=valid, other=0.0).to(tl.float32)
        ref = tl.load(img_ptr + r * s_img + ch, mask=valid, other=0.0).to(tl.float32)
        color = rgb + (1.0 - alpha) * bg
        reference = ref * ref_a + (1.0 - ref_a) * bg
        t_color, slope = _tonemap(color * ref_a)
        t_ref, _ = _tonemap(reference * ref_a)
        diff = t_color - t_ref
        if FORWARD:
            color_sum += tl.abs(diff)
        else:
            g = _sign(diff) * slope * ref_a * g_color  # d loss / d colour
            tl.store(grad_rgb_ptr + r * 3 + ch, g, mask=valid)
            d_alpha -= g * bg
    if FORWARD:
        a_err = alpha - ref_a
        sums = tl.sum(tl.where(valid, color_sum, 0.0)) * color_scale
        a_sum = tl.sum(tl.where(valid, a_err * a_err, 0.0)) * alpha_scale
        tl.store(partial_ptr + pid * 2, sums)
        tl.store(partial_ptr + pid * 2 + 1, a_sum)
    else:
        d_alpha += 2.0 * (alpha - ref_a) * g_alpha
        tl.store(grad_alpha_ptr + r, d_alpha, mask=valid)


def _rows(t: Tensor, channels: int) -> Tensor:
    """[..., channels] as [M, channels] rows with unit channel stride (a view when possible)."""
    rows = t.reshape(-1, channels)
    return rows if rows.stride(1) == 1 or channels == 1 else rows.contiguous()


def _launch(rgb: Tensor, alpha: Tensor, img: Tensor, bg: Tensor, **out) -> None:
    n = rgb.shape[0]
    forward = "partial" in out
    dummy = rgb
    grid = (triton.cdiv(n, BLOCK),)
    args = (rgb, alpha, img, bg, rgb.stride(0), alpha.stride(0), img.stride(0), bg.stride(0),
            out.get("partial", dummy), out.get("g_out", dummy), out.get("grad_rgb", dummy),
            out.get("grad_alpha", dummy), n, 1.0 / (3 * n), 1.0 / n)
    if not rgb.is_cuda:  # Triton's interpreter (TRITON_INTERPRET=1): the CPU tests
        _image_loss_kernel[grid](*args, BLOCK=BLOCK, FORWARD=forward)
        return
    with torch.cuda.device(rgb.device):
        _image_loss_kernel[grid](*args, BLOCK=BLOCK, FORWARD=forward, num_warps=NUM_WARPS)


class _ImageLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rgb: Tensor, alpha: Tensor, img: Tensor, bg: Tensor) -> tuple[Tensor, Tensor]:
        shape_rgb, shape_alpha = rgb.shape, alpha.shape
        rows = (_rows(rgb, 3), _rows(alpha, 1), _rows(img, 4), _rows(bg, 3))
        partial = torch.empty(triton.cdiv(rows[0].shape[0], BLOCK), 2, device=rgb.device, dtype=torch.float32)
        _launch(*rows, partial=partial)
        ctx.save_for_backward(*rows)
        ctx.shapes = (shape_rgb, shape_alpha)
        color, alpha_loss = partial.sum(0).to(rgb.dtype).unbind(0)
        return color, alpha_loss

    @staticmethod
    def backward(ctx, g_color: Tensor, g_alpha: Tensor):
        rgb, alpha, img, bg = ctx.saved_tensors
        g_out = torch.stack([g_color, g_alpha]).float().contiguous()
        grad_rgb = torch.empty(rgb.shape, device=rgb.device, dtype=torch.float32)
        grad_alpha = torch.empty(alpha.shape, device=rgb.device, dtype=torch.float32)
        _launch(rgb, alpha, img, bg, g_out=g_out, grad_rgb=grad_rgb, grad_alpha=grad_alpha)
        shape_rgb, shape_alpha = ctx.shapes
        return (grad_rgb.to(rgb.dtype).reshape(shape_rgb), grad_alpha.to(alpha.dtype).reshape(shape_alpha), None, None)


def image_losses_triton(rgb: Tensor, alpha: Tensor, img: Tensor, bg: Tensor) -> tuple[Tensor, Tensor]:
    """`recon.losses.image_losses` in two kernels: rgb [B,H,W,3] premultiplied, alpha [B,H,W,1], img [B,H,W,4]
    straight RGBA reference, bg [B,H,W,3]; returns the (colour, alpha) losses. Gradients reach rgb and alpha."""
    if rgb.shape[:-1] != alpha.shape[:-1] or rgb.shape[:-1] != img.shape[:-1] or rgb.shape[:-1] != bg.shape[:-1]:
        raise ValueError(f"image losses: rgb {tuple(rgb.shape)}, alpha {tuple(alpha.shape)}, img {tuple(img.shape)} "
                         f"and bg {tuple(bg.shape)} must share their leading dimensions.")
    if (rgb.shape[-1], alpha.shape[-1], img.shape[-1], bg.shape[-1]) != (3, 1, 4, 3):
        raise ValueError("image losses: rgb, alpha, img and bg need 3, 1, 4 and 3 channels.")
    return _ImageLosses.apply(rgb, alpha, img.detach(), bg.detach())
