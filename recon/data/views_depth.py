"""Reader for multi-view renders on a known orbit: ``cameras.json`` + ``views/`` (+ ``depth/``).

The layout image-to-3D pipelines produce (a diffusion model's fixed views of one object, or renders):

```
scene/
  cameras.json
  views/000.png ...        RGBA (or RGB with data.background_color)
  depth/000.npy | 000.png  optional, per view (same stem); either file type
```

``cameras.json`` gives each view's camera as angles about the object, either explicitly::

    {"fov": 30, "radius": 2.0, "views": [{"file": "000.png", "azimuth": 30, "elevation": 20}, ...]}

(``fov``, ``radius`` and ``center`` may also be given per view; a view's value wins), or as a named preset::

    {"preset": "zero123pp", "radius": 2.0}                       # the files: views/ sorted by name
    {"preset": "orbit", "n": 16, "elevation": 20, "fov": 40}       # n views, azimuths 360/n apart

Conventions (recon's world: y up): ``azimuth`` and ``elevation`` in degrees; the camera sits at
``center + radius * (cos(el) sin(az), sin(el), cos(el) cos(az))``, so azimuth 0 is on the +z axis, 90 on +x
(a right-handed turn about +y, counter-clockwise seen from above) and positive elevation is above the
horizon. It looks at ``center`` (default the origin) with the image's up towards +y (continuous through the
poles). ``fov`` is the horizontal field of view in degrees; pixels are square and the principal point is
the image centre. ``radius`` (scene units) defaults to 2.0: with ``data.normalize=auto`` (this format's
default) only the ratios of distances matter.

Presets (:data:`PRESETS`): ``zero123pp``: the six views of Zero123++ v1.2, azimuths 30, 90, 150, 210, 270,
330 degrees with elevations alternating 20 and -10 degrees, fov 30 (azimuth relative to the input view);
``orbit``: ``n`` views (default 16) at one ``elevation`` (default 0), azimuths ``start + 360 k / n``
(``start`` default 0), fov 40 unless given.

Depth (optional): ``depth/<view stem>.npy`` holds float [H,W] depth in scene units; ``depth/<view stem>.png``
a 16-bit PNG in thousandths of a scene unit (millimetres when the unit is the metre). Depth is the distance
along the camera's viewing axis (camera-space -z, not the distance along the ray); 0 means unknown. A depth
map must match its view's size and hold no NaN, Inf or negative value. Views without a depth file get
zeros (unknown) when other views have one.

Split: ``"holdout": k`` in cameras.json holds out every k-th view (the first, the (k+1)-th, ...) as the
val/test set; 0 holds none out and ``val``/``test`` are the training views (a fit check, not a novel-view
score). Default: 8 with 16 views or more, else 0 (a six-view generation cannot spare one).
"""
from __future__ import annotations

import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from recon.data.frames import DataError, Frames, read_json_object
from recon.data.images import combine_alpha, read_image
from recon.data.nerfstudio import IMAGE_SUFFIXES, check_same_size, to_frames

PRESETS = {  # name -> list of (azimuth, elevation) degrees and the preset's horizontal fov, degrees
    "zero123pp": {"views": [(30.0, 20.0), (90.0, -10.0), (150.0, 20.0), (210.0, -10.0), (270.0, 20.0), (330.0, -10.0)],
                  "fov": 30.0},
}
DEFAULT_RADIUS = 2.0
DEPTH_PNG_UNIT = 0.001  # a 16-bit depth PNG counts thousandths of a scene unit


