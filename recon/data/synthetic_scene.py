"""The built-in scene: a procedural object rendered by recon itself into the NeRF-synthetic layout.

The object ("toy mug") is a real test of reconstruction rather than a sphere or a cube:
  - a cylindrical body with a bowl carved into its top (a concavity seen only from above),
  - a torus handle fused to the side (genus 1: a through-hole),
  - a thin fin on the opposite side (0.08 scene units thick, ~5 % of the object's size),
  - a colour texture with a checker pattern, stripes and a height gradient (3D procedural, no UVs).

Its geometry is an analytic signed distance function meshed by marching cubes (scikit-image); views are
rendered with recon's rasterizer (any backend) at 2x supersampling, with baked Lambertian shading from a
fixed light, so the appearance is view independent (an albedo field can reproduce it exactly).
Everything is generated on first use into a cache directory (``$RECON_CACHE`` or ``~/.cache/recon``);
nothing is downloaded.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from recon.cache import cache_dir as default_cache_dir
from recon.color import linear_to_srgb
from recon.export.obj import atomic_directory, png_bytes_all
from recon.render.camera import look_at, perspective, transform_pos

SCENE_VERSION = 1
CAMERA_ANGLE_X = 0.6911112070083618  # the NeRF-synthetic scenes' horizontal field of view
CAMERA_RADIUS = 3.2
LIGHT_DIR = (0.36, 0.80, 0.48)  # direction towards the baked light, world space


# ----------------------------------------------------------------------------------------- geometry
def _sd_torus_z(p: Tensor, center: tuple[float, float, float], major: float, minor: float) -> Tensor:
    """Signed distance to a torus whose axis is the z axis. p: [N,3]."""
    q = p - p.new_tensor(center)
    ring = torch.sqrt(q[:, 0] ** 2 + q[:, 1] ** 2) - major
    return torch.sqrt(ring**2 + q[:, 2] ** 2) - minor


def _sd_box(p: Tensor, center: tuple[float, float, float], half: tuple[float, float, float]) -> Tensor:
    q = (p - p.new_tensor(center)).abs() - p.new_tensor(half)
    return q.clamp_min(0).norm(dim=-1) + q.max(dim=-1).values.clamp_max(0)


def _sd_capped_cylinder_y(p: Tensor, radius: float, y0: float, y1: float, rounding: float) -> Tensor:
    """Rounded cylinder around the y axis from y0 to y1."""
    r = torch.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2) - (radius - rounding)
    h = (p[:, 1] - 0.5 * (y0 + y1)).abs() - (0.5 * (y1 - y0) - rounding)
    d = torch.stack([r, h], -1)
    return d.clamp_min(0).norm(dim=-1) + d.max(dim=-1).values.clamp_max(0) - rounding


def _smooth_union(a: Tensor, b: Tensor, k: float) -> Tensor:
    h = (0.5 + 0.5 * (b - a) / k).clamp(0, 1)
    return b * (1 - h) + a * h - k * h * (1 - h)


def scene_sdf(p: Tensor) -> Tensor:
    """Signed distance of the built-in object (negative inside). p: [N,3] world space -> [N]."""
    body = _sd_capped_cylinder_y(p, radius=0.45, y0=-0.6, y1=0.35, rounding=0.06)
    bowl = torch.linalg.norm(p - p.new_tensor([0.0, 0.52, 0.0]), dim=-1) - 0.36
    body = torch.maximum(body, -bowl)  # carve the concavity
    handle = _sd_torus_z(p, center=(0.56, -0.12, 0.0), major=0.27, minor=0.075)
    fin = _sd_box(p, center=(-0.66, -0.2, 0.0), half=(0.24, 0.28, 0.04))
    return _smooth_union(_smooth_union(body, handle, 0.04), fin, 0.03)


def scene_albedo(p: Tensor) -> Tensor:
    """Linear RGB albedo of the built-in object at world points p [N,3] -> [N,3] in [0,1]."""
    red = p.new_tensor([0.80, 0.22, 0.12])
    blue = p.new_tensor([0.12, 0.38, 0.80])
    cream = p.new_tensor([0.92, 0.85, 0.55])
    green = p.new_tensor([0.15, 0.60, 0.25])
    t = ((p[:, 1:2] + 0.6) / 1.0).clamp(0, 1)  # height gradient
    base = red * (1 - t) + blue * t
    cells = torch.floor(p * 5.0).sum(-1, keepdim=True)
    checker = torch.remainder(cells, 2.0)
    col = base * (1 - 0.55 * checker) + cream * 0.55 * checker
    # stripes around the handle (angle about its own axis) and a darker fin
    q = p - p.new_tensor([0.56, -0.12, 0.0])
    stripe = (torch.sin(8.0 * torch.atan2(q[:, 1:2], q[:, 0:1])) > 0).float()
    on_handle = (p[:, 0:1] > 0.42).float()
    col = col * (1 - on_handle) + on_handle * (green * stripe + cream * (1 - stripe))
    on_fin = (p[:, 0:1] < -0.44).float()
    col = col * (1 - on_fin) + on_fin * (0.5 * col + 0.5 * green)
    return col.clamp(0, 1)


def scene_mesh(resolution: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth mesh of the built-in object by marching cubes of its SDF.

    Returns verts [Nv,3] float32 (world units) and faces [Nf,3] int64, oriented outward, watertight.
    """
    from skimage.measure import marching_cubes

    lo, hi = -1.0, 1.0
    xs = torch.linspace(lo, hi, resolution, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, xs, xs, indexing="ij"), -1).reshape(-1, 3)
    sdf = scene_sdf(grid).reshape(resolution, resolution, resolution).numpy()
    step = (hi - lo) / (resolution - 1)
    verts, faces, _, _ = marching_cubes(sdf, level=0.0, spacing=(step, step, step))
    verts = verts + lo
    return verts.astype(np.float32), faces.astype(np.int64)


