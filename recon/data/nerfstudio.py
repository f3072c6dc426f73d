"""Reader for nerfstudio / instant-ngp ``transforms.json``: one JSON for all frames, intrinsics in pixels.

Layout: a ``transforms.json`` holding ``frames``, each with a ``file_path`` (relative to the JSON's folder) and a
4x4 camera-to-world ``transform_matrix`` in the OpenGL/NeRF convention (x right, y up, looking down -z), the
same as recon's, so poses are used as they are. Intrinsics ``fl_x, fl_y, cx, cy, w, h`` (pixels) sit at the top
level or in a frame (a frame's value wins); ``camera_angle_x`` (and ``camera_angle_y``) is the fallback for the
focal length. OpenCV distortion ``k1, k2, p1, p2`` (and ``k3``) is removed from images and masks with
``cv2.undistort`` when any is non-zero; the pinhole intrinsics stay as they are. A frame's ``mask_path`` is a mask
image (> 0.5 = object), combined with the image's alpha if it has one.

Splits: nerfstudio's ``train_filenames`` / ``val_filenames`` / ``test_filenames`` lists (paths as in
``file_path``) when the JSON has them (``val`` falls back to the test list and back). Otherwise frames are
sorted by ``file_path`` and every k-th one, k = round(1 / (1 - train_fraction)) (10 for 0.9), starting with
the first, is held out; ``val`` and ``test`` are that same held-out set.

instant-ngp's ``scale``, ``offset`` and ``aabb_scale`` say how instant-ngp maps these poses into its unit
cube; recon does not apply them (the poses are read unchanged, in the capture's units) and reports them in
:func:`transforms_metadata`. ``data.normalize=auto`` (the default for this format, see
:mod:`recon.data.normalize`) fits the object into recon's tet grid from the masks instead.
"""
from __future__ import annotations

import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from recon.color import srgb_to_linear
from recon.data.frames import DataError, Frames, read_json_object
from recon.data.images import combine_alpha, read_image, size_mismatch
from recon.parallel import thread_map

IMAGE_SUFFIXES = (".png", ".PNG", ".jpg", ".jpeg", ".JPG", ".JPEG", ".exr")
DISTORTION_KEYS = ("k1", "k2", "p1", "p2", "k3")
INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x", "camera_angle_y") + DISTORTION_KEYS
PINHOLE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "RADIAL", "SIMPLE_RADIAL")


# ----------------------------------------------------------------------------------------- shared checks
def rigid_c2w(m: np.ndarray, where: str, fix: str) -> np.ndarray:
    """Validate a camera-to-world matrix [4,4] and return it as float64 with a pure rotation.

    A uniform scale of the rotation block is divided out (it does not change which pixel a point projects
    to); a reflection (det <= 0) or a non-orthogonal block (error > 1e-3 after removing the scale) is refused.
    """
    if not np.isfinite(m).all():
        raise DataError(f"{where} has NaN or Inf in its camera-to-world matrix. {fix}")
    rot = m[:3, :3]
    det = float(np.linalg.det(rot))
    if det <= 1e-12:
        raise DataError(
            f"{where} has a camera-to-world rotation with determinant {det:.4g} <= 0 (a reflection or a degenerate "
            f"matrix), so it is not a camera pose. {fix}"
        )
    unit = rot / det ** (1.0 / 3.0)
    err = float(np.abs(unit.T @ unit - np.eye(3)).max())
    if err > 1e-3:
        raise DataError(
            f"{where} has a camera-to-world rotation that is not orthonormal (|R^T R - I| = {err:.3g} > 1e-3 after "
            f"removing a uniform scale): shear or non-uniform scale is not a camera pose. {fix}"
        )
    out = np.eye(4)
    out[:3, :3] = unit
    out[:3, 3] = m[:3, 3]
    return out


def read_mask(path: Path, image_path: Path, image_hw: tuple[int, int]) -> np.ndarray:
    """Read a mask image as float32 [H,W] in {0,1} (> 0.5 = object), checking its size against the image's."""
    try:
        m = iio.imread(path)
    except Exception as e:
        raise DataError(f"cannot read mask {path}: {e}. Replace the file with a valid PNG.") from e
    scale = 65535.0 if m.dtype == np.uint16 else 255.0 if m.dtype == np.uint8 else 1.0
    m = m.astype(np.float32) / scale
    if m.ndim == 3:
        m = m[..., 3] if m.shape[-1] == 4 else m.max(-1)
    if m.shape != tuple(image_hw):
        raise DataError(
            f"mask {path} is {m.shape[1]}x{m.shape[0]} but its image {image_path} is {image_hw[1]}x{image_hw[0]}. "
            "A mask must have its image's size; regenerate or resize it."
        )
    return (m > 0.5).astype(np.float32)


