"""Mesh clean-up before export: drop surfaces that no training view ever sees.

DMTet leaves closed pockets and sheets inside the object (the image losses never see them, and the SDF
regulariser only slowly removes them); at fine tet grids they can be most of the extracted triangles.
They cost UV space and unwrapping time and corrupt geometry metrics, and no photo constrains them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from recon.geometry.mesh import Mesh
from recon.render.camera import transform_pos


@torch.no_grad()
def visible_faces(rasterizer, mesh: Mesh, mvp: Tensor, resolution: tuple[int, int], batch: int = 8) -> Tensor:
    """Faces of ``mesh`` that cover at least one pixel in any of the views ``mvp`` [N,4,4]: bool [Nf]."""
    faces = mesh.faces
    seen = torch.zeros(faces.shape[0], dtype=torch.bool, device=faces.device)
    for i in range(0, mvp.shape[0], batch):
        rast, _ = rasterizer.rasterize(transform_pos(mvp[i : i + batch].to(mesh.verts.device), mesh.verts),
                                       faces, resolution)
        ids = rast[..., 3].reshape(-1).long()
        seen[ids[ids > 0] - 1] = True
    return seen


def keep_faces(mesh: Mesh, keep: Tensor) -> Mesh:
    """Sub-mesh of the faces where ``keep`` [Nf] is True, unreferenced vertices removed, normals recomputed."""
    faces = mesh.faces[keep]
    used, inverse = torch.unique(faces.reshape(-1), return_inverse=True)
    return Mesh(verts=mesh.verts[used], faces=inverse.reshape(-1, 3)).with_normals()


def cull_invisible(rasterizer, mesh: Mesh, mvp: Tensor, resolution: tuple[int, int]) -> Mesh:
    """``mesh`` without the faces that none of the views ``mvp`` sees (see module docstring)."""
    seen = visible_faces(rasterizer, mesh, mvp, resolution)
    if not bool(seen.any()):
        raise ValueError("no face of the mesh is visible from the training views: the cameras miss the object.")
    return keep_faces(mesh, seen)
