"""Sparse (CSR) times dense-with-few-columns on CUDA by a Triton kernel, for the light's prefilter operator.

`EnvironmentLight.build_mips` applies a constant 0.5M x 2.1M CSR matrix (26M entries at 512^2) to the three colour
channels of the pooled cube chain every step, forward and (transposed) backward. cuSPARSE's ``csrmm`` handles the
three dense columns poorly (about 1 ms per product on an H200); here a program sums ROWS rows: it walks their
entries BLOCK at a time, gathers the C channels of each referenced row of x and accumulates in registers.

A program runs as long as the longest of its rows, so a matrix with rows much longer than the rest (the prefilter's
transpose: the coarse pooled texels feed every output of the rough levels, up to 18000 entries a row against
0-18 for most) is cut into chunks of at most CHUNK entries, each summed by one program slot and added into its
row's output atomically. The chunk list is built once per matrix (one host synchronisation) and kept on the
matrix tensor itself.

Needs `triton`; `env_light.py` imports this module lazily and uses torch's sparse product elsewhere (CPU tensors,
float64). Under TRITON_INTERPRET=1 (set before triton is imported) the kernel runs in Triton's interpreter on CPU
tensors, for tests.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

ROWS = 16  # rows per program: the transposed operator has millions of short or empty rows
BLOCK = 16  # entries per row and iteration: the prefilter's rows hold 30-170, its transpose's 0-18000
NUM_WARPS = 4
CHUNK = 256  # entries per chunk, for matrices with a row longer than this


@triton.jit
def _accumulate(acc, col_ptr, val_ptr, x_ptr, begin, end, ch, C: tl.constexpr, BLOCK: tl.constexpr):
    """acc [ROWS, BLOCK, C_PAD] += the entries begin[r] .. begin[r] + BLOCK of each row r (those before end[r]) times
    their rows of x."""
    idx = begin[:, None] + tl.arange(0, BLOCK)[None, :]  # [ROWS, BLOCK]
    inside = idx < end[:, None]
    col = tl.load(col_ptr + idx, mask=inside, other=0).to(tl.int64)
    val = tl.load(val_ptr + idx, mask=inside, other=0.0)
    ch3 = ch[None, None, :]
    xv = tl.load(x_ptr + col[:, :, None] * C + ch3, mask=inside[:, :, None] & (ch3 < C), other=0.0)
    return acc + val[:, :, None] * xv


@triton.jit
def _row_bounds(crow_ptr, n_rows, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = rows < n_rows
    start = tl.load(crow_ptr + rows, mask=valid, other=0).to(tl.int64)
    end = tl.load(crow_ptr + rows + 1, mask=valid, other=0).to(tl.int64)
    return rows, valid, start, end


@triton.jit
def _csr_rows_kernel(crow_ptr, col_ptr, val_ptr, x_ptr, out_ptr, n_rows, C: tl.constexpr, C_PAD: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows, valid, start, end = _row_bounds(crow_ptr, n_rows, ROWS)
    ch = tl.arange(0, C_PAD)
    acc = tl.zeros([ROWS, BLOCK, C_PAD], dtype=tl.float32)
    for k in range(0, tl.max(end - start), BLOCK):  # the group's longest row
        acc = _accumulate(acc, col_ptr, val_ptr, x_ptr, start + k, end, ch, C, BLOCK)
    out = tl.sum(acc, axis=1)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + ch[None, :], out, mask=valid[:, None] & (ch[None, :] < C))


@triton.jit
def _csr_rows_kernel_fixed(crow_ptr, col_ptr, val_ptr, x_ptr, out_ptr, n_rows, C: tl.constexpr, C_PAD: tl.constexpr,
                           ROWS: tl.constexpr, BLOCK: tl.constexpr, MAX_ROW: tl.constexpr):
    """The same for Triton's interpreter, which loops to constant bounds only: every group walks MAX_ROW entries."""
    rows, valid, start, end = _row_bounds(crow_ptr, n_rows, ROWS)
    ch = tl.arange(0, C_PAD)
    acc = tl.zeros([ROWS, BLOCK, C_PAD], dtype=tl.float32)
    for k in range(0, MAX_ROW, BLOCK):
        acc = _accumulate(acc, col_ptr, val_ptr, x_ptr, start + k, end, ch, C, BLOCK)
    out = tl.sum(acc, axis=1)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + ch[None, :], out, mask=valid[:, None] & (ch[None, :] < C))


