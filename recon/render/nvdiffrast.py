"""CUDA rasterizer: a thin wrapper over nvdiffrast.torch with its CUDA context (never OpenGL).

Install with `pip install diffrp-nvdiffrast`; the CUDA plugin is JIT-compiled by torch on first use,
which needs nvcc (matching torch's CUDA version), ninja and a C++ compiler.
"""
from __future__ import annotations

import importlib.util
import math
import re
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

from recon.render.rasterizer import CUBE_KERNELS, DiffAttrs, Rasterizer
from recon.render.torch_raster import _FacesCache

_lock = threading.Lock()
_plugin_ready = False
_contexts: dict[int, object] = {}  # one RasterizeCudaContext per CUDA device index


def is_available() -> bool:
    """Whether the nvdiffrast package is installed (says nothing about CUDA or the plugin build)."""
    return importlib.util.find_spec("nvdiffrast") is not None


def plugin_name(nvdiffrast_version: str, torch_version: str) -> str:
    """Module name of nvdiffrast's JIT-built CUDA plugin, computed as nvdiffrast/torch/ops.py does."""
    name = f"nvdiffrast_plugin_{nvdiffrast_version}_torch{torch_version}"
    return re.sub(r"\W|^(?=\d)", "_", name)


def _plugin_build_dir() -> str:
    """Where torch's extension builder keeps nvdiffrast's plugin for this nvdiffrast and torch."""
    import nvdiffrast
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(plugin_name(nvdiffrast.__version__, torch.__version__), False)


def plugin_built() -> bool | None:
    """Whether nvdiffrast's CUDA plugin is already built for this nvdiffrast and torch (its first use then loads it
    instead of compiling for about 30 s); None when nvdiffrast is not installed."""
    if not is_available():
        return None
    build_dir = Path(_plugin_build_dir())
    return any(build_dir.glob("*.so")) or any(build_dir.glob("*.pyd"))


def _load_plugin() -> None:
    """Build (first time) and import nvdiffrast's CUDA plugin, once per process.

    nvdiffrast imports the freshly built plugin by module name; recent torch versions no longer put the
    extension's build directory on sys.path, so that import fails unless we add the directory first.
    """
    global _plugin_ready
    if _plugin_ready:
        return
    with _lock:
        if _plugin_ready:
            return
        from nvdiffrast.torch import ops

        build_dir = _plugin_build_dir()
        if build_dir not in sys.path:
            sys.path.insert(0, build_dir)
        try:
            ops._get_plugin()
        except Exception as err:
            if torch.version.cuda:
                fix = (
                    f"Check that nvcc (CUDA {torch.version.cuda}, matching torch {torch.__version__}) and ninja are "
                    "on PATH and that CUDA_HOME points at that toolkit, or use render.backend=torch."
                )
            else:
                fix = f"torch {torch.__version__} has no CUDA support: install a CUDA build, or use render.backend=torch."
            raise RuntimeError(f"The nvdiffrast CUDA plugin build failed ({type(err).__name__}: {err}). {fix}") from err
        _plugin_ready = True


def _context(device: torch.device):
    """The RasterizeCudaContext of a CUDA device, created on first use."""
    import nvdiffrast.torch as dr

    index = device.index if device.index is not None else torch.cuda.current_device()
    ctx = _contexts.get(index)
    if ctx is None:
        with _lock:
            ctx = _contexts.get(index)
            if ctx is None:
                ctx = dr.RasterizeCudaContext(device=torch.device("cuda", index))
                _contexts[index] = ctx
    return ctx


