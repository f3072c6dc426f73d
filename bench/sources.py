"""Reconstruct the built-in scene from each input layout, and the depth loss with few views (CPU, small settings).

`python bench/sources.py [--out FILE] [--only NAME ...]` writes the built-in scene (128 px) as a COLMAP model and
as multi-view renders with depth (the writers of the data tests), fits each with `experiment=cpu`, and fits
6 views of the multi-view layout with and without `model.loss.depth_weight`. Chamfer-L1 is measured against the
ground-truth mesh in the input's coordinates (the exports are written back through the scene normalization).
`photos`: 36 unposed 320 px photos of the object (the SfM test's speckled texture, which SIFT needs), posed by
structure from motion and fitted at 128 px, against the same photos with their true poses (the baseline); SfM's frame
is the truth's up to a similarity, so the ground truth is
carried into it (Umeyama on the camera centres) before `recon.eval` measures chamfer.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests" / "data"):  # the data tests' layout writers
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

RES = 128
SIX = [(0.0, 15.0), (60.0, 35.0), (120.0, -10.0), (180.0, 20.0), (240.0, 50.0), (300.0, -5.0)]


def fit(name: str, data: Path, out: Path, *overrides: str) -> dict:
    run = out / name
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=cpu", f"hydra.run.dir={run}", f"data.path={data}",
           f"data.resolution={RES}", "callbacks.progress.refresh_rate=0", *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True)
    m = json.loads((run / "metrics.json").read_text())
    g = m.get("geometry", {})
    return {"command": " ".join(cmd[2:]), "psnr": m["psnr"], "iou": m["iou"], "chamfer_l1": g.get("chamfer_l1"),
            "fscore@0.01": g.get("fscore@0.01"), "n_views": m["n_views"]}


def fit_photos(work: Path) -> dict:
    """Unposed photos -> SfM -> fit; chamfer against the ground truth carried into SfM's frame."""
    import shutil

    import imageio.v3 as iio
    import numpy as np
    import pycolmap
    import test_sfm
    import trimesh

    from recon.color import linear_to_srgb
    from recon.data.sfm import ensure_sfm
    from recon.data.synthetic_scene import _write_split, render_views, scene_mesh
    from recon.render import make_rasterizer

    root = work / "data_photos"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    verts, faces = scene_mesh(resolution=128)
    c2w = test_sfm.orbit_cameras(test_sfm.N_VIEWS)
    images = render_views(torch.from_numpy(verts), torch.from_numpy(faces), torch.from_numpy(c2w).float(),
                          test_sfm.RES, make_rasterizer("torch", "cpu"), supersample=1, albedo=test_sfm.speckled_albedo)
    for i, img in enumerate(images):
        srgb = torch.cat([linear_to_srgb(img[..., :3]), img[..., 3:]], -1)
        iio.imwrite(root / f"view_{i:03d}.png", (srgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy())
    # the same photos with their true poses (NeRF-synthetic layout, the same every-8th test split): the baseline
    posed = work / "data_photos_true_poses"
    shutil.rmtree(posed, ignore_errors=True)
    test = [i for i in range(len(images)) if i % 8 == 0]
    train = [i for i in range(len(images)) if i % 8]
    for split, idx in (("train", train), ("val", test[:2]), ("test", test)):
        _write_split(posed, split, images[idx], c2w[idx])
    gt_truth = posed / "gt_mesh.ply"
    trimesh.Trimesh(verts, faces, process=False).export(gt_truth)
    baseline = fit("photos_true_poses", posed, work)
    result = fit("photos", root, work)
    model_dir, summary = ensure_sfm(root)  # the fit's cached model (same RECON_CACHE)
    rec = pycolmap.Reconstruction(str(model_dir))
    names = {rec.images[i].name: rec.images[i] for i in rec.reg_image_ids()}
    index = sorted(int(n[5:8]) for n in names)
    est = np.stack([names[f"view_{i:03d}.png"].projection_center() for i in index])
    s, rot, t = test_sfm.umeyama(est, c2w[index, :3, 3])  # SfM -> truth
    gt = trimesh.Trimesh(verts, faces, process=False)
    gt.vertices = (np.asarray(gt.vertices) - t) @ rot / s  # truth -> SfM's frame, where the export lives
    gt_path = work / "gt_mesh_in_sfm_frame.ply"
    gt.export(gt_path)
    cmd = [sys.executable, "-m", "recon.eval", str(work / "photos"), "--gt-mesh", str(gt_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True)
    m = json.loads((work / "photos" / "metrics.json").read_text())
    g = m["geometry"]
    result.update({"eval_command": " ".join(cmd[2:]), "chamfer_l1": g["chamfer_l1"], "fscore@0.01": g.get("fscore@0.01"),
                   "sfm": {"registered": len(index), "of": test_sfm.N_VIEWS, "similarity_scale": s,
                           "mean_reprojection_error_px": summary.get("mean_reprojection_error_px")},
                   "true_poses_baseline": baseline})
    return result


def main(argv: list[str] | None = None) -> dict:
    import shutil

    import test_colmap
    import test_views_depth

    from recon.data.synthetic_scene import CAMERA_ANGLE_X, builtin_scene, scene_mesh

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("outputs/bench_sources"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", nargs="*", default=None)
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    scene = builtin_scene(resolution=RES, n_train=64, n_val=2, n_test=8)
    gt = scene / "gt_mesh.ply"
    results = {}

    def want(name: str) -> bool:
        return a.only is None or name in a.only

    if want("nerf_synthetic"):
        results["nerf_synthetic"] = fit("nerf_synthetic", scene, a.work)
    if want("colmap"):
        root = a.work / "data_colmap"
        shutil.rmtree(root, ignore_errors=True)
        f = 0.5 * RES / math.tan(0.5 * CAMERA_ANGLE_X)
        test_colmap.write_colmap(scene, root, params=[f, f, RES / 2, RES / 2], size=(RES, RES))
        shutil.copy(gt, root / "gt_mesh.ply")
        results["colmap"] = fit("colmap", root, a.work)
    mesh = tuple(torch.from_numpy(x) for x in scene_mesh(resolution=128))
    test_views_depth.RES = RES
    if want("views"):
        root = a.work / "data_views"
        shutil.rmtree(root, ignore_errors=True)
        angles = [(az, el) for el in (-15.0, 15.0, 45.0) for az in range(0, 360, 18)]  # 60 views, every 8th held out
        test_views_depth.write_views(mesh, root, angles=angles, radius=3.2)
        shutil.copy(gt, root / "gt_mesh.ply")
        results["views"] = fit("views", root, a.work)
    if want("six_views"):
        root = a.work / "data_six"
        shutil.rmtree(root, ignore_errors=True)
        test_views_depth.write_views(mesh, root, angles=SIX, radius=3.2)
        shutil.copy(gt, root / "gt_mesh.ply")
        results["six_views_no_depth"] = fit("six_no_depth", root, a.work)
        results["six_views_depth"] = fit("six_depth", root, a.work, "model.loss.depth_weight=1.0")
    if want("photos"):
        results["photos_sfm"] = fit_photos(a.work)
    text = json.dumps(results, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
