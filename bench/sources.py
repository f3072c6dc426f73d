"""Reconstruct the built-in scene from each input layout, and the depth loss with few views (CPU, small settings).

`python bench/sources.py [--out FILE] [--only NAME ...]` writes the built-in scene (128 px) as a COLMAP model and
as multi-view renders with depth (the writers of the data tests), fits each with `experiment=cpu`, and fits
6 views of the multi-view layout with and without `model.loss.depth_weight`. Chamfer-L1 is measured against the
ground-truth mesh in the input's coordinates (the exports are written back through the scene normalization).
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
    text = json.dumps(results, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
