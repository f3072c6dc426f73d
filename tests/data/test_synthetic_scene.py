"""The built-in scene is a real reconstruction test and is generated correctly."""
import json

import torch
import trimesh

from recon.data.nerf_synthetic import load_nerf_synthetic
from recon.data.synthetic_scene import builtin_scene, scene_albedo, scene_mesh, scene_sdf


def test_mesh_is_closed_genus_one_with_concavity_and_thin_part():
    v, f = scene_mesh(resolution=128)
    tm = trimesh.Trimesh(v, f, process=False)
    assert tm.is_watertight and tm.volume > 0  # closed, faces outward
    assert tm.euler_number == 0  # genus 1: the handle's through-hole
    # concavity: the top's centre is below the rim (a bowl), so the hull is clearly larger than the mesh
    assert tm.convex_hull.volume > 1.3 * tm.volume
    # thin part: the fin is 0.08 thick (inside at its mid-plane, outside 0.05 off it)
    p = torch.tensor([[-0.7, -0.2, 0.0], [-0.7, -0.2, 0.05], [-0.7, -0.2, -0.05]], dtype=torch.float64)
    d = scene_sdf(p)
    assert d[0] < 0 and d[1] > 0 and d[2] > 0
    assert scene_sdf(torch.tensor([[0.0, 0.3, 0.0]], dtype=torch.float64)) > 0  # inside the bowl is empty


def test_albedo_is_textured():
    pts = torch.rand(5000, 3, dtype=torch.float64) * 1.8 - 0.9
    c = scene_albedo(pts)
    assert c.min() >= 0 and c.max() <= 1 and c.std(0).min() > 0.1  # varies in every channel


def test_generation_writes_nerf_layout_and_is_cached(tmp_path):
    root = builtin_scene(resolution=32, n_train=3, n_val=1, n_test=2, cache_dir=tmp_path, backend="torch")
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        meta = json.loads((root / f"transforms_{split}.json").read_text())
        assert len(meta["frames"]) == n and "camera_angle_x" in meta
    frames = load_nerf_synthetic(root, "train")
    assert frames.images.shape == (3, 32, 32, 4)
    alpha = frames.images[..., 3]
    assert 0.05 < (alpha > 0.5).float().mean() < 0.8  # the object is in view, not filling it
    edge = ((alpha > 0.01) & (alpha < 0.99)).sum()
    assert edge > 0  # antialiased silhouettes
    assert (root / "gt_mesh.ply").is_file()
    mtime = (root / "transforms_test.json").stat().st_mtime
    assert builtin_scene(resolution=32, n_train=3, n_val=1, n_test=2, cache_dir=tmp_path) == root
    assert (root / "transforms_test.json").stat().st_mtime == mtime  # reused, not regenerated
    assert not [p for p in (tmp_path / "scenes").iterdir() if p.name.startswith(".")]  # no temp dirs left


