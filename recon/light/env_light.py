"""Learnable HDR environment light (nvdiffrec): cube map, GGX-prefiltered mip chain, split-sum shading.

Cube-map convention and lookups: `recon.render.cube`.
Lat-long images are [H,2H,C], row 0 looking up (+y), column 0 and 2H-1 looking along +z, the centre along -z
(nvdiffrec's probe.hdr layout): dir = (sin(theta) sin(phi), cos(theta), -sin(theta) cos(phi)).
Everything here is plain torch, differentiable w.r.t. the cube, on whatever device the module lives.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from recon.compiled import fused
from recon.cuda_graphs import GraphCache
from recon.light.bsdf import ggx_lut, ggx_ndf, hammersley, importance_sample_ggx, lookup_lut
from recon.render.cube import cube_taps, cube_to_dir, dir_to_cube, normalize, sample_cube, sample_cube_mips
from recon.sparse import SparseOperator


def _read_probe(path: str) -> Tensor:
    """A lat-long Radiance .hdr probe [H,2H,3] (recon's probe.hdr layout) for ``light.init=PATH``."""
    from pathlib import Path

    from recon.export.hdr import read_hdr

    p = Path(path).expanduser()
    if p.suffix.lower() != ".hdr":
        raise ValueError(f"model.light.init={path!r}: use 'constant', 'random' or the path of a lat-long .hdr probe.")
    if not p.is_file():
        raise FileNotFoundError(f"model.light.init={path!r}: no such .hdr probe (give an absolute path or one relative "
                                "to the directory train.py runs in).")
    img = read_hdr(p)
    if img.shape[1] != 2 * img.shape[0]:
        raise ValueError(f"{p} is {img.shape[1]}x{img.shape[0]}: a lat-long probe is twice as wide as high.")
    return img


class _OperatorCache:
    """Holds a derived operator (the sparse prefilter, the dense irradiance weights) and the key it was built for;
    copies and pickles start empty (sparse CSR tensors neither deep-copy nor need to travel: rebuilt on first use)."""

    def __init__(self) -> None:
        self.key, self.value = None, None

    def __deepcopy__(self, memo) -> "_OperatorCache":
        return _OperatorCache()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def cube_texel_solid_angle(res: int, device: torch.device | str | None = None) -> Tensor:
    """Exact solid angle of each texel of a res^2 cube face: [R,R] sr (six faces sum to 4*pi)."""
    e = torch.linspace(-1, 1, res + 1, dtype=torch.float64, device=device)

    def area(x: Tensor, y: Tensor) -> Tensor:  # solid angle of the face rectangle [0,x]x[0,y]
        return torch.atan2(x * y, torch.sqrt(x * x + y * y + 1))

    y, x = torch.meshgrid(e, e, indexing="ij")
    a = area(x, y)
    return (a[1:, 1:] - a[:-1, 1:] - a[1:, :-1] + a[:-1, :-1]).abs().float()


def avg_pool_cube(cube: Tensor) -> Tensor:
    """2x2 average pooling of every face: [6,R,R,C] -> [6,R/2,R/2,C]."""
    f, r, _, c = cube.shape
    return cube.reshape(f, r // 2, 2, r // 2, 2, c).mean(dim=(2, 4))


def _tangent_frame(n: Tensor) -> tuple[Tensor, Tensor]:
    """Two unit tangents orthogonal to unit normals n [...,3] (branchless frame of Duff et al. 2017)."""
    x, y, z = n.unbind(-1)
    sign = torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))
    a = -1 / (sign + z)
    b = x * y * a
    t = torch.stack((1 + sign * x * x * a, sign * b, -sign * x), dim=-1)
    bt = torch.stack((b, sign + y * y * a, -y), dim=-1)
    return t, bt


def latlong_dirs(height: int, device: torch.device | str | None = None) -> Tensor:
    """Directions through the pixel centres of a [H,2H] lat-long image: [H,2H,3]."""
    theta = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height * math.pi
    phi = ((torch.arange(2 * height, dtype=torch.float32, device=device) + 0.5) / height - 1) * math.pi
    theta, phi = torch.meshgrid(theta, phi, indexing="ij")
    return torch.stack((theta.sin() * phi.sin(), theta.cos(), -theta.sin() * phi.cos()), dim=-1)


