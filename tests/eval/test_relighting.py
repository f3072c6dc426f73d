"""Relighting through the exported files: the ground-truth object exported by recon and lit by a probe reproduces
the PBR built-in scene's renders under that probe, and the wrong probe does not."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import trimesh

from recon.callbacks.mesh_export import write_result
from recon.data.synthetic_scene import PBR_MATERIAL, builtin_scene
from recon.export.hdr import read_hdr
from recon.export.uv_bake import simplify, unwrap
from recon.geometry.mesh import Mesh

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("pbr_recovery", ROOT / "bench" / "pbr_recovery.py")
recovery = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recovery)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    kw = dict(resolution=64, n_train=3, n_val=1, n_test=4, shading="pbr", cache_dir=cache, backend="torch")
    return builtin_scene(**kw, light="sky"), builtin_scene(**kw, light="sunset")


def test_ground_truth_export_relights(tmp_path, scenes):
    """Bound: the GT object (decimated to 30k faces, 8-bit textures) lit by the GT probe scores ~30 dB on the object's
    pixels under either light; 26 dB fails any error in the probe's lat-long convention, the ORM layout or the
    tangent frames (the sunset probe on the sky views scores < 20 dB)."""
    sky, sunset = scenes
    gt = trimesh.load(sky / "gt_mesh.ply", process=False)
    mesh = unwrap(simplify(Mesh(torch.tensor(gt.vertices, dtype=torch.float32), torch.tensor(gt.faces)).with_normals(), 30000))
    m = PBR_MATERIAL
    tex = torch.tensor([*m["kd"], m["occlusion"], m["roughness"], m["metallic"], 0, 0, 1.0]).expand(64, 64, 9).clone()
    write_result(tmp_path, mesh, tex, read_hdr(sky / "light.hdr"))
    (tmp_path / "run.json").write_text(json.dumps({"data_dir": str(sky), "format": "nerf_synthetic", "resolution": [64, 64],
                                                   "light": {"base_res": 64, "min_res": 8, "diffuse_res": 8}}))
    assert recovery.object_psnr(tmp_path, sky, tmp_path / "probe.hdr", backend="torch")["psnr"] > 26
    assert recovery.object_psnr(tmp_path, sunset, sunset / "light.hdr", backend="torch")["psnr"] > 26
    assert recovery.object_psnr(tmp_path, sky, sunset / "light.hdr", backend="torch")["psnr"] < 20
    means = recovery.face_means(recovery.load_export(tmp_path, "cpu"))
    assert max(abs(a - b) for a, b in zip(means["kd"], m["kd"])) < 0.01  # sRGB 8-bit round trip
    assert abs(means["ks"][1] - m["roughness"]) < 0.01 and abs(means["ks"][2] - m["metallic"]) < 0.01
