"""glTF binary export: container structure, Khronos validator (when installed), trimesh round trip, UV convention."""
import io
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh

import recon.export.obj as obj_mod
from recon.color import srgb_to_linear
from recon.export.gltf import split_uv_seams, write_glb
from recon.export.uv_bake import unwrap
from recon.geometry.mesh import Mesh

RED, BLUE = torch.tensor([0.8, 0.05, 0.05]), torch.tensor([0.05, 0.1, 0.9])
COMPONENTS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}
DTYPES = {5126: np.float32, 5125: np.uint32}


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    tm = trimesh.creation.icosphere(subdivisions=2, radius=0.8)
    sphere = Mesh(torch.tensor(tm.vertices, dtype=torch.float32), torch.tensor(tm.faces, dtype=torch.int64))
    return unwrap(sphere, resolution=256)  # xatlas: several charts, so UV seams to split


def two_colour(h: int = 64, w: int = 64) -> torch.Tensor:
    """RED in the top-left quadrant (rows < h/2, columns < w/2), BLUE elsewhere: tells u and v flips apart."""
    kd = BLUE.expand(h, w, 3).clone()
    kd[: h // 2, : w // 2] = RED
    return kd


def maps(h: int = 32, w: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    orm = torch.rand(h, w, 3, generator=g)
    n = torch.randn(h, w, 3, generator=g) * 0.3 + torch.tensor([0.0, 0.0, 1.0])
    return orm, torch.nn.functional.normalize(n, dim=-1)


def read_glb(path: Path) -> tuple[dict, bytes, bytes]:
    """(json, bin chunk, raw file), asserting the GLB container layout."""
    raw = path.read_bytes()
    magic, version, length = struct.unpack_from("<III", raw, 0)
    assert (magic, version, length) == (0x46546C67, 2, len(raw))
    json_len, json_type = struct.unpack_from("<II", raw, 12)
    assert json_type == 0x4E4F534A and json_len % 4 == 0
    json_bytes = raw[20 : 20 + json_len]
    assert json_bytes.rstrip(b" ") == json_bytes.rstrip()  # padded with spaces only
    bin_len, bin_type = struct.unpack_from("<II", raw, 20 + json_len)
    assert bin_type == 0x004E4942 and bin_len % 4 == 0
    assert 28 + json_len + bin_len == len(raw)
    return json.loads(json_bytes), raw[28 + json_len :], raw


def accessor(gltf: dict, bin_chunk: bytes, index: int) -> np.ndarray:
    acc = gltf["accessors"][index]
    view = gltf["bufferViews"][acc["bufferView"]]
    n = COMPONENTS[acc["type"]]
    dtype = np.dtype(DTYPES[acc["componentType"]])
    assert "byteStride" not in view and view["byteLength"] == acc["count"] * n * dtype.itemsize
    assert (view["byteOffset"] + acc.get("byteOffset", 0)) % 4 == 0
    data = np.frombuffer(bin_chunk, dtype, acc["count"] * n, view["byteOffset"] + acc.get("byteOffset", 0))
    return data.reshape(acc["count"], n)


def image(gltf: dict, bin_chunk: bytes, texture_index: int) -> np.ndarray:
    img = gltf["images"][gltf["textures"][texture_index]["source"]]
    assert img["mimeType"] == "image/png"
    view = gltf["bufferViews"][img["bufferView"]]
    data = bin_chunk[view["byteOffset"] : view["byteOffset"] + view["byteLength"]]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return iio.imread(io.BytesIO(data), extension=".png")


def test_structure(tmp_path, mesh):
    orm, normal_ts = maps()
    path = write_glb(tmp_path / "m.glb", mesh, two_colour(), orm, normal_ts)
    assert path == tmp_path / "m.glb" and [p.name for p in tmp_path.iterdir()] == ["m.glb"]
    gltf, bin_chunk, _ = read_glb(path)
    assert gltf["asset"] == {"version": "2.0", "generator": "recon"}
    assert gltf["buffers"] == [{"byteLength": len(bin_chunk)}] and "uri" not in gltf["buffers"][0]
    for view in gltf["bufferViews"]:
        assert view["byteOffset"] % 4 == 0 and view["byteOffset"] + view["byteLength"] <= len(bin_chunk)
    (prim,) = [p for m in gltf["meshes"] for p in m["primitives"]]
    attrs = prim["attributes"]
    assert set(attrs) == {"POSITION", "NORMAL", "TEXCOORD_0", "TANGENT"} and prim["mode"] == 4

    pos_index, uv_index, faces = split_uv_seams(mesh)
    corners = torch.stack([mesh.faces.reshape(-1), mesh.uv_faces.reshape(-1)], dim=1)
    pairs, inverse = torch.unique(corners, dim=0, return_inverse=True)  # the distinct corners, in (pos, uv) order
    assert torch.equal(torch.stack([pos_index, uv_index], 1), pairs) and torch.equal(faces, inverse.reshape(-1, 3))
    nc = len(pos_index)
    assert mesh.num_verts < nc <= mesh.faces.numel()  # seams were split
    pos = accessor(gltf, bin_chunk, attrs["POSITION"])
    np.testing.assert_array_equal(pos, mesh.verts[pos_index].numpy())
    acc_pos = gltf["accessors"][attrs["POSITION"]]
    assert acc_pos["min"] == pos.min(0).tolist() and acc_pos["max"] == pos.max(0).tolist()
    nrm = accessor(gltf, bin_chunk, attrs["NORMAL"])
    np.testing.assert_allclose(np.linalg.norm(nrm, axis=1), 1, atol=1e-6)
    uv = accessor(gltf, bin_chunk, attrs["TEXCOORD_0"])
    np.testing.assert_array_equal(uv, mesh.uv[uv_index].numpy())  # recon's uv is glTF's: no flip
    tan = accessor(gltf, bin_chunk, attrs["TANGENT"])
    np.testing.assert_allclose(np.linalg.norm(tan[:, :3], axis=1), 1, atol=1e-5)
    assert set(np.unique(tan[:, 3])) <= {-1.0, 1.0} and np.abs((tan[:, :3] * nrm).sum(1)).max() < 1e-4
    assert gltf["accessors"][prim["indices"]]["componentType"] == 5125
    idx = accessor(gltf, bin_chunk, prim["indices"]).reshape(-1, 3)
    np.testing.assert_array_equal(idx, faces.numpy())
    assert idx.max() == nc - 1 and len(idx) == mesh.num_faces
    # each split corner keeps its original position and uv
    np.testing.assert_array_equal(pos[idx], mesh.verts[mesh.faces].numpy())
    np.testing.assert_array_equal(uv[idx], mesh.uv[mesh.uv_faces].numpy())

    (material,) = gltf["materials"]
    pbr = material["pbrMetallicRoughness"]
    assert image(gltf, bin_chunk, pbr["baseColorTexture"]["index"]).shape == (64, 64, 3)
    orm_img = image(gltf, bin_chunk, pbr["metallicRoughnessTexture"]["index"])
    assert material["occlusionTexture"]["index"] == pbr["metallicRoughnessTexture"]["index"]
    np.testing.assert_allclose(orm_img / 255.0, orm.numpy(), atol=0.5 / 255 + 1e-6)  # stored linearly
    n_img = image(gltf, bin_chunk, material["normalTexture"]["index"])
    np.testing.assert_allclose(n_img / 255.0 * 2 - 1, normal_ts.numpy(), atol=1.01 / 255)
    assert gltf["samplers"] == [{"magFilter": 9729, "minFilter": 9987, "wrapS": 10497, "wrapT": 10497}]
    assert all(t["sampler"] == 0 for t in gltf["textures"])


def test_minimal_material_and_computed_normals(tmp_path, mesh):
    plain = Mesh(mesh.verts, mesh.faces, uv=mesh.uv, uv_faces=mesh.uv_faces)  # normals=None
    gltf, bin_chunk, _ = read_glb(write_glb(tmp_path / "m.glb", plain, two_colour()))
    (material,) = gltf["materials"]
    assert set(material) == {"name", "pbrMetallicRoughness"} and len(gltf["images"]) == 1
    assert material["pbrMetallicRoughness"]["metallicFactor"] == 0.0
    attrs = gltf["meshes"][0]["primitives"][0]["attributes"]
    assert set(attrs) == {"POSITION", "NORMAL", "TEXCOORD_0"}
    pos, nrm = accessor(gltf, bin_chunk, attrs["POSITION"]), accessor(gltf, bin_chunk, attrs["NORMAL"])
    assert (np.sum(pos * nrm, axis=1) > 0.9 * np.linalg.norm(pos, axis=1)).all()  # sphere: outward normals


def test_texture_sampled_at_vertex_uvs_reproduces_kd(tmp_path, mesh):
    """glTF's uv origin is the top-left of the image: texel (row, col) = (v H, u W) with no flip."""
    kd = two_colour()
    gltf, bin_chunk, _ = read_glb(write_glb(tmp_path / "m.glb", mesh, kd))
    img = srgb_to_linear(torch.tensor(image(gltf, bin_chunk, 0), dtype=torch.float32) / 255)
    uv = accessor(gltf, bin_chunk, gltf["meshes"][0]["primitives"][0]["attributes"]["TEXCOORD_0"])
    h, w = img.shape[:2]
    far = (np.abs(uv - 0.5) > 2.5 / h).all(axis=1)  # away from the colour boundary (one texel of filtering)
    rows, cols = (uv[far, 1] * h).astype(int).clip(0, h - 1), (uv[far, 0] * w).astype(int).clip(0, w - 1)
    expected = torch.where(torch.from_numpy((uv[far, 1] < 0.5) & (uv[far, 0] < 0.5))[:, None], RED, BLUE)
    assert far.sum() > 50 and (uv[far, 1] < 0.5).any() and (uv[far, 1] > 0.5).any()
    torch.testing.assert_close(img[rows, cols], expected, atol=0.01, rtol=0)


def test_trimesh_round_trip(tmp_path, mesh):
    orm, normal_ts = maps()
    kd = two_colour()
    path = write_glb(tmp_path / "m.glb", mesh, kd, orm, normal_ts)
    scene = trimesh.load(path, process=False)
    (tm,) = scene.geometry.values()
    assert len(tm.vertices) == len(split_uv_seams(mesh)[0]) and len(tm.faces) == mesh.num_faces
    material = tm.visual.material
    assert isinstance(material, trimesh.visual.material.PBRMaterial)
    assert material.baseColorTexture is not None and material.metallicRoughnessTexture is not None
    assert material.normalTexture is not None
    # trimesh flips v to its OBJ-like convention (v up): undo it and sample the base colour at the vertices
    uv = np.asarray(tm.visual.uv)
    assert uv.shape == (len(tm.vertices), 2)
    tex = srgb_to_linear(torch.tensor(np.asarray(material.baseColorTexture.convert("RGB")), dtype=torch.float32) / 255)
    u, v = uv[:, 0], 1.0 - uv[:, 1]
    far = (np.abs(np.stack([u, v], 1) - 0.5) > 2.5 / 64).all(axis=1)
    rows, cols = (v[far] * 64).astype(int).clip(0, 63), (u[far] * 64).astype(int).clip(0, 63)
    expected = torch.where(torch.from_numpy((v[far] < 0.5) & (u[far] < 0.5))[:, None], RED, BLUE)
    torch.testing.assert_close(tex[rows, cols], expected, atol=0.01, rtol=0)


def test_crash_mid_write_leaves_no_file(tmp_path, mesh, monkeypatch):
    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(obj_mod.os, "fsync", boom)  # after the temporary file got its bytes, before the rename
    with pytest.raises(OSError, match="disk full"):
        write_glb(tmp_path / "m.glb", mesh, two_colour())
    assert list(tmp_path.iterdir()) == []


def test_needs_uv(tmp_path, mesh):
    with pytest.raises(ValueError, match="uv=None"):
        write_glb(tmp_path / "m.glb", Mesh(mesh.verts, mesh.faces), two_colour())


def _validator_node_path() -> str | None:
    """NODE_PATH under which `require('gltf-validator')` works: $RECON_GLTF_VALIDATOR (a node_modules dir) or global."""
    if shutil.which("node") is None:
        return None
    candidates = [os.environ.get("RECON_GLTF_VALIDATOR", "")]
    try:
        root = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, timeout=20).stdout.strip()
        candidates.append(root)
    except (OSError, subprocess.SubprocessError):
        pass
    for node_path in filter(None, candidates):
        env = {**os.environ, "NODE_PATH": node_path}
        probe = subprocess.run(["node", "-e", "require('gltf-validator')"], env=env, capture_output=True, timeout=20)
        if probe.returncode == 0:
            return node_path
    return None


VALIDATE_JS = """
const v = require('gltf-validator');
const data = new Uint8Array(require('fs').readFileSync(process.argv[1]));
v.validateBytes(data).then(r => console.log(JSON.stringify(r.issues))).catch(e => { console.error(e); process.exit(2); });
"""


@pytest.mark.parametrize("with_maps", [False, True])
def test_khronos_validator(tmp_path, mesh, with_maps):
    node_path = _validator_node_path()
    if node_path is None:
        pytest.skip("Khronos gltf-validator not found: `npm install -g gltf-validator` or set RECON_GLTF_VALIDATOR "
                    "to a node_modules folder holding it (the structural tests above still ran).")
    orm, normal_ts = maps() if with_maps else (None, None)
    path = write_glb(tmp_path / "m.glb", mesh, two_colour(), orm, normal_ts)
    out = subprocess.run(["node", "-e", VALIDATE_JS, str(path)], env={**os.environ, "NODE_PATH": node_path},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    issues = json.loads(out.stdout)
    assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, issues["messages"]


def test_tangents_unit_on_degenerate_uv_triangles(tmp_path):
    """A chart collapsed to one uv point still gets unit tangents orthogonal to the normals (the validator requires it)."""
    verts = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [2, 1, 0]], dtype=torch.float32)
    faces = torch.tensor([[0, 1, 2], [1, 3, 2], [3, 4, 2]])
    uv = torch.tensor([[0.1, 0.9], [0.9, 0.9], [0.1, 0.1], [0.9, 0.1]])
    uv_faces = torch.tensor([[0, 1, 2], [1, 3, 2], [3, 3, 3]])  # the last face maps to one point
    _, normal_ts = maps()
    gltf, bin_chunk, _ = read_glb(write_glb(tmp_path / "m.glb", Mesh(verts, faces, uv=uv, uv_faces=uv_faces), two_colour(),
                                            normal_ts=normal_ts))
    attrs = gltf["meshes"][0]["primitives"][0]["attributes"]
    tan, nrm = accessor(gltf, bin_chunk, attrs["TANGENT"]), accessor(gltf, bin_chunk, attrs["NORMAL"])
    assert len(tan) == 6  # vertex 2 and 3 appear with two uvs each
    np.testing.assert_allclose(np.linalg.norm(tan[:, :3], axis=1), 1, atol=1e-6)
    assert np.abs((tan[:, :3] * nrm).sum(1)).max() < 1e-5
    # a proper chart: u along +x, v (down the image) along -y, so the bitangent (up the image) is +y
    first = accessor(gltf, bin_chunk, gltf["meshes"][0]["primitives"][0]["indices"]).reshape(-1, 3)[0]
    np.testing.assert_allclose(tan[first, :3], [[1, 0, 0]] * 3, atol=1e-6)
    bitangent = np.cross(nrm[first], tan[first, :3]) * tan[first, 3:]
    np.testing.assert_allclose(bitangent, [[0, 1, 0]] * 3, atol=1e-6)