def sample_latlong(img: Tensor, dirs: Tensor) -> Tensor:
    """Bilinear lookup of a lat-long image [H,W,C] along dirs [...,3] -> [...,C] (wraps in longitude)."""
    h, w, ch = img.shape
    d = normalize(dirs)
    u = torch.atan2(d[..., 0], -d[..., 2]) / (2 * math.pi) + 0.5
    v = torch.acos(d[..., 1].clamp(-1, 1)) / math.pi
    x = u * w - 0.5
    y = (v * h - 0.5).clamp(0, h - 1)
    x0, y0 = x.floor(), y.floor().clamp(max=max(h - 2, 0))
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    x0 = x0.long() % w
    x1 = (x0 + 1) % w
    y0 = y0.long()
    y1 = (y0 + 1).clamp(max=h - 1)
    return (img[y0, x0] * (1 - fx) + img[y0, x1] * fx) * (1 - fy) + (img[y1, x0] * (1 - fx) + img[y1, x1] * fx) * fy


def _mip_level(roughness: Tensor, n_levels: int, min_roughness: float, max_roughness: float) -> Tensor:
    """Fractional specular mip level for roughness [...] (nvdiffrec's ``get_mip``): linear in roughness over the
    prefiltered levels 0..n-2, then towards the roughness-1 level n-1."""
    if n_levels == 1:
        return torch.zeros_like(roughness)
    lo = (roughness.clamp(min_roughness, max_roughness) - min_roughness) / (max_roughness - min_roughness) * max(
        n_levels - 2, 0)
    hi = (roughness.clamp(max_roughness, 1.0) - max_roughness) / (1.0 - max_roughness) + n_levels - 2
    return torch.where(roughness < max_roughness, lo, hi).clamp(0, n_levels - 1)


@fused
def _split_sum_inputs(pos: Tensor, n: Tensor, kd: Tensor, arm: Tensor, view_pos: Tensor, specular: bool,
                      n_levels: int, min_roughness: float, max_roughness: float):
    """What the lookups of `EnvironmentLight.shade` need: diffuse and specular colours, n.v, the reflected
    direction and the specular mip level (the last four None without ``specular``)."""
    if not specular:
        return kd, None, None, None, None
    wo = normalize(view_pos - pos)
    roughness, metallic = arm[..., 1:2], arm[..., 2:3]
    spec_col = (1 - metallic) * 0.04 + kd * metallic
    diff_col = kd * (1 - metallic)
    n_dot_v = (wo * n).sum(-1, keepdim=True).clamp_min(1e-4)
    reflvec = normalize(2 * n_dot_v * n - wo)
    mip = _mip_level(roughness, n_levels, min_roughness, max_roughness)[..., 0]
    return diff_col, spec_col, n_dot_v, reflvec, mip


@fused
def _split_sum_combine(irradiance: Tensor, diff_col: Tensor, spec: Tensor | None, spec_col: Tensor | None,
                       fg: Tensor | None, arm: Tensor) -> Tensor:
    """(irradiance * diffuse colour + prefiltered * (F0 * scale + bias)) * (1 - occlusion)."""
    shaded = irradiance * diff_col
    if spec is not None:
        shaded = shaded + spec * (spec_col * fg[..., 0:1] + fg[..., 1:2])
    return shaded * (1 - arm[..., 0:1])


