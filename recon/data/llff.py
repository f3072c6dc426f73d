"""Reader for the LLFF layout: ``poses_bounds.npy`` + ``images/`` (+ ``masks/``).

``poses_bounds.npy`` is float [N,17]: per image (in sorted file-name order) a 3x5 matrix, row-major, whose
first three columns are the camera-to-world rotation in LLFF's [down, right, back] axes, the fourth the camera
position and the fifth (height, width, focal) in pixels of the full-size images, then the near/far depth
bounds. The rotation is converted to recon's NeRF convention (x right, y up, looking down -z): the columns
[down, right, back] become [right, up, back] = [c1, -c0, c2]. Poses keep the capture's world frame and units
(no recentring or bound-based rescaling as in NeRF's loader); ``data.normalize=auto`` (the default for this
format) then fits the object into the tet grid from the masks.

When the images are a downscaled copy (LLFF's ``images_4`` etc., chosen with ``image_dir``), the focal
length is scaled by the images' size over (height, width); the principal point is the image centre.
Masks: ``masks/<stem>.png`` per image (> 0.5 = object), required unless the images have alpha or
``background_color`` is set. Split: every 8th image (0, 8, 16, ...) is the test set, as in NeRF's LLFF
experiments; ``val`` is the test set too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from recon.data.frames import DataError, Frames
from recon.data.images import combine_alpha, read_image
from recon.data.nerfstudio import IMAGE_SUFFIXES, check_same_size, read_mask, rigid_c2w, to_frames

LLFF_HOLD = 8


def llff_to_nerf(pose: np.ndarray) -> np.ndarray:
    """LLFF [3,4] camera-to-world ([down, right, back] | position) -> NeRF-convention [4,4]."""
    out = np.eye(4)
    out[:3, 0], out[:3, 1], out[:3, 2], out[:3, 3] = pose[:, 1], -pose[:, 0], pose[:, 2], pose[:, 3]
    return out


def nerf_to_llff(c2w: np.ndarray) -> np.ndarray:
    """NeRF-convention camera-to-world [4,4] -> LLFF [3,4] ([down, right, back] | position)."""
    return np.stack([-c2w[:3, 1], c2w[:3, 0], c2w[:3, 2], c2w[:3, 3]], -1)


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in IMAGE_SUFFIXES and not p.name.startswith("."))


def load_llff(
    root: str | Path,
    split: str,
    image_dir: str = "images",
    background_color: tuple[float, float, float] | None = None,
    mask_tolerance: float = 0.02,
) -> Frames:
    """Load one split ('train', 'val' or 'test') of an LLFF directory as linear-RGB Frames."""
    root = Path(root)
    path = root / "poses_bounds.npy"
    if not path.is_file():
        raise DataError(
            f"{path} not found. An LLFF scene directory holds poses_bounds.npy (from LLFF's imgs2poses.py) next to "
            "an images/ folder. Point data.path at that directory."
        )
    try:
        pb = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"cannot read {path}: {e}. Regenerate it with LLFF's imgs2poses.py.") from e
    if pb.ndim != 2 or pb.shape[1] != 17:
        raise DataError(f"{path} has shape {pb.shape}; expected N x 17 (a 3x5 pose per image + near/far bounds).")
    folder = root / image_dir
    if not folder.is_dir():
        raise DataError(f"{folder} not found: the images of {path} belong in it (or set image_dir to their folder).")
    files = _list_images(folder)
    if len(files) != len(pb):
        raise DataError(
            f"{path} holds {len(pb)} poses but {folder} holds {len(files)} images; they pair up in sorted file-name "
            "order, so the counts must match. Remove stray images or regenerate poses_bounds.npy."
        )
    if split not in ("train", "val", "test"):
        raise DataError(f"split {split!r} is not one of train, val, test.")
    held = [i for i in range(len(files)) if i % LLFF_HOLD == 0]
    index = held if split != "train" else [i for i in range(len(files)) if i % LLFF_HOLD != 0]
    if not index:
        raise DataError(f"{path} has {len(files)} images; the train split needs at least 2 (image 0 is held out).")
    mask_dir = root / "masks"
    images, poses, intrinsics, paths = [], [], [], []
    for i in index:
        where = f"row {i} of {path} (image {files[i].name})"
        m34 = pb[i, :15].reshape(3, 5).astype(np.float64)
        if not np.isfinite(pb[i]).all():
            raise DataError(f"{where} has NaN or Inf. Regenerate poses_bounds.npy.")
        c2w = rigid_c2w(llff_to_nerf(m34[:, :4]), where, "Regenerate poses_bounds.npy.")
        hh, ww, focal = m34[:, 4]
        rgb, alpha = read_image(files[i])
        h, w = rgb.shape[:2]
        sx, sy = w / ww, h / hh
        if min(hh, ww, focal) <= 0 or abs(sx - sy) > 0.01 * max(sx, sy):
            raise DataError(
                f"{where} gives (height, width, focal) = ({hh:g}, {ww:g}, {focal:g}), which does not fit the "
                f"{w}x{h} image {files[i]} (a downscaled copy must keep the aspect ratio). Use the images the poses "
                "were computed for, or a uniformly downscaled copy of them."
            )
        mask = None
        if mask_dir.is_dir():
            cands = [mask_dir / (files[i].stem + s) for s in IMAGE_SUFFIXES] + [mask_dir / (files[i].name + ".png")]
            mask_path = next((c for c in cands if c.is_file()), None)
            if mask_path is None:
                raise DataError(f"{mask_dir} has no mask for image {files[i]} (looked for {files[i].stem}.png). "
                                "Every image needs a mask with the same stem, or remove the masks folder.")
            mask = read_mask(mask_path, files[i], (h, w))
            if not mask.any():
                raise DataError(f"mask {mask_path} is empty (no pixel > 0.5): the object is not visible in "
                                f"{files[i]}. Fix the mask or remove the image.")
        elif alpha is None and background_color is None:
            raise DataError(
                f"image {files[i]} has no alpha channel and {mask_dir} does not exist, and recon needs object masks. "
                "Add masks/<image stem>.png (white = object), provide RGBA images, or set data.background_color."
            )
        a = combine_alpha(rgb, alpha, mask, files[i], background_color, mask_tolerance)
        rgba = np.concatenate([rgb, a[..., None]], -1)
        check_same_size(images, paths, rgba, files[i], split)
        images.append(rgba)
        poses.append(c2w)
        intrinsics.append([focal * sx, focal * sy, w / 2, h / 2])
        paths.append(str(files[i]))
    return to_frames(images, poses, intrinsics, paths)
