"""Will the fit fit? Its peak memory estimated from the config before any step, compared with what is free.

``python -m recon.resources [key=value ...] [--json]`` (or ``recon estimate ...``) prints the estimate of a config,
term by term, with the memory free on its device; exit status 1 when the fit would be refused.

The model is additive, per process, and its peak is the largest of three phases:

    setup:  FIXED + frames + hash grid + tet grid + light + a light prefilter operator being built (at the first
            step, and again when the evaluation loads the exported probe while the trained light keeps its own)
    pass 1: FIXED + frames + hash grid + light + tet grid + PIXEL_BYTES[hash backend] x (B x H x W)
    pass 2: FIXED + frames + hash grid + light + tet grid + texture + PASS2_PIXEL_BYTES x (B x H x W)

``frames`` are the training and validation views held on the training device (``data.resident``; on a CPU always),
B x H x W the pixels one process renders per step. On CUDA the estimate is ``torch.cuda.max_memory_allocated``
(what ``timing.json`` reports as ``peak_gpu_memory_bytes``) and is compared with ``torch.cuda.mem_get_info``; on a
CPU it is the process's peak resident memory (``bench/run.py``'s ``peak_host_memory_bytes``), compared with the
host's available memory. The coefficients come from the benchmark runs in ``bench/results/`` and from counting
bytes; each constant says which.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recon.callbacks.failure_report import MEMORY_SETTINGS, FitFailure
from recon.compiled import mode_name
from recon.optional import triton_importable

GIB = 2**30

# -- counted -------------------------------------------------------------------------------------------------------
FRAME_BYTES_PER_PIXEL = 16          # resident RGBA float32 frames: 4 channels x 4 bytes
HASH_TABLE_BYTES_PER_ENTRY = 4 * 4  # per feature: float32 value, gradient and Adam's two moments
TEXTURE_BYTES_PER_TEXEL = 200       # pass 2's [R,R,9] float32 texture: value, gradient, two Adam moments (144 B),
#                                     its mip chain and the chain's gradient (+1/3 of 72 B), and the bake's UV G-buffer
BAKE_BYTES_PER_TEXEL = 64           # a bake without pass 2 (pass2_steps=0): the [R,R,9] result and the UV G-buffer
# -- measured on the CPU with the modules alone (peak resident memory growth of two forward/backward/Adam steps) ----
TET_BYTES_PER_CELL = 488            # DMTetGeometry(tet_grid=128) built and stepped: 1.02 GB / 128^3 cells (the [6G^3,4]
#                                     int64 tet table alone is 192 B per cell; on CUDA with model.geometry.lattice_kernel
#                                     that table is never built, so there this over-counts by 192 B per cell)
LIGHT_BYTES_PER_TEXEL = 3700        # EnvironmentLight(base_res=512) per texel of a cube face: its prefilter operator
#                                     (CSR matrix and transpose with 32-bit indices, 26.3M entries, kept: 2.8 KB) and
#                                     a build_mips + backward + Adam step (0.9 KB)
LIGHT_BUILD_BYTES_PER_TEXEL = 4000   # on top of that while the operator is built (first step; evaluation): its
#                                     entries before the CSR conversion and the transpose's sort (peak 6.75 KB - 2.75)
# -- fitted to bench/results (every other term above subtracted first; those runs predate the sparse prefilter
#    operator, and their light, per-texel GGX sampling, took 4500 B per texel, measured as above) ----------------
PIXEL_BYTES = {  # per rendered pixel of a pass-1 step (G-buffers, shading, the hash-grid encoding, kept for backward)
    # quick-torch-hash-cuda-nvidia-h200.json (512^2 x 4, grid 64: 5.45 GiB) and nerf800-short-cuda-nvidia-h200.json
    # (800^2 x 8, grid 128: 24.4 GiB), both with the pure-PyTorch hash grid: the slope between the two runs
    "torch": 4409,
    # with the Triton kernel, nvdiffrast's cube-map lookups and the index_select gathers: quick-cuda-nvidia-h200.json
    # (512^2 x 4, grid 64: 1.81 GiB, 734 B/px after the other terms) and nerf800-7866e5a-cuda-nvidia-h200.json (800^2 x 8,
    # grid 128, the full 5000 + 5000 schedule: 6.87 GiB, 772 B/px), with the same FIXED
    "triton": 760,
    # tiny-cuda-nn's fused encoding: not measured; the Triton kernel's figure (both keep no per-corner tensors)
    "tcnn": 760,
}
HOST_PIXEL_BYTES = 2000             # on a CPU (torch rasterizer and hash grid): the slope between two runs of
#                                     `train.py experiment=cpu` (2 cores): 128^2 x 4 -> 1.43 GB and data.resolution=256
#                                     data.batch_size=8 -> 2.40 GB peak resident memory
FUSED_MLP_PIXEL_SAVING = 145        # model.material.fused_mlp on CUDA (one Triton kernel each way keeps no hidden
#                                     activations), shading eager: nerf800-7e014e0-cuda-nvidia-h200.json (800^2 x 8, grid 128,
#                                     5000 + 5000 steps: 6.18 GiB peak, 627 B/px after the other terms, against 772)
COMPILED_PIXEL_SAVING = 162         # model.render.compile=auto/on on CUDA (Inductor fuses the shading and losses and
#                                     keeps fewer intermediates for backward): nerf800-compiled-cuda-nvidia-h200.json
#                                     (the same fit compiled: 5.41 GiB peak, 464 B/px)
FUSED_KERNELS_PIXEL_SAVING = 177   # model.render.fused_shading with model.loss.fused_kernel on CUDA (the shading and
#                                     the image losses as Triton kernels keep no intermediates for backward), in both
#                                     passes: nerf800-a937619-cuda-nvidia-h200.json (5.34 GiB peak) against
#                                     nerf800-7e014e0-cuda-nvidia-h200.json (the same fit with both off: 6.18 GiB)
PASS2_PIXEL_BYTES = 460             # pass 2 (texture lookups, no hash grid), shading eager, is not measured apart:
#                                     the whole run's peak (nerf800-7e014e0-cuda-nvidia-h200.json, 6.18 GiB) bounds pass 2's
#                                     terms, which leaves at most 463 B per pixel (301 B compiled)
GPU_FIXED_BYTES = 170_000_000       # the intercept of the two pure-PyTorch runs above (BSDF table, MLP, workspaces)
HOST_FIXED_BYTES = 1_195_000_000    # cpu-small-cpu.json: 1.24 GB peak resident memory of the whole process (Python,
#                                     torch, Lightning, export and evaluation) less its 0.05 GB of modelled terms
HEADROOM = 0.9                      # refuse when the estimate exceeds this fraction of the free memory (allocator slack)
DEFAULT_RESOLUTION = 800            # data.resolution=null keeps the files' size, unknown before they are read

# which settings each term grows with (named in the refusal)
TERM_SETTINGS = {
    "pixels": "data.batch_size, data.resolution",
    "frames": "data.resolution and the number of views",
    "tet grid": "model.geometry.tet_grid",
    "light": "model.light.base_res",
    "texture": "model.bake.texture_res",
    "hash grid": "model.material.encoding.log2_hashmap_size",
    "fixed": "",
}


class ResourceError(FitFailure):
    """The estimated peak memory of a fit exceeds what its device has free; nothing was started."""


@dataclass
class MemoryEstimate:
    """Estimated peak memory of one training process, term by term (bytes), for each pass."""

    device: str                      # "cuda:0", "cpu", ...
    memory: str                      # "GPU" or "host"
    hash_backend: str
    setup: dict[str, int]            # while a light prefilter operator is built (first step, evaluation)
    pass1: dict[str, int]
    pass2: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)
    processes: int = 1               # training processes sharing this memory (a CPU DDP run's ranks on one host)

    @property
    def phases(self) -> dict[str, dict[str, int]]:
        return {"setup": self.setup, "pass 1": self.pass1, "pass 2": self.pass2}

    @property
    def total_bytes(self) -> int:
        """Peak of one process."""
        return max(sum(terms.values()) for terms in self.phases.values())

    @property
    def required_bytes(self) -> int:
        """Peak of every process sharing the memory: what must be free."""
        return self.total_bytes * self.processes

    @property
    def peak_phase(self) -> dict[str, int]:
        return max(self.phases.values(), key=lambda terms: sum(terms.values()))

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes, "required_bytes": self.required_bytes}


# ---------------------------------------------------------------------------------------------------- the config
def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def _world_size(trainer: dict) -> int:
    devices, nodes = trainer.get("devices", 1), int(trainer.get("num_nodes", 1) or 1)
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, int) or str(devices).isdigit():
        n = max(1, int(devices))
    else:  # "auto" / -1: every visible device
        import torch

        n = max(1, torch.cuda.device_count())
    return n * nodes


def training_device(cfg) -> str:
    """The device this process trains on: ``cuda:<i>`` (trainer.accelerator auto/gpu/cuda with CUDA) or ``cpu``."""
    import torch

    if str(cfg.trainer.get("accelerator", "auto")) not in ("auto", "gpu", "cuda") or not torch.cuda.is_available():
        return "cpu"
    devices, local = cfg.trainer.get("devices", 1), _local_rank()
    listed = not isinstance(devices, (str, int)) and devices is not None  # trainer.devices=[2,3]: the GPU indices
    return f"cuda:{int(list(devices)[local]) if listed else local}"


def hash_backend(cfg, device: str) -> str:
    """The hash-grid backend ``model.material.backend`` resolves to on ``device`` (see MLPTexture3D)."""
    backend = str(cfg.model.material.get("backend", "auto"))
    if backend != "auto":
        return backend
    if not device.startswith("cuda"):
        return "torch"
    from recon.materials.hash_grid import tcnn_available, triton_available

    return "tcnn" if tcnn_available() else "triton" if triton_available() else "torch"


def hash_table_entries(encoding: dict) -> int:
    """Entries of the hash grid's table (all levels), as HashGridEncoding lays it out."""
    from recon.materials.hash_grid import level_layout

    n_levels, base, top = int(encoding["n_levels"]), int(encoding["base_resolution"]), int(encoding["max_resolution"])
    scale = math.exp((math.log(top) - math.log(base)) / (n_levels - 1)) if n_levels > 1 else 1.0
    layout = level_layout(3, n_levels, int(encoding["log2_hashmap_size"]), base, scale)
    return int(layout["offset"][-1] + layout["size"][-1])


