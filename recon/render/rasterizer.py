"""The rasterization API shared by both backends, and `make_rasterizer` to pick one.

Every backend follows nvdiffrast.torch's semantics (github.com/NVlabs/nvdiffrast):

- Clip space is OpenGL's: a vertex is visible when -w <= x, y, z <= w; there is no backface culling.
- Pixel row i sits at NDC y = -1 + (2i+1)/H and column j at x = -1 + (2j+1)/W, so row 0 is NDC y = -1.
  With the y-flipped projection of `recon.render.camera.perspective`, row 0 is the top of the picture.
- `rast [B,H,W,4]` holds (u, v, z/w, triangle_id + 1) and zeros where no triangle covers the pixel centre.
  u, v are perspective-correct barycentrics: a point is u*v0 + v*v1 + (1-u-v)*v2 of its triangle.
- `rast_db [B,H,W,4]` holds (du/dX, du/dY, dv/dX, dv/dY) in pixels (X along columns, Y along rows).
- Gradients reach `pos_clip` through u, v and rast_db (not through z/w or coverage) and, at silhouettes,
  through `antialias`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "nvdiffrast")
CUBE_KERNELS = ("triton", "nvdiffrast")  # render.cube_kernel: the CUDA backend's cube-map lookups
FILTER_MODES = ("auto", "nearest", "linear", "linear-mipmap-nearest", "linear-mipmap-linear")
BOUNDARY_MODES = ("wrap", "clamp", "zero")

DiffAttrs = Literal["all"] | Sequence[int] | None


class Rasterizer(ABC):
    """Differentiable triangle rasterization with nvdiffrast's four operations.

    Backends subclass this; `name` is the value of `render.backend` that selects them.
    """

    name: str = ""

    @abstractmethod
    def rasterize(self, pos_clip: Tensor, faces: Tensor, resolution: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Rasterize triangles.

        pos_clip: [B,Nv,4] clip-space vertex positions. faces: [Nf,3] int64 vertex indices.
        resolution: (H, W) in pixels.
        Returns rast [B,H,W,4] = (u, v, z/w, triangle_id + 1), zeros where empty, and
        rast_db [B,H,W,4] = (du/dX, du/dY, dv/dX, dv/dY) in pixels. Differentiable w.r.t. pos_clip
        through u, v and rast_db.
        """

    @abstractmethod
    def interpolate(
        self,
        attr: Tensor,
        rast: Tensor,
        faces: Tensor,
        rast_db: Tensor | None = None,
        diff_attrs: DiffAttrs = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Interpolate vertex attributes over the rasterized triangles.

        attr: [B,Nv,C], or [Nv,C] shared by all images. rast: [B,H,W,4] from `rasterize`.
        faces: [Nf,3] int64 (may differ from the rasterized faces, e.g. UV faces, if triangle ids match).
        Returns [B,H,W,C] (zeros where empty) and, when rast_db and diff_attrs ("all" or a list of
        channel indices) are given, the pixel derivatives [B,H,W,2*len(diff_attrs)] ordered
        (dA0/dX, dA0/dY, dA1/dX, ...); otherwise None. Differentiable w.r.t. attr, rast and rast_db.
        """

    @abstractmethod
    def antialias(self, color: Tensor, rast: Tensor, pos_clip: Tensor, faces: Tensor) -> Tensor:
        """Analytic antialiasing of silhouette edges.

        color: [B,H,W,C]; rast: [B,H,W,4] from `rasterize(pos_clip, faces, ...)`; pos_clip: [B,Nv,4];
        faces: [Nf,3] int64. Returns [B,H,W,C] where pixels next to a silhouette edge blend in their
        neighbour's colour by the fraction of the pixel the edge leaves uncovered; differentiable
        w.r.t. color and pos_clip (this is where coverage changes get their gradient).
        """

    @abstractmethod
    def texture(
        self,
        tex: Tensor,
        uv: Tensor,
        uv_da: Tensor | None = None,
        filter_mode: str = "auto",
        boundary_mode: str = "wrap",
        max_mip_level: int | None = None,
    ) -> Tensor:
        """Sample a 2D texture.

        tex: [B or 1,Ht,Wt,C]. uv: [B,H,W,2], texel (0,0)'s corner at uv (0,0), u along the width and
        v along the height. uv_da: [B,H,W,4] = (du/dX, du/dY, dv/dX, dv/dY) selects the mip level.
        filter_mode: "nearest", "linear", "linear-mipmap-nearest", "linear-mipmap-linear" or "auto"
        (mipmapped when uv_da is given, else linear). boundary_mode: "wrap", "clamp" or "zero".
        max_mip_level: coarsest mip level used (None: down to 1x1). Returns [B,H,W,C],
        differentiable w.r.t. tex, uv and uv_da.
        """

    def cube_texture(self, levels: list[Tensor], dirs: Tensor, level: Tensor | None = None) -> Tensor:
        """Sample a cube map along directions, trilinearly across its mip chain.

        levels: [6,R,R,C] cube faces (`recon.render.cube`'s convention, nvdiffrast's), then its coarser levels, each
        half the previous. dirs: [...,3] (need not be unit length). level: [...] fractional mip level (0 = levels[0],
        clamped to the chain); None samples levels[0] bilinearly. Returns [...,C], differentiable w.r.t. every
        level and ``level``. This default is the PyTorch lookup of `recon.render.cube` (filtering across face edges
        and corners as nvdiffrast's cube mode does); backends with a native cube-map sampler override it.
        """
        from recon.render.cube import sample_cube_mips

        return sample_cube_mips(levels, dirs, level)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _wants_cuda(device: torch.device | str | None) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def make_rasterizer(backend: str = "auto", device: torch.device | str | None = None, cube_stride: int = 0,
                    cube_kernel: str = "nvdiffrast") -> Rasterizer:
    """The rasterizer named by `render.backend`.

    backend: "auto" (nvdiffrast on a CUDA device when it imports, else torch), "torch" (pure PyTorch,
    any device) or "nvdiffrast" (CUDA only). device: where the tensors will live; None means CUDA when
    this process sees a GPU. cube_stride, cube_kernel: the CUDA backend's cube-map lookups (`NvdiffrastRasterizer`;
    the torch backend ignores them).
    """
    if backend not in BACKENDS:
        raise ValueError(f"render.backend={backend!r} is not a rasterizer; valid names: {', '.join(BACKENDS)}.")
    if cube_kernel not in CUBE_KERNELS:
        raise ValueError(f"render.cube_kernel={cube_kernel!r}: use one of {', '.join(CUBE_KERNELS)}.")
    from recon.render.torch_raster import TorchRasterizer

    if backend == "torch":
        return TorchRasterizer()

    from recon.render import nvdiffrast as nvdr_backend

    if backend == "auto":
        if _wants_cuda(device) and torch.cuda.is_available() and nvdr_backend.is_available():
            return nvdr_backend.NvdiffrastRasterizer(device, cube_stride, cube_kernel)
        return TorchRasterizer()

    if not torch.cuda.is_available():
        raise ValueError(
            f"render.backend={backend!r} needs CUDA but this process sees no GPU. "
            "Use render.backend=torch (CPU, slower) or run on a CUDA machine."
        )
    if device is not None and torch.device(device).type != "cuda":
        raise ValueError(
            f"render.backend={backend!r} needs a CUDA device but was given device={str(device)!r}. "
            "Use render.backend=torch for CPU tensors, or pass a CUDA device."
        )
    if not nvdr_backend.is_available():
        raise ImportError(
            f"render.backend={backend!r} needs the nvdiffrast package, which is not installed: "
            "run `pip install diffrp-nvdiffrast` (or `pip install recon[cuda]`), or use render.backend=torch."
        )
    return nvdr_backend.NvdiffrastRasterizer(device, cube_stride, cube_kernel)
