"""OBJ export: round trip through trimesh, UV convention, atomic writes, baking."""
import pytest
import torch
import trimesh

import recon.export.obj as obj_mod
from recon.export.obj import load_textured_obj, write_textured_obj
from recon.export.uv_bake import bake_texture, dilate, unwrap
from recon.geometry.mesh import Mesh
from recon.render import make_rasterizer


@pytest.fixture
def sphere() -> Mesh:
    tm = trimesh.creation.icosphere(subdivisions=2, radius=0.8)
    return Mesh(torch.tensor(tm.vertices, dtype=torch.float32), torch.tensor(tm.faces, dtype=torch.int64))


def color_field(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([(p[:, 0] + 1) / 2, (p[:, 1] + 1) / 2, torch.full_like(p[:, 0], 0.25)], -1).clamp(0, 1)


def test_unwrap_bake_round_trip(tmp_path, sphere):
    mesh = unwrap(sphere)
    assert mesh.uv.min() >= 0 and mesh.uv.max() <= 1 and mesh.uv_faces.shape == mesh.faces.shape
    tex = bake_texture(make_rasterizer("torch", "cpu"), mesh, color_field, 256)
    assert tex.shape == (256, 256, 3)
    write_textured_obj(tmp_path, mesh, tex)
    assert {p.name for p in tmp_path.iterdir()} == {"mesh.obj", "mesh.mtl", "texture_kd.png"}
    tm = trimesh.load(tmp_path / "mesh.obj", force="mesh", process=False)
    assert len(tm.faces) == sphere.faces.shape[0]
    from scipy.spatial import cKDTree

    d_lo, _ = cKDTree(sphere.verts.numpy()).query(tm.vertices)
    d_ol, _ = cKDTree(tm.vertices).query(sphere.verts.numpy())
    assert d_lo.max() < 1e-5 and d_ol.max() < 1e-5  # same positions (trimesh splits UV seams)
    assert tm.visual.uv is not None and tm.visual.material.image is not None
    # the texture at each vertex's UV reproduces the field at the vertex (UV convention and baking agree)
    loaded, texture = load_textured_obj(tmp_path / "mesh.obj")
    h, w = texture.shape[1:3]
    uv = loaded.uv
    ij = (uv * torch.tensor([w, h]) - 0.5).round().long().clamp(0, w - 1)
    sampled = texture[0, ij[:, 1], ij[:, 0]]
    corner_pos = loaded.verts[loaded.faces.reshape(-1)]
    corner_tex = sampled[loaded.uv_faces.reshape(-1)]
    err = (corner_tex - color_field(corner_pos)).abs().mean()
    assert err < 0.03, err


def test_dilate_fills_from_nearest():
    tex = torch.zeros(4, 4, 1)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    tex[0, 0], mask[0, 0] = 1.0, True
    tex[3, 3], mask[3, 3] = 2.0, True
    out = dilate(tex, mask)
    assert out[0, 1, 0] == 1.0 and out[3, 2, 0] == 2.0 and out[0, 0, 0] == 1.0


def test_crash_mid_export_leaves_no_obj(tmp_path, sphere, monkeypatch):
    mesh = unwrap(sphere)
    tex = torch.rand(16, 16, 3)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(obj_mod, "obj_text", boom)
    with pytest.raises(KeyboardInterrupt):
        write_textured_obj(tmp_path, mesh, tex)
    assert not (tmp_path / "mesh.obj").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_missing_obj_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="mesh.obj not found"):
        load_textured_obj(tmp_path / "mesh.obj")


def test_simplify_caps_faces_and_keeps_shape(sphere):
    from recon.export.uv_bake import simplify

    fine = trimesh.creation.icosphere(subdivisions=4, radius=0.8)
    mesh = Mesh(torch.tensor(fine.vertices, dtype=torch.float32), torch.tensor(fine.faces, dtype=torch.int64))
    small = simplify(mesh, 1000)
    assert small.faces.shape[0] <= 1000 and small.normals is not None
    r = small.verts.norm(dim=-1)
    assert (r - 0.8).abs().max() < 0.02  # still the sphere
    assert simplify(sphere, 10**6) is sphere
    # the decimation trimesh's simplify_quadric_decimation gives (the same library, called directly)
    ref = fine.simplify_quadric_decimation(face_count=1000)
    assert small.faces.shape[0] == len(ref.faces) and small.verts.shape[0] == len(ref.vertices)
    gap = torch.cdist(small.verts.double(), torch.tensor(ref.vertices)).min(dim=1).values
    assert gap.max() < 1e-6


def test_atomic_write_gives_normal_permissions(tmp_path):
    import os

    from recon.export.obj import atomic_write_bytes, default_file_mode

    atomic_write_bytes(tmp_path / "a.txt", b"x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == default_file_mode()
    umask = os.umask(0o022)
    try:
        assert default_file_mode() == 0o644
    finally:
        os.umask(umask)


def test_obj_text_is_numpy_savetxt_text(sphere):
    """The one-string row formatting writes exactly what np.savetxt writes, in every branch (normals, UVs, both,
    neither), including negative zeros, tiny values and an empty mesh."""
    import io

    import numpy as np

    def reference(mesh, rows_fmt):
        out = io.StringIO()
        for rows, fmt in rows_fmt:
            np.savetxt(out, rows, fmt=fmt)
        return out.getvalue()

    mesh = unwrap(sphere).with_normals()
    mesh.verts[0] = torch.tensor([-0.0, 1e-9, -1e-7])
    v, n = mesh.verts.numpy(), mesh.normals.numpy()
    uv = mesh.uv.numpy().copy()
    uv[:, 1] = 1.0 - uv[:, 1]
    f, ft = mesh.faces.numpy() + 1, mesh.uv_faces.numpy() + 1
    full = obj_mod.obj_text(mesh)
    body = full.split("mtllib mesh.mtl\n", 1)[1].replace("usemtl recon_material\n", "")
    rows = np.stack([f[:, 0], ft[:, 0], f[:, 0], f[:, 1], ft[:, 1], f[:, 1], f[:, 2], ft[:, 2], f[:, 2]], 1)
    assert body == reference(mesh, [(v, "v %.6f %.6f %.6f"), (n, "vn %.6f %.6f %.6f"), (uv, "vt %.6f %.6f"),
                                    (rows, "f %d/%d/%d %d/%d/%d %d/%d/%d")])
    plain = Mesh(mesh.verts, mesh.faces)
    assert obj_mod.obj_text(plain, mtl_name=None) == "# recon mesh\n" + reference(plain, [(v, "v %.6f %.6f %.6f"), (f, "f %d %d %d")])
    empty = Mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64))
    assert obj_mod.obj_text(empty, mtl_name=None) == "# recon mesh\n"
