"""Marching tets' topology on the `make_tet_grid` lattice in two Triton kernels and one host sync.

`recon.geometry.dmtet.marching_tets_topology` works on any tet mesh: it gathers the surface tets, sorts the keys of
their crossing edges to number each edge once and waits for the device at every compaction (some forty kernels,
five waits at tet_grid=128). On the lattice an edge needs no sort: every edge joins a vertex p to p + d for one of
the seven steps d in {0,1}^3 \\ {0} (`recon.geometry.tet_grid`), so (p, d) names it, and numbering the crossing
edges in (p, d) order is a prefix sum. Here:

1. ``_count_kernel``, one program per BLOCK vertices: the seven crossing flags of each vertex's edges, and for each
   vertex that is a cell's lower corner the number of faces of that cell's six tets;
2. two prefix sums (torch.cumsum): the edge number of each crossing (p, d), each cell's first face;
3. one wait for the two totals (the sizes of the outputs);
4. ``_write_kernel``: each crossing edge's two vertices and each surface cell's faces.

Steps d are numbered by their vertex-index offset: step m in 1..7 is (dx, dy, dz) = (m >> 2, (m >> 1) & 1, m & 1),
offset dx n^2 + dy n + dz for n = res + 1 vertices per side, which grows with m. So (p, m) order is (lower, upper)
vertex order, and the results are exactly `marching_tets_topology`'s: the same edges in the same order, the same
faces (tets in index order, each tet's triangles in table order).

Cell corner m (same bit layout) has vertex offset dx n^2 + dy n + dz from the cell's lower corner; a cell's occupancy
is the 8-bit mask of its inside corners. The tables (``lattice_tables``): each tet's marching-tets case for each of
the 256 cell masks, the number of triangles of each case, the triangle table, and for each tet edge its lower
corner's offset and step, as a position in the [Nv, 7] flag array relative to the cell's lower corner.
Needs `triton`; `recon.geometry.dmtet` imports this lazily and uses it for CUDA tensors (or in Triton's interpreter).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 256
NUM_WARPS = 4
BLOCK_INTERPRETER = 4096


@triton.jit
def _offset(m: tl.constexpr, n):
    """Vertex-index offset of step / cell corner m (bits: x = 4, y = 2, z = 1)."""
    return ((m >> 2) & 1) * n * n + ((m >> 1) & 1) * n + (m & 1)


@triton.jit
def _in_bounds(i, j, k, n, valid, m: tl.constexpr):
    """Whether the vertex (i, j, k) plus step m lies in the grid of n vertices per side."""
    return valid & (i + ((m >> 2) & 1) < n) & (j + ((m >> 1) & 1) < n) & (k + (m & 1) < n)


@triton.jit
def _vertex_block(inside_ptr, n_verts, n, BLOCK: tl.constexpr):
    """This program's BLOCK vertices: (v int64, valid, i, j, k, mask, is_cell). Bit m of mask: the vertex plus step
    m is inside (0 off the grid), so where `is_cell` it is the occupancy of the cell whose lower corner v is."""
    v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = v < n_verts
    k = v % n
    j = (v // n) % n
    i = v // (n * n)
    res = n - 1
    is_cell = valid & (i < res) & (j < res) & (k < res)
    mask = tl.zeros(v.shape, dtype=tl.int32)
    for m in tl.static_range(8):
        bit = tl.load(inside_ptr + v + _offset(m, n), mask=_in_bounds(i, j, k, n, valid, m), other=0).to(tl.int32)
        mask = mask | (bit << m)
    return v.to(tl.int64), valid, i, j, k, mask, is_cell


@triton.jit
def _flag(mask, i, j, k, n, valid, m: tl.constexpr):
    """Whether the edge from the vertex along step m exists and joins an inside and an outside vertex."""
    return _in_bounds(i, j, k, n, valid, m) & (((mask >> m) & 1) != (mask & 1))


@triton.jit(do_not_specialize=["n_verts", "n"])
def _count_kernel(inside_ptr, flags_ptr, faces_per_cell_ptr, cell_faces_ptr, n_verts, n, BLOCK: tl.constexpr):
    """flags [Nv, 7] int32: crossing edge (vertex, step m = 1..7); faces_per_cell [Nv] int32: faces of the cell at
    this lower corner (0 where none)."""
    v64, valid, i, j, k, mask, is_cell = _vertex_block(inside_ptr, n_verts, n, BLOCK)
    for m in tl.static_range(1, 8):
        tl.store(flags_ptr + v64 * 7 + (m - 1), _flag(mask, i, j, k, n, valid, m).to(tl.int32), mask=valid)
    count = tl.load(cell_faces_ptr + mask, mask=is_cell, other=0)
    tl.store(faces_per_cell_ptr + v64, count, mask=valid)


@triton.jit(do_not_specialize=["n_verts", "n"])
def _write_kernel(
    inside_ptr, edge_end_ptr, face_end_ptr,  # inclusive prefix sums of the flags [Nv*7] and faces per cell [Nv]
    edges_ptr, faces_ptr,  # outputs [E, 2], [F, 3] int64
    case_ptr, num_tri_ptr, tri_table_ptr, edge_slot_ptr,  # tables (see the module docstring)
    n_verts, n, BLOCK: tl.constexpr,
):
    v64, valid, i, j, k, mask, is_cell = _vertex_block(inside_ptr, n_verts, n, BLOCK)
    for m in tl.static_range(1, 8):
        flag = _flag(mask, i, j, k, n, valid, m)
        edge = tl.load(edge_end_ptr + v64 * 7 + (m - 1), mask=flag, other=1).to(tl.int64) - 1
        tl.store(edges_ptr + edge * 2, v64, mask=flag)
        tl.store(edges_ptr + edge * 2 + 1, v64 + _offset(m, n), mask=flag)

    face = tl.load(face_end_ptr + v64 - 1, mask=is_cell & (v64 > 0), other=0).to(tl.int64)  # faces before this cell
    for t in tl.static_range(6):
        case = tl.load(case_ptr + t * 256 + mask, mask=is_cell, other=0)
        n_tri = tl.load(num_tri_ptr + case, mask=is_cell, other=0)
        for r in tl.static_range(2):
            active = is_cell & (n_tri > r)
            for q in tl.static_range(3):
                tet_edge = tl.load(tri_table_ptr + case * 6 + r * 3 + q, mask=active, other=0)
                slot = tl.load(edge_slot_ptr + t * 6 + tet_edge, mask=active, other=0)
                edge = tl.load(edge_end_ptr + v64 * 7 + slot, mask=active, other=1).to(tl.int64) - 1
                tl.store(faces_ptr + face * 3 + q, edge, mask=active)
            face += active.to(tl.int64)


def lattice_tables(res: int, device: torch.device | str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(case [6, 256], cell_faces [256], num_triangles [16], triangle_table [16, 6], edge_slot [6, 6]) for
    `lattice_topology` on a grid of ``res`` cells per side (int32, on ``device``; see the module docstring)."""
    from recon.geometry.dmtet import NUM_TRIANGLES, TRIANGLE_TABLE
    from recon.geometry.tet_grid import TET_EDGE_CORNERS, _kuhn_corners

    n = res + 1
    kuhn = torch.from_numpy(_kuhn_corners())  # [6, 4, 3] corner offsets (x, y, z)
    corner = kuhn[..., 0] * 4 + kuhn[..., 1] * 2 + kuhn[..., 2]  # [6, 4] cell corner numbers
    masks = torch.arange(256)
    bits = (masks[:, None] >> corner.reshape(1, -1)) & 1  # [256, 24]
    case = (bits.view(256, 6, 4) << torch.arange(4)).sum(-1).t()  # [6, 256]
    cell_faces = NUM_TRIANGLES[case].sum(0)  # [256]
    a, b = corner[:, TET_EDGE_CORNERS[:, 0]], corner[:, TET_EDGE_CORNERS[:, 1]]  # [6, 6]: corners of each tet edge
    lower, step = a & b, a ^ b  # the Kuhn path is monotone: one corner's bits contain the other's
    lower_offset = ((lower >> 2) & 1) * n * n + ((lower >> 1) & 1) * n + (lower & 1)
    edge_slot = lower_offset * 7 + step - 1
    tables = (case, cell_faces, NUM_TRIANGLES, TRIANGLE_TABLE.clamp(min=0), edge_slot)
    return tuple(t.to(device=device, dtype=torch.int32).contiguous() for t in tables)


