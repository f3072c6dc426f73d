"""Geometry: tet-grid SDF to triangle mesh (DMTet), and mesh attributes (normals, tangents)."""

from recon.geometry.dmtet import DMTetGeometry, marching_tets, sdf_sign_loss
from recon.geometry.mesh import Mesh, compute_tangents, laplacian_loss, laplacian_uniform, vertex_normals
from recon.geometry.tet_grid import make_tet_grid, tet_edges, tet_grid_edges, tet_volumes

__all__ = [
    "DMTetGeometry",
    "Mesh",
    "compute_tangents",
    "laplacian_loss",
    "laplacian_uniform",
    "make_tet_grid",
    "marching_tets",
    "sdf_sign_loss",
    "tet_edges",
    "tet_grid_edges",
    "tet_volumes",
    "vertex_normals",
]
