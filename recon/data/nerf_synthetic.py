"""Reader for the NeRF-synthetic layout: ``transforms_{split}.json`` + RGBA PNGs.

Each JSON holds ``camera_angle_x`` (horizontal field of view, radians) and ``frames``, each with a
``file_path`` (relative to the directory, extension optional) and a 4x4 camera-to-world
``transform_matrix`` in the NeRF/Blender convention. Images are sRGB; they are converted to linear RGB and
their alpha channel becomes the object mask. Images without alpha need ``background_color``: pixels
within ``mask_tolerance`` of that colour are background.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from recon.data.frames import DataError, Frames, read_json_object
from recon.data.images import read_all, read_linear_rgba

IMAGE_SUFFIXES = (".png", ".PNG", ".jpg", ".jpeg", ".JPG", ".exr")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        siblings = sorted(p.name for p in path.parent.glob("transforms*.json")) if path.parent.is_dir() else []
        found = f" It holds: {', '.join(siblings)}." if siblings else ""
        raise DataError(
            f"{path} not found.{found} A NeRF-synthetic scene directory holds transforms_train.json, "
            "transforms_val.json and transforms_test.json next to the image folders. Point data.path at such a "
            "directory, or leave data.path unset to use the built-in scene."
        )
    meta = read_json_object(path, "'camera_angle_x' and 'frames'")
    return meta


def _resolve_image(root: Path, file_path: str, json_path: Path, index: int) -> Path:
    base = (root / file_path).resolve() if not Path(file_path).is_absolute() else Path(file_path)
    candidates = [base] + [base.with_name(base.name + s) for s in IMAGE_SUFFIXES]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(
        f"frame {index} of {json_path} points at '{file_path}', but no image exists at {base} "
        f"(also tried the extensions {', '.join(IMAGE_SUFFIXES[:4])}). Restore the image or remove the frame."
    )


def load_nerf_synthetic(
    root: str | Path,
    split: str,
    background_color: tuple[float, float, float] | None = None,
    mask_tolerance: float = 0.02,
) -> Frames:
    """Load one split ('train', 'val' or 'test') of a NeRF-synthetic directory as linear-RGB Frames."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path={str(root)!r} is not a directory. Point it at a NeRF-synthetic scene folder.")
    json_path = root / f"transforms_{split}.json"
    meta = _read_json(json_path)
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise DataError(f"{json_path} has no 'frames' list (or it is empty): the {split} split needs at least one frame.")
    poses, paths = [], []
    for i, fr in enumerate(frames):
        if not isinstance(fr, dict) or "file_path" not in fr:
            raise DataError(f"frame {i} of {json_path} has no 'file_path'.")
        m = np.asarray(fr.get("transform_matrix", []), dtype=np.float64)
        if m.shape != (4, 4):
            raise DataError(f"frame {i} ('{fr['file_path']}') of {json_path} has no 4x4 'transform_matrix'.")
        if not np.isfinite(m).all():
            raise DataError(f"frame {i} ('{fr['file_path']}') of {json_path} has NaN or Inf in its transform_matrix.")
        paths.append(_resolve_image(root, fr["file_path"], json_path, i))
        poses.append(m)
    images = read_all(paths, lambda p: read_linear_rgba(p, background_color, mask_tolerance), f"the {split} split")
    h, w = images.shape[1:3]
    if "camera_angle_x" in meta:
        fx = 0.5 * w / math.tan(0.5 * float(meta["camera_angle_x"]))
        fy = 0.5 * h / math.tan(0.5 * float(meta["camera_angle_y"])) if "camera_angle_y" in meta else fx
    elif "fl_x" in meta:
        fx = float(meta["fl_x"])
        fy = float(meta.get("fl_y", fx))
    else:
        raise DataError(f"{json_path} has neither 'camera_angle_x' nor 'fl_x': the camera's field of view is unknown.")
    cx, cy = float(meta.get("cx", w / 2)), float(meta.get("cy", h / 2))
    intrinsics = torch.tensor([[fx, fy, cx, cy]], dtype=torch.float32).repeat(len(images), 1)
    return Frames(torch.from_numpy(images), torch.from_numpy(np.stack(poses)).float(), intrinsics, [str(p) for p in paths])
