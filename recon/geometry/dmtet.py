"""DMTet: a signed distance field on a deformable tet grid, turned into a mesh by marching tets.

Sign convention: INSIDE is `sdf < 0`, OUTSIDE is `sdf >= 0` (a vertex with sdf exactly 0 counts as
outside). nvdiffrec's code uses the opposite sign (its `sdf > 0` is occupied); every formula here is
nvdiffrec's with `sdf -> -sdf`, and the extracted faces are wound counter-clockwise seen from outside,
so their normals point from the inside (sdf < 0) towards the outside (sdf > 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recon.gather import take_rows
from recon.geometry.mesh import Mesh, normals_with_faces
from recon.geometry.tet_grid import TET_EDGE_CORNERS, lattice_verts, make_tet_grid, tet_grid_edges
from recon.optional import optional_module

# Marching-tets case table. Case = sum of 2^i over the inside corners i of a tet; entries index the
# tet edges in `TET_EDGE_CORNERS` order, 3 per triangle, -1 unused. It is nvdiffrec's table with each
# triangle's winding reversed, so that positively oriented tets (det(v1 - v0, v2 - v0, v3 - v0) > 0)
# give outward normals.
TRIANGLE_TABLE = torch.tensor([
    [-1, -1, -1, -1, -1, -1],
    [1, 2, 0, -1, -1, -1],
    [4, 3, 0, -1, -1, -1],
    [1, 2, 4, 1, 4, 3],
    [3, 5, 1, -1, -1, -1],
    [2, 0, 3, 2, 3, 5],
    [1, 0, 4, 1, 4, 5],
    [4, 5, 2, -1, -1, -1],
    [4, 2, 5, -1, -1, -1],
    [4, 0, 1, 4, 1, 5],
    [3, 0, 2, 3, 2, 5],
    [1, 5, 3, -1, -1, -1],
    [4, 2, 1, 4, 1, 3],
    [3, 4, 0, -1, -1, -1],
    [2, 1, 0, -1, -1, -1],
    [-1, -1, -1, -1, -1, -1],
], dtype=torch.int64)  # fmt: skip
NUM_TRIANGLES = torch.tensor([0, 1, 1, 2, 1, 2, 2, 1, 1, 2, 2, 1, 2, 1, 1, 0], dtype=torch.int64)


def marching_tets_topology(
    inside: Tensor, tets: Tensor, tables: tuple[Tensor, Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Combinatorial half of marching tets: which edges carry a vertex, and the faces.

    inside: [Nv] bool; tets: [Nt,4] int64, positively oriented. Returns `edges [Ne,2] int64`
    (global vertex indices, one inside and one outside endpoint, unique) and `faces [Nf,3] int64`
    indexing `edges`. Only tets with both inside and outside corners are processed.
    tables: (TET_EDGE_CORNERS, TRIANGLE_TABLE, NUM_TRIANGLES) already on `tets.device` (a module's
    buffers); None copies the module-level ones there.
    """
    device = tets.device
    if tables is None:
        tables = tuple(t.to(device) for t in (TET_EDGE_CORNERS, TRIANGLE_TABLE, NUM_TRIANGLES))
    corners, triangle_table, num_triangles = tables
    inside_t = inside[tets]  # [Nt,4]
    n_inside = inside_t.sum(dim=1)
    valid = ((n_inside > 0) & (n_inside < 4)).nonzero().squeeze(1)  # filter first: usually a few %
    tets, inside_t = take_rows(tets, valid), inside_t.index_select(0, valid)  # one host sync for both

    ends = tets[:, corners]  # [T,6,2]
    crossing = (inside_t[:, corners[:, 0]] != inside_t[:, corners[:, 1]]).reshape(-1).nonzero().squeeze(1)  # of T*6
    lo, hi = ends.min(dim=2).values, ends.max(dim=2).values
    n = inside.shape[0]
    # One int64 key per undirected edge: a 1-D unique is far cheaper than unique(dim=0) on pairs.
    keys, edge_id = torch.unique((lo * n + hi).reshape(-1).index_select(0, crossing), return_inverse=True)
    edges = torch.stack([keys // n, keys % n], dim=1)
    idx_map = torch.full((tets.shape[0] * 6,), -1, dtype=torch.int64, device=device)
    idx_map[crossing] = edge_id  # integer positions: no second host sync
    idx_map = idx_map.view(-1, 6)

    case = (inside_t.long() * (2 ** torch.arange(4, device=device))).sum(dim=1)
    table = triangle_table[case]  # [T,6]
    count = num_triangles[case]  # [T]
    faces = idx_map.gather(1, table.clamp(min=0)).reshape(-1, 2, 3)
    keep = count[:, None] > torch.arange(2, device=device)[None]  # [T,2]
    return edges, faces[keep]


def interpolate_crossings(pos_a: Tensor, pos_b: Tensor, sdf_a: Tensor, sdf_b: Tensor) -> Tensor:
    """Zero crossing of the linear sdf along edges a-b: `[Ne,3]`, differentiable in all inputs.

    pos_*: [Ne,3]; sdf_*: [Ne] with opposite signs (so sdf_b - sdf_a never vanishes).
    """
    sdf_a, sdf_b = sdf_a.unsqueeze(1), sdf_b.unsqueeze(1)
    return (pos_a * sdf_b - pos_b * sdf_a) / (sdf_b - sdf_a)


def marching_tets(verts: Tensor, sdf: Tensor, tets: Tensor) -> tuple[Tensor, Tensor]:
    """Differentiable marching tetrahedra (nvdiffrec's `DMTet.__call__`), surface at sdf = 0.

    verts: [Nv,3] float; sdf: [Nv] same dtype, inside < 0 <= outside; tets: [Nt,4] int64, positively
    oriented (as `make_tet_grid` gives). Returns `verts [Nv',3]`, one per sign-changing edge, placed
    by linear interpolation of the sdf (gradients reach `verts` and `sdf`), and `faces [Nf',3]
    int64` wound so normals point outward (towards sdf > 0). Both are empty without a sign change.
    """
    edges, faces = marching_tets_topology(sdf.detach() < 0, tets)
    a, b = edges[:, 0], edges[:, 1]
    return interpolate_crossings(take_rows(verts, a), take_rows(verts, b), take_rows(sdf, a), take_rows(sdf, b)), faces


def sdf_sign_loss(sdf: Tensor, edges: Tensor, all_crossing: bool = False) -> Tensor:
    """nvdiffrec's sdf regularizer: BCE pulling both ends of every sign-changing edge together.

    sdf: [Nv]; edges: [2,Ne] vertex indices. For each edge whose ends differ in sign, the sdf at one
    end, taken as a logit, is scored against the sign of the other end, and vice versa; returns the
    mean over those edges of the two terms (0, still in the graph, if none). Minimising it removes
    sign changes, i.e. spurious surface fragments and floaters.
    all_crossing: every given edge is known to change sign (marching tets' edges), so none is filtered.
    """
    if not all_crossing:
        inside = sdf.detach() < 0
        # Select the (few) sign-changing edges without autograd, then gather with gradients only there.
        edges = edges[:, inside[edges[0]] != inside[edges[1]]]
    sdf_a, sdf_b = take_rows(sdf, edges[0]), take_rows(sdf, edges[1])
    if sdf_a.numel() == 0:
        return sdf_a.sum()
    # Symmetric under sdf -> -sdf, so nvdiffrec's (sdf > 0) targets apply unchanged to our sign.
    return F.binary_cross_entropy_with_logits(sdf_a, (sdf_b > 0).to(sdf.dtype)) + F.binary_cross_entropy_with_logits(
        sdf_b, (sdf_a > 0).to(sdf.dtype)
    )


class DMTetGeometry(nn.Module):
    """Learnable sdf and vertex offsets on a `make_tet_grid` lattice; `forward()` gives the Mesh.

    tet_grid: cells per cube side; scale: cube edge, scene units; center: cube centre.
    deform_scale: largest vertex offset, in cells (offset = deform_scale * cell_size * tanh(deform)).
    sdf_init: "sphere" is the metric sdf |x - center| - init_radius * scale / 2 (a sphere at
    `init_radius` of the half edge); "random" is nvdiffrec's init, uniform(-0.1, 0.9) in its sign, so
    uniform(-0.9, 0.1) here: about 90% of vertices inside, with random outside specks. Note that at
    tet_grid=128 this first surface has ~5M faces (forward ~6 s on CPU); "sphere" gives ~170k.

    lattice_kernel: on CUDA, marching tets' topology runs as two Triton kernels on the lattice
    (`recon.geometry.marching_tets_triton`): the same edges and faces, one wait for the device per extraction
    instead of five and a few launches instead of some forty. False, or without triton, `marching_tets_topology`.

    `verts` and the case tables are non-persistent buffers: `.to()` moves them, checkpoints hold only
    the parameters `sdf [Nv]` and `deform [Nv,3]` (the grid is rebuilt from the arguments). `tets` and
    `edges` (~0.6 GB at tet_grid=128: 12.6M tets, 14.8M edges) are built on first use on the sdf's
    device, and are no buffers: nothing to broadcast under DDP.
    """

    def __init__(
        self,
        tet_grid: int = 128,
        scale: float = 2.1,
        center: Sequence[float] = (0.0, 0.0, 0.0),
        deform_scale: float = 0.5,
        sdf_init: str = "sphere",
        init_radius: float = 0.6,
        lattice_kernel: bool = True,
    ):
        super().__init__()
        self.lattice_kernel = bool(lattice_kernel)
        self._lattice_tables: tuple[Tensor, ...] | None = None  # `lattice_tables` on the sdf's device
        self.tet_grid, self.scale, self.deform_scale = int(tet_grid), float(scale), float(deform_scale)
        self.center = tuple(float(c) for c in center)
        verts = lattice_verts(self.tet_grid, self.scale, self.center)
        self.register_buffer("verts", verts, persistent=False)
        self._grid: dict[str, Tensor] = {}  # `tets` and `edges`, built on first use (see `_grid_table`)
        self.register_buffer("tet_edge_corners", TET_EDGE_CORNERS.clone(), persistent=False)
        self.register_buffer("triangle_table", TRIANGLE_TABLE.clone(), persistent=False)
        self.register_buffer("num_triangles", NUM_TRIANGLES.clone(), persistent=False)

        if sdf_init == "sphere":
            sdf = (verts - torch.tensor(self.center)).norm(dim=1) - init_radius * self.scale / 2
        elif sdf_init == "random":
            sdf = 0.1 - torch.rand(verts.shape[0])
        else:
            raise ValueError(f"geometry.sdf_init={sdf_init!r} is not known: use 'sphere' or 'random'.")
        self.sdf = nn.Parameter(sdf)
        self.deform = nn.Parameter(torch.zeros_like(verts))

    @property
    def tets(self) -> Tensor:
        """The grid's tets `[6 res^3, 4] int64` (`make_tet_grid`) on the sdf's device, built on first use: on CUDA
        marching tets works on the lattice (`lattice_kernel`) and never needs them (0.4 GB at tet_grid=128)."""
        return self._grid_table("tets", lambda: make_tet_grid(self.tet_grid, self.scale, self.center)[1])

    @property
    def edges(self) -> Tensor:
        """The grid's edges `[2, Ne] int64` (`tet_grid_edges`) on the sdf's device, built on first use (the sdf
        regulariser needs them only when no extraction of the current sdf gave its crossing edges)."""
        return self._grid_table("edges", lambda: tet_grid_edges(self.tet_grid))

    def _grid_table(self, name: str, build) -> Tensor:
        """A grid table on the sdf's device: kept once built (moved, not rebuilt, when the module changes device)."""
        table = self._grid.get(name)
        if table is None:
            table = build()
        if table.device != self.sdf.device:
            table = table.to(self.sdf.device)
        self._grid[name] = table
        return table

    @property
    def cell_size(self) -> float:
        """Edge of one grid cell, scene units."""
        return self.scale / self.tet_grid

    @property
    def has_surface(self) -> bool:
        """Whether the sdf has both signs; if not, `forward()` returns an empty mesh."""
        inside = self.sdf.detach() < 0
        return bool(inside.any()) and not bool(inside.all())

    def deformed_verts(self, index: Tensor | None = None) -> Tensor:
        """Grid vertices moved by their offsets, `[Nv,3]` (or `[len(index),3]` for a subset)."""
        verts, deform = (self.verts, self.deform) if index is None else (take_rows(self.verts, index),
                                                                          take_rows(self.deform, index))
        return verts + self.deform_scale * self.cell_size * torch.tanh(deform)

    def _surface_cells(self, inside: Tensor) -> Tensor:
        """[res^3] bool: the cells whose 8 corners are not all on one side: the mean occupancy of each 2x2x2 block of
        grid vertices is strictly between 0 and 1 (a mean of eight 0/1 values, exact in float32)."""
        n = self.tet_grid + 1
        mean = F.avg_pool3d(inside.view(1, 1, n, n, n).float(), kernel_size=2, stride=1)
        return ((mean > 0) & (mean < 1)).reshape(-1)

    def _surface_tets(self, inside: Tensor) -> Tensor:
        """Tets `[Nt',4]` of the cells whose 8 corners are not all on one side.

        A superset of the tets marching tets keeps, found on the lattice without gathering over all 6 res^3 tets.
        """
        cells = torch.nonzero(self._surface_cells(inside)).squeeze(1)
        tet_ids = (cells[:, None] * 6 + torch.arange(6, device=cells.device)).reshape(-1)
        return take_rows(self.tets, tet_ids)

    def _topology(self, inside: Tensor) -> tuple[Tensor, Tensor]:
        """Marching tets' crossing edges [Ne,2] and faces [Nf,3] of the occupancy ``inside`` (see `lattice_kernel`)."""
        if self.lattice_kernel and inside.is_cuda:
            kernels = optional_module("recon.geometry.marching_tets_triton")
            if kernels is not None:
                if self._lattice_tables is None or self._lattice_tables[0].device != inside.device:
                    self._lattice_tables = kernels.lattice_tables(self.tet_grid, inside.device)
                return kernels.lattice_topology(inside, self.tet_grid, self._lattice_tables)
        tables = (self.tet_edge_corners, self.triangle_table, self.num_triangles)
        return marching_tets_topology(inside, self._surface_tets(inside), tables)

    def forward(self) -> Mesh:
        """Surface of the current sdf on the deformed grid, with vertex normals.

        Differentiable w.r.t. `sdf` and `deform`. Without a sign change (`has_surface` False) the
        mesh is empty (0 verts, 0 faces) but still in the graph: callers should skip the image
        losses for that step, or re-initialise the sdf, since nothing can be rendered and no
        gradient would flow.
        """
        inside = self.sdf.detach() < 0
        edges, faces = self._topology(inside)
        self._crossing = (edges, self._sdf_state())
        ends = edges.reshape(-1)  # both ends of each edge, gathered together
        pos, sdf = self.deformed_verts(ends).view(-1, 2, 3), take_rows(self.sdf, ends).view(-1, 2)
        verts = interpolate_crossings(pos[:, 0], pos[:, 1], sdf[:, 0], sdf[:, 1])
        normals, unit_faces = normals_with_faces(verts, faces)
        return Mesh(verts=verts, faces=faces, normals=normals, face_normals=unit_faces)

    def _sdf_state(self) -> tuple[int, int, torch.device]:
        """Identifies the sdf's current values: its parameter, in-place version counter (an optimiser step or a
        checkpoint load bumps it) and device."""
        return id(self.sdf), self.sdf._version, self.sdf.device

    @torch.no_grad()
    def extract_mesh(self) -> Mesh:
        """Detached `forward()` result, e.g. for export or evaluation."""
        return self.forward().detach()

    def sdf_regularizer(self) -> Tensor:
        """nvdiffrec's sign-change regularizer over all grid edges (`sdf_sign_loss`), scalar.

        The sign-changing grid edges are exactly the edges marching tets places vertices on: when `forward()` ran on
        the current sdf (a training step renders before its losses), its edges are used, which skips a pass over all
        grid edges (14.8M at tet_grid=128); otherwise the grid's edges are filtered."""
        crossing = getattr(self, "_crossing", None)
        if crossing is not None and crossing[1] == self._sdf_state():
            return sdf_sign_loss(self.sdf, crossing[0].t(), all_crossing=True)
        return sdf_sign_loss(self.sdf, self.edges)

    def extra_repr(self) -> str:
        return (
            f"tet_grid={self.tet_grid}, scale={self.scale}, center={self.center}, "
            f"deform_scale={self.deform_scale}, verts={self.verts.shape[0]}, tets={6 * self.tet_grid ** 3}"
        )

