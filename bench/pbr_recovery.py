"""How well a fit recovers known materials and light: `python bench/pbr_recovery.py [--resolution 96] [overrides...]`.

Fits the built-in scene's PBR variant (uniform PBR_MATERIAL under the "sky" light), then measures from the files
on disk:
- the albedo, roughness and metalness of the exported textures (mean over the mesh's faces) against the truth,
  and the diffuse reflectance kd * (1 - metallic) (what the diffuse term of the shading sees);
- the export's shading normals against the true object's (``surface``, see `surface_normals`): roughness widens
  the specular lobe to cover normal error, so it is only recovered where the normals are;
- relighting: the export rendered under the *other* known light ("sunset", its probe given to recon.eval) against
  the ground-truth renders under that light, PSNR on the object's pixels; raw, and after one global scale
  (albedo and light intensity are ambiguous up to a factor: a brighter light with a darker albedo gives the same
  photos, so a relit render can only be right up to that factor); and, as the baseline relighting must beat,
  the export rendered under its own learned light against the same sunset images, with the same alignment.
With ``--known-light`` the fit is given the sky probe and keeps it fixed (``model.light.init=<scene>/light.hdr
model.light.trainable=false``): only geometry and materials are fitted, which makes the materials well posed; the
run's probe.hdr is then the sky probe, so the baseline is the export under the wrong (training) light.
Writes a JSON (``--out``) and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from recon.color import linear_to_srgb
from recon.data.frames import FrameDataset
from recon.data.sources import load_frames
from recon.data.synthetic_scene import PBR_MATERIAL, builtin_scene, scene_sdf
from recon.eval.evaluate import load_export, load_light, read_run_info, render_export
from recon.geometry.mesh import face_normals
from recon.render import make_rasterizer


def face_means(export: dict) -> dict:
    """Mean kd and ks over the mesh's faces (texels at face centroids; dilation padding is not counted)."""
    mesh = export["mesh"]
    uv = mesh.uv[mesh.uv_faces].mean(1)

    def at(tex):
        r = tex.shape[1]
        ij = (uv * r).long().clamp(0, r - 1)
        return tex[0, ij[:, 1], ij[:, 0]].mean(0)

    return {"kd": at(export["kd"]).tolist(), "ks": at(export["ks"]).tolist()}


def surface_normals(export: dict) -> dict:
    """How far the export's shading normals are from the object's: area-weighted over faces, the cosine between the
    mesh's vertex normals averaged at each face and the true SDF's gradient at the face centroid (``normal_cos``),
    the fraction of the area where they differ by more than 18 degrees, and the mean |true SDF| at the centroids
    (distance to the true surface, scene units). Roughness absorbs normal error: a fit that cannot place the
    specular lobe sharply widens it."""
    mesh = export["mesh"]
    verts, faces = mesh.verts.double(), mesh.faces
    area = face_normals(verts, faces).norm(dim=-1)
    centroid = verts[faces].mean(1).requires_grad_(True)
    with torch.enable_grad():
        sdf = scene_sdf(centroid)
        (grad,) = torch.autograd.grad(sdf.sum(), centroid)
    true_n = torch.nn.functional.normalize(grad, dim=-1)
    shading_n = torch.nn.functional.normalize(mesh.normals.double()[faces].mean(1), dim=-1)
    cos = (shading_n * true_n).sum(-1)
    ok = torch.isfinite(cos) & (area > 0)
    w = area[ok] / area[ok].sum()
    return {"normal_cos": float((cos[ok] * w).sum()), "area_over_18deg": float((w * (cos[ok] < 0.951)).sum()),
            "mean_abs_sdf": float((sdf.detach().abs()[ok] * w).sum())}


