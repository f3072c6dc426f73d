"""Image file reading shared by every input layout."""
from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np

from recon.data.frames import DataError


def read_image(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an image as float32 sRGB [H,W,3] in [0,1] and its alpha [H,W] (None without an alpha channel)."""
    try:
        img = iio.imread(path)
    except Exception as e:  # imageio raises many types for corrupt data
        raise DataError(f"cannot read image {path}: {e}. Replace the file with a valid PNG/JPEG.") from e
    if img.ndim == 2:
        img = img[..., None].repeat(3, -1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise DataError(f"image {path} has shape {img.shape}; expected H x W x 3 (RGB) or H x W x 4 (RGBA).")
    scale = 65535.0 if img.dtype == np.uint16 else 255.0 if img.dtype == np.uint8 else 1.0
    img = img.astype(np.float32) / scale
    return img[..., :3], (img[..., 3] if img.shape[-1] == 4 else None)


def combine_alpha(
    rgb: np.ndarray,
    alpha: np.ndarray | None,
    mask: np.ndarray | None,
    path: Path,
    background_color: tuple[float, float, float] | None,
    mask_tolerance: float,
) -> np.ndarray:
    """Object coverage [H,W]: the mask times the image's alpha, else the alpha, else from the backdrop colour."""
    if mask is not None:
        return mask if alpha is None else mask * alpha
    if alpha is not None:
        return alpha
    if background_color is None:
        raise DataError(
            f"image {path} has no alpha channel and no mask, and recon needs an object mask. Either provide RGBA "
            "images or mask images, or set data.background_color=[r,g,b] (the backdrop colour in the photos, sRGB "
            "in 0..1, e.g. [1,1,1] for white) so the mask is derived from it."
        )
    bg = np.asarray(background_color, dtype=np.float32)
    return (np.abs(rgb - bg).max(-1) > mask_tolerance).astype(np.float32)