@triton.jit
def _csr_chunks_kernel(item_row_ptr, item_start_ptr, item_end_ptr, col_ptr, val_ptr, x_ptr, out_ptr, n_items,
                       C: tl.constexpr, C_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                       CHUNK: tl.constexpr, FIXED: tl.constexpr):
    """out[row] += the entries start .. end of a row times x, for ROWS chunks (row, start, end) per program; out
    starts at zero. FIXED (Triton's interpreter, which loops to constant bounds only): every chunk walks CHUNK."""
    items = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = items < n_items
    row = tl.load(item_row_ptr + items, mask=valid, other=0).to(tl.int64)
    start = tl.load(item_start_ptr + items, mask=valid, other=0).to(tl.int64)
    end = tl.load(item_end_ptr + items, mask=valid, other=0).to(tl.int64)
    ch = tl.arange(0, C_PAD)
    acc = tl.zeros([ROWS, BLOCK, C_PAD], dtype=tl.float32)
    if FIXED:
        for k in range(0, CHUNK, BLOCK):
            acc = _accumulate(acc, col_ptr, val_ptr, x_ptr, start + k, end, ch, C, BLOCK)
    else:
        for k in range(0, tl.max(end - start), BLOCK):
            acc = _accumulate(acc, col_ptr, val_ptr, x_ptr, start + k, end, ch, C, BLOCK)
    out = tl.sum(acc, axis=1)
    tl.atomic_add(out_ptr + row[:, None] * C + ch[None, :], out, mask=valid[:, None] & (ch[None, :] < C))


def row_chunks(crow: Tensor, chunk: int = CHUNK) -> tuple[Tensor, Tensor, Tensor] | None:
    """The rows of a CSR matrix (row pointers ``crow``) cut into pieces of at most ``chunk`` entries, as (row, start,
    end) int64 tensors in row order, empty rows left out; None when no row is longer than ``chunk`` (the row kernel
    is then balanced). One host synchronisation."""
    lengths = (crow[1:] - crow[:-1]).long()
    if lengths.numel() == 0 or int(lengths.max()) <= chunk:
        return None
    pieces = (lengths + chunk - 1) // chunk
    row = torch.repeat_interleave(torch.arange(lengths.numel(), device=crow.device), pieces)
    first = torch.cumsum(pieces, 0) - pieces  # index of each row's first piece
    k = torch.arange(row.numel(), device=crow.device) - first[row]
    start = crow.long()[row] + k * chunk
    end = torch.minimum(start + chunk, crow.long()[row + 1])
    return row, start, end


def _chunks_of(a: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """`row_chunks` of CSR ``a``, computed on first use and kept as an attribute of the tensor."""
    if not hasattr(a, "_recon_row_chunks"):
        a._recon_row_chunks = row_chunks(a.crow_indices())
    return a._recon_row_chunks


def csr_matmul(a: Tensor, x: Tensor) -> Tensor:
    """``a @ x`` for a CSR matrix ``a`` [R,K] (float32 values, int32 or int64 indices) and a dense ``x`` [K,C]
    (float32, C <= 16) on the same device. Returns [R,C] float32."""
    if a.layout != torch.sparse_csr:
        raise ValueError(f"csr_matmul needs a sparse CSR matrix, got layout {a.layout}.")
    if x.dim() != 2 or x.shape[0] != a.shape[1] or x.shape[1] > 16:
        raise ValueError(f"csr_matmul: x must be [{a.shape[1]}, C<=16], got {list(x.shape)}.")
    if a.dtype != torch.float32 or x.dtype != torch.float32:
        raise ValueError(f"csr_matmul computes in float32, got {a.dtype} and {x.dtype}.")
    x = x.contiguous()
    n_rows, n_cols = a.shape[0], x.shape[1]
    if n_rows == 0:
        return torch.empty(n_rows, n_cols, dtype=x.dtype, device=x.device)
    interpret = interpreting()
    crow = a.crow_indices()
    meta = dict(C=n_cols, C_PAD=triton.next_power_of_2(max(n_cols, 1)), ROWS=ROWS, BLOCK=BLOCK)
    chunks = _chunks_of(a)
    if chunks is not None:
        out = torch.zeros(n_rows, n_cols, dtype=x.dtype, device=x.device)
        row, start, end = chunks
        grid = (triton.cdiv(row.numel(), ROWS),)
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _csr_chunks_kernel[grid](row, start, end, a.col_indices(), a.values(), x, out, row.numel(), **meta,
                                     CHUNK=CHUNK, FIXED=interpret, num_warps=NUM_WARPS)
        return out
    out = torch.empty(n_rows, n_cols, dtype=x.dtype, device=x.device)
    args = (crow, a.col_indices(), a.values(), x, out, n_rows)
    grid = (triton.cdiv(n_rows, ROWS),)
    if interpret:
        max_row = max(1, int((crow[1:] - crow[:-1]).max()))
        _csr_rows_kernel_fixed[grid](*args, **meta, MAX_ROW=max_row)
    else:
        with torch.cuda.device(x.device):
            _csr_rows_kernel[grid](*args, **meta, num_warps=NUM_WARPS)
    return out


def interpreting() -> bool:
    """True when this process runs Triton kernels in the interpreter (triton imported with TRITON_INTERPRET=1)."""
    return not isinstance(_csr_rows_kernel, triton.runtime.JITFunction)