def strided_order(n: int, stride: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """A permutation of range(n) whose neighbours are about ``stride`` apart, and its inverse: ``order[t] = (t * k)
    % n`` with k the first integer from ``stride`` (taken modulo n, at least 1) that shares no factor with n, so
    every index comes once.
    ``x.index_select(0, order)`` reorders rows, ``y.index_select(0, inverse)`` puts them back. Two elementwise
    kernels each, no sort."""
    if n <= 0 or stride < 1:
        raise ValueError(f"strided_order needs n >= 1 and stride >= 1, got n={n}, stride={stride}")
    k = stride % n if n > 1 else 1
    k = max(k, 1)
    while math.gcd(k, n) != 1:
        k += 1
    t = torch.arange(n, device=device, dtype=torch.int64)
    return (t * k) % n, (t * pow(k, -1, n)) % n if n > 1 else t


class NvdiffrastRasterizer(Rasterizer):
    """nvdiffrast.torch on CUDA. Inputs must be float32 CUDA tensors; faces are cast to int32 here.

    device: the CUDA device the tensors live on (informational; each call uses its inputs' device).
    cube_stride: 0 runs `cube_texture`'s lookups in the directions' order; k > 0 in `strided_order` (neighbouring
    threads k directions apart; ``model.render.cube_stride``). The values are the same. So are the gradients, up to
    the order of atomic additions, except at the 4 corner texels of each cube face, where nvdiffrast spreads one
    bilinear footprint over three faces: there its gradient depends on which lookups share a warp. Against the exact
    gradient (`bench/cube_lookup.py`, H200, 1.32M lookups) the pixels' order is 20-25 % off at those texels, a
    stride of 4096 2 % (the 16² diffuse cube) and 5e-7 (the 512²-16² specular chain). The strided lookups cost more
    (0.74 + 0.25 ms per step with their backward), so 0 is the default.
    cube_kernel: "nvdiffrast" (its cube-mode texture) or "triton" (`recon.render.cube_triton`: the same lookup, exact
    at the corner texels, its backward adding runs of equal texels once; ``model.render.cube_kernel``).
    """

    name = "nvdiffrast"

    def __init__(self, device: torch.device | str | None = None, cube_stride: int = 0,
                 cube_kernel: str = "nvdiffrast") -> None:
        if cube_stride < 0:
            raise ValueError(f"render.cube_stride must be 0 (directions' order) or positive, got {cube_stride}")
        if cube_kernel not in CUBE_KERNELS:
            raise ValueError(f"render.cube_kernel={cube_kernel!r}: use one of {', '.join(CUBE_KERNELS)}.")
        if cube_kernel == "triton" and cube_stride:
            raise ValueError(f"render.cube_stride={cube_stride} reorders nvdiffrast's cube-map lookups, and "
                             "render.cube_kernel=triton sums runs of neighbouring lookups instead: set cube_stride=0, "
                             "or render.cube_kernel=nvdiffrast to keep the stride.")
        if cube_kernel == "triton" and importlib.util.find_spec("triton") is None:
            raise ImportError("render.cube_kernel=triton needs the triton package (installed with torch on Linux "
                              "CUDA builds); use render.cube_kernel=nvdiffrast.")
        self.cube_stride = int(cube_stride)
        self.cube_kernel = cube_kernel
        self.device = torch.device(device) if device is not None else torch.device("cuda")
        self._faces = _FacesCache()  # faces -> int32 copy
        self._topology = _FacesCache()  # faces -> nvdiffrast topology hash

    def _tri(self, faces: Tensor) -> Tensor:
        return self._faces.get(faces, lambda f: f.to(torch.int32).contiguous())

    def rasterize(self, pos_clip: Tensor, faces: Tensor, resolution: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """See `Rasterizer.rasterize`. pos_clip: [B,Nv,4] float32 CUDA; faces: [Nf,3] int64."""
        import nvdiffrast.torch as dr

        _load_plugin()
        ctx = _context(pos_clip.device)
        res = [int(resolution[0]), int(resolution[1])]
        return dr.rasterize(ctx, pos_clip.contiguous(), self._tri(faces), resolution=res, grad_db=True)

    def interpolate(
        self,
        attr: Tensor,
        rast: Tensor,
        faces: Tensor,
        rast_db: Tensor | None = None,
        diff_attrs: DiffAttrs = None,
    ) -> tuple[Tensor, Tensor | None]:
        """See `Rasterizer.interpolate`. attr: [B,Nv,C] or [Nv,C]; rast: [B,H,W,4]."""
        import nvdiffrast.torch as dr

        _load_plugin()
        if diff_attrs is not None and rast_db is None:
            raise ValueError("interpolate(diff_attrs=...) needs rast_db, the second output of rasterize().")
        if attr.dim() == 2:
            attr = attr[None]  # broadcast over the minibatch
        if diff_attrs is None or rast_db is None:
            out, _ = dr.interpolate(attr.contiguous(), rast, self._tri(faces))
            return out, None
        diff = diff_attrs if isinstance(diff_attrs, str) else [int(i) for i in diff_attrs]
        return dr.interpolate(attr.contiguous(), rast, self._tri(faces), rast_db=rast_db, diff_attrs=diff)

    def antialias(self, color: Tensor, rast: Tensor, pos_clip: Tensor, faces: Tensor) -> Tensor:
        """See `Rasterizer.antialias`. color: [B,H,W,C]; the topology hash is built once per faces tensor."""
        import nvdiffrast.torch as dr

        _load_plugin()
        tri = self._tri(faces)
        topology = self._topology.get(faces, lambda f: dr.antialias_construct_topology_hash(tri))
        return dr.antialias(color.contiguous(), rast, pos_clip.contiguous(), tri, topology_hash=topology)

    def texture(
        self,
        tex: Tensor,
        uv: Tensor,
        uv_da: Tensor | None = None,
        filter_mode: str = "auto",
        boundary_mode: str = "wrap",
        max_mip_level: int | None = None,
    ) -> Tensor:
        """See `Rasterizer.texture`. tex: [B or 1,Ht,Wt,C]; uv: [B,H,W,2]; uv_da: [B,H,W,4]."""
        import nvdiffrast.torch as dr

        _load_plugin()
        return dr.texture(
            tex.contiguous(),
            uv.contiguous(),
            uv_da=uv_da.contiguous() if uv_da is not None else None,
            filter_mode=filter_mode,
            boundary_mode=boundary_mode,
            max_mip_level=max_mip_level,
        )

    def cube_texture(self, levels: list[Tensor], dirs: Tensor, level: Tensor | None = None) -> Tensor:
        """See `Rasterizer.cube_texture`: nvdiffrast's cube-mode texture, one kernel for the whole chain, filtering
        across face edges; gradients also reach ``dirs`` (as in nvdiffrec)."""
        if self.cube_kernel == "triton":
            from recon.render.cube_triton import cube_lookup

            return cube_lookup(levels, dirs, level)
        import nvdiffrast.torch as dr

        _load_plugin()
        shape = dirs.shape[:-1]
        dirs = dirs.reshape(-1, 3)
        level = None if level is None or len(levels) == 1 else level.reshape(-1)
        order = None
        if self.cube_stride > 0 and dirs.shape[0] > 1:
            order, inverse = strided_order(dirs.shape[0], self.cube_stride, dirs.device)
            dirs = dirs.index_select(0, order)
            level = None if level is None else level.index_select(0, order)
        uv = dirs.reshape(1, -1, 1, 3).contiguous()
        if level is None:
            out = dr.texture(levels[0][None].contiguous(), uv, filter_mode="linear", boundary_mode="cube")
        else:
            bias = level.reshape(1, -1, 1).clamp(0, len(levels) - 1).contiguous()
            out = dr.texture(levels[0][None].contiguous(), uv, mip=[m[None].contiguous() for m in levels[1:]],
                             mip_level_bias=bias, filter_mode="linear-mipmap-linear", boundary_mode="cube")
        out = out.reshape(-1, out.shape[-1])
        if order is not None:
            out = out.index_select(0, inverse)
        return out.reshape(*shape, out.shape[-1])