def lattice_topology(inside: Tensor, res: int, tables: tuple[Tensor, ...] | None = None) -> tuple[Tensor, Tensor]:
    """`marching_tets_topology(inside, make_tet_grid(res)[1])`'s result (same edges, faces and order) on the lattice.

    inside: [(res + 1)^3] bool, the occupancy of the grid's vertices. Returns ``edges [E, 2] int64`` (lower, upper
    vertex) and ``faces [F, 3] int64`` indexing ``edges``. tables: `lattice_tables(res, inside.device)`, built here
    when None. Waits for the device once, for the two output sizes.
    """
    n = res + 1
    n_verts = inside.shape[0]
    if n ** 3 * 7 >= 2**31:
        raise ValueError(f"lattice marching tets numbers edges in 32 bits: a grid of {res} cells per side has too many "
                         "(at most 660). Use model.geometry.lattice_kernel=false for it.")
    if n_verts != n ** 3:
        raise ValueError(f"lattice marching tets: {n_verts} occupancy values for a grid of {res} cells per side, "
                         f"which has {n ** 3} vertices.")
    if inside.dtype != torch.bool:
        raise ValueError(f"lattice marching tets needs a bool occupancy, got {inside.dtype}.")
    device = inside.device
    if tables is None:
        tables = lattice_tables(res, device)
    case, cell_faces, num_tri, tri_table, edge_slot = tables
    occupancy = inside.contiguous().view(torch.uint8)
    flags = torch.empty(n_verts * 7, dtype=torch.int32, device=device)
    faces_per_cell = torch.empty(n_verts, dtype=torch.int32, device=device)
    interpret = not inside.is_cuda
    block = BLOCK_INTERPRETER if interpret else BLOCK
    grid = (triton.cdiv(n_verts, block),)
    extra = {} if interpret else {"num_warps": NUM_WARPS}
    with torch.cuda.device(device) if inside.is_cuda else contextlib.nullcontext():
        _count_kernel[grid](occupancy, flags, faces_per_cell, cell_faces, n_verts, n, BLOCK=block, **extra)
        edge_end = torch.cumsum(flags, 0, dtype=torch.int32)
        face_end = torch.cumsum(faces_per_cell, 0, dtype=torch.int32)
        n_edges, n_faces = torch.stack([edge_end[-1], face_end[-1]]).tolist()  # the one wait
        edges = torch.empty(n_edges, 2, dtype=torch.int64, device=device)
        faces = torch.empty(n_faces, 3, dtype=torch.int64, device=device)
        if n_edges:
            _write_kernel[grid](occupancy, edge_end, face_end, edges, faces, case, num_tri, tri_table, edge_slot,
                                n_verts, n, BLOCK=block, **extra)
    return edges, faces
