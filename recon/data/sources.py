"""Every input layout recon reads, behind one call: ``load_frames(root, split, format)``."""
from __future__ import annotations

from pathlib import Path

from recon.data.colmap import load_colmap
from recon.data.frames import DataError, Frames
from recon.data.llff import load_llff
from recon.data.nerf_synthetic import load_nerf_synthetic
from recon.data.nerfstudio import IMAGE_SUFFIXES, load_nerfstudio
from recon.data.sfm import load_images
from recon.data.views_depth import load_views

FORMATS = {  # format name -> what marks a directory of that format (any one of them), in detection order
    "nerf_synthetic": ("transforms_train.json",),
    "nerfstudio": ("transforms.json",),
    "llff": ("poses_bounds.npy",),
    "colmap": ("sparse/0/cameras.bin", "sparse/0/cameras.txt", "sparse/cameras.bin", "sparse/cameras.txt"),
    "views": ("cameras.json",),
    "images": ("images/", "*.png|*.jpg"),  # unposed photos: an images/ folder, or a folder of image files
}


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() and p.suffix in IMAGE_SUFFIXES for p in folder.iterdir())


def _marks(root: Path, marker: str) -> bool:
    if marker.endswith("/"):
        return _has_images(root / marker)
    if marker.startswith("*"):
        return _has_images(root)
    return (root / marker).is_file()


def detect_format(root: Path) -> str:
    """The format of a scene directory, from the file that marks it (see FORMATS)."""
    if not root.is_dir():
        raise DataError(f"data.path={str(root)!r} is not a directory. Point it at a scene folder.")
    for name, markers in FORMATS.items():
        if any(_marks(root, m) for m in markers):
            return name
    looked = ", ".join(f"{' or '.join(m)} ({n})" for n, m in FORMATS.items())
    raise DataError(
        f"cannot tell the format of {root}: it holds none of {looked}. Point data.path at a scene directory, or "
        f"set data.format to one of {', '.join(FORMATS)}."
    )


READERS = {"nerf_synthetic": load_nerf_synthetic, "nerfstudio": load_nerfstudio, "llff": load_llff,
           "colmap": load_colmap, "views": load_views, "images": load_images}


def load_frames(
    root: str | Path,
    split: str,
    format: str = "auto",
    background_color: tuple[float, float, float] | None = None,
    mask_tolerance: float = 0.02,
    options: dict | None = None,
) -> Frames:
    """One split of a scene directory in any supported layout ('auto' detects it from its marker file).

    options: extra keyword arguments per format name, e.g. ``{"images": {"min_registered": 0.9}}``.
    """
    root = Path(root)
    fmt = detect_format(root) if format == "auto" else format
    if fmt not in READERS:
        raise DataError(f"data.format={format!r} is not one of auto, {', '.join(READERS)}.")
    extra = (options or {}).get(fmt, {})
    return READERS[fmt](root, split, background_color=background_color, mask_tolerance=mask_tolerance, **extra)