def count_views(data: dict) -> int:
    """Training + validation views: the built-in scene's counts, or the image files under ``data.path`` (all splits,
    masks/ and depth/ left out: an upper bound known without reading them)."""
    if not data.get("path"):
        builtin = data.get("builtin") or {}
        return int(builtin.get("n_train", 100)) + int(builtin.get("n_val", 4))
    from recon.data.nerfstudio import IMAGE_SUFFIXES

    root = Path(str(data["path"])).expanduser()
    if not root.is_dir():
        return 0  # the data module names the missing folder when it loads
    skip = {"masks", "depth", "mask"}
    return sum(1 for p in root.rglob("*") if p.suffix in IMAGE_SUFFIXES and not skip & set(p.relative_to(root).parts[:-1]))


def _resolution(data: dict) -> tuple[int, int]:
    res = data.get("resolution")
    if res is None:
        return DEFAULT_RESOLUTION, DEFAULT_RESOLUTION
    if isinstance(res, int):
        return res, res
    h, w = (int(r) for r in res)
    return h, w


def estimate_memory(cfg, device: str | None = None, backend: str | None = None) -> MemoryEstimate:
    """Peak memory of one training process of ``cfg`` (the composed train config). ``device`` and ``backend``
    default to what the run would use here (``training_device``, ``hash_backend``)."""
    from omegaconf import OmegaConf

    device = device or training_device(cfg)
    backend = backend or hash_backend(cfg, device)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=False)  # default_root_dir needs a run dir; not read here
    on_gpu = device.startswith("cuda")
    h, w = _resolution(data)
    world = _world_size(trainer) if on_gpu or trainer.get("strategy") else 1
    batch = max(1, math.ceil(int(data["batch_size"]) / world))
    processes = 1 if on_gpu else world // int(trainer.get("num_nodes", 1) or 1)
    views = count_views(data)
    frames_here = not on_gpu or data.get("resident", True)
    tet, light, tex = int(model["geometry"]["tet_grid"]), int(model["light"]["base_res"]), int(model["bake"]["texture_res"])
    entries = hash_table_entries(model["material"]["encoding"]) * int(model["material"]["encoding"]["n_features_per_level"])
    common = {
        "fixed": GPU_FIXED_BYTES if on_gpu else HOST_FIXED_BYTES,
        "frames": views * h * w * FRAME_BYTES_PER_PIXEL if frames_here else 0,
        "hash grid": entries * HASH_TABLE_BYTES_PER_ENTRY,
        "light": LIGHT_BYTES_PER_TEXEL * light * light,
        "tet grid": TET_BYTES_PER_CELL * tet**3,
    }
    pixel_bytes = PIXEL_BYTES.get(backend, PIXEL_BYTES["torch"]) if on_gpu else HOST_PIXEL_BYTES
    pass2_pixel_bytes = PASS2_PIXEL_BYTES
    if on_gpu and model["material"].get("fused_mlp", True) and triton_importable():
        pixel_bytes -= FUSED_MLP_PIXEL_SAVING
    render, loss = model.get("render", {}), model.get("loss", {})
    fused = render.get("fused_shading", True) and loss.get("fused_kernel", True)
    compiled = mode_name(render.get("compile", "off")) != "off"
    # the fused kernels replace the functions Inductor would compile: the larger saving of the two, not both
    saving = max(FUSED_KERNELS_PIXEL_SAVING if fused else 0, COMPILED_PIXEL_SAVING if compiled else 0)
    if on_gpu and triton_importable():
        pixel_bytes -= saving
        pass2_pixel_bytes -= saving
    pass1 = {**common, "pixels": pixel_bytes * batch * h * w}
    pass2 = {**common, "texture": TEXTURE_BYTES_PER_TEXEL * tex * tex,
             "pixels": min(pixel_bytes, pass2_pixel_bytes) * batch * h * w}
    if int(model.get("pass2_steps", 1)) == 0:  # pass 1 only: the export bakes the texture once, no pass-2 training
        pass2 = {**common, "texture": BAKE_BYTES_PER_TEXEL * tex * tex}
    setup = {**common, "light": (LIGHT_BYTES_PER_TEXEL + LIGHT_BUILD_BYTES_PER_TEXEL) * light * light}
    settings = {"data.resolution": [h, w], "data.batch_size": int(data["batch_size"]), "batch per process": batch,
                "views": views, "model.geometry.tet_grid": tet, "model.light.base_res": light,
                "model.bake.texture_res": tex, "model.material.backend": backend}
    phases = [{k: int(v) for k, v in terms.items()} for terms in (setup, pass1, pass2)]
    return MemoryEstimate(device, "GPU" if on_gpu else "host", backend, *phases, settings, max(1, processes))


