"""Radiance HDR (.hdr, RGBE) images: the learned environment light as a lat-long probe, written atomically."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recon.export.obj import atomic_write_bytes


def hdr_bytes(image: Tensor) -> bytes:
    """[H,W,3] linear HDR radiance (>= 0) -> bytes of a Radiance .hdr file (OpenCV's RGBE encoder)."""
    import cv2

    rgb = image.detach().float().clamp_min(0).cpu().numpy()
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"an HDR image must be [H,W,3], got {list(rgb.shape)}.")
    ok, buf = cv2.imencode(".hdr", np.ascontiguousarray(rgb[..., ::-1]))  # OpenCV wants BGR
    if not ok:
        raise RuntimeError("OpenCV could not encode the HDR image.")
    return buf.tobytes()


def write_hdr(path: str | Path, image: Tensor) -> Path:
    """Write [H,W,3] linear radiance as a Radiance .hdr file, atomically. Returns ``path``."""
    path = Path(path)
    atomic_write_bytes(path, hdr_bytes(image))
    return path


def read_hdr(path: str | Path) -> Tensor:
    """Read a Radiance .hdr file -> [H,W,3] float32 linear radiance."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found.")
    bgr = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path} is not a readable Radiance .hdr image.")
    return torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1]).astype(np.float32))
