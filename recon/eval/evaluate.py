"""Evaluate an exported reconstruction from its files on disk.

``python -m recon.eval RUN_DIR [--data PATH] [--gt-mesh PATH]`` loads ``RUN_DIR/mesh.obj`` with its textures,
renders it at the data set's test views with recon's renderer, compares with the test images (sRGB over a
white background) and, given a ground-truth mesh, measures the geometry. Writes ``RUN_DIR/metrics.json``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from recon.color import linear_to_srgb
from recon.data.frames import DataError, FrameDataset
from recon.data.sources import load_frames
from recon.eval.metrics import geometry_metrics, psnr, silhouette_iou, ssim
from recon.export.obj import atomic_write_bytes, load_textured_obj

RUN_INFO = "run.json"


def read_run_info(run_dir: Path) -> dict:
    path = run_dir / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def _json_number(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")


@torch.no_grad()
def evaluate_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    gt_mesh: str | Path | None = None,
    split: str = "test",
    backend: str = "auto",
    device: str | None = None,
    n_samples: int = 100_000,
    write: bool = True,
) -> dict:
    """Metrics of the export in ``run_dir`` (see module docstring); also written to ``metrics.json``."""
    from recon.render import make_rasterizer
    from recon.render.shading import render_albedo

    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    data = Path(data) if data is not None else (Path(info["data_dir"]) if "data_dir" in info else None)
    if data is None:
        raise DataError(f"no data set known for {run_dir}: pass --data PATH (the scene directory it was fitted to).")
    device = device or ("cuda" if torch.cuda.is_available() and backend != "torch" else "cpu")
    mesh, texture = load_textured_obj(run_dir / "mesh.obj", device)
    if texture is None:
        raise DataError(f"{run_dir / 'mesh.obj'} has no map_Kd texture: the export is incomplete.")
    frames = load_frames(data, split, info.get("format", "auto"), info.get("background_color"),
                         info.get("mask_tolerance", 0.02))
    if len(frames) == 0:
        raise DataError(f"the {split} split of {data} has no frames.")
    if info.get("resolution"):
        frames = frames.resized(tuple(info["resolution"]))
    ds = FrameDataset(frames)
    rasterizer = make_rasterizer(backend, device)
    per_view = []
    for i in range(len(ds)):
        item = ds[i]
        img = item["img"].to(device)
        out = render_albedo(rasterizer, mesh, item["mvp"][None].to(device), tuple(img.shape[:2]), texture=texture)
        color = out["rgb"][0] + (1 - out["alpha"][0])  # over white
        ref = img[..., :3] * img[..., 3:] + (1 - img[..., 3:])
        a, b = linear_to_srgb(color).clamp(0, 1), linear_to_srgb(ref).clamp(0, 1)
        per_view.append({
            "frame": Path(frames.paths[i]).name,
            "psnr": _json_number(psnr(a, b)), "ssim": ssim(a, b),
            "iou": silhouette_iou(out["alpha"][0, ..., 0], img[..., 3]),
        })
    finite = [v["psnr"] for v in per_view if isinstance(v["psnr"], float)]
    metrics = {
        "split": split, "n_views": len(per_view),
        "psnr": _json_number(float(np.mean(finite))) if len(finite) == len(per_view) else "inf",
        "ssim": float(np.mean([v["ssim"] for v in per_view])),
        "iou": float(np.mean([v["iou"] for v in per_view])),
        "triangles": int(mesh.faces.shape[0]), "vertices": int(mesh.verts.shape[0]),
    }
    gt_path = Path(gt_mesh) if gt_mesh is not None else (data / "gt_mesh.ply" if (data / "gt_mesh.ply").is_file() else None)
    if gt_path is not None:
        import trimesh

        if not gt_path.is_file():
            raise DataError(f"ground-truth mesh {gt_path} not found.")
        gt = trimesh.load(gt_path, force="mesh", process=False)
        pred = trimesh.Trimesh(mesh.verts.cpu().numpy(), mesh.faces.cpu().numpy(), process=False)
        metrics["geometry"] = geometry_metrics(pred, gt, n_samples=n_samples)
        metrics["gt_mesh"] = str(gt_path)
    metrics["per_view"] = per_view
    if write:
        previous = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
        previous.update(metrics)
        atomic_write_bytes(run_dir / "metrics.json", json.dumps(previous, indent=2).encode())
    return metrics


def format_table(metrics: dict) -> str:
    """A two-column text table of the main metrics."""
    p = metrics["psnr"]
    rows = [("views", str(metrics["n_views"])), ("PSNR (dB)", f"{p:.2f}" if isinstance(p, float) else str(p)),
            ("SSIM", f"{metrics['ssim']:.4f}"), ("silhouette IoU", f"{metrics['iou']:.4f}"),
            ("triangles", str(metrics["triangles"]))]
    g = metrics.get("geometry")
    if g:
        rows += [("chamfer L1 (/diag)", f"{g['chamfer_l1']:.5f}"), ("chamfer L2 (/diag^2)", f"{g['chamfer_l2']:.2e}"),
                 ("normal consistency", f"{g['normal_consistency']:.4f}")]
        rows += [(f"F-score @{k.split('@')[1]}", f"{v:.4f}") for k, v in g.items() if k.startswith("fscore@")]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
