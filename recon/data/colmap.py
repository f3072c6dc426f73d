"""Reader for COLMAP sparse models: ``sparse/0/{cameras,images,points3D}.{bin,txt}`` + ``images/`` (+ ``masks/``).

The model (binary or text, as COLMAP's mapper or ``model_converter`` writes it) is read with pycolmap; the
model folder is ``sparse/0``, else ``sparse``. Only registered images (those with a pose) are used, sorted by
name. COLMAP stores world-to-camera poses in the OpenCV camera convention (x right, y down, looking down +z);
they are inverted and their y and z axes flipped into recon's camera-to-world NeRF convention (x right, y up,
looking down -z). Poses keep the model's world frame and units; ``data.normalize=auto`` (the default for
this format) fits the object into the tet grid.

Camera models: ``SIMPLE_PINHOLE`` and ``PINHOLE`` are used as they are; ``SIMPLE_RADIAL``, ``RADIAL``,
``OPENCV`` and ``FULL_OPENCV`` have their distortion removed from images and masks with ``cv2.undistort``
(the pinhole part of the intrinsics stays). COLMAP and recon both put pixel centres at half-integers
(the image's top-left corner is (0, 0)); OpenCV puts them at integers, so the principal point handed to
OpenCV is shifted by half a pixel. Fisheye and other models are refused: undistort them with COLMAP's
``image_undistorter`` first.

Images: ``images/<name>`` for each image's name in the model (names may hold sub-folders). Masks:
``masks/<name>.png`` (COLMAP's convention, e.g. ``masks/0001.jpg.png``) or ``masks/<name stem>.png``
(> 0.5 = object), required unless the images have alpha or ``background_color`` is set. Split: every 8th
registered image (0, 8, 16, ... in name order) is the test set, as in NeRF's LLFF experiments; ``val`` is the
test set too.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from recon.data.frames import DataError, Frames
from recon.data.images import combine_alpha, read_image
from recon.data.nerfstudio import IMAGE_SUFFIXES, check_same_size, read_mask, rigid_c2w, to_frames

log = logging.getLogger(__name__)

COLMAP_HOLD = 8
OPENCV_TO_NERF = np.diag([1.0, -1.0, -1.0, 1.0])  # flips camera y (down -> up) and z (forward -> backward)
# COLMAP camera model -> (names of its parameters, in order); distortion terms become OpenCV's vector
# (k1, k2, p1, p2[, k3, k4, k5, k6]).
CAMERA_MODELS = {
    "SIMPLE_PINHOLE": ("f", "cx", "cy"),
    "PINHOLE": ("fx", "fy", "cx", "cy"),
    "SIMPLE_RADIAL": ("f", "cx", "cy", "k1"),
    "RADIAL": ("f", "cx", "cy", "k1", "k2"),
    "OPENCV": ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2"),
    "FULL_OPENCV": ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6"),
}
MODEL_FILES = ("cameras", "images", "points3D")


def colmap_to_nerf(cam_from_world: np.ndarray) -> np.ndarray:
    """COLMAP world-to-camera [3,4] or [4,4] (OpenCV axes) -> NeRF-convention camera-to-world [4,4] float64."""
    w2c = np.eye(4)
    w2c[:3, :4] = np.asarray(cam_from_world, dtype=np.float64)[:3, :4]
    return np.linalg.inv(w2c) @ OPENCV_TO_NERF


def nerf_to_colmap(c2w: np.ndarray) -> np.ndarray:
    """NeRF-convention camera-to-world [4,4] -> COLMAP world-to-camera [3,4] (OpenCV axes)."""
    return np.linalg.inv(np.asarray(c2w, dtype=np.float64) @ OPENCV_TO_NERF)[:3, :4]


def rotation_to_quaternion(rot: np.ndarray) -> np.ndarray:
    """Rotation matrix [3,3] -> unit quaternion (w, x, y, z) with w >= 0, COLMAP's order."""
    from scipy.spatial.transform import Rotation

    x, y, z, w = Rotation.from_matrix(rot).as_quat()
    q = np.array([w, x, y, z])
    return q if w >= 0 else -q


def find_model_dir(root: Path) -> Path:
    """The folder holding the sparse model: ``sparse/0``, ``sparse`` or ``root`` itself (first with cameras.*)."""
    for d in (root / "sparse" / "0", root / "sparse", root):
        if any((d / f"cameras.{ext}").is_file() for ext in ("bin", "txt")):
            return d
    raise DataError(
        f"no COLMAP model under {root}: looked for sparse/0/cameras.bin|txt, sparse/cameras.bin|txt and "
        "cameras.bin|txt. A COLMAP scene directory holds sparse/0/ (cameras, images, points3D; from COLMAP's "
        "mapper) next to images/. Point data.path at that directory."
    )


