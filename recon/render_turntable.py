"""Turntable video of an exported reconstruction.

``python -m recon.render_turntable RUN_DIR [--frames 60] [--resolution 512] [--fps 30] [--elevation 20]``
loads ``RUN_DIR/mesh.obj`` with its texture, orbits a camera around the object (about +y, through the
bounding-box centre, at a fixed elevation) and writes ``RUN_DIR/turntable.mp4`` (H.264, yuv420p) and a small
``RUN_DIR/turntable.gif``, each atomically.

Framing: the camera looks at the bounding-box centre from the distance at which the mesh's bounding sphere
spans ``FILL`` (80 %) of the frame height at a fixed vertical field of view, so any mesh size is framed alike.

Shading (``shading="lambert"``, the default): texture albedo times a soft Lambert term,
``AMBIENT + (1 - AMBIENT) * max(n . l, 0)``, from a key light fixed relative to the camera (up, left, in
front), as in a studio turntable where the object turns under fixed lights; normals are area-weighted vertex
normals of the mesh with UV seams welded, flipped towards the camera (exported surfaces can be one-sided).
``shading="unlit"`` writes the albedo itself. The result is composited over ``background`` (sRGB values)
and encoded linear -> sRGB.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from recon.color import linear_to_srgb, srgb_to_linear
from recon.export.obj import atomic_write_bytes, default_file_mode, load_textured_obj
from recon.geometry.mesh import Mesh, vertex_normals

FOVY = math.radians(40.0)          # vertical field of view of the turntable camera
FILL = 0.8                         # fraction of the frame height the bounding sphere spans
AMBIENT = 0.35                     # share of the albedo lit regardless of orientation (soft shadows)
LIGHT_DIR_CAM = (-0.4, 0.5, 1.0)   # towards the key light, camera space (x right, y up, +z to the viewer)
GIF_MAX_SIZE = 256                 # the GIF is downscaled to at most this many pixels a side
GIF_FRAME_STEP = 2                 # ... and keeps every 2nd frame
SHADINGS = ("lambert", "unlit")


def framing(mesh: Mesh, fovy: float = FOVY, fill: float = FILL) -> tuple[Tensor, float]:
    """Look-at target [3] (bbox centre) and camera distance (scene units) for the bounding sphere to fill ``fill`` of the frame.

    A sphere of radius r seen from distance d subtends a half-angle asin(r/d); its image spans a fraction
    tan(asin(r/d)) / tan(fovy/2) of the frame height, so d = r / sin(atan(fill * tan(fovy/2))).
    """
    aabb = mesh.aabb().double()
    center = aabb.mean(0)
    radius = float((mesh.verts.double() - center).norm(dim=-1).max())
    if not math.isfinite(radius) or radius <= 0:
        raise ValueError("the mesh has zero extent: nothing to frame.")
    half_angle = math.atan(fill * math.tan(fovy / 2))
    return center.float(), radius / math.sin(half_angle)


def orbit_cameras(center: Tensor, distance: float, frames: int, elevation: float) -> Tensor:
    """Camera-to-world matrices [frames,4,4] evenly spaced around +y through ``center``, elevation in radians.

    Frame 0 looks from +z (azimuth 0); the azimuth grows by 2*pi/frames, so the loop closes without a repeat.
    """
    from recon.render.camera import look_at

    azimuth = torch.arange(frames, dtype=torch.float64) * (2 * math.pi / frames)
    direction = torch.stack([
        math.cos(elevation) * torch.sin(azimuth),
        torch.full_like(azimuth, math.sin(elevation)),
        math.cos(elevation) * torch.cos(azimuth),
    ], -1)
    eye = center.double() + distance * direction
    return look_at(eye, center.double()).float()


def welded_normals(mesh: Mesh) -> Tensor:
    """Vertex normals [Nv,3] with vertices at equal positions welded (OBJ import splits UV seams; unwelded, seams show)."""
    unique, inverse = torch.unique(mesh.verts, dim=0, return_inverse=True)
    return vertex_normals(unique, inverse[mesh.faces])[inverse]


def render_frames(
    rasterizer,
    mesh: Mesh,
    texture: Tensor,
    c2w: Tensor,
    proj: Tensor,
    resolution: int,
    background_linear: Tensor,
    shading: str = "lambert",
) -> Tensor:
    """Render views ``c2w`` [B,4,4] through ``proj`` [4,4]: returns [B,H,W,3] uint8 sRGB over the background (linear RGB [3])."""
    from recon.render.camera import mvp_from_c2w
    from recon.render.shading import render_albedo

    mvp = mvp_from_c2w(c2w, proj.to(c2w))
    out = render_albedo(rasterizer, mesh, mvp, (resolution, resolution), texture=texture, antialias=False)
    rgb, mask = out["rgb"], out["mask"]
    if shading == "lambert":
        normals = mesh.normals if mesh.normals is not None else welded_normals(mesh)
        gb_normal, _ = rasterizer.interpolate(normals, out["rast"], mesh.faces)
        gb_normal = F.normalize(gb_normal, dim=-1)
        cam_pos = c2w[:, None, None, :3, 3]
        facing = ((cam_pos - out["gb_pos"]) * gb_normal).sum(-1, keepdim=True)
        gb_normal = torch.where(facing < 0, -gb_normal, gb_normal)  # light the side the camera sees
        light = F.normalize(c2w[:, :3, :3] @ torch.tensor(LIGHT_DIR_CAM, dtype=c2w.dtype, device=c2w.device), dim=-1)
        lambert = (gb_normal * light[:, None, None, :]).sum(-1, keepdim=True).clamp_min(0)
        rgb = rgb * (AMBIENT + (1 - AMBIENT) * lambert)
    rgba = torch.cat([rgb, mask[..., None].to(rgb.dtype)], -1).contiguous()
    rgba = rasterizer.antialias(rgba, out["rast"], out["pos_clip"], mesh.faces)
    alpha = rgba[..., 3:].clamp(0, 1)
    color = rgba[..., :3] + (1 - alpha) * background_linear.to(rgba)  # premultiplied over the background
    return (linear_to_srgb(color.clamp(0, 1)) * 255 + 0.5).clamp(0, 255).to(torch.uint8).cpu()


def downscale(frames: Tensor, max_size: int) -> Tensor:
    """[B,H,W,3] uint8 -> at most ``max_size`` a side (area-weighted, aspect kept), uint8."""
    h, w = frames.shape[1:3]
    scale = max_size / max(h, w)
    if scale >= 1:
        return frames
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return (x + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


class _AtomicVideo:
    """An H.264 MP4 written by ffmpeg to a temporary file beside ``path``, renamed over it on success."""

    def __init__(self, path: Path, size: tuple[int, int], fps: float):
        import imageio_ffmpeg

        self.path = path
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.writer = imageio_ffmpeg.write_frames(
            str(self.tmp), size, fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=None,
            macro_block_size=2,  # sizes are even; the default 16 would silently rescale other sizes
            output_params=["-crf", "18", "-movflags", "+faststart", "-f", "mp4"],  # .tmp suffix: name the muxer
        )
        self.writer.send(None)

    def write(self, frames: Tensor) -> None:
        for frame in frames.numpy():
            self.writer.send(np.ascontiguousarray(frame))

    def commit(self) -> None:
        self.writer.close()
        os.chmod(self.tmp, default_file_mode())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:  # ffmpeg may already have failed; the temp file goes regardless
            self.tmp.unlink(missing_ok=True)


@torch.no_grad()
def render_turntable(
    run_dir: str | Path,
    frames: int = 60,
    resolution: int = 512,
    fps: float = 30,
    elevation_deg: float = 20.0,
    backend: str = "auto",
    device: str | torch.device | None = None,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    shading: str = "lambert",
    batch: int = 8,
) -> dict:
    """Render ``run_dir/mesh.obj`` turning once about +y; write ``turntable.mp4`` and ``turntable.gif``.

    frames: views per turn; resolution: square frame side in pixels (even, as yuv420p needs); fps: video rate;
    elevation_deg: camera elevation in degrees (the CLI's unit), in (-90, 90); background: sRGB in [0,1];
    shading: "lambert" or "unlit" (module docstring); batch: views per rasterize call.
    Returns ``{"mp4": Path, "gif": Path}``. Raises FileNotFoundError / ValueError on bad input.
    """
    from recon.render import make_rasterizer
    from recon.render.camera import perspective

    run_dir = Path(run_dir)
    if frames < 1:
        raise ValueError(f"frames={frames}: need at least one frame.")
    if resolution < 16 or resolution % 2:
        raise ValueError(f"resolution={resolution}: H.264 in yuv420p needs an even frame size of at least 16 pixels.")
    if not fps > 0:
        raise ValueError(f"fps={fps}: must be positive.")
    if not -90 < elevation_deg < 90:
        raise ValueError(f"elevation={elevation_deg}: must lie strictly between -90 and 90 degrees (the orbit is about +y).")
    if shading not in SHADINGS:
        raise ValueError(f"shading={shading!r}: valid names are {', '.join(SHADINGS)}.")
    if len(background) != 3 or not all(0 <= c <= 1 for c in background):
        raise ValueError(f"background={tuple(background)}: need three sRGB values in [0,1], e.g. 1,1,1.")
    device = device or ("cuda" if torch.cuda.is_available() and backend != "torch" else "cpu")
    obj_path = run_dir / "mesh.obj"
    mesh, texture = load_textured_obj(obj_path, device)
    if texture is None:
        raise ValueError(f"{obj_path} has no map_Kd texture (or no UVs): the export is incomplete, nothing to render.")
    rasterizer = make_rasterizer(backend, device)
    center, distance = framing(mesh)
    # the bounding sphere lies within distance * (1 -+ sin(half-angle)) ~ [0.7, 1.3] * distance of the camera
    proj = perspective(FOVY, 1.0, near=0.1 * distance, far=10 * distance)
    c2w = orbit_cameras(center, distance, frames, math.radians(elevation_deg)).to(device)
    background_linear = srgb_to_linear(torch.tensor(background, dtype=torch.float32, device=device))
    if shading == "lambert":
        mesh = Mesh(verts=mesh.verts, faces=mesh.faces, normals=welded_normals(mesh), uv=mesh.uv, uv_faces=mesh.uv_faces)

    paths = {"mp4": run_dir / "turntable.mp4", "gif": run_dir / "turntable.gif"}
    video = _AtomicVideo(paths["mp4"], (resolution, resolution), fps)
    gif_frames = []
    try:
        for start in range(0, frames, batch):
            images = render_frames(rasterizer, mesh, texture, c2w[start : start + batch], proj, resolution, background_linear, shading)
            video.write(images)
            keep = [i for i in range(images.shape[0]) if (start + i) % GIF_FRAME_STEP == 0]
            gif_frames.append(downscale(images[keep], GIF_MAX_SIZE))
        video.commit()
    except BaseException:
        video.abort()
        raise
    import imageio.v3 as iio

    gif = torch.cat(gif_frames).numpy()
    duration_ms = 1000.0 * GIF_FRAME_STEP / fps
    atomic_write_bytes(paths["gif"], iio.imwrite("<bytes>", gif, extension=".gif", duration=duration_ms, loop=0))
    return paths


def _background(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not three sRGB values in [0,1] such as 1,1,1")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recon.render_turntable", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="run directory holding mesh.obj (a finished fit's export)")
    p.add_argument("--frames", type=int, default=60, help="views per full turn")
    p.add_argument("--resolution", type=int, default=512, help="square frame side in pixels (even)")
    p.add_argument("--fps", type=float, default=30)
    p.add_argument("--elevation", type=float, default=20.0, help="camera elevation, degrees")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "nvdiffrast"])
    p.add_argument("--background", type=_background, default=(1.0, 1.0, 1.0), help="sRGB r,g,b in [0,1]")
    p.add_argument("--shading", default="lambert", choices=SHADINGS, help="albedo times a soft key light, or albedo only")
    try:
        a = p.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad arguments, 0 on --help
        return int(e.code or 0)
    t0 = time.perf_counter()
    try:
        paths = render_turntable(a.run_dir, a.frames, a.resolution, a.fps, a.elevation, a.backend,
                                 background=a.background, shading=a.shading)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(path)
    print(f"{a.frames} frames at {a.resolution}x{a.resolution} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