# ---------------------------------------------------------------------------------------------------- free memory
def available_host_memory() -> int | None:
    """Host memory available to a new allocation, bytes: ``MemAvailable`` of /proc/meminfo (Linux), else the free
    physical pages (os.sysconf); None when neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def free_memory(device: str) -> int | None:
    """Free memory of ``device`` in bytes (``torch.cuda.mem_get_info`` on CUDA, the host's available memory on a
    CPU); None when it cannot be measured here."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return available_host_memory()


def refusal_message(estimate: MemoryEstimate, free: int) -> str:
    """What a refused fit prints: the estimate, the free memory and the settings to lower, largest term first."""
    terms = sorted(estimate.peak_phase.items(), key=lambda kv: -kv[1])
    largest = "; ".join(f"{name} {v / GIB:.2f} GiB ({TERM_SETTINGS[name]})" for name, v in terms[:3]
                        if TERM_SETTINGS.get(name))
    s = estimate.settings
    res = "x".join(str(r) for r in s["data.resolution"])
    per = f" ({estimate.processes} processes)" if estimate.processes > 1 else ""
    return (f"estimated peak {estimate.memory} memory {estimate.required_bytes / GIB:.2f} GiB{per} exceeds the "
            f"{free / GIB:.2f} GiB free on {estimate.device} (data.resolution={res}, data.batch_size="
            f"{s['data.batch_size']}, model.geometry.tet_grid={s['model.geometry.tet_grid']}, model.bake.texture_res="
            f"{s['model.bake.texture_res']}, model.light.base_res={s['model.light.base_res']}, hash grid "
            f"{estimate.hash_backend}). Largest: {largest}. Lower one of {MEMORY_SETTINGS}, or set "
            "check_resources=false to start anyway.")