# ----------------------------------------------------------------------------------------- cameras
def fibonacci_directions(n: int, offset: float = 0.5) -> np.ndarray:
    """n roughly uniform unit directions on the sphere, [n,3]."""
    i = np.arange(n, dtype=np.float64) + offset
    y = 1.0 - 2.0 * i / n
    r = np.sqrt(np.clip(1.0 - y * y, 0.0, 1.0))
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([r * np.cos(phi), y, r * np.sin(phi)], -1)


def orbit_c2w(n: int, radius: float, seed: int | None, offset: float = 0.5) -> np.ndarray:
    """Camera-to-world matrices [n,4,4] (NeRF convention) looking at the origin from a sphere."""
    dirs = fibonacci_directions(n, offset)
    if seed is not None:  # a random rotation about y so splits don't share viewpoints
        a = np.random.default_rng(seed).uniform(0, 2 * math.pi)
        rot = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
        dirs = dirs @ rot.T
    out = []
    for d in dirs:
        up = (0.0, 0.0, -1.0) if abs(d[1]) > 0.999 else (0.0, 1.0, 0.0)
        out.append(look_at(torch.tensor(d * radius), torch.zeros(3, dtype=torch.float64), torch.tensor(up)).numpy())
    return np.stack(out).astype(np.float32)


# ----------------------------------------------------------------------------------------- rendering
def downsample_straight(rgba: Tensor, supersample: int) -> Tensor:
    """Box-filter premultiplied RGBA [B,H,W,4] by ``supersample`` and return straight colour + alpha, clamped to [0,1]."""
    if supersample > 1:
        rgba = F.avg_pool2d(rgba.permute(0, 3, 1, 2), supersample).permute(0, 2, 3, 1)
    alpha = rgba[..., 3:].clamp(0, 1)
    rgb = torch.where(alpha > 1e-6, rgba[..., :3] / alpha.clamp_min(1e-6), torch.zeros_like(rgba[..., :3]))
    return torch.cat([rgb.clamp(0, 1), alpha], -1)


