"""Regular tetrahedral grid of a cube: the lattice DMTet deforms and marches.

Layout, relied on by `recon.geometry.dmtet`:
- vertex (i, j, k), i along x, j along y, k along z, has index `(i * (res + 1) + j) * (res + 1) + k`;
- cell (i, j, k) has index `(i * res + j) * res + k` and owns tets `6 * cell ... 6 * cell + 5`.

Each cell is split into 6 tetrahedra along its main diagonal (Kuhn / Freudenthal decomposition):
for each permutation (a, b, c) of the axes, the tet is the monotone corner path
`0 -> e_a -> e_a + e_b -> (1, 1, 1)`. Every cell uses the same split, so a face shared by two cells
is cut along the same diagonal from both sides and the grid is conforming.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# Unit-step offsets of the 7 edge directions of the Kuhn grid: every edge joins p and p + d for a
# non-zero d in {0,1}^3 (3 axis edges, 3 face diagonals, 1 body diagonal per lattice point).
EDGE_DIRECTIONS = ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))
# Corner pairs of the 6 edges of a tet, in the order the marching-tets triangle table uses.
TET_EDGE_CORNERS = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], dtype=torch.int64)


def _kuhn_corners() -> np.ndarray:
    """[6,4,3] int corner offsets of the 6 tets of the unit cube, all positively oriented."""
    tets = []
    for perm in itertools.permutations(range(3)):
        corner = np.zeros(3, dtype=np.int64)
        path = [corner.copy()]
        for axis in perm:
            corner[axis] = 1
            path.append(corner.copy())
        path = np.stack(path)
        # det(v1 - v0, v2 - v0, v3 - v0) has the sign of the permutation: swap two corners of odd ones.
        if np.linalg.det((path[1:] - path[0]).astype(np.float64)) < 0:
            path[[2, 3]] = path[[3, 2]]
        tets.append(path)
    return np.stack(tets)


def lattice_verts(res: int, scale: float, center: Sequence[float] | Tensor) -> Tensor:
    """The grid's vertices `[(res+1)^3, 3] float32` (`make_tet_grid`'s first output) alone."""
    axis = torch.linspace(-0.5, 0.5, res + 1, dtype=torch.float64) * scale
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    center = torch.as_tensor(center, dtype=torch.float64).reshape(1, 3)
    return (grid + center).float()


def make_tet_grid(
    res: int, scale: float = 2.1, center: Sequence[float] | Tensor = (0.0, 0.0, 0.0)
) -> tuple[Tensor, Tensor]:
    """Conforming tetrahedral grid of the cube of edge `scale` centred at `center`.

    res: cells per cube side. Returns `verts [(res+1)^3, 3] float32` (scene units) and
    `tets [6 res^3, 4] int64`, every tet with det(v1 - v0, v2 - v0, v3 - v0) > 0.
    Index layout: see the module docstring.
    """
    if res < 1:
        raise ValueError(f"make_tet_grid needs res >= 1 cells per side, got res={res}.")
    n = res + 1
    verts = lattice_verts(res, scale, center)

    corners = torch.from_numpy(_kuhn_corners())  # [6,4,3]
    corner_offset = (corners[..., 0] * n + corners[..., 1]) * n + corners[..., 2]  # [6,4]
    cell = torch.arange(res, dtype=torch.int64)
    base = ((cell[:, None, None] * n + cell[None, :, None]) * n + cell[None, None, :]).reshape(-1)  # lower corner
    tets = (base[:, None, None] + corner_offset[None]).reshape(-1, 4)
    return verts, tets


def tet_grid_edges(res: int) -> Tensor:
    """Unique edges of `make_tet_grid(res)` tets, `[2, Ne] int64`, row 0 < row 1 (vertex indices).

    Built from the lattice directly (p -> p + d for the 7 `EDGE_DIRECTIONS`) rather than by
    deduplicating the 6 Nt tet edges, which at res=128 would sort 75M pairs.
    """
    n = res + 1
    index = torch.arange(n**3, dtype=torch.int64).reshape(n, n, n)
    counts = [(n - dx) * (n - dy) * (n - dz) for dx, dy, dz in EDGE_DIRECTIONS]
    edges = torch.empty(2, sum(counts), dtype=torch.int64)
    start = 0
    for (dx, dy, dz), count in zip(EDGE_DIRECTIONS, counts, strict=True):
        edges[0, start : start + count].view(n - dx, n - dy, n - dz).copy_(index[: n - dx, : n - dy, : n - dz])
        edges[1, start : start + count].view(n - dx, n - dy, n - dz).copy_(index[dx:, dy:, dz:])
        start += count
    return edges


def tet_edges(tets: Tensor) -> Tensor:
    """Unique edges of any tet mesh, `[2, Ne] int64`, row 0 < row 1, sorted by (row 0, row 1)."""
    pairs = tets[:, TET_EDGE_CORNERS].reshape(-1, 2)
    lo, hi = pairs.min(dim=1).values, pairs.max(dim=1).values
    n = int(tets.max()) + 1 if tets.numel() else 1
    key = torch.unique(lo * n + hi)
    return torch.stack([key // n, key % n])


def tet_volumes(verts: Tensor, tets: Tensor) -> Tensor:
    """Signed volumes `[Nt]`, det(v1 - v0, v2 - v0, v3 - v0) / 6, in scene units cubed."""
    v = verts[tets]
    return torch.linalg.det(v[:, 1:] - v[:, :1]) / 6.0
