"""Visibility culling removes surfaces hidden inside the object and keeps the visible shell."""
import torch
import trimesh

from recon.data.synthetic_scene import orbit_c2w
from recon.export.cleanup import cull_invisible, keep_faces
from recon.geometry.mesh import Mesh
from recon.render import make_rasterizer, perspective


def test_interior_shell_is_culled_outer_kept():
    outer = trimesh.creation.box(extents=(1, 1, 1))
    inner = trimesh.creation.icosphere(subdivisions=2, radius=0.3)  # hidden inside the box
    both = trimesh.util.concatenate([outer, inner])
    mesh = Mesh(torch.tensor(both.vertices, dtype=torch.float32), torch.tensor(both.faces, dtype=torch.int64))
    c2w = torch.from_numpy(orbit_c2w(12, 3.0, seed=None))
    mvp = perspective(0.8, 1.0, 0.1, 100.0) @ torch.linalg.inv(c2w)
    culled = cull_invisible(make_rasterizer("torch", "cpu"), mesh, mvp, (64, 64))
    assert culled.faces.shape[0] == len(outer.faces)  # all 12 box triangles seen, no sphere triangle
    assert culled.verts.shape[0] == len(outer.vertices)  # unreferenced vertices dropped
    assert culled.verts.abs().max() == 0.5


def test_keep_faces_reindexes():
    verts = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    faces = torch.tensor([[0, 1, 2], [2, 3, 4]])
    sub = keep_faces(Mesh(verts, faces), torch.tensor([False, True]))
    assert torch.equal(sub.verts, verts[2:]) and torch.equal(sub.faces, torch.tensor([[0, 1, 2]]))
