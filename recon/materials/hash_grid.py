"""Multi-resolution hash encoding (Müller et al. 2022, "Instant Neural Graphics Primitives").

Two backends share one parameter tensor laid out exactly like tiny-cuda-nn's `HashGrid`
encoding, so a table trained with one backend can be evaluated with the other:

- `torch`: pure PyTorch, runs on CPU and CUDA; all levels are handled together by one gather
  from the flat table (and one scatter-add per feature in the backward pass).
- `tcnn`: `tinycudann.Encoding` (fused CUDA kernels), used for CUDA inputs when the
  `tinycudann` package imports.
- `triton`: fused Triton kernels (`hash_grid_triton.py`) for CUDA inputs with 1 to 3 dims: one
  gather-and-interpolate pass forward, atomic adds into the table (and point) gradient backward;
  same maths as `torch` up to summation order. Needs the `triton` package (shipped with CUDA
  builds of PyTorch).

Grid conventions (those of tiny-cuda-nn, see `include/tiny-cuda-nn/encodings/grid.h`):

- per-level growth b = exp((ln max_resolution - ln base_resolution) / (n_levels - 1));
- level l has scale s_l = base_resolution * b^l - 1 and R_l = ceil(s_l) + 1 vertices per axis
  (for non-integer base * b^l this is floor(base * b^l) + 1, the paper's N_l + 1);
- a point x in [0,1]^D sits at lattice position p = s_l * x + 0.5; the half-cell offset staggers
  the levels so that their cell boundaries do not align (paper, appendix A);
- a level holds min(next_multiple(R_l^D, 8), 2^log2_hashmap_size) entries; levels whose R_l^D
  vertices fit are indexed densely (x + y R + z R^2, wrapping modulo the level size), the others
  by the spatial hash (x * 1) ^ (y * 2654435761) ^ (z * 805459861) in uint32 arithmetic, modulo
  the level size;
- features are trilinearly (D-linearly) interpolated from the 2^D corners of the cell.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

BACKENDS = ("auto", "torch", "tcnn", "triton")
TRITON_LAYOUTS = ("levels", "points")  # hash_grid_triton.LAUNCH_LAYOUTS (this module imports triton lazily)


def triton_layouts(text: str) -> tuple[str, str]:
    """``triton_layout`` as (forward, backward): "levels", "points" or "FORWARD/BACKWARD" (e.g. "levels/points")."""
    names = str(text).split("/")
    names = names * 2 if len(names) == 1 else names
    if len(names) != 2 or not set(names) <= set(TRITON_LAYOUTS):
        raise ValueError(f"model.material.encoding.triton_layout={text!r}: use 'levels', 'points' or "
                         "FORWARD/BACKWARD of those, e.g. 'levels/points' (recon/materials/hash_grid_triton.py).")
    return names[0], names[1]

# tiny-cuda-nn's coherent prime hash; the first "prime" is 1 so that neighbouring x share cache lines.
_PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)

# Gathering a row of F features as one machine word is ~2x faster than gathering F-wide rows.
_WORD_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}

_tcnn_cache: dict[str, Any] = {}


def _import_tcnn() -> Any | None:
    """Return the `tinycudann` module, or None when it does not import (not installed, no CUDA)."""
    if "module" not in _tcnn_cache:
        try:
            import tinycudann  # noqa: PLC0415  (optional dependency, imports CUDA on load)

            _tcnn_cache["module"], _tcnn_cache["error"] = tinycudann, None
        except Exception as err:  # ImportError, or EnvironmentError raised when CUDA is absent
            _tcnn_cache["module"], _tcnn_cache["error"] = None, err
    return _tcnn_cache["module"]


def tcnn_available() -> bool:
    """True when `import tinycudann` works in this process."""
    return _import_tcnn() is not None


_triton_cache: dict[str, Any] = {}


def _import_triton_backend() -> Any | None:
    """Return the `hash_grid_triton` module, or None when `triton` does not import."""
    if "module" not in _triton_cache:
        try:
            from recon.materials import hash_grid_triton  # noqa: PLC0415  (imports triton)

            _triton_cache["module"], _triton_cache["error"] = hash_grid_triton, None
        except Exception as err:  # ImportError, or a triton build that fails to load
            _triton_cache["module"], _triton_cache["error"] = None, err
    return _triton_cache["module"]


def triton_available() -> bool:
    """True when the Triton backend imports (the `triton` package is installed and loads)."""
    return _import_triton_backend() is not None


def level_layout(
    n_input_dims: int,
    n_levels: int,
    log2_hashmap_size: int,
    base_resolution: int,
    per_level_scale: float,
) -> dict[str, np.ndarray]:
    """Per-level scale, resolution, table size, offset and hashing flag, as tiny-cuda-nn computes them.

    Returns numpy arrays of length n_levels: `scale` float32, `resolution`, `size`, `offset` int64,
    `hashed` bool. Scales are computed in float32 like the CUDA kernels, so that dense levels get
    the same vertex counts.
    """
    log2_scale = np.log2(np.float32(per_level_scale)).astype(np.float32)
    levels = np.arange(n_levels, dtype=np.float32)
    scale = (np.exp2(levels * log2_scale) * np.float32(base_resolution) - np.float32(1.0)).astype(np.float32)
    resolution = np.ceil(scale).astype(np.int64) + 1
    n_vertices = resolution.astype(object) ** n_input_dims  # python ints: no overflow at fine levels
    dense_size = np.array([-(-int(n) // 8) * 8 for n in n_vertices], dtype=object)
    size = np.array([min(int(n), 1 << log2_hashmap_size) for n in dense_size], dtype=np.int64)
    hashed = np.array([int(n) > int(s) for n, s in zip(n_vertices, size)], dtype=bool)
    offset = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
    return {"scale": scale, "resolution": resolution, "size": size, "offset": offset, "hashed": hashed}


class _ScaleGradient(torch.autograd.Function):
    """Identity whose backward multiplies the incoming gradient by a constant."""

    @staticmethod
    def forward(ctx, table: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return table.view_as(table)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class _InterpolateTable(torch.autograd.Function):
    """out[l,n,:] = sum_c weights[l,c,n] * table[index[l,c,n], :], with a scatter-add backward.

    A hand-written backward avoids keeping the gathered [L,C,N,F] corner values alive for autograd
    and scatters one feature column at a time, which is the fastest variant on CPU.
    """

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor, weights: Tensor, n_features: int) -> Tensor:
        ctx.save_for_backward(index, weights, table)
        ctx.n_features = n_features
        values = _gather_rows(table, index, n_features)  # [L,C,N,F]
        return (values * weights[..., None]).sum(1)  # [L,N,F]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        index, weights, table = ctx.saved_tensors
        n_features = ctx.n_features
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_table = grad_out.new_zeros(table.numel() // n_features, n_features)
            flat_index = index.reshape(-1)
            for f in range(n_features):  # one 1-D scatter per feature beats one F-wide scatter
                contrib = (weights * grad_out[:, None, :, f]).reshape(-1)
                grad_table[:, f].index_add_(0, flat_index, contrib.to(grad_table.dtype))
            grad_table = grad_table.view(table.shape)
        if ctx.needs_input_grad[2]:
            values = _gather_rows(table, index, n_features)
            grad_weights = (values * grad_out[:, None]).sum(-1)
        return grad_table, None, grad_weights, None


def _gather_rows(table: Tensor, index: Tensor, n_features: int) -> Tensor:
    """table viewed as [rows, F], gathered at index [...] -> [..., F]."""
    row_bytes = n_features * table.element_size()
    if row_bytes in _WORD_DTYPES and n_features > 1:
        words = table.view(_WORD_DTYPES[row_bytes])  # flat table: one word per row
        return words[index].view(table.dtype).view(*index.shape, n_features)
    return table.view(-1, n_features)[index]


class HashGridEncoding(nn.Module):
    """Multi-resolution hash encoding of points in the unit cube.

    x: [N, n_input_dims], finite, in [0,1]; coordinates outside are clamped onto the cube (so
    their gradient is zero). Returns [N, n_levels * n_features_per_level] in the table's dtype
    (float32; float64 for tests), level-major: features of level l are columns [l*F, (l+1)*F).

    The table is one flat parameter `params` of n_entries * n_features_per_level values with
    the layout of tiny-cuda-nn's HashGrid (level l occupies rows offset_l .. offset_l + size_l,
    features of a row contiguous), initialised uniform(-1e-4, 1e-4) as tiny-cuda-nn does.

    grad_scale multiplies the gradient that reaches the table (nvdiffrec's material network
    scales encoder gradients by 128); it is a plain attribute and may be changed at any time.
    backend: "torch", "tcnn" (needs `tinycudann` and CUDA inputs), "triton" (needs `triton`, CUDA
    inputs or TRITON_INTERPRET=1, and n_input_dims <= 3) or "auto": on CUDA inputs tcnn when the
    table is float32 and `tinycudann` imports, else triton when it imports and n_input_dims <= 3;
    torch otherwise.
    triton_layout: the Triton kernel's launch layouts, "levels", "points" or "FORWARD/BACKWARD"
    (`hash_grid_triton`'s docstring); None: that module's LAUNCH_LAYOUT (levels).
    run_levels: the Triton backward adds the table gradient of the run_levels coarsest levels once per
    run of consecutive points in one cell corner (`hash_grid_triton._runs_add`); None: that module's
    RUN_LEVELS (all levels).
    """

    def __init__(
        self,
        n_input_dims: int = 3,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        max_resolution: int = 4096,
        backend: str = "auto",
        grad_scale: float = 1.0,
        triton_layout: str | None = None,
        run_levels: int | None = None,
    ):
        super().__init__()
        self.triton_layout = None if triton_layout is None else triton_layouts(triton_layout)
        if run_levels is not None and not 0 <= run_levels <= n_levels:
            raise ValueError(f"HashGridEncoding run_levels={run_levels} must be in 0..n_levels={n_levels} (or None).")
        self.run_levels = run_levels
        if backend not in BACKENDS:
            raise ValueError(f"HashGridEncoding backend={backend!r} is not one of {BACKENDS}.")
        if backend == "tcnn" and not tcnn_available():
            raise ImportError(
                f"HashGridEncoding backend='tcnn' needs tiny-cuda-nn, which failed to import "
                f"({_tcnn_cache['error']!r}). Install it with `pip install "
                "git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch` "
                "(package tinycudann, needs CUDA), or use backend='torch' (CPU and CUDA, slower)."
            )
        if backend == "triton":
            _check_triton_backend(n_input_dims)
        if not 1 <= n_input_dims <= len(_PRIMES):
            raise ValueError(f"n_input_dims={n_input_dims} must be in 1..{len(_PRIMES)}.")
        if n_levels < 1 or n_features_per_level < 1:
            raise ValueError("n_levels and n_features_per_level must be positive.")
        if not 1 <= base_resolution <= max_resolution:
            raise ValueError(
                f"Need 1 <= base_resolution <= max_resolution, got {base_resolution} and {max_resolution}."
            )
        if not 1 <= log2_hashmap_size <= 30:
            raise ValueError(f"log2_hashmap_size={log2_hashmap_size} must be in 1..30.")

        self.n_input_dims = n_input_dims
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.log2_hashmap_size = log2_hashmap_size
        self.base_resolution = base_resolution
        self.max_resolution = max_resolution
        self.backend = backend
        self.grad_scale = float(grad_scale)
        if n_levels > 1:
            log_ratio = math.log(max_resolution) - math.log(base_resolution)
            self.per_level_scale = math.exp(log_ratio / (n_levels - 1))
        else:
            self.per_level_scale = 1.0

        layout = level_layout(
            n_input_dims, n_levels, log2_hashmap_size, base_resolution, self.per_level_scale
        )
        # Resolutions never decrease with the level, so dense levels form a prefix.
        self.n_dense_levels = int((~layout["hashed"]).sum())
        assert not layout["hashed"][: self.n_dense_levels].any()
        self.n_entries = int(layout["offset"][-1] + layout["size"][-1])

        # Per-dimension multipliers: strides R^d for dense levels, hash primes for the others.
        resolution = layout["resolution"]
        multipliers = np.zeros((n_levels, n_input_dims), dtype=np.int64)
        for level in range(n_levels):
            if layout["hashed"][level]:
                multipliers[level] = _PRIMES[:n_input_dims]
            else:
                multipliers[level] = [int(resolution[level]) ** d for d in range(n_input_dims)]
        self.register_buffer("level_scale", torch.from_numpy(layout["scale"]), persistent=False)
        self.register_buffer("level_resolution", torch.from_numpy(resolution), persistent=False)
        self.register_buffer("level_size", torch.from_numpy(layout["size"]), persistent=False)
        self.register_buffer("level_offset", torch.from_numpy(layout["offset"]), persistent=False)
        self.register_buffer("level_hashed", torch.from_numpy(layout["hashed"]), persistent=False)
        self.register_buffer("level_multiplier", torch.from_numpy(multipliers), persistent=False)
        # Dense levels: row offset of corner c from its cell's first corner, sum_d ((c >> d) & 1) R^d.
        corner_bits = (np.arange(2**n_input_dims)[:, None] >> np.arange(n_input_dims)) & 1  # [C,D]
        dense_corner_offset = multipliers[: self.n_dense_levels] @ corner_bits.T  # [Ld,C]
        self.register_buffer("dense_corner_offset", torch.from_numpy(dense_corner_offset), persistent=False)

        self.params = nn.Parameter(torch.empty(self.n_entries * n_features_per_level))
        self.reset_parameters()
        self._tcnn_modules: dict[torch.device, Any] = {}

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.params, -1e-4, 1e-4)

    def level_table(self, level: int) -> Tensor:
        """View of level `level`'s rows of the table: [size_l, F]."""
        start = int(self.level_offset[level])
        rows = self.params.view(-1, self.n_features_per_level)
        return rows[start : start + int(self.level_size[level])]

    def tcnn_config(self) -> dict:
        """The equivalent tiny-cuda-nn encoding config."""
        return {
            "otype": "HashGrid",
            "n_levels": self.n_levels,
            "n_features_per_level": self.n_features_per_level,
            "log2_hashmap_size": self.log2_hashmap_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale,
        }

    def extra_repr(self) -> str:
        return (
            f"n_input_dims={self.n_input_dims}, n_levels={self.n_levels}, "
            f"n_features_per_level={self.n_features_per_level}, log2_hashmap_size={self.log2_hashmap_size}, "
            f"resolution={self.base_resolution}..{self.max_resolution}, dense_levels={self.n_dense_levels}, "
            f"backend={self.backend!r}, grad_scale={self.grad_scale}, triton_layout={self.triton_layout}, "
            f"run_levels={self.run_levels}"
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_tcnn_modules"] = {}  # native CUDA objects are rebuilt on demand
        return state

    def corner_indices(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Table rows and interpolation weights of the cell corners around each point.

        x: [N, D] finite, in [0,1] (clamped). Returns index [L, 2^D, N] int64, rows of the [n_entries, F]
        table, and weights [L, 2^D, N] in the table's dtype (summing to 1 over the corners).
        Corner c takes vertex offset (c >> d) & 1 along dimension d. Differentiable w.r.t. x
        through the weights.
        """
        dtype = self.params.dtype
        n_dims, n_levels = self.n_input_dims, self.n_levels
        # Level-major layout [L,...,N]: consecutive lookups stay within one level's rows (cache).
        xt = x.to(dtype).clamp(0.0, 1.0).t().contiguous()  # [D,N]
        pos = xt[None] * self.level_scale.to(dtype)[:, None, None] + 0.5  # [L,D,N]
        cell = pos.detach().long()  # pos >= 0.5, so truncation is floor
        frac = pos - cell.to(dtype)

        index = torch.empty(n_levels, 2**n_dims, x.shape[0], dtype=torch.int64, device=x.device)
        n_dense = self.n_dense_levels
        if n_dense > 0:
            # Dense: x + y R + z R^2 = (cell index) + (corner offset), wrapping modulo the level size
            # like tiny-cuda-nn (the half-cell shift lets the last corner run one vertex past the grid).
            base = (cell[:n_dense] * self.level_multiplier[:n_dense, :, None]).sum(1)  # [Ld,N]
            dense = torch.add(base[:, None, :], self.dense_corner_offset[:, :, None], out=index[:n_dense])
            size = self.level_size[:n_dense, None, None]
            dense -= (dense >= size) * size  # index < 2 * size, so one subtraction is a modulo
        if n_dense < n_levels:
            # Hashed: XOR of uint32 products vertex_d * prime_d, modulo 2^log2_hashmap_size. Masking
            # the int64 products to the low log2_hashmap_size (<= 30) bits gives the same bits.
            mask = (1 << self.log2_hashmap_size) - 1
            primes = self.level_multiplier[n_dense:, :, None]  # [Lh,D,1]
            term0 = cell[n_dense:] * primes
            terms = torch.stack([term0, term0 + primes], dim=2) & mask  # [Lh,D,2,N]
            index[n_dense:] = _combine_corners(terms, torch.bitwise_xor)
        index += self.level_offset[:, None, None]
        weights = _combine_corners(torch.stack([1.0 - frac, frac], dim=2), torch.mul)
        assert index.shape == (n_levels, 2**n_dims, x.shape[0])
        return index, weights

    def forward(self, x: Tensor, row_mask: Tensor | None = None) -> Tensor:
        """Encode x [N, D] in [0,1] (clamped) -> [N, n_levels * n_features_per_level].

        row_mask: [N] bool, the points to encode (None: all); the others give zero rows and no gradient. The Triton
        kernels skip them (no table reads, no atomic adds), the other backends zero them after encoding all."""
        if x.ndim != 2 or x.shape[1] != self.n_input_dims:
            raise ValueError(f"Expected x of shape [N, {self.n_input_dims}], got {list(x.shape)}.")
        if row_mask is not None and (row_mask.dtype != torch.bool or row_mask.shape != (x.shape[0],)):
            raise ValueError(f"row_mask must be a bool tensor [{x.shape[0]}], got {row_mask.dtype} {list(row_mask.shape)}.")
        table = self.params
        if table.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"HashGridEncoding table is {table.dtype}; keep it float32 (lattice positions need "
                "float32 precision at fine levels) and use torch.autocast for mixed precision."
            )
        if self._use_triton(x):  # scales the table gradient inside its backward kernel
            return self._forward_triton(x, row_mask)
        if self.grad_scale != 1.0 and table.requires_grad and torch.is_grad_enabled():
            table = _ScaleGradient.apply(table, self.grad_scale)
        if self._use_tcnn(x) and x.shape[0] > 0:
            out = self._forward_tcnn(x, table)
        else:
            index, weights = self.corner_indices(x)
            out = _InterpolateTable.apply(table, index, weights, self.n_features_per_level)  # [L,N,F]
            out = out.permute(1, 0, 2).reshape(x.shape[0], self.n_output_dims)
        return out if row_mask is None else out * row_mask[:, None]

    # tiny-cuda-nn backend ---------------------------------------------------------------------

    def _use_tcnn(self, x: Tensor) -> bool:
        if self.backend in ("torch", "triton"):
            return False
        if self.backend == "auto":
            return x.is_cuda and self.params.dtype == torch.float32 and tcnn_available()
        if not x.is_cuda:
            raise ValueError(
                "HashGridEncoding backend='tcnn' needs CUDA inputs, got a tensor on "
                f"{x.device}. Use backend='torch' or backend='auto' on this device."
            )
        if self.params.dtype != torch.float32:
            raise ValueError(
                f"HashGridEncoding backend='tcnn' needs a float32 table, got {self.params.dtype}. "
                "Use backend='torch'."
            )
        return True

    def _forward_tcnn(self, x: Tensor, table: Tensor) -> Tensor:
        tcnn = _import_tcnn()
        encoding = self._tcnn_modules.get(x.device)
        if encoding is None:
            with torch.cuda.device(x.device):
                encoding = tcnn.Encoding(self.n_input_dims, self.tcnn_config(), dtype=torch.float32)
            if encoding.params.numel() != table.numel():
                raise RuntimeError(
                    f"tinycudann HashGrid has {encoding.params.numel()} parameters, recon's layout "
                    f"{table.numel()}; this tinycudann version is not supported, use backend='torch'."
                )
            del encoding.params  # its own initial table is never used: ours is passed in below
            self._tcnn_modules[x.device] = encoding
        # Call tinycudann's autograd function with our table (tcnn.Module.forward would use its own).
        from tinycudann import modules as tcnn_modules  # noqa: PLC0415

        n = x.shape[0]
        granularity = int(tcnn_modules._C.batch_size_granularity())
        padded = -(-n // granularity) * granularity
        x_in = x.clamp(0.0, 1.0).float()
        if padded != n:
            x_in = torch.nn.functional.pad(x_in, [0, 0, 0, padded - n])
        out = tcnn_modules._module_function.apply(
            encoding.native_tcnn_module, x_in.contiguous(), table.contiguous(), encoding.loss_scale
        )
        return out[:n, : self.n_output_dims].float()

    # Triton backend ---------------------------------------------------------------------------

    def _use_triton(self, x: Tensor) -> bool:
        if self.backend == "auto":
            return (
                x.is_cuda
                and self.n_input_dims <= 3
                and not self._use_tcnn(x)
                and triton_available()
            )
        if self.backend != "triton":
            return False
        module = _check_triton_backend(self.n_input_dims)
        if not x.is_cuda and not module.interpreting():
            raise ValueError(
                "HashGridEncoding backend='triton' needs CUDA inputs, got a tensor on "
                f"{x.device}. Use backend='torch' or backend='auto' on this device (or set "
                "TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter, for testing)."
            )
        return True

    def _forward_triton(self, x: Tensor, row_mask: Tensor | None = None) -> Tensor:
        table = self.params
        grad_scale = self.grad_scale if table.requires_grad and torch.is_grad_enabled() else 1.0
        return _import_triton_backend().hash_grid_encode(
            x, table, self.level_scale, self.level_multiplier, self.level_size, self.level_offset,
            self.n_dense_levels, self.n_features_per_level, grad_scale, launch_layout=self.triton_layout,
            run_levels=self.run_levels, row_mask=row_mask,
        )


def _check_triton_backend(n_input_dims: int) -> Any:
    """The `hash_grid_triton` module, or a clear error when backend='triton' cannot run."""
    module = _import_triton_backend()
    if module is None:
        raise ImportError(
            "HashGridEncoding backend='triton' needs the `triton` package, which failed to import "
            f"({_triton_cache['error']!r}). Install it with `pip install triton` (CUDA builds of "
            "PyTorch ship it), or use backend='torch' (CPU and CUDA, slower)."
        )
    if n_input_dims > module.MAX_INPUT_DIMS:
        raise ValueError(
            f"HashGridEncoding backend='triton' handles n_input_dims <= {module.MAX_INPUT_DIMS}, got "
            f"{n_input_dims}. Use backend='torch' or backend='auto'."
        )
    return module


def _combine_corners(terms: Tensor, op) -> Tensor:
    """[L,D,2,N] per-dimension terms -> [L,2^D,N], combining one term per dimension with `op`.

    Corner c uses term (c >> d) & 1 of dimension d (x varies fastest, as in tiny-cuda-nn).
    """
    n_levels, n_dims, _, n = terms.shape
    out = terms[:, 0]  # [L,2,N]
    for d in range(1, n_dims):  # loop over dimensions, not levels
        out = op(terms[:, d, :, None, :], out[:, None, :, :]).reshape(n_levels, 2 ** (d + 1), n)
    return out