def to_frames(images: list[np.ndarray], poses: list[np.ndarray], intrinsics: list[list[float]], paths: list[str]) -> Frames:
    """Stack sRGB+alpha images [H,W,4], poses [4,4] and (fx, fy, cx, cy) into linear-RGB Frames (each image
    converted straight into the one array, in threads: no stacked copy and no whole-array temporaries)."""
    rgba = torch.empty((len(images), *images[0].shape), dtype=torch.float32)

    def convert(i: int) -> None:
        img = torch.from_numpy(np.asarray(images[i], dtype=np.float32))
        rgba[i, ..., :3] = srgb_to_linear(img[..., :3])
        rgba[i, ..., 3:] = img[..., 3:]

    thread_map(convert, range(len(images)))
    c2w = torch.from_numpy(np.stack(poses)).float()
    return Frames(rgba, c2w, torch.tensor(intrinsics, dtype=torch.float32), paths)


def check_same_size(images: list[np.ndarray], paths: list[str], img: np.ndarray, path: Path, split: str) -> None:
    if images and img.shape[:2] != images[0].shape[:2]:
        raise size_mismatch(f"the {split} split", paths[0], images[0].shape, path, img.shape)


# ----------------------------------------------------------------------------------------- transforms.json
def _json_path(root: str | Path) -> Path:
    root = Path(root)
    path = root if root.suffix == ".json" else root / "transforms.json"
    if not path.is_file():
        raise DataError(
            f"{path} not found. A nerfstudio / instant-ngp scene directory holds transforms.json next to its images "
            "(ns-process-data and colmap2nerf.py write one). Point data.path at that directory."
        )
    return path


def _read_meta(path: Path) -> dict:
    meta = read_json_object(path, "a non-empty 'frames' list")
    if not isinstance(meta.get("frames"), list) or not meta["frames"]:
        raise DataError(f"{path} must hold a JSON object with a non-empty 'frames' list.")
    return meta


def transforms_metadata(root: str | Path) -> dict:
    """instant-ngp's scene placement of a transforms.json: ``scale``, ``offset``, ``aabb_scale`` (None if absent).

    recon does not apply them; they say how instant-ngp would map the poses into its unit cube
    (position * scale + offset), a hint for ``model.geometry.scale`` / ``model.geometry.center``.
    """
    meta = _read_meta(_json_path(root))
    return {k: meta.get(k) for k in ("scale", "offset", "aabb_scale")}


def _norm(p: str) -> str:
    return Path(p).as_posix().removeprefix("./")


def _resolve(base: Path, file_path: str, what: str, where: str) -> Path:
    p = Path(file_path) if Path(file_path).is_absolute() else base / file_path
    for c in [p] + [p.with_name(p.name + s) for s in IMAGE_SUFFIXES]:
        if c.is_file():
            return c
    raise DataError(f"{where} points at {what} '{file_path}', but no file exists at {p}. Restore it or remove the frame.")


def _select(meta: dict, frames: list[dict], split: str, train_fraction: float, path: Path) -> list[int]:
    """Indices of ``frames`` in ``split`` (explicit filename lists, else every k-th frame held out)."""
    if split not in ("train", "val", "test"):
        raise DataError(f"split {split!r} is not one of train, val, test.")
    if any(f"{s}_filenames" in meta for s in ("train", "val", "test")):
        order = {"train": ["train"], "val": ["val", "test"], "test": ["test", "val"]}[split]
        key = next((f"{s}_filenames" for s in order if f"{s}_filenames" in meta), None)
        if key is None:
            raise DataError(f"{path} lists split files but neither '{split}_filenames' nor a fallback; add the list.")
        by_name = {_norm(fr.get("file_path", "")): i for i, fr in enumerate(frames)}
        out = []
        for name in meta[key]:
            if _norm(name) not in by_name:
                raise DataError(f"{path}: '{name}' in {key} is no frame's file_path. Fix the list or add the frame.")
            out.append(by_name[_norm(name)])
        if not out:
            raise DataError(f"{path}: {key} is empty; the {split} split needs at least one frame.")
        return out
    if not 0.0 < train_fraction < 1.0:
        raise DataError(f"train_fraction={train_fraction} must lie strictly between 0 and 1.")
    if len(frames) < 2:
        raise DataError(f"{path} has {len(frames)} frame; splitting into train and test needs at least 2.")
    k = max(2, round(1.0 / (1.0 - train_fraction)))
    order = sorted(range(len(frames)), key=lambda i: str(frames[i].get("file_path", "")))
    held = [i for j, i in enumerate(order) if j % k == 0]
    return held if split != "train" else [i for j, i in enumerate(order) if j % k != 0]