def check_resources(cfg, headroom: float = HEADROOM) -> MemoryEstimate:
    """Refuse a fit whose estimated peak memory exceeds ``headroom`` x the free memory of its device: raises
    ResourceError (report kind ``resources``) before anything is built. Returns the estimate otherwise."""
    estimate = estimate_memory(cfg)
    if estimate.processes > 1 and _local_rank() > 0:
        return estimate  # the host is shared: local rank 0 checked for all of its processes, before they started
    free = free_memory(estimate.device)
    if free is not None and estimate.required_bytes > headroom * free:
        message = refusal_message(estimate, free)
        raise ResourceError(message, {"kind": "resources", "step": 0, "message": message, "checkpoint": None,
                                      "estimate_bytes": estimate.required_bytes, "free_bytes": free,
                                      "device": estimate.device})
    return estimate


# ---------------------------------------------------------------------------------------------------- command line
def format_estimate(estimate: MemoryEstimate, free: int | None) -> str:
    """A text table: each term of each phase in GiB, the peak, the free memory and the verdict."""
    phases = estimate.phases
    names = list(dict.fromkeys(n for terms in phases.values() for n in terms))
    rows = [("GiB", *phases)] + [(n, *(f"{p[n] / GIB:.2f}" if n in p else "-" for p in phases.values())) for n in names]
    rows.append(("total", *(f"{sum(p.values()) / GIB:.2f}" for p in phases.values())))
    width = max(len(r[0]) for r in rows)
    lines = ["  ".join([f"{r[0]:<{width}}", *(f"{c:>7}" for c in r[1:])]) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    settings = ", ".join(f"{k}={v}" for k, v in estimate.settings.items())
    per = f" per process, {estimate.processes} processes" if estimate.processes > 1 else ""
    lines += ["", f"peak {estimate.memory} memory: {estimate.total_bytes / GIB:.2f} GiB{per} on {estimate.device}; {settings}"]
    if free is None:
        lines.append(f"free memory of {estimate.device}: unknown here")
    else:
        verdict = "fits" if estimate.required_bytes <= HEADROOM * free else "would be refused"
        lines.append(f"free on {estimate.device}: {free / GIB:.2f} GiB: {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recon.resources",
                                description="Estimated peak memory of a fit (the config train.py would run).")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for train.py (experiment=cpu ...)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    a = p.parse_args(argv)
    from hydra.errors import HydraException

    from recon.fit import compose_config

    try:
        cfg = compose_config(a.overrides)
        estimate = estimate_memory(cfg)
    except (HydraException, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    free = free_memory(estimate.device)
    fits = free is None or estimate.required_bytes <= HEADROOM * free
    if a.json:
        print(json.dumps({**estimate.as_dict(), "free_bytes": free, "fits": fits}, indent=2))
    else:
        print(format_estimate(estimate, free))
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