def orbit_c2w(azimuth: float, elevation: float, radius: float, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Camera-to-world [4,4] float64 (NeRF convention) of a camera on a sphere looking at its centre.

    azimuth, elevation: degrees (see the module docstring). The axes are written in closed form, so a camera
    straight above or below is well defined (its image up is the horizontal direction away from azimuth).
    """
    az, el = math.radians(azimuth), math.radians(elevation)
    back = np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
    right = np.array([math.cos(az), 0.0, -math.sin(az)])
    up = np.cross(back, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2] = right, up, back
    c2w[:3, 3] = np.asarray(center, dtype=np.float64) + radius * back
    return c2w


def _number(value, key: str, where: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: '{key}' is {value!r}, not a number.") from None
    if not math.isfinite(out):
        raise DataError(f"{where}: '{key}' is {value!r}; it must be finite.")
    return out


def _list_views(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in IMAGE_SUFFIXES and not p.name.startswith("."))


def read_cameras(root: Path) -> list[dict]:
    """The views of ``root/cameras.json``: dicts with ``file`` (a Path), ``azimuth``, ``elevation``, ``radius``,
    ``fov`` (degrees) and ``center`` [3], in file order."""
    path = root / "cameras.json"
    if not path.is_file():
        raise DataError(f"{path} not found. A multi-view directory holds cameras.json (view angles or a preset) next "
                        "to views/. Point data.path at that directory.")
    meta = read_json_object(path, "'views' or 'preset'")
    folder = root / "views"
    if not folder.is_dir():
        raise DataError(f"{folder} not found: the images described by {path} belong in it.")
    if "preset" in meta:
        name = meta["preset"]
        files = _list_views(folder)
        if name == "orbit":
            n = int(_number(meta.get("n", 16), "n", str(path)))
            el = _number(meta.get("elevation", 0.0), "elevation", str(path))
            start = _number(meta.get("start", 0.0), "start", str(path))
            angles, fov = [(start + 360.0 * k / n, el) for k in range(n)], 40.0
        elif name in PRESETS:
            angles, fov = PRESETS[name]["views"], PRESETS[name]["fov"]
        else:
            raise DataError(f"{path}: preset {name!r} is not one of orbit, {', '.join(PRESETS)}. Name a preset or list "
                            "the views' angles under 'views'.")
        if len(files) != len(angles):
            raise DataError(f"{path}: preset {name!r} has {len(angles)} views but {folder} holds {len(files)} images; "
                            "they pair up in sorted file-name order, so the counts must match.")
        views = [{"file": f.name, "azimuth": a, "elevation": e} for f, (a, e) in zip(files, angles)]
        meta = {"fov": fov, **meta}
    else:
        views = meta.get("views")
        if not isinstance(views, list) or not views:
            raise DataError(f"{path} has neither a 'preset' nor a non-empty 'views' list.")
    out = []
    for i, v in enumerate(views):
        where = f"view {i} of {path}"
        if not isinstance(v, dict) or "file" not in v:
            raise DataError(f"{where} has no 'file' (the image's name in views/).")
        where = f"view {i} ('{v['file']}') of {path}"
        cam = {}
        for key, default in (("azimuth", None), ("elevation", None), ("radius", DEFAULT_RADIUS), ("fov", None)):
            value = v.get(key, meta.get(key, default))
            if value is None:
                raise DataError(f"{where} has no '{key}' (and {path} gives none for all views). Give it in degrees.")
            cam[key] = _number(value, key, where)
        if cam["radius"] <= 0 or not 0 < cam["fov"] < 180:
            raise DataError(f"{where}: radius={cam['radius']:g} must be > 0 and fov={cam['fov']:g} in (0, 180) degrees.")
        center = v.get("center", meta.get("center", [0.0, 0.0, 0.0]))
        if not isinstance(center, list) or len(center) != 3:
            raise DataError(f"{where}: 'center' must be [x, y, z].")
        cam["center"] = [_number(c, "center", where) for c in center]
        cam["file"] = folder / v["file"]
        out.append(cam)
    holdout = meta.get("holdout", 8 if len(out) >= 16 else 0)
    for cam in out:
        cam["holdout"] = int(holdout)
    return out


def read_depth(path: Path, image_path: Path, image_hw: tuple[int, int]) -> np.ndarray:
    """A depth map as float32 [H,W] in scene units (0 = unknown), validated against its image's size."""
    try:
        if path.suffix == ".npy":
            d = np.load(path, allow_pickle=False).astype(np.float32)
        else:
            raw = iio.imread(path)
            if raw.dtype != np.uint16:
                raise DataError(f"depth map {path} is a {raw.dtype} PNG; recon reads 16-bit PNGs in thousandths of a "
                                "scene unit (millimetres) or float .npy files in scene units.")
            d = raw.astype(np.float32) * DEPTH_PNG_UNIT
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read depth map {path}: {e}. Replace it with a float .npy or a 16-bit PNG.") from e
    if d.ndim == 3 and d.shape[-1] == 1:
        d = d[..., 0]
    if d.ndim != 2:
        raise DataError(f"depth map {path} has shape {d.shape}; expected H x W.")
    if d.shape != tuple(image_hw):
        raise DataError(f"depth map {path} is {d.shape[1]}x{d.shape[0]} but its view {image_path} is "
                        f"{image_hw[1]}x{image_hw[0]}. A depth map must have its view's size.")
    if not np.isfinite(d).all():
        raise DataError(f"depth map {path} holds {int((~np.isfinite(d)).sum())} NaN or Inf values. Write 0 where the "
                        "depth is unknown.")
    if (d < 0).any():
        raise DataError(f"depth map {path} holds negative depths (min {float(d.min()):.4g}). Depth is the distance "
                        "along the viewing axis, >= 0; write 0 where it is unknown.")
    return d


def load_views(
    root: str | Path,
    split: str,
    background_color: tuple[float, float, float] | None = None,
    mask_tolerance: float = 0.02,
) -> Frames:
    """Load one split ('train', 'val' or 'test') of a cameras.json + views/ (+ depth/) directory as Frames.

    Returns Frames with depth [N,H,W] (scene units, 0 = unknown) when the scene has a depth/ folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path={str(root)!r} is not a directory. Point it at a multi-view folder.")
    if split not in ("train", "val", "test"):
        raise DataError(f"split {split!r} is not one of train, val, test.")
    cams = read_cameras(root)
    k = cams[0]["holdout"]
    if k == 0:
        index = list(range(len(cams)))
    else:
        held = [i for i in range(len(cams)) if i % k == 0]
        index = held if split != "train" else [i for i in range(len(cams)) if i % k != 0]
    depth_dir = root / "depth"
    images, poses, intrinsics, paths, depths = [], [], [], [], []
    for i in index:
        cam = cams[i]
        img_path = cam["file"]
        if not img_path.is_file():
            raise DataError(f"view {i} of {root / 'cameras.json'} names '{img_path.name}', but {img_path} does not "
                            "exist. Restore the image or remove the view.")
        rgb, alpha = read_image(img_path)
        h, w = rgb.shape[:2]
        a = combine_alpha(rgb, alpha, None, img_path, background_color, mask_tolerance)
        rgba = np.concatenate([rgb, a[..., None]], -1)
        check_same_size(images, paths, rgba, img_path, split)
        fx = 0.5 * w / math.tan(0.5 * math.radians(cam["fov"]))
        images.append(rgba)
        poses.append(orbit_c2w(cam["azimuth"], cam["elevation"], cam["radius"], cam["center"]))
        intrinsics.append([fx, fx, w / 2, h / 2])
        paths.append(str(img_path))
        if depth_dir.is_dir():
            cands = [depth_dir / (img_path.stem + s) for s in (".npy", ".png")]
            depth_path = next((c for c in cands if c.is_file()), None)
            depths.append(read_depth(depth_path, img_path, (h, w)) if depth_path else np.zeros((h, w), np.float32))
    frames = to_frames(images, poses, intrinsics, paths)
    if depths:
        frames.depth = torch.from_numpy(np.stack(depths)).float()
    return frames
