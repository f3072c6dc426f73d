"""Differentiable row gathers whose backward is a scatter-add, not a sort.

``x[index]`` and ``x[mask]`` record an advanced-indexing op whose gradient is ``index_put_(accumulate=True)``; on
CUDA that sorts the indices every backward pass (``indexing_backward_kernel``), which measured as the largest
single kernel of a training step at 800 px. ``index_select`` gives the same values and its gradient is
``index_add_``, an atomic scatter-add, several times faster.

On CUDA, ``index_select`` of rows whose size is a multiple of 16 bytes (float32 x 4: a UV with its derivatives, a
tangent with its sign; int64 x 4: tets) takes a vectorised path that measured 1.09 ms for 1.8M rows of 16 or 32
bytes against 0.03 ms for rows of 12 (torch 2.11, H200, `bench/gather.py`); those rows go through ``gather`` with a
full index instead (0.08 ms; its backward is a scatter-add too). Plain torch: no Lightning here.
"""
from __future__ import annotations

import torch
from torch import Tensor


def select_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x.index_select(0, index)`` for a 1-D ``index``, by the faster kernel on CUDA (see the module's note)."""
    row_bytes = x[0].numel() * x.element_size() if x.dim() > 0 and x.shape[0] > 0 else 0
    if x.is_cuda and row_bytes and row_bytes % 16 == 0 and row_bytes <= 256:
        return gather_rows(x, index)
    return x.index_select(0, index)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x.index_select(0, index)`` as ``torch.gather`` with an index per value (materialised: an expanded index
    takes the slow vectorised path again)."""
    width = x[0].numel()
    flat = x.reshape(x.shape[0], width)
    return torch.gather(flat, 0, index[:, None].expand(-1, width).contiguous()).reshape(-1, *x.shape[1:])


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` for an integer ``index`` of any shape: [*index.shape, *x.shape[1:]]."""
    return select_rows(x, index.reshape(-1)).reshape(*index.shape, *x.shape[1:])


def mask_index(mask: Tensor) -> Tensor:
    """Flat positions of the true entries of ``mask``, in row-major order (one host sync); for `masked_rows`."""
    return mask.reshape(-1).nonzero().squeeze(1)


def masked_rows(x: Tensor, index: Tensor, mask_dims: int) -> Tensor:
    """``x[mask]`` given ``index = mask_index(mask)`` and ``mask_dims = mask.dim()``: [N, *x.shape[mask_dims:]]."""
    return select_rows(x.reshape(-1, *x.shape[mask_dims:]), index)


class _ScatterRows(torch.autograd.Function):
    """``zeros(n, ...).index_copy(0, index, x)`` whose backward is ``grad.index_select(0, index)``: index_copy's own
    backward gathers with an index expanded to every element (8 bytes of index per value moved)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, n: int) -> Tensor:  # noqa: D102
        ctx.save_for_backward(index)
        return x.new_zeros(n, *x.shape[1:]).index_copy_(0, index, x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        (index,) = ctx.saved_tensors
        return select_rows(grad, index), None, None


def scatter_rows(x: Tensor, index: Tensor, n: int) -> Tensor:
    """Rows ``x`` [M,...] placed at rows ``index`` [M] (distinct) of zeros [n,...]: the inverse of `masked_rows`."""
    return _ScatterRows.apply(x, index, n)
