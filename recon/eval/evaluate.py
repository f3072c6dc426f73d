"""Evaluate an exported reconstruction from its files on disk.

``python -m recon.eval RUN_DIR [--data PATH] [--gt-mesh PATH] [--light HDR]`` loads ``RUN_DIR/mesh.obj`` with its
textures (``map_Kd``, and ``map_Ks`` + normal map when present) and ``probe.hdr``, renders it at the data set's
test views with recon's renderer (split-sum PBR under the probe, or unlit albedo for an albedo-only export),
compares with the test images (sRGB over a white background) and, given a ground-truth mesh, measures the
geometry. Writes ``RUN_DIR/metrics.json``. ``--light`` relights the export under another lat-long HDR probe;
``--mesh mesh.glb`` evaluates the GLB (its glTF PBR material) instead, into ``metrics.mesh.glb.json``.
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
from recon.geometry.mesh import Mesh

RUN_INFO = "run.json"


def read_run_info(run_dir: Path) -> dict:
    path = run_dir / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def load_export(run_dir: Path, device: str, mesh_file: str = "mesh.obj") -> dict:
    """The exported files of ``run_dir`` as render inputs: ``mesh`` (welded positions, UV seams in ``uv_faces``,
    normals, tangents), ``kd`` [1,H,W,3] linear, and when present ``ks``/``nrm`` [1,H,W,3]. ``mesh_file``:
    ``mesh.obj`` (with its MTL's maps) or ``mesh.glb`` (its glTF PBR material, `recon.export.gltf.load_glb`)."""
    from recon.export.gltf import load_glb
    from recon.export.obj import load_pbr_maps

    path = run_dir / mesh_file
    if path.suffix.lower() == ".glb":
        mesh, maps = load_glb(path, device)
    elif path.suffix.lower() == ".obj":
        mesh, texture = load_textured_obj(path, device)
        if texture is None:
            raise DataError(f"{path} has no map_Kd texture: the export is incomplete.")
        maps = {"kd": texture, **load_pbr_maps(path, device)}
    else:
        raise DataError(f"{path}: recon evaluates mesh.obj or mesh.glb exports, not {path.suffix!r} files.")
    # both formats split vertices at UV seams: weld positions again so normals and tangents are smooth across seams
    verts, inverse = torch.unique(mesh.verts, dim=0, return_inverse=True)
    welded = Mesh(verts=verts, faces=inverse[mesh.faces], uv=mesh.uv, uv_faces=mesh.faces if mesh.uv is not None else None)
    return {"mesh": welded.with_tangents() if mesh.uv is not None else welded.with_normals(), **maps}


def load_light(path: Path, device: str, settings: dict | None = None):
    """An EnvironmentLight (mips built) from a lat-long .hdr probe; ``settings``: the run's light settings."""
    from recon.export.hdr import read_hdr
    from recon.light import EnvironmentLight

    img = read_hdr(path).to(device)
    cfg = {k: v for k, v in (settings or {}).items()
           if k in ("base_res", "min_res", "min_roughness", "max_roughness", "prefilter_samples", "diffuse_res")}
    if "base_res" not in cfg:
        cfg["base_res"] = 1 << max(2, int(math.log2(img.shape[0])))
    cfg["min_res"] = min(cfg.get("min_res", 16), cfg["base_res"])
    light = EnvironmentLight(**cfg).to(device)
    light.from_latlong(img)
    light.build_mips()
    return light


def render_export(rasterizer, export: dict, mvp: torch.Tensor, cam_pos: torch.Tensor, resolution, light=None) -> dict:
    """Render loaded exports from cameras mvp [B,4,4] / cam_pos [B,3]: PBR under ``light`` when the export has ORM
    and normal maps and a light is given, else unlit albedo."""
    from recon.render.shading import render_albedo, render_pbr

    mesh = export["mesh"]
    if light is None or "ks" not in export:
        return render_albedo(rasterizer, mesh, mvp, resolution, texture=export["kd"])
    tex = torch.cat([export["kd"], export["ks"], export.get("nrm", torch.zeros_like(export["kd"]))], -1)

    def material(gb, mask):
        values = rasterizer.texture(tex, gb["gb_uv"], gb["gb_uv_da"], filter_mode="linear-mipmap-linear")
        return {"kd": values[..., 0:3], "ks": values[..., 3:6], "nrm": values[..., 6:9]}

    return render_pbr(rasterizer, mesh, mvp, cam_pos, resolution, material, light, perturb="nrm" in export)


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
    light: str | Path | None = None,
    mesh_file: str = "mesh.obj",
) -> dict:
    """Metrics of the export in ``run_dir`` (see module docstring); also written to ``metrics.json`` (for
    ``mesh_file="mesh.glb"``: ``metrics.mesh.glb.json``, leaving the OBJ's metrics as they are)."""
    from recon.render import make_rasterizer

    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    data = Path(data) if data is not None else (Path(info["data_dir"]) if "data_dir" in info else None)
    if data is None:
        raise DataError(f"no data set known for {run_dir}: pass --data PATH (the scene directory it was fitted to).")
    device = device or ("cuda" if torch.cuda.is_available() and backend != "torch" else "cpu")
    export = load_export(run_dir, device, mesh_file)
    mesh = export["mesh"]
    light_path = Path(light) if light is not None else run_dir / "probe.hdr"
    if light is not None and not light_path.is_file():
        raise DataError(f"light probe {light_path} not found.")
    env = load_light(light_path, device, info.get("light")) if light_path.is_file() and "ks" in export else None
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
        out = render_export(rasterizer, export, item["mvp"][None].to(device), item["cam_pos"][None].to(device),
                            tuple(img.shape[:2]), env)
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
        "shading": "pbr" if env is not None else "albedo", "mesh_file": mesh_file,
    }
    if light is not None:
        metrics["light"] = str(light_path)
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
        out = run_dir / ("metrics.json" if mesh_file == "mesh.obj" else f"metrics.{mesh_file}.json")
        previous = json.loads(out.read_text()) if out.is_file() else {}
        previous.update(metrics)
        atomic_write_bytes(out, json.dumps(previous, indent=2).encode())
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