@torch.no_grad()
def render_views(
    verts: Tensor, faces: Tensor, c2w: Tensor, resolution: int, rasterizer, supersample: int = 2, batch: int = 4,
    albedo=None,
) -> Tensor:
    """Render the object (baked Lambertian shading of the procedural albedo) from cameras c2w [N,4,4].

    albedo: world points [N,3] -> linear RGB [N,3]; None is :func:`scene_albedo`.
    Returns [N,H,W,4] float32: linear RGB with straight (not premultiplied) colour and alpha coverage.
    """
    albedo = scene_albedo if albedo is None else albedo
    device = verts.device
    res = resolution * supersample
    proj = perspective(CAMERA_ANGLE_X, 1.0, 0.1, 1000.0).to(device)
    light = F.normalize(torch.tensor(LIGHT_DIR, device=device), dim=0)
    from recon.geometry.mesh import vertex_normals

    normals = vertex_normals(verts, faces)
    images = []
    for i in range(0, c2w.shape[0], batch):
        cams = c2w[i : i + batch].to(device)
        mvp = proj @ torch.linalg.inv(cams)
        pos_clip = transform_pos(mvp, verts)
        rast, _ = rasterizer.rasterize(pos_clip, faces, (res, res))
        gb_pos, _ = rasterizer.interpolate(verts, rast, faces)
        gb_n, _ = rasterizer.interpolate(normals, rast, faces)
        mask = rast[..., 3] > 0
        kd = albedo(gb_pos[mask])
        n = F.normalize(gb_n[mask], dim=-1)
        shade = 0.35 + 0.65 * (n @ light).clamp_min(0)[:, None]
        rgb = torch.zeros(*mask.shape, 3, device=device)
        rgb[mask] = kd * shade
        rgba = torch.cat([rgb, mask[..., None].float()], -1)
        rgba = rasterizer.antialias(rgba.contiguous(), rast, pos_clip, faces)
        images.append(downsample_straight(rgba, supersample).cpu())
    return torch.cat(images)


# ----------------------------------------------------------------------------------------- PBR variant
# Known uniform materials and two known lights for the relightable variant (shading="pbr"): recovering them
# is what the full model is tested on. Roughness 0.4 and metalness 0.5 leave both the diffuse and the specular
# lobe visible; the lights are grey (the model's white-balance prior) with a sun and a sky gradient.
PBR_MATERIAL = {"kd": (0.70, 0.38, 0.18), "occlusion": 0.0, "roughness": 0.4, "metallic": 0.5}
PBR_LIGHTS = {"sky": {"sun": (0.40, 0.80, 0.45), "sun_power": 8.0, "zenith": 1.2, "horizon": 0.6, "ground": 0.25},
              "sunset": {"sun": (-0.75, 0.25, -0.6), "sun_power": 10.0, "zenith": 0.5, "horizon": 0.8, "ground": 0.15}}


def pbr_light_latlong(name: str, height: int = 64) -> Tensor:
    """Lat-long HDR probe [H,2H,3] of one of the built-in lights (PBR_LIGHTS), linear radiance."""
    from recon.light.env_light import latlong_dirs

    p = PBR_LIGHTS[name]
    d = latlong_dirs(height)
    y = d[..., 1:2]
    sky = torch.where(y > 0, p["horizon"] + (p["zenith"] - p["horizon"]) * y, torch.full_like(y, p["ground"]))
    sun = F.normalize(torch.tensor(p["sun"]), dim=0)
    lobe = torch.exp(((d * sun).sum(-1, keepdim=True) - 1) / 0.02) * p["sun_power"]  # ~8 degrees wide
    return (sky + lobe).expand(*d.shape[:2], 3).contiguous()


@torch.no_grad()
def render_views_pbr(
    verts: Tensor, faces: Tensor, c2w: Tensor, resolution: int, rasterizer, light_name: str, supersample: int = 2,
    batch: int = 4,
) -> Tensor:
    """Render the object with PBR_MATERIAL under the built-in light ``light_name`` (recon's split-sum shading).

    Returns [N,H,W,4] float32: linear RGB (straight) and alpha coverage.
    """
    from recon.geometry.mesh import Mesh
    from recon.light import EnvironmentLight
    from recon.render.shading import render_pbr

    device = verts.device
    res = resolution * supersample
    proj = perspective(CAMERA_ANGLE_X, 1.0, 0.1, 1000.0).to(device)
    light = EnvironmentLight(base_res=64, min_res=8, diffuse_res=8).to(device)
    light.from_latlong(pbr_light_latlong(light_name, 64).to(device))
    light.build_mips()
    mesh = Mesh(verts, faces).with_normals()
    m = PBR_MATERIAL
    values = torch.tensor([*m["kd"], m["occlusion"], m["roughness"], m["metallic"], 0.0, 0.0, 1.0], device=device)

    def material(gb, mask):
        v = values.expand(int(mask.sum()), 9)
        return {"kd": v[:, 0:3], "ks": v[:, 3:6], "nrm": v[:, 6:9]}

    images = []
    for i in range(0, c2w.shape[0], batch):
        cams = c2w[i : i + batch].to(device)
        out = render_pbr(rasterizer, mesh, proj @ torch.linalg.inv(cams), cams[:, :3, 3], (res, res), material, light,
                         perturb=False)
        rgba = torch.cat([out["rgb"], out["alpha"]], -1)
        images.append(downsample_straight(rgba, supersample).cpu())
    return torch.cat(images)


