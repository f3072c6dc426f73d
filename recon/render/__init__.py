"""Differentiable rendering: one rasterizer API (nvdiffrast on CUDA, pure PyTorch anywhere) and cameras."""
from recon.render.camera import look_at, mvp_from_c2w, perspective, transform_pos
from recon.render.rasterizer import BACKENDS, Rasterizer, make_rasterizer
from recon.render.torch_raster import TorchRasterizer

__all__ = [
    "BACKENDS",
    "Rasterizer",
    "TorchRasterizer",
    "look_at",
    "make_rasterizer",
    "mvp_from_c2w",
    "perspective",
    "transform_pos",
]