class EnvironmentLight(nn.Module):
    """nvdiffrec's learnable environment light: an HDR cube map shading with the split-sum approximation.

    Call `build_mips()` after every change of `base` (once per optimiser step) and before `shade()`.
    Mip level l of the specular chain has resolution base_res / 2^l down to min_res (L levels). Level 0 is the
    raw base map (standing in for min_roughness, whose lobe is a few texels wide at 512^2); levels 1..L-2 are
    GGX-prefiltered for roughness linearly spaced in [min_roughness, max_roughness]; the last level holds
    roughness 1, and roughness between max_roughness and 1 interpolates towards it (nvdiffrec's `get_mip`).
    """

    def __init__(
        self,
        base_res: int = 512,
        min_res: int = 16,
        min_roughness: float = 0.08,
        max_roughness: float = 0.5,
        init: str | Tensor = "constant",
        init_value: float = 0.5,
        prefilter_samples: int = 32,
        diffuse_res: int = 16,
        lut_resolution: int = 256,
        lut_samples: int = 512,
        trainable: bool = True,
    ) -> None:
        super().__init__()
        probe = None
        if isinstance(init, str) and init not in ("constant", "random"):
            probe = _read_probe(init)
            init = "constant"
        if isinstance(init, Tensor):
            base = init.detach().float().clone()
            if base.dim() != 4 or base.shape[0] != 6 or base.shape[1] != base.shape[2]:
                raise ValueError(f"light init tensor must be a cube map [6,R,R,3], got {tuple(base.shape)}")
            base_res = base.shape[1]
        elif init == "constant":
            base = torch.full((6, base_res, base_res, 3), float(init_value))
        elif init == "random":  # nvdiffrec's default start: uniform in [0.25, 0.75]
            base = torch.rand(6, base_res, base_res, 3) * 0.5 + 0.25
        else:
            raise ValueError(f"light init={init!r} is not known: use 'constant', 'random' or a [6,R,R,3] tensor.")
        if base_res & (base_res - 1) or min_res & (min_res - 1) or min_res > base_res:
            raise ValueError(f"light base_res={base_res} and min_res={min_res} must be powers of two, min <= base.")
        self.base = nn.Parameter(base, requires_grad=bool(trainable))
        self.min_res, self.min_roughness, self.max_roughness = min_res, min_roughness, max_roughness
        self.prefilter_samples, self.diffuse_res = prefilter_samples, min(diffuse_res, min_res)
        self.register_buffer("lut", ggx_lut(lut_resolution, lut_samples).clone(), persistent=False)
        self.specular: list[Tensor] | None = None
        self.diffuse: Tensor | None = None
        self._operator = _OperatorCache()  # the prefilter as a sparse matrix, see `_prefilter_operator`
        self._irradiance_weights = _OperatorCache()  # the diffuse convolution as a dense matrix, see `_irradiance`
        self._graphs = GraphCache()  # build_mips' CUDA graphs (recon.cuda_graphs)
        if probe is not None:
            self.from_latlong(probe)

    @property
    def trainable(self) -> bool:
        """Whether the fit learns the light (False: a known probe, fixed, as nvdiffrec's ``lock_light``)."""
        return self.base.requires_grad

    @property
    def num_levels(self) -> int:
        return int(math.log2(self.base.shape[1] // self.min_res)) + 1

    def level_roughness(self, level: int) -> float:
        """Roughness that specular mip `level` is prefiltered for."""
        n = self.num_levels
        if level == n - 1 and n > 1:
            return 1.0
        if n <= 2:
            return self.min_roughness
        return self.min_roughness + (self.max_roughness - self.min_roughness) * level / (n - 2)

    def get_mip(self, roughness: Tensor) -> Tensor:
        """Fractional specular mip level for roughness [...] (nvdiffrec's mapping)."""
        return _mip_level(roughness, self.num_levels, self.min_roughness, self.max_roughness)

    def _prefilter_taps(self, chain_res: list[int], offsets: list[int], level: int, roughness: float,
                        device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """GGX convolution of level `level` (N = V = R per texel) as sparse weights on the pooled chain.

        Karis' filtered importance sampling: a sample of pdf p covers 1/(S p) sr; it is read from the pooled
        level whose texels have about that solid angle, so few fixed samples give a smooth, unbiased-ish blur.
        Returns (rows, cols, weights): output texel of the level, texel of the concatenated chain (`offsets`
        give where each level starts), weight; sorted by (row, column) without repeats; a row's weights sum to one.
        Each sample is read bilinearly inside the face it hits (`cube_taps`), as on every backend.
        """
        res = chain_res[level]
        n_samples = int(max(self.prefilter_samples, min(1024, 2**17 // (6 * res * res))))
        h = importance_sample_ggx(hammersley(n_samples, device), roughness)  # [S,3] tangent space
        l_t = 2 * h[:, 2:3] * h - torch.tensor([0.0, 0.0, 1.0], device=device)  # reflect N about H, V = N
        n_dot_l = l_t[:, 2]
        keep = n_dot_l > 1e-4
        h, l_t, n_dot_l = h[keep], l_t[keep], n_dot_l[keep]
        pdf = ggx_ndf(h[:, 2], roughness) / 4  # D * n_dot_h / (4 v_dot_h) with v = n
        omega_s = 1 / (n_samples * pdf)
        omega_p = 4 * math.pi / (6 * res * res)
        lod = (0.5 * torch.log2(omega_s / omega_p) + 1).clamp_min(0).round().long()
        src_level = (level + lod).clamp(max=len(chain_res) - 1)
        weight = n_dot_l / n_dot_l.sum()

        n = cube_to_dir(res, device).reshape(-1, 3)
        t, b = _tangent_frame(n)
        rows, cols, vals = [], [], []
        n_cols = sum(6 * r * r for r in chain_res)
        chunk = max(1, 2**19 // max(1, h.shape[0]))  # ~2M taps at a time: small transients even at 512^2
        for k in range(0, n.shape[0], chunk):
            tk, bk, nk = t[k : k + chunk, None], b[k : k + chunk, None], n[k : k + chunk, None]
            dirs = tk * l_t[None, :, 0:1] + bk * l_t[None, :, 1:2] + nk * l_t[None, :, 2:3]  # [n,S,3]
            face, uv = dir_to_cube(dirs)
            idx = torch.empty(*dirs.shape[:2], 4, dtype=torch.long, device=device)
            w = torch.empty(*dirs.shape[:2], 4, device=device)
            for src in src_level.unique().tolist():
                sel = src_level == src
                i, wi = cube_taps(chain_res[src], face[:, sel], uv[:, sel])
                idx[:, sel], w[:, sel] = i + offsets[src], wi
            # merge taps that hit the same texel (most, at low roughness): sorted by (row, column), unique
            key = (torch.arange(k, k + dirs.shape[0], device=device)[:, None, None] * n_cols + idx).reshape(-1)
            key, inverse = torch.unique(key, return_inverse=True)
            rows.append((key // n_cols).int())  # 32-bit: < 2^31 texels in any chain recon builds
            cols.append((key % n_cols).int())
            vals.append(torch.zeros(key.shape[0], device=device).index_add_(0, inverse, (w * weight[None, :, None]).reshape(-1)))
        return torch.cat(rows), torch.cat(cols), torch.cat(vals)

    def _prefilter_operator(self, chain_res: list[int], device: torch.device, dtype: torch.dtype) -> SparseOperator:
        """The prefiltering of levels 1..L-1 as one sparse operator on the concatenated pooled chain.

        Prefiltering is linear in the light and its samples are fixed, so the matrix is built once per resolution
        and device (a few seconds at 512^2 on a CPU, well under one on a GPU) and every `build_mips` is one sparse
        product, forward and backward, instead of millions of direction computations per step.
        """
        key = (tuple(chain_res), device, dtype)
        if self._operator.key == key:
            return self._operator.value
        sizes = [6 * r * r for r in chain_res]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        rows, cols, vals, row0 = [], [], [], 0
        with torch.no_grad():
            for lv in range(1, len(chain_res)):
                r, c, v = self._prefilter_taps(chain_res, offsets, lv, self.level_roughness(lv), device)
                rows.append(r + row0)
                cols.append(c)
                vals.append(v)
                row0 += sizes[lv]
            shape = (row0, sum(sizes))
            rows, cols, vals = torch.cat(rows), torch.cat(cols), torch.cat(vals).to(dtype)
            op = SparseOperator.from_sorted(rows, cols, vals, shape)
        self._operator.key, self._operator.value = key, op
        return op

    def _irradiance(self, cube: Tensor) -> Tensor:
        """Cosine-weighted convolution (normalised so a constant map stays constant) at the cube's resolution."""
        res = cube.shape[1]
        key = (res, str(cube.device), cube.dtype)
        if self._irradiance_weights.key != key:  # a constant of the resolution: built once, not every step
            dirs = cube_to_dir(res, cube.device).reshape(-1, 3)
            w = (dirs @ dirs.T).clamp_min(0) * cube_texel_solid_angle(res, cube.device).repeat(6, 1, 1).reshape(1, -1)
            w = w / w.sum(-1, keepdim=True)  # the quadrature of int cos dw = pi, exact for constant light
            self._irradiance_weights.key, self._irradiance_weights.value = key, w.to(cube.dtype)
        return (self._irradiance_weights.value @ cube.reshape(-1, cube.shape[-1])).reshape(cube.shape)

    def build_mips(self) -> None:
        """Rebuild the specular mip chain and diffuse irradiance cube from `base` (differentiably; while training on
        CUDA through CUDA graphs, `recon.cuda_graphs`: the chain's shapes never change)."""
        levels = self._graphs.call("light mips", self._mip_chain, self.base)
        self.specular, self.diffuse = [self.base, *levels[:-1]], levels[-1]

    @contextlib.contextmanager
    def using(self, specular: Sequence[Tensor], diffuse: Tensor, lut: Tensor) -> Iterator[None]:
        """Shade with these mips and BSDF table instead of the light's own for the block (then restore them): a
        function captured as a CUDA graph reads the tensors it is given, not the ones the light holds then."""
        saved = self.specular, self.diffuse, self.lut
        self.specular, self.diffuse, self.lut = list(specular), diffuse, lut
        try:
            yield
        finally:
            self.specular, self.diffuse, self.lut = saved

    def _mip_chain(self, base: Tensor) -> tuple[Tensor, ...]:
        """Specular levels 1..L-1 and the diffuse irradiance cube of cube map ``base``."""
        pooled = [base]
        while pooled[-1].shape[1] > self.min_res:
            pooled.append(avg_pool_cube(pooled[-1]))
        specular = []
        if len(pooled) > 1:
            ch = base.shape[-1]
            op = self._prefilter_operator([p.shape[1] for p in pooled], base.device, base.dtype)
            out = op(torch.cat([p.reshape(-1, ch) for p in pooled]))
            sizes = [6 * p.shape[1] ** 2 for p in pooled[1:]]
            specular = [o.reshape(p.shape) for o, p in zip(out.split(sizes), pooled[1:])]
        diff_src = pooled[-1]
        while diff_src.shape[1] > self.diffuse_res:
            diff_src = avg_pool_cube(diff_src)
        return (*specular, self._irradiance(diff_src))

    def shade(
        self, gb_pos: Tensor, gb_normal: Tensor, kd: Tensor, arm: Tensor, view_pos: Tensor, specular: bool = True,
        rasterizer=None,
    ) -> Tensor:
        """Split-sum shading (nvdiffrec's `EnvironmentLight.shade`).

        gb_pos, gb_normal: [...,3] world space, normals unit length. kd: [...,3] albedo, linear RGB.
        arm: [...,3] occlusion, roughness, metallic. view_pos: camera position, [...,3] or [B,3] for [B,...,3]
        G-buffers. Returns [...,3] linear HDR radiance:
            (irradiance(N) * kd * (1-metallic) + prefiltered(R, roughness) * (F0 * scale + bias)) * (1 - occlusion)
        with F0 = lerp(0.04, kd, metallic); the whole sum is scaled by 1 - occlusion as nvdiffrec does (its
        `ks.x`). With specular=False the diffuse term uses kd unscaled by metallic, as nvdiffrec.
        rasterizer: a `Rasterizer` whose `cube_texture` / `texture` do the cube-map and BSDF-table lookups (nvdiffrast's
        kernels on CUDA: one launch for all specular levels); None: the PyTorch lookups of `recon.render.cube`.
        """
        if self.specular is None or self.diffuse is None:
            raise RuntimeError("EnvironmentLight.shade needs mips: call light.build_mips() after each base update.")
        if view_pos.dim() == 2 and gb_pos.dim() > 2 and view_pos.shape[0] == gb_pos.shape[0]:
            view_pos = view_pos.reshape(view_pos.shape[0], *([1] * (gb_pos.dim() - 2)), 3)
        levels = self.mip_levels
        # a slice of the material's channels would carry its storage offset into the compiled functions' guards,
        # where dynamic shapes tie it to a size of 3: pass 2's texture channels would then compile them again
        arm = arm.clone(memory_format=torch.contiguous_format) if arm.storage_offset() else arm
        diff_col, spec_col, n_dot_v, reflvec, mip = _split_sum_inputs(gb_pos, gb_normal, kd, arm, view_pos, specular,
                                                                      *levels)
        if not specular:
            irradiance = (sample_cube_mips if rasterizer is None else rasterizer.cube_texture)([self.diffuse], gb_normal)
            return _split_sum_combine(irradiance, diff_col, None, None, None, arm)
        irradiance, fg, spec = self.lookups(gb_normal, arm[..., 1:2], n_dot_v, reflvec, mip, rasterizer)
        return _split_sum_combine(irradiance, diff_col, spec, spec_col, fg, arm)

    def lookups(self, normal: Tensor, roughness: Tensor, n_dot_v: Tensor, reflvec: Tensor, mip: Tensor,
                rasterizer=None) -> tuple[Tensor, Tensor, Tensor]:
        """The three lookups of split-sum shading: irradiance along ``normal`` [...,3], the BSDF table's (scale,
        bias) [...,2] at (n.v, roughness) ([...,1] each) and the prefiltered light along ``reflvec`` [...,3] at the
        fractional ``mip`` level [...]. rasterizer: as in `shade`."""
        cube_lookup = sample_cube_mips if rasterizer is None else rasterizer.cube_texture
        irradiance = cube_lookup([self.diffuse], normal)
        if rasterizer is None:
            fg = lookup_lut(self.lut, n_dot_v[..., 0], roughness[..., 0])
        else:  # the table's rows are n.v, its columns roughness: uv = (roughness, n.v)
            uv = torch.cat([roughness, n_dot_v], -1).reshape(1, -1, 1, 2)
            fg = rasterizer.texture(self.lut[None], uv, filter_mode="linear", boundary_mode="clamp")
            fg = fg.reshape(*roughness.shape[:-1], -1)
        return irradiance, fg, cube_lookup(self.specular, reflvec, mip)

    @property
    def mip_levels(self) -> tuple[int, float, float]:
        """(levels of the specular chain, min_roughness, max_roughness): what the mip-level mapping needs."""
        return self.num_levels, self.min_roughness, self.max_roughness

    def regularizer(self) -> Tensor:
        """nvdiffrec's white-balance prior: mean |base - grey(base)| (penalises coloured light)."""
        return torch.mean(torch.abs(self.base - self.base.mean(dim=-1, keepdim=True)))

    @torch.no_grad()
    def clamp_(self, min: float | None = 0.0, max: float | None = None) -> None:  # noqa: A002 (torch's names)
        """Clamp the base radiance in place (nvdiffrec clamps to >= 0 after each step)."""
        self.base.clamp_(min=min, max=max)

    @torch.no_grad()
    def to_latlong(self, height: int = 256) -> Tensor:
        """Base cube as a lat-long image [H,2H,3] (linear HDR), e.g. for writing probe.hdr."""
        return sample_cube(self.base, latlong_dirs(height, self.base.device))

    @torch.no_grad()
    def from_latlong(self, img: Tensor) -> None:
        """Set the base cube from a lat-long image [H,2H,3] (linear HDR); call build_mips() afterwards."""
        dirs = cube_to_dir(self.base.shape[1], self.base.device)
        self.base.copy_(sample_latlong(img.to(self.base), dirs))