def _write_split(root: Path, split: str, images: Tensor, c2w: np.ndarray) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    pixels = [(torch.cat([linear_to_srgb(img[..., :3]), img[..., 3:]], -1).clamp(0, 1) * 255 + 0.5).to(torch.uint8)
              .cpu().numpy() for img in images]
    for i, data in enumerate(png_bytes_all(pixels)):  # encoded in threads
        (root / split / f"r_{i}.png").write_bytes(data)
    frames = [{"file_path": f"./{split}/r_{i}", "transform_matrix": m.tolist()} for i, m in enumerate(c2w)]
    meta = {"camera_angle_x": CAMERA_ANGLE_X, "frames": frames}
    (root / f"transforms_{split}.json").write_text(json.dumps(meta, indent=2))


def builtin_scene_dir(resolution: int = 256, n_train: int = 100, n_val: int = 4, n_test: int = 16,
                      cache_dir: str | Path | None = None, shading: str = "baked", light: str = "sky",
                      backend: str = "auto") -> Path:
    """Where `builtin_scene` keeps the scene with these settings (complete once ``transforms_test.json`` exists;
    ``backend``, the renderer that generates it, does not change it)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = f"builtin-v{SCENE_VERSION}-{resolution}px-{n_train}-{n_val}-{n_test}"
    if shading == "pbr":
        name += f"-pbr-{light}"
    return cache / "scenes" / name


def builtin_scene(
    resolution: int = 256,
    n_train: int = 100,
    n_val: int = 4,
    n_test: int = 16,
    cache_dir: str | Path | None = None,
    backend: str = "auto",
    shading: str = "baked",
    light: str = "sky",
) -> Path:
    """Path of the built-in scene in the NeRF-synthetic layout, generating it on first use.

    The directory holds train/val/test RGBA PNGs, ``transforms_{split}.json`` (``camera_angle_x``,
    camera-to-world ``transform_matrix``) and ``gt_mesh.ply``. shading: "baked" (procedural albedo with baked
    Lambertian shading, view independent) or "pbr" (uniform PBR_MATERIAL under the built-in environment light
    ``light``, written as ``light.hdr`` with ``materials.json``). Generation writes into a temporary
    directory that is renamed into place when complete, so an interrupted generation is never reused.
    """
    from recon.render import make_rasterizer

    if shading not in ("baked", "pbr") or light not in PBR_LIGHTS:
        raise ValueError(f"data.builtin.shading={shading!r} / light={light!r}: use baked|pbr and one of {', '.join(PBR_LIGHTS)}.")
    root = builtin_scene_dir(resolution, n_train, n_val, n_test, cache_dir, shading, light)
    if (root / "transforms_test.json").exists():
        return root
    with atomic_directory(root) as tmp:
        verts_np, faces_np = scene_mesh()
        import trimesh

        trimesh.Trimesh(verts_np, faces_np, process=False).export(tmp / "gt_mesh.ply")
        device = "cuda" if backend != "torch" and torch.cuda.is_available() else "cpu"
        rasterizer = make_rasterizer(backend, device)
        verts = torch.from_numpy(verts_np).to(device)
        faces = torch.from_numpy(faces_np).to(device)
        if shading == "pbr":
            from recon.export.hdr import write_hdr

            write_hdr(tmp / "light.hdr", pbr_light_latlong(light, 64))
            (tmp / "materials.json").write_text(json.dumps(PBR_MATERIAL, indent=2))
        for split, n, seed, offset in (("train", n_train, None, 0.5), ("val", n_val, 1, 0.25), ("test", n_test, 2, 0.75)):
            c2w = orbit_c2w(n, CAMERA_RADIUS, seed, offset)
            if shading == "pbr":
                images = render_views_pbr(verts, faces, torch.from_numpy(c2w), resolution, rasterizer, light)
            else:
                images = render_views(verts, faces, torch.from_numpy(c2w), resolution, rasterizer)
            _write_split(tmp, split, images, c2w)
    return root
