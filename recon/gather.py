"""Differentiable row gathers whose backward is a scatter-add, not a sort.

``x[index]`` and ``x[mask]`` record an advanced-indexing op whose gradient is ``index_put_(accumulate=True)``; on
CUDA that sorts the indices every backward pass (``indexing_backward_kernel``), which measured as the largest
single kernel of a training step at 800 px. ``index_select`` gives the same values and its gradient is
``index_add_``, an atomic scatter-add, several times faster. Plain torch: no Lightning here.
"""
from __future__ import annotations

import torch
from torch import Tensor


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` for an integer ``index`` of any shape: [*index.shape, *x.shape[1:]]."""
    return x.index_select(0, index.reshape(-1)).reshape(*index.shape, *x.shape[1:])


def mask_index(mask: Tensor) -> Tensor:
    """Flat positions of the true entries of ``mask``, in row-major order (one host sync); for `masked_rows`."""
    return mask.reshape(-1).nonzero().squeeze(1)


def masked_rows(x: Tensor, index: Tensor, mask_dims: int) -> Tensor:
    """``x[mask]`` given ``index = mask_index(mask)`` and ``mask_dims = mask.dim()``: [N, *x.shape[mask_dims:]]."""
    return x.reshape(-1, *x.shape[mask_dims:]).index_select(0, index)


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
        return grad.index_select(0, index), None, None


def scatter_rows(x: Tensor, index: Tensor, n: int) -> Tensor:
    """Rows ``x`` [M,...] placed at rows ``index`` [M] (distinct) of zeros [n,...]: the inverse of `masked_rows`."""
    return _ScatterRows.apply(x, index, n)