def read_model(model_dir: Path):
    """Read a COLMAP sparse model folder with pycolmap; a missing points3D file is taken as empty."""
    try:
        import pycolmap
    except ImportError as e:
        raise DataError("reading COLMAP models needs pycolmap: pip install pycolmap") from e
    ext = next((e for e in ("bin", "txt") if (model_dir / f"cameras.{e}").is_file()), None)
    if ext is None:
        raise DataError(f"{model_dir / 'cameras.bin'} (or cameras.txt) not found: a COLMAP model needs its cameras "
                        "file. Restore it or rerun COLMAP's mapper.")
    if not (model_dir / f"images.{ext}").is_file():
        raise DataError(f"{model_dir / f'images.{ext}'} not found next to {model_dir / f'cameras.{ext}'}: a COLMAP "
                        "model needs its images file (the poses). Restore it or rerun COLMAP's mapper.")
    tmp = None
    src = model_dir
    if not (model_dir / f"points3D.{ext}").is_file():  # the points are not needed: read the model without them
        tmp = Path(tempfile.mkdtemp(prefix="recon-colmap-"))
        for name in ("cameras", "images", "rigs", "frames"):
            if (model_dir / f"{name}.{ext}").is_file():
                shutil.copy(model_dir / f"{name}.{ext}", tmp / f"{name}.{ext}")
        if ext == "bin":
            (tmp / "points3D.bin").write_bytes(np.uint64(0).tobytes())
        else:
            (tmp / "points3D.txt").write_text("")
        src = tmp
    try:
        return pycolmap.Reconstruction(str(src))
    except Exception as e:  # pycolmap raises ValueError / RuntimeError with the parser's message
        files = ", ".join(str(model_dir / f"{n}.{ext}") for n in MODEL_FILES)
        raise DataError(f"cannot read the COLMAP model {files}: {e}. Regenerate it with COLMAP.") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def camera_intrinsics(camera, where: str) -> tuple[list[float], list[float]]:
    """(fx, fy, cx, cy) in pixels and the OpenCV distortion vector (empty for pinhole models) of a pycolmap camera."""
    model = camera.model.name if hasattr(camera.model, "name") else str(camera.model)
    if model not in CAMERA_MODELS:
        raise DataError(
            f"{where} uses the camera model {model}; recon reads {', '.join(CAMERA_MODELS)}. Undistort the images "
            "to a pinhole camera with COLMAP's image_undistorter and point data.path at its output."
        )
    p = dict(zip(CAMERA_MODELS[model], (float(v) for v in camera.params)))
    fx = p.get("fx", p.get("f"))
    fy = p.get("fy", p.get("f"))
    k = [fx, fy, p["cx"], p["cy"]]
    if not np.isfinite(k).all() or fx <= 0 or fy <= 0:
        raise DataError(f"{where} has camera parameters {[float(v) for v in camera.params]} ({model}); the focal "
                        "length must be > 0 and every parameter finite. Fix or regenerate the model.")
    dist = [p.get(n, 0.0) for n in ("k1", "k2", "p1", "p2")]
    if model == "FULL_OPENCV":
        dist += [p[n] for n in ("k3", "k4", "k5", "k6")]
    return k, (dist if any(dist) else [])


def undistort(img: np.ndarray, k: list[float], dist: list[float]) -> np.ndarray:
    """Remove OpenCV-model distortion from an image [H,W,C]; k = (fx, fy, cx, cy), pixel centres at half-integers."""
    try:
        import cv2
    except ImportError as e:
        raise DataError("undistorting images needs OpenCV: pip install opencv-python-headless") from e
    fx, fy, cx, cy = k
    kmat = np.array([[fx, 0, cx - 0.5], [0, fy, cy - 0.5], [0, 0, 1]], dtype=np.float64)  # OpenCV: centres at integers
    return cv2.undistort(img, kmat, np.asarray(dist, dtype=np.float64))


def find_mask(mask_dir: Path, name: str) -> Path | None:
    """The mask of image ``name``: ``<name>.png`` (COLMAP's convention) or ``<name stem><suffix>``."""
    rel = Path(name)
    cands = [mask_dir / (name + ".png")] + [mask_dir / rel.with_suffix(s) for s in IMAGE_SUFFIXES]
    return next((c for c in cands if c.is_file()), None)


