"""Constant sparse linear operators ``y = A x``, differentiable in ``x``: the light's prefiltering, the mesh Laplacian.

A is stored in CSR with 32-bit indices together with its transpose (the backward product), so neither a transpose
nor a coalesce (a host synchronisation on CUDA) happens per step. On float32 CUDA tensors the products run in
recon's Triton row kernel (`recon.spmm_triton`: cuSPARSE's csrmm handles the few columns these operators take
poorly); elsewhere in torch's sparse product. Plain torch.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from recon.optional import optional_module


def csr(rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix from (row, column) entries already sorted by row then column, without repeats (no sort here);
    32-bit indices (half the memory of torch's default 64-bit ones), which cuSPARSE and the CPU kernels take."""
    counts = torch.bincount(rows, minlength=shape[0])
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow.to(torch.int32), cols.to(torch.int32), vals, shape, check_invariants=False)


def _triton_spmm():
    """`recon.spmm_triton.csr_matmul`, or None when triton does not import."""
    module = optional_module("recon.spmm_triton")
    return None if module is None else module.csr_matmul


def sparse_matmul(a: Tensor, x: Tensor) -> Tensor:
    """a @ x for CSR ``a``: the Triton row kernel for float32 CUDA tensors, torch's sparse product otherwise."""
    fn = _triton_spmm() if x.is_cuda and x.dtype == torch.float32 else None
    return fn(a, x) if fn is not None else a @ x


class SparseLinear(torch.autograd.Function):
    """y = A x for a constant sparse CSR matrix A, with A^T precomputed for the backward pass (no transpose per step)."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, a_t: Tensor) -> Tensor:  # noqa: D102
        ctx.a_t = a_t
        return sparse_matmul(a, x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return sparse_matmul(ctx.a_t, grad.contiguous()), None, None


class SparseOperator:
    """A constant sparse matrix ``A`` [M,N] as a differentiable map ``x [N,C] -> A x [M,C]``.

    rows, cols, vals: the entries, in any order (repeated positions are summed). Not an nn.Module: it holds no
    parameters, and whoever owns it rebuilds it from what it was built from (checkpoints need not carry it).
    """

    def __init__(self, rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]):
        n = int(shape[1])
        key, inverse = torch.unique(rows.long() * n + cols.long(), return_inverse=True)  # (row, column) order
        summed = torch.zeros(key.shape[0], dtype=vals.dtype, device=vals.device).index_add_(0, inverse, vals)
        self._set(key // n, key % n, summed, shape)

    @classmethod
    def from_sorted(cls, rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> SparseOperator:
        """From entries already sorted by (row, column) without repeats (large operators: no sort here)."""
        op = cls.__new__(cls)
        op._set(rows, cols, vals, shape)
        return op

    def _set(self, rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> None:
        m = int(shape[0])
        self.shape = (m, int(shape[1]))
        self.a = csr(rows, cols, vals, self.shape)
        order = torch.argsort(cols.long() * m + rows.long())  # the transpose, sorted by (column, row)
        self.a_t = csr(cols[order], rows[order], vals[order], self.shape[::-1])

    @classmethod
    def from_sparse(cls, a: Tensor) -> SparseOperator:
        """From a torch sparse COO or CSR tensor."""
        coo = a.to_sparse_coo().coalesce() if a.layout != torch.sparse_coo else a.coalesce()
        rows, cols = coo.indices()
        return cls(rows, cols, coo.values(), tuple(coo.shape))

    @property
    def device(self) -> torch.device:
        return self.a.device

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[0] != self.shape[1]:
            raise ValueError(f"a sparse operator of shape {self.shape} cannot multiply {tuple(x.shape)}.")
        return SparseLinear.apply(x, self.a, self.a_t)
