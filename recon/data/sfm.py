"""Unposed photos: camera poses and intrinsics by COLMAP structure-from-motion (pycolmap, CPU), cached.

Layout: ``images/`` (or the scene directory itself holding only image files) + optional ``masks/``
(``<name>.png`` or ``<stem>.png``, > 0.5 = object). Every image file (sorted by name) goes to SfM:
SIFT features, exhaustive matching (``matcher=sequential`` for video frames: each image is matched with its
neighbours in name order) and COLMAP's incremental mapper, all on the CPU. One shared camera is estimated
(``single_camera``) with ``camera_model`` (``SIMPLE_RADIAL`` by default: a focal length, principal point and
one radial term; the reader then undistorts the images with it).

Object masks steer SfM: with ``masks/``, an alpha channel or ``background_color``, features are extracted only
on the object (the backdrop of a turntable capture moves with the object's frame and would otherwise fit a
static camera). Masks are also the training coverage, as in every reader.

The result is cached under ``$RECON_CACHE/sfm/<key>/sparse/0`` (binary COLMAP model + ``sfm.json``, a summary),
``key`` hashing the image (and mask) files' bytes and the SfM settings, so a second run reads it instead of
repeating SfM; ``min_registered`` is checked on every load and is not part of the key. The largest model
must register at least ``max(3, ceil(min_registered * N))`` of the N images (``min_registered`` is a fraction
in (0, 1]), else a DataError says how many did; the frames are then read from the model like a COLMAP scene
(:mod:`recon.data.colmap`: unregistered images are skipped, every 8th registered one is held out). SfM's
poses are in an arbitrary frame and scale: ``data.normalize=auto`` (the default for this format) fits the
object into the tet grid.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from recon.data.colmap import find_mask, load_colmap
from recon.data.frames import DataError, Frames
from recon.data.images import combine_alpha, read_image
from recon.data.nerfstudio import IMAGE_SUFFIXES, read_mask
from recon.export.obj import atomic_directory

log = logging.getLogger(__name__)

SFM_VERSION = 1  # part of the cache key: bump when the pipeline changes what it produces
MATCHERS = ("exhaustive", "sequential")
MIN_IMAGES = 3


def image_dir(root: Path) -> Path:
    """The folder of the photos: ``images/`` when present, else the scene directory itself."""
    return root / "images" if (root / "images").is_dir() else root


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (no hidden files), sorted by name."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a directory. Point data.path at a folder of photos (or one holding images/).")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in IMAGE_SUFFIXES and not p.name.startswith("."))


def _sfm_masks(files: list[Path], mask_dir: Path, background_color, mask_tolerance: float) -> list[np.ndarray] | None:
    """Object masks [H,W] bool for feature extraction (masks/, alpha or backdrop colour), None when there are none."""
    if not mask_dir.is_dir() and background_color is None:
        alphas = [read_image(f)[1] for f in files]
        if all(a is None for a in alphas):
            return None
    out = []
    for f in files:
        rgb, alpha = read_image(f)
        mask = None
        if mask_dir.is_dir():
            mask_path = find_mask(mask_dir, f.name)
            if mask_path is None:
                raise DataError(f"{mask_dir} has no mask for image {f} (looked for {f.name}.png and {f.stem}.png). "
                                "Every image needs a mask, or remove the masks folder.")
            mask = read_mask(mask_path, f, rgb.shape[:2])
        if mask is None and alpha is None and background_color is None:
            raise DataError(f"image {f} has no alpha channel while other images have one. Give every image an alpha "
                            "channel, add masks/, or set data.background_color.")
        out.append(combine_alpha(rgb, alpha, mask, f, background_color, mask_tolerance) > 0.5)
    return out


def cache_key(files: list[Path], mask_dir: Path, settings: dict) -> str:
    """SHA-1 over the settings, each image's name and bytes, and the mask files' names and bytes."""
    h = hashlib.sha1(json.dumps({"version": SFM_VERSION, **settings}, sort_keys=True).encode())
    extra = sorted(p for p in mask_dir.rglob("*") if p.is_file()) if mask_dir.is_dir() else []
    for p in files + extra:
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()[:20]


def run_sfm(
    files: list[Path],
    out_dir: Path,
    masks: list[np.ndarray] | None,
    matcher: str = "exhaustive",
    camera_model: str = "SIMPLE_RADIAL",
    single_camera: bool = True,
    max_image_size: int = 1600,
) -> dict:
    """Run SfM on ``files`` (all in one folder) and write the largest model to ``out_dir`` (binary).

    Returns the summary: ``images``, ``registered``, ``mean_reprojection_error_px``, ``seconds``, ``points``.
    """
    try:
        import pycolmap
    except ImportError as e:
        raise DataError("structure-from-motion needs pycolmap: pip install pycolmap") from e
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="recon-sfm-"))
    glog_level = pycolmap.logging.minloglevel
    if not log.isEnabledFor(logging.DEBUG):  # COLMAP's per-image progress lines only with DEBUG logging
        pycolmap.logging.minloglevel = 1
    try:
        db = work / "database.db"
        reader = pycolmap.ImageReaderOptions()
        reader.camera_model = camera_model
        if masks is not None:  # COLMAP: <mask_path>/<image name>.png, features only where the mask is non-zero
            (work / "masks").mkdir()
            for f, m in zip(files, masks):
                iio.imwrite(work / "masks" / f"{f.name}.png", m.astype(np.uint8) * 255)
            reader.mask_path = str(work / "masks")
        extraction = pycolmap.FeatureExtractionOptions()
        extraction.max_image_size = max_image_size
        mode = pycolmap.CameraMode.SINGLE if single_camera else pycolmap.CameraMode.PER_IMAGE
        pycolmap.extract_features(db, files[0].parent, image_names=[f.name for f in files], camera_mode=mode,
                                  reader_options=reader, extraction_options=extraction, device=pycolmap.Device.cpu)
        if matcher == "sequential":
            pycolmap.match_sequential(db, device=pycolmap.Device.cpu)
        else:
            pycolmap.match_exhaustive(db, device=pycolmap.Device.cpu)
        options = pycolmap.IncrementalPipelineOptions()
        models = pycolmap.incremental_mapping(db, files[0].parent, work / "sparse", options=options)
        best = max(models.values(), key=lambda r: r.num_reg_images(), default=None)
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = {"images": len(files), "registered": 0, "mean_reprojection_error_px": None, "points": 0}
        if best is not None:
            best.write_binary(str(out_dir))
            summary.update(registered=int(best.num_reg_images()), points=int(best.num_points3D()),
                           mean_reprojection_error_px=float(best.compute_mean_reprojection_error()))
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        return summary
    finally:
        pycolmap.logging.minloglevel = glog_level
        shutil.rmtree(work, ignore_errors=True)


def ensure_sfm(
    root: Path,
    background_color: tuple[float, float, float] | None = None,
    mask_tolerance: float = 0.02,
    matcher: str = "exhaustive",
    camera_model: str = "SIMPLE_RADIAL",
    single_camera: bool = True,
    use_masks: bool = True,
    max_image_size: int = 1600,
    cache_dir: str | Path | None = None,
) -> tuple[Path, dict]:
    """The cached SfM model folder of the photos under ``root`` (running SfM on first use) and its summary."""
    from recon.cache import cache_dir as default_cache_dir

    if matcher not in MATCHERS:
        raise DataError(f"data.sfm.matcher={matcher!r} is not one of {', '.join(MATCHERS)}.")
    folder = image_dir(root)
    files = list_images(folder)
    if len(files) < MIN_IMAGES:
        raise DataError(f"{folder} holds {len(files)} image file(s) ({', '.join(IMAGE_SUFFIXES[:4])}); "
                        f"structure-from-motion needs at least {MIN_IMAGES} overlapping photos.")
    mask_dir = root / "masks"
    settings = {"matcher": matcher, "camera_model": camera_model, "single_camera": single_camera,
                "use_masks": use_masks, "max_image_size": max_image_size,
                "background_color": list(background_color) if background_color is not None else None,
                "mask_tolerance": mask_tolerance}
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "sfm"
    out = cache / cache_key(files, mask_dir, settings)
    if (out / "sfm.json").is_file():
        summary = json.loads((out / "sfm.json").read_text())
        log.info("SfM of %s: cached in %s (%d of %d images registered)", folder, out, summary["registered"], len(files))
        return out / "sparse" / "0", summary
    masks = _sfm_masks(files, mask_dir, background_color, mask_tolerance) if use_masks else None
    log.info("SfM of %d images in %s (%s matching, %s) ...", len(files), folder, matcher,
             "features on the object masks" if masks is not None else "whole images")
    with atomic_directory(out) as tmp:
        summary = run_sfm(files, tmp / "sparse" / "0", masks, matcher, camera_model, single_camera, max_image_size)
        summary["image_dir"] = str(folder)
        (tmp / "sfm.json").write_text(json.dumps(summary, indent=2))
    err = summary["mean_reprojection_error_px"]
    log.info("SfM registered %d of %d images, mean reprojection error %s px, %.1f s; cached in %s", summary["registered"],
             len(files), f"{err:.3f}" if err is not None else "n/a", summary["seconds"], out)
    return out / "sparse" / "0", summary


def load_images(
    root: str | Path,
    split: str,
    background_color: tuple[float, float, float] | None = None,
    mask_tolerance: float = 0.02,
    min_registered: float = 0.8,
    **sfm,
) -> Frames:
    """Load one split ('train', 'val' or 'test') of a folder of unposed photos, posed by (cached) SfM.

    min_registered: the fraction of the images SfM must register (at least 3 images in any case).
    sfm: ``matcher``, ``camera_model``, ``single_camera``, ``use_masks``, ``max_image_size``, ``cache_dir``
    (see :func:`ensure_sfm`).
    """
    root = Path(root)
    if not 0.0 < min_registered <= 1.0:
        raise DataError(f"data.sfm.min_registered={min_registered} must be a fraction of the images in (0, 1].")
    model_dir, summary = ensure_sfm(root, background_color, mask_tolerance, **sfm)
    need = max(MIN_IMAGES, math.ceil(min_registered * summary["images"]))
    if summary["registered"] < need:
        raise DataError(
            f"structure-from-motion registered {summary['registered']} of the {summary['images']} images in "
            f"{image_dir(root)}, fewer than data.sfm.min_registered={min_registered} requires ({need}). The photos "
            "need more overlap (neighbouring views at most ~20 degrees apart), texture on the object and sharp focus; "
            "masks/ or an alpha channel keep features off the backdrop. Lower data.sfm.min_registered to train on "
            f"the registered images only. (The SfM result is cached in {model_dir.parent.parent}.)"
        )
    return load_colmap(root, split, background_color, mask_tolerance, model_dir=model_dir, image_dir=image_dir(root),
                       mask_dir=root / "masks")