def load_colmap(
    root: str | Path,
    split: str,
    background_color: tuple[float, float, float] | None = None,
    mask_tolerance: float = 0.02,
    model_dir: str | Path | None = None,
    image_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
) -> Frames:
    """Load one split ('train', 'val' or 'test') of a COLMAP scene as linear-RGB Frames.

    root: the scene directory. model_dir, image_dir, mask_dir: override ``sparse/0``, ``images`` and ``masks``
    (relative to root, or absolute). Returns Frames with per-frame intrinsics [N,4] in pixels.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path={str(root)!r} is not a directory. Point it at a COLMAP scene folder.")
    mdir = root / model_dir if model_dir is not None else find_model_dir(root)
    idir = root / (image_dir if image_dir is not None else "images")
    kdir = root / (mask_dir if mask_dir is not None else "masks")
    if split not in ("train", "val", "test"):
        raise DataError(f"split {split!r} is not one of train, val, test.")
    rec = read_model(mdir)
    ext = "bin" if (mdir / "cameras.bin").is_file() else "txt"
    model_file, cameras_file = mdir / f"images.{ext}", mdir / f"cameras.{ext}"
    if not idir.is_dir():
        raise DataError(f"{idir} not found: the images of the COLMAP model {model_file} belong in it. Put them there "
                        "(same names as in the model) or point data.path at the folder that holds images/ and sparse/.")
    reg = sorted((rec.images[i] for i in rec.reg_image_ids()), key=lambda im: im.name)
    if len(rec.images) > len(reg):
        log.info("%s: %d of %d images are registered; the others have no pose and are skipped",
                 model_file, len(reg), len(rec.images))
    if len(reg) < 2:
        raise DataError(f"{model_file} has {len(reg)} registered image(s); splitting into train and test needs at "
                        "least 2 (every 8th image, starting with the first, is held out).")
    held = [j for j in range(len(reg)) if j % COLMAP_HOLD == 0]
    index = held if split != "train" else [j for j in range(len(reg)) if j % COLMAP_HOLD != 0]
    images, poses, intrinsics, paths = [], [], [], []
    for j in index:
        im = reg[j]
        where = f"image {im.name!r} (id {im.image_id}) of {model_file}"
        cfw = im.cam_from_world() if callable(im.cam_from_world) else im.cam_from_world
        c2w = rigid_c2w(colmap_to_nerf(cfw.matrix()), where, "Rerun COLMAP's mapper.")
        if im.camera_id not in rec.cameras:
            raise DataError(f"{where} uses camera {im.camera_id}, which {cameras_file} does not hold. Regenerate the model.")
        camera = rec.cameras[im.camera_id]
        k, dist = camera_intrinsics(camera, f"camera {im.camera_id} in {cameras_file} (used by {where})")
        img_path = idir / im.name
        if not img_path.is_file():
            raise DataError(f"{where} has no image file: {img_path} does not exist. Restore it, or point data.path at "
                            "the folder whose images/ holds the images the model was made from.")
        rgb, alpha = read_image(img_path)
        h, w = rgb.shape[:2]
        if (camera.width, camera.height) != (w, h):
            raise DataError(
                f"camera {im.camera_id} in {cameras_file} (used by {where}) is {camera.width}x{camera.height} but the image {img_path} is "
                f"{w}x{h}. The model must describe the image files; use the images COLMAP saw (or rescale the model "
                "with COLMAP's model_converter)."
            )
        mask = None
        if kdir.is_dir():
            mask_path = find_mask(kdir, im.name)
            if mask_path is None:
                raise DataError(f"{kdir} has no mask for image {img_path} (looked for {im.name}.png and "
                                f"{Path(im.name).with_suffix('.png')}). Every image needs a mask, or remove the masks folder.")
            mask = read_mask(mask_path, img_path, (h, w))
            if not mask.any():
                raise DataError(f"mask {mask_path} is empty (no pixel > 0.5): the object is not visible in {img_path}. "
                                "Fix the mask or remove the image.")
        elif alpha is None and background_color is None:
            raise DataError(
                f"image {img_path} has no alpha channel and {kdir} does not exist, and recon needs object masks. Add "
                f"masks/<image name>.png (white = object), provide RGBA images, or set data.background_color."
            )
        a = combine_alpha(rgb, alpha, mask, img_path, background_color, mask_tolerance)
        rgba = np.concatenate([rgb, a[..., None]], -1).astype(np.float32)
        if dist:  # coverage is derived before undistorting: the black border cv2 fills in is then background
            rgba = np.clip(undistort(rgba, k, dist), 0.0, 1.0)
        check_same_size(images, paths, rgba, img_path, split)
        images.append(rgba)
        poses.append(c2w)
        intrinsics.append(k)
        paths.append(str(img_path))
    return to_frames(images, poses, intrinsics, paths)