def _undistort(img: np.ndarray, k: list[float], dist: list[float]) -> np.ndarray:
    try:
        import cv2
    except ImportError as e:
        raise DataError("undistorting images needs OpenCV: pip install opencv-python-headless") from e
    fx, fy, cx, cy = k
    kmat = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64)
    return cv2.undistort(img, kmat, np.asarray(dist, dtype=np.float64))


def load_nerfstudio(
    root: str | Path,
    split: str,
    train_fraction: float = 0.9,
    background_color: tuple[float, float, float] | None = None,
    mask_tolerance: float = 0.02,
) -> Frames:
    """Load one split ('train', 'val' or 'test') of a transforms.json scene as linear-RGB Frames.

    root: the scene directory (or the JSON file itself). Returns Frames with per-frame intrinsics [N,4] in pixels.
    """
    path = _json_path(root)
    meta = _read_meta(path)
    if meta.get("camera_model", "OPENCV") not in PINHOLE_MODELS:
        raise DataError(
            f"{path} has camera_model={meta['camera_model']!r}; recon reads pinhole cameras with OpenCV distortion "
            f"({', '.join(PINHOLE_MODELS)}). Undistort the images to a pinhole camera first."
        )
    frames = meta["frames"]
    images, poses, intrinsics, paths = [], [], [], []
    for i in _select(meta, frames, split, train_fraction, path):
        fr = frames[i]
        if not isinstance(fr, dict) or "file_path" not in fr:
            raise DataError(f"frame {i} of {path} has no 'file_path'.")
        where = f"frame {i} ('{fr['file_path']}') of {path}"
        if "transform_matrix" not in fr:
            raise DataError(f"{where} has no 'transform_matrix'. Give every frame its 4x4 camera-to-world matrix.")
        try:
            m = np.asarray(fr["transform_matrix"], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise DataError(f"{where} has a 'transform_matrix' that is not a 4x4 array of numbers.") from e
        if m.shape == (3, 4):
            m = np.concatenate([m, [[0.0, 0.0, 0.0, 1.0]]])
        if m.shape != (4, 4):
            raise DataError(f"{where} has a transform_matrix of shape {m.shape}; expected 4x4.")
        m = rigid_c2w(m, where, "Fix or regenerate the pose (e.g. rerun ns-process-data).")
        img_path = _resolve(path.parent, fr["file_path"], "image", where)
        rgb, alpha = read_image(img_path)
        h, w = rgb.shape[:2]
        cam = {key: fr.get(key, meta.get(key)) for key in INTRINSIC_KEYS}
        for key, size in (("w", w), ("h", h)):
            if cam[key] is not None and int(cam[key]) != size:
                raise DataError(
                    f"{where}: the JSON says {key}={cam[key]} but the image {img_path} is {w}x{h}. The intrinsics must "
                    "describe the image file; rescale fl_x/fl_y/cx/cy/w/h to the image or use the full-size images."
                )
        if cam["fl_x"] is not None:
            fx = float(cam["fl_x"])
            fy = float(cam["fl_y"]) if cam["fl_y"] is not None else fx
        elif cam["camera_angle_x"] is not None:
            fx = 0.5 * w / math.tan(0.5 * float(cam["camera_angle_x"]))
            fy = 0.5 * h / math.tan(0.5 * float(cam["camera_angle_y"])) if cam["camera_angle_y"] is not None else fx
        else:
            raise DataError(f"{where}: neither 'fl_x' nor 'camera_angle_x' is given, so the focal length is unknown.")
        k = [fx, fy, float(cam["cx"]) if cam["cx"] is not None else w / 2, float(cam["cy"]) if cam["cy"] is not None else h / 2]
        mask = None
        if fr.get("mask_path"):
            mask_path = _resolve(path.parent, fr["mask_path"], "mask", where)
            mask = read_mask(mask_path, img_path, (h, w))
            if not mask.any():
                raise DataError(f"mask {mask_path} of {where} is empty (no pixel > 0.5): the object is not visible. "
                                "Fix the mask or remove the frame.")
        a = combine_alpha(rgb, alpha, mask, img_path, background_color, mask_tolerance)
        rgba = np.concatenate([rgb, a[..., None]], -1).astype(np.float32)
        dist = [float(cam[key] or 0.0) for key in DISTORTION_KEYS]
        if any(dist):
            # coverage is derived before undistorting: the black border cv2 fills in is then background
            rgba = _undistort(rgba, k, dist)
        check_same_size(images, paths, rgba, img_path, split)
        images.append(np.clip(rgba, 0.0, 1.0))
        poses.append(m)
        intrinsics.append(k)
        paths.append(str(img_path))
    return to_frames(images, poses, intrinsics, paths)
