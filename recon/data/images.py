"""Image file reading shared by every input layout."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import imageio.v3 as iio
import numpy as np
import torch

from recon.color import srgb_to_linear
from recon.data.frames import DataError
from recon.parallel import thread_map


def decode_image(path: Path) -> np.ndarray:
    """The file's pixels as stored: [H,W,3] or [H,W,4] (grey images repeated to RGB), any dtype."""
    try:
        img = iio.imread(path)
    except Exception as e:  # imageio raises many types for corrupt data
        raise DataError(f"cannot read image {path}: {e}. Replace the file with a valid PNG/JPEG.") from e
    if img.ndim == 2:
        img = img[..., None].repeat(3, -1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise DataError(f"image {path} has shape {img.shape}; expected H x W x 3 (RGB) or H x W x 4 (RGBA).")
    return img


def _as_float(img: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    scale = 65535.0 if img.dtype == np.uint16 else 255.0 if img.dtype == np.uint8 else 1.0
    img = img.astype(np.float32) / scale
    return img[..., :3], (img[..., 3] if img.shape[-1] == 4 else None)


def read_image(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an image as float32 sRGB [H,W,3] in [0,1] and its alpha [H,W] (None without an alpha channel)."""
    return _as_float(decode_image(path))


@functools.lru_cache(maxsize=1)
def _byte_to_linear() -> np.ndarray:
    """[256] float32: `srgb_to_linear` of each 8-bit value as `read_image` scales it (the same floats, so the same
    results up to the last bit that torch's vectorised and scalar pow may differ in)."""
    return srgb_to_linear(torch.arange(256, dtype=torch.float32) / 255.0).numpy()


def read_linear_rgba(path: Path, background_color: tuple[float, float, float] | None,
                     mask_tolerance: float) -> np.ndarray:
    """An image as float32 [H,W,4]: linear RGB and coverage (`combine_alpha`: its alpha, else from the backdrop
    colour). 8-bit RGBA, the common case, converts by table lookup: `srgb_to_linear` of `read_image`'s values."""
    img = decode_image(path)
    if img.dtype == np.uint8 and img.shape[-1] == 4:
        out = np.empty(img.shape, np.float32)
        out[..., :3] = _byte_to_linear()[img[..., :3]]
        out[..., 3] = img[..., 3].astype(np.float32) / 255.0
        return out
    rgb, alpha = _as_float(img)
    alpha = combine_alpha(rgb, alpha, None, path, background_color, mask_tolerance)
    return np.concatenate([srgb_to_linear(torch.from_numpy(rgb)).numpy(), alpha[..., None]], -1)


def size_mismatch(what: str, first: Path | str, first_hw: tuple[int, ...], path: Path | str,
                  hw: tuple[int, ...]) -> DataError:
    """The error for an image of ``what`` (e.g. "the train split") whose size differs from the split's first."""
    return DataError(
        f"images in {what} differ in size: {first} is {first_hw[1]}x{first_hw[0]} but {path} is {hw[1]}x{hw[0]}. "
        "All frames of a split must have one size; resize them (data.resolution then resamples every frame).")


def read_all(paths: list[Path], read: Callable[[Path], np.ndarray], what: str) -> np.ndarray:
    """``read`` every path into one [N,H,W,C] array, in threads (decoding releases the GIL); the first image sets
    the size, and an image of another size is `size_mismatch`'s error."""
    first = read(paths[0])
    out = np.empty((len(paths), *first.shape), first.dtype)
    out[0] = first

    def load(i: int) -> None:
        img = read(paths[i])
        if img.shape != first.shape:
            raise size_mismatch(what, paths[0], first.shape, paths[i], img.shape)
        out[i] = img

    thread_map(load, range(1, len(paths)))
    return out


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
