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
