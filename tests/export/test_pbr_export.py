"""The full PBR export: OBJ + MTL with kd/ks/normal maps, probe.hdr, GLB with ORM, staged so a crash leaves nothing."""
import json
import struct

import numpy as np
import pytest
import torch
import trimesh

import recon.callbacks.mesh_export as export_mod
from recon.callbacks.mesh_export import write_result
from recon.eval.evaluate import load_export, load_light
from recon.export.hdr import read_hdr
from recon.export.uv_bake import unwrap
from recon.geometry.mesh import Mesh


@pytest.fixture
def result():
    tm = trimesh.creation.icosphere(subdivisions=2, radius=0.8)
    mesh = unwrap(Mesh(torch.tensor(tm.vertices, dtype=torch.float32), torch.tensor(tm.faces)).with_normals())
    torch.manual_seed(0)
    tex = torch.rand(32, 32, 9)
    tex[..., 6:9] = torch.nn.functional.normalize(tex[..., 6:9] * torch.tensor([2.0, 2.0, 1.0]) - torch.tensor([1.0, 1.0, 0.0]), dim=-1)
    light = torch.rand(16, 32, 3) * 4
    return mesh, tex, light


def _glb_json(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<I", data[12:16])
    return json.loads(data[20 : 20 + length])


def test_round_trip(tmp_path, result):
    mesh, tex, light = result
    obj = write_result(tmp_path, mesh, tex, light)
    assert obj == tmp_path / "mesh.obj"
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"mesh.obj", "mesh.mtl", "mesh.glb", "texture_kd.png", "texture_ks.png", "texture_n.png", "probe.hdr"}
    exp = load_export(tmp_path, "cpu")
    assert exp["mesh"].faces.shape == mesh.faces.shape and exp["mesh"].uv is not None
    torch.testing.assert_close(exp["ks"][0], tex[..., 3:6], atol=1 / 255 + 1e-6, rtol=0)  # linear 8 bit
    torch.testing.assert_close(exp["nrm"][0], tex[..., 6:9], atol=2 / 255 + 1e-6, rtol=0)
    hdr = read_hdr(tmp_path / "probe.hdr")
    # RGBE: an 8-bit mantissa per channel, one exponent per pixel
    assert ((hdr - light).abs().amax(-1) / light.amax(-1)).max() < 0.01
    env = load_light(tmp_path / "probe.hdr", "cpu", {"base_res": 16, "min_res": 4})
    assert env.base.shape == (6, 16, 16, 3) and env.specular is not None
    tm = trimesh.load(tmp_path / "mesh.obj", force="mesh", process=False)
    assert len(tm.faces) == mesh.faces.shape[0] and tm.visual.uv is not None
    gltf = _glb_json(tmp_path / "mesh.glb")
    mat = gltf["materials"][0]
    assert {"baseColorTexture", "metallicRoughnessTexture"} <= set(mat["pbrMetallicRoughness"])
    assert "normalTexture" in mat and "occlusionTexture" in mat and "TANGENT" in gltf["meshes"][0]["primitives"][0]["attributes"]
    glb = trimesh.load(tmp_path / "mesh.glb", force="mesh", process=False)
    orm = np.asarray(glb.visual.material.metallicRoughnessTexture.convert("RGB"), dtype=np.float32) / 255
    # glTF's occlusion is visibility: 1 - nvdiffrec's occlusion channel; roughness and metalness as they are
    np.testing.assert_allclose(orm[..., 0], 1 - tex[..., 3].numpy(), atol=1 / 255 + 1e-6)
    np.testing.assert_allclose(orm[..., 1:], tex[..., 4:6].numpy(), atol=1 / 255 + 1e-6)


@pytest.mark.parametrize("writer", ["write_textured_obj", "write_glb"])
def test_crash_mid_export_leaves_nothing(tmp_path, result, monkeypatch, writer):
    """Either writer failing (they run side by side) leaves no file, whatever the other one finished."""
    mesh, tex, light = result

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(export_mod, writer, boom)
    with pytest.raises(KeyboardInterrupt):
        write_result(tmp_path, mesh, tex, light)
    assert list(tmp_path.iterdir()) == []  # no mesh.glb, no mesh.obj, no staging folder


def test_export_back_in_input_coordinates(tmp_path, result):
    """A fit in normalized coordinates writes its mesh in the input's (datamodule.normalization.to_world)."""
    from recon.data.normalize import Normalization

    mesh, tex, light = result
    norm = Normalization(scale=0.25, translation=[0.5, -1.0, 2.0], method="test")
    write_result(tmp_path, mesh, tex, light, to_world=norm.to_world)
    tm = trimesh.load(tmp_path / "mesh.obj", force="mesh", process=False)
    expected = norm.to_world(mesh.verts).numpy()
    got = np.unique(np.round(tm.vertices, 5), axis=0)  # trimesh splits vertices at UV seams
    np.testing.assert_allclose(got, np.unique(np.round(expected, 5), axis=0), atol=2e-5)
    glb = trimesh.load(tmp_path / "mesh.glb", force="mesh", process=False)
    np.testing.assert_allclose(glb.bounds, trimesh.Trimesh(expected, mesh.faces.numpy()).bounds, atol=1e-5)


def test_shared_maps_encoded_once_and_the_same_as_each_writer_alone(tmp_path, result, monkeypatch):
    """write_result encodes the albedo and normal maps once for both files (4 PNGs: kd, ks, orm, normal, not 6),
    and its files are byte for byte what the OBJ and GLB writers write on their own."""
    import recon.export.obj as obj_mod
    from recon.export.gltf import write_glb
    from recon.export.obj import write_textured_obj
    from recon.materials.pbr import split_channels

    mesh, tex, light = result
    encoded = []
    png_bytes = obj_mod.png_bytes
    monkeypatch.setattr(obj_mod, "png_bytes", lambda image, level: encoded.append(image.shape) or png_bytes(image, level))
    write_result(tmp_path / "together", mesh, tex, light)
    assert len(encoded) == 4
    ch = split_channels(tex)
    alone = tmp_path / "alone"
    alone.mkdir()
    write_textured_obj(alone, mesh, ch["kd"], ks=ch["ks"], normal_ts=ch["nrm"])
    orm = torch.cat([1 - ch["ks"][..., 0:1], ch["ks"][..., 1:3]], -1)
    write_glb(alone / "mesh.glb", mesh, ch["kd"], orm, ch["nrm"])
    for name in ("mesh.obj", "mesh.mtl", "texture_kd.png", "texture_ks.png", "texture_n.png", "mesh.glb"):
        assert (tmp_path / "together" / name).read_bytes() == (alone / name).read_bytes(), name


def test_png_level_trades_size_for_time_and_keeps_pixels(tmp_path):
    """Every zlib level stores the same pixels; a higher level gives a smaller file for a smooth texture; a level
    outside 0-9 is refused naming the setting."""
    from recon.callbacks.mesh_export import MeshExport
    from recon.export.obj import png_bytes

    y, x = np.mgrid[0:256, 0:256]
    image = np.stack([(x + y) // 2, (x * y) % 256, 128 + 100 * np.sin(x / 9.0)], -1).astype(np.uint8)
    fast, small = png_bytes(image, 1), png_bytes(image, 9)
    import imageio.v3 as iio

    assert np.array_equal(iio.imread(fast), image) and np.array_equal(iio.imread(small), image)
    assert len(small) < len(fast)
    for bad in (10, -1, 2.5, True):
        with pytest.raises(ValueError, match="png_level"):
            MeshExport(str(tmp_path), png_level=bad)
