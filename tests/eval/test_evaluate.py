"""recon.eval on exported files: the ground-truth mesh exported by recon scores near-perfectly; errors are clear."""
import json

import pytest
import torch
import torch.nn.functional as F

from recon.data.synthetic_scene import LIGHT_DIR, builtin_scene, scene_albedo, scene_mesh, scene_sdf
from recon.eval.__main__ import main as eval_main
from recon.eval.evaluate import evaluate_run
from recon.export.obj import write_textured_obj
from recon.export.uv_bake import bake_texture, simplify, unwrap
from recon.geometry.mesh import Mesh
from recon.render import make_rasterizer


def shaded_albedo(p: torch.Tensor) -> torch.Tensor:
    """The built-in scene's view-independent radiance: albedo x baked Lambert (normal = SDF gradient)."""
    with torch.enable_grad():
        q = p.detach().double().requires_grad_(True)
        (g,) = torch.autograd.grad(scene_sdf(q).sum(), q)
    n = F.normalize(g.float(), dim=-1)
    light = F.normalize(torch.tensor(LIGHT_DIR), dim=0)
    return scene_albedo(p) * (0.35 + 0.65 * (n @ light).clamp_min(0)[:, None])


@pytest.fixture(scope="module")
def gt_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = builtin_scene(resolution=64, n_train=2, n_val=1, n_test=3, cache_dir=root / "cache", backend="torch")
    v, f = scene_mesh()  # the same marching-cubes mesh as gt_mesh.ply, decimated so xatlas is quick
    mesh = unwrap(simplify(Mesh(torch.from_numpy(v), torch.from_numpy(f)), 20_000))
    tex = bake_texture(make_rasterizer("torch", "cpu"), mesh, shaded_albedo, 512)
    run = root / "run"
    write_textured_obj(run, mesh, tex)
    (run / "run.json").write_text(json.dumps({"data_dir": str(data), "resolution": [64, 64]}))
    return run, data


def test_ground_truth_export_scores_high(gt_run):
    run, _ = gt_run
    m = evaluate_run(run, backend="torch")  # 100k samples: the sampling noise floor is ~0.0015 of the diagonal
    assert m["n_views"] == 3 and len(m["per_view"]) == 3
    assert m["psnr"] > 28 and m["ssim"] > 0.9 and m["iou"] > 0.97, m
    assert m["geometry"]["chamfer_l1"] < 0.0025 and m["geometry"]["fscore@0.01"] > 0.98, m["geometry"]
    written = json.loads((run / "metrics.json").read_text())
    assert written["psnr"] == m["psnr"]


def test_cli_prints_table_and_fails_clearly(gt_run, tmp_path, capsys):
    run, data = gt_run
    assert eval_main([str(run), "--backend", "torch", "--samples", "5000"]) == 0
    out = capsys.readouterr().out
    assert "PSNR (dB)" in out and "chamfer L1" in out
    assert eval_main([str(tmp_path), "--data", str(data), "--backend", "torch"]) == 2
    assert "mesh.obj not found" in capsys.readouterr().err


def test_empty_mesh_and_missing_split_are_named(gt_run, tmp_path):
    run, data = gt_run
    (tmp_path / "mesh.obj").write_text("# empty\nv 0 0 0\n")
    with pytest.raises(ValueError, match="mesh.obj"):
        evaluate_run(tmp_path, data=data, backend="torch")
    with pytest.raises(ValueError, match="transforms_nope.json not found"):
        evaluate_run(run, split="nope", backend="torch", write=False)


def test_glb_export_scores_as_the_obj(gt_run, tmp_path):
    """The same textured mesh evaluated from mesh.glb (glTF's UV convention, its own copy of the texture) and from
    mesh.obj gives the same images: PSNR within 0.05 dB. A flipped v axis or a wrong colour space would cost > 5 dB."""
    from recon.export.gltf import write_glb
    from recon.export.obj import load_textured_obj

    run, _ = gt_run
    mesh, texture = load_textured_obj(run / "mesh.obj")
    write_glb(run / "mesh.glb", mesh, texture[0])
    obj = evaluate_run(run, backend="torch", n_samples=5000, write=False)
    glb = evaluate_run(run, backend="torch", n_samples=5000, mesh_file="mesh.glb")
    assert glb["mesh_file"] == "mesh.glb" and abs(glb["psnr"] - obj["psnr"]) < 0.05, (glb["psnr"], obj["psnr"])
    assert json.loads((run / "metrics.mesh.glb.json").read_text())["psnr"] == glb["psnr"]
    (tmp_path / "mesh.glb").write_bytes(b"glTF" + b"\0" * 20)  # truncated
    with pytest.raises(ValueError, match="mesh.glb"):
        evaluate_run(tmp_path, data=gt_run[1], backend="torch", mesh_file="mesh.glb")