@torch.no_grad()
def object_psnr(run_dir: Path, scene: Path, light_path: Path, device: str = "cpu", backend: str = "auto") -> dict:
    """PSNR (sRGB, object pixels of both) of the export under ``light_path`` against ``scene``'s test views: raw and
    after the least-squares global scale of the linear render."""
    info = read_run_info(run_dir)
    export = load_export(run_dir, device)
    env = load_light(light_path, device, info.get("light"))
    frames = load_frames(scene, "test", "nerf_synthetic")
    if info.get("resolution"):
        frames = frames.resized(tuple(info["resolution"]))
    ds = FrameDataset(frames)
    rasterizer = make_rasterizer(backend, device)
    pred, ref, mask = [], [], []
    for i in range(len(ds)):
        item = ds[i]
        img = item["img"].to(device)
        out = render_export(rasterizer, export, item["mvp"][None].to(device), item["cam_pos"][None].to(device),
                            frames.resolution, env)
        pred.append(out["rgb"][0])
        ref.append(img[..., :3] * img[..., 3:])
        mask.append(((out["alpha"][0] > 0.5) & (img[..., 3:] > 0.5)).float())
    p, r, m = torch.stack(pred), torch.stack(ref), torch.stack(mask)
    scale = float((p * r * m).sum() / (p * p * m).sum().clamp_min(1e-12))

    def psnr(x: torch.Tensor) -> float:
        a, b = linear_to_srgb(x.clamp(0, 1)), linear_to_srgb(r.clamp(0, 1))
        mse = (((a - b) ** 2) * m).sum() / (m.sum() * 3)
        return float(-10 * torch.log10(mse.clamp_min(1e-12)))

    return {"psnr": psnr(p), "psnr_scaled": psnr(p * scale), "scale": scale}


def measure(run_dir: Path, relit_scene: Path, device: str = "cpu", backend: str = "auto") -> dict:
    """Recovered materials and relighting of a fitted run (see module docstring)."""
    export = load_export(run_dir, device)
    means = face_means(export)
    truth = PBR_MATERIAL
    diffuse = [k * (1 - means["ks"][2]) for k in means["kd"]]
    true_diffuse = [k * (1 - truth["metallic"]) for k in truth["kd"]]
    return {
        "truth": truth, "recovered": {"kd": means["kd"], "occlusion": means["ks"][0], "roughness": means["ks"][1],
                                      "metallic": means["ks"][2], "diffuse": diffuse},
        "error": {"kd_max_abs": max(abs(a - b) for a, b in zip(means["kd"], truth["kd"])),
                  "diffuse_max_abs": max(abs(a - b) for a, b in zip(diffuse, true_diffuse)),
                  "roughness": means["ks"][1] - truth["roughness"], "metallic": means["ks"][2] - truth["metallic"]},
        "surface": surface_normals(export),
        "relit": object_psnr(run_dir, relit_scene, relit_scene / "light.hdr", device, backend),
        "learned_light_on_relit_views": object_psnr(run_dir, relit_scene, run_dir / "probe.hdr", device, backend),
        "learned_light_on_training_light_views": None,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=96)
    ap.add_argument("--views", type=int, default=48)
    ap.add_argument("--run-dir", type=Path, default=Path("outputs/pbr_recovery"))
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the result")
    ap.add_argument("--known-light", action="store_true",
                    help="fit under the scene's own probe, kept fixed (model.light.init=<scene>/light.hdr, "
                         "model.light.trainable=false): only geometry and materials are recovered")
    ap.add_argument("overrides", nargs="*", help="extra train.py overrides")
    a = ap.parse_intermixed_args(argv)  # options and overrides in any order
    scene = dict(resolution=a.resolution, n_val=2, n_test=8, shading="pbr")
    train_scene = builtin_scene(**scene, n_train=a.views, light="sky")
    relit_scene = builtin_scene(**scene, n_train=1, light="sunset")  # only its test views are used: the same cameras
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=cpu", f"hydra.run.dir={a.run_dir}",
           f"data.resolution={a.resolution}", "data.builtin.shading=pbr", f"data.builtin.n_train={a.views}",
           "data.builtin.n_val=2", "data.builtin.n_test=8", "callbacks.progress.refresh_rate=0"]
    if a.known_light:
        cmd += [f"model.light.init={train_scene / 'light.hdr'}", "model.light.trainable=false"]
    cmd += a.overrides
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    fit_seconds = time.perf_counter() - start
    device = "cuda" if torch.cuda.is_available() and not any("accelerator=cpu" in o for o in a.overrides) else "cpu"
    result = measure(a.run_dir, relit_scene, device)
    result["learned_light_on_training_light_views"] = object_psnr(a.run_dir, train_scene, a.run_dir / "probe.hdr", device)
    result["command"] = " ".join(["train.py", *cmd[2:]])
    result["fit_seconds"] = round(fit_seconds, 1)
    result["metrics"] = {k: v for k, v in json.loads((a.run_dir / "metrics.json").read_text()).items() if k != "per_view"}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
