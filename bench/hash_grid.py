"""Time the hash-grid encoding alone, per backend: `python bench/hash_grid.py --out bench/results/hash_grid.json`.

For each point count, point layout, with and without a gradient for the points, and each backend
(torch, triton, tcnn; those that run on the device), times the forward pass, the backward pass
(table gradient, plus the point gradient when asked) and both together: median of --repeats
timed runs after --warmup untimed ones, with CUDA events (time.perf_counter on a CPU). The table
has nvdiffrec's configuration by default (16 levels x 2 features, 2^19 rows per level,
resolution 16..4096), float32, random values. Prints a Markdown table and writes JSON to --out.

The triton backend gets one row per launch layout in --triton-layouts, written FORWARD/BACKWARD
(`levels`: a program per block of points and level; `points`: a program per block of points for
all levels; see recon/materials/hash_grid_triton.py): the forward column depends on the forward
layout only, the backward column on the backward layout only, the fwd+bwd column on both.

Point layouts: `uniform` (i.i.d. in the unit cube, no locality) and `surface` (a sphere swept in
scanline order, like the covered pixels of rendered views: neighbouring points share cells, so
the coarse levels' atomic adds collide).

    python bench/hash_grid.py                              # CUDA: N = 1M and 4M, every backend
    python bench/hash_grid.py --device cpu --n 20000       # CPU smoke test: torch backend only
    python bench/hash_grid.py --n 3000000 --points surface --backends triton --triton-layouts levels points
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/hash_grid.py` puts bench/, not the repository root, on sys.path
    sys.path.insert(0, str(ROOT))

from recon.materials.hash_grid import TRITON_LAYOUTS, HashGridEncoding, tcnn_available, triton_available, triton_layouts  # noqa: E402

NVDIFFREC = dict(n_input_dims=3, n_levels=16, n_features_per_level=2, log2_hashmap_size=19,
                 base_resolution=16, max_resolution=4096)
PHASES = ("forward", "backward", "forward_backward")


def make_points(n: int, layout: str, device: torch.device, seed: int = 0) -> torch.Tensor:
    """[n,3] float32 points in [0,1]^3: `uniform` random, or `surface` (sphere, scanline order)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "uniform":
        return torch.rand(n, 3, generator=gen).to(device)
    if layout == "surface":
        side = math.ceil(math.sqrt(n))
        i = torch.arange(n, dtype=torch.float64)
        theta = (i // side + 0.5) / side * math.pi  # rows of an image: polar angle
        phi = (i % side + 0.5) / side * 2 * math.pi  # along a row: azimuth
        unit = torch.stack([theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos()], dim=-1)
        return (0.5 + 0.35 * unit).float().to(device)
    raise ValueError(f"Unknown point layout {layout!r}; use uniform or surface.")


class Timer:
    """Elapsed milliseconds of a callable: CUDA events on the current stream, or perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def launch_layout(text: str) -> str:
    """`FORWARD/BACKWARD` launch layouts of the triton backend (`HashGridEncoding.triton_layout`); one name sets both."""
    try:
        return "/".join(triton_layouts(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def time_backend(
    enc: HashGridEncoding, backend: str, x: torch.Tensor, grad_out: torch.Tensor, input_grad: bool,
    repeats: int, warmup: int,
) -> dict:
    """Median milliseconds of forward, backward and forward + backward, and the peak memory of one step."""
    enc.backend = backend
    timer = Timer(x.device)
    x = x.detach().requires_grad_(input_grad)
    state: dict = {}

    def forward():
        state["out"] = enc(x)

    def backward():
        state["out"].backward(grad_out)

    def step():
        forward()
        backward()

    def reset():
        enc.params.grad, x.grad = None, None  # optimiser.zero_grad(set_to_none=True)
        state.clear()

    times = {phase: [] for phase in PHASES}
    for i in range(warmup + repeats):
        reset()
        t_forward = timer(forward)
        t_backward = timer(backward)
        reset()
        t_step = timer(step)
        if i >= warmup:
            times["forward"].append(t_forward)
            times["backward"].append(t_backward)
            times["forward_backward"].append(t_step)
    reset()
    peak = None
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        step()
        torch.cuda.synchronize(x.device)
        peak = torch.cuda.max_memory_allocated(x.device) - base
    with torch.no_grad():
        out = enc(x).float()
    reset()
    result = {f"{phase}_ms": statistics.median(t) for phase, t in times.items()}
    result["peak_memory_bytes"] = peak
    result["output"] = out  # compared with the torch backend's by the caller, then dropped
    return result


def available_backends(device: torch.device) -> list[str]:
    if device.type != "cuda":
        # The triton and tcnn kernels are CUDA kernels; triton runs on a CPU in its interpreter (tests).
        return ["torch", "triton"] if triton_available() and _triton_interprets() else ["torch"]
    names = ["torch"]
    if triton_available():
        names.append("triton")
    if tcnn_available():
        names.append("tcnn")
    return names


def _triton_interprets() -> bool:
    from recon.materials import hash_grid_triton

    return hash_grid_triton.interpreting()


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    backends = args.backends or available_backends(device)
    unknown = set(backends) - set(available_backends(device))
    if unknown:
        raise SystemExit(f"Backend(s) {sorted(unknown)} cannot run on {device}; available: {available_backends(device)}.")
    torch.manual_seed(0)
    config = {**NVDIFFREC, "log2_hashmap_size": args.log2_hashmap_size}
    enc = HashGridEncoding(backend="torch", **config).to(device)
    with torch.no_grad():
        enc.params.uniform_(-1.0, 1.0)  # trained tables are far from tiny-cuda-nn's 1e-4 init
    rows = []
    for n in args.n:
        grad_out = torch.randn(n, enc.n_output_dims, generator=torch.Generator().manual_seed(1)).to(device)
        for layout in args.points:
            x = make_points(n, layout, device)
            for input_grad in args.input_grad:
                reference = None
                runs = [(b, launch, r) for b in backends
                        for launch in (args.triton_layouts if b == "triton" else [None])
                        for r in (args.run_levels or [None] if b == "triton" else [None])]
                for backend, launch, run_levels in runs:
                    case = {"n_points": n, "points": layout, "input_grad": input_grad, "backend": backend,
                            "launch_layout": launch}
                    if run_levels is not None:
                        from recon.materials import hash_grid_triton

                        case["run_levels"] = run_levels
                        hash_grid_triton.RUN_LEVELS = run_levels
                    try:
                        enc.triton_layout = None if launch is None else triton_layouts(launch)
                        res = time_backend(enc, backend, x, grad_out, input_grad, args.repeats, args.warmup)
                    except torch.cuda.OutOfMemoryError as err:
                        rows.append({**case, "error": f"out of memory: {err}"})
                        torch.cuda.empty_cache()
                        continue
                    out = res.pop("output")
                    if backend == "torch":
                        reference = out
                    diff = None if reference is None else (out - reference).abs().max().item()
                    rows.append({**case, **res, "max_abs_diff_vs_torch": diff})
                    print(format_row(rows[-1], rows), flush=True)
                    del out
            del x
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "tcnn": tcnn_available(),
        "git_commit": _git_commit(),
        "config": config,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "results": rows,
    }


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def _git_commit() -> str | None:
    from bench.run import git_commit  # the same rule as the end-to-end benchmark's

    commit = git_commit()
    return None if commit is None else commit[:7]


HEADER = ("| N | points | point grad | backend | forward ms | backward ms | fwd+bwd ms | fwd+bwd vs torch | peak GiB |\n"
          "|---:|---|---|---|---:|---:|---:|---:|---:|")


def format_row(row: dict, rows: list[dict]) -> str:
    """One Markdown table row; the speed-up is relative to the torch backend's row of the same case."""
    case = (row["n_points"], row["points"], row["input_grad"])
    backend = row["backend"] if row.get("launch_layout") is None else f"{row['backend']} {row['launch_layout']}"
    if row.get("run_levels") is not None:
        backend += f" runs<{row['run_levels']}"
    lead = f"| {row['n_points']:,} | {row['points']} | {'yes' if row['input_grad'] else 'no'} | {backend} "
    if "error" in row:
        return lead + "| " + " | ".join(["-"] * 5) + " |"
    torch_row = next((r for r in rows if (r["n_points"], r["points"], r["input_grad"]) == case
                      and r["backend"] == "torch" and "error" not in r), None)
    speedup = f"{torch_row['forward_backward_ms'] / row['forward_backward_ms']:.1f}x" if torch_row else "-"
    peak = "-" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / 2**30:.2f}"
    return (lead + f"| {row['forward_ms']:.2f} | {row['backward_ms']:.2f} | {row['forward_backward_ms']:.2f} "
            f"| {speedup} | {peak} |")


def write_json(path: Path, data: dict) -> None:
    """Write through a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def caption(args: argparse.Namespace) -> str:
    return (f"Hash-grid encoding on {device_name(torch.device(args.device))} (torch {torch.__version__}, triton "
            f"{_version('triton')}), median of {args.repeats} after {args.warmup} warm-up runs; table "
            f"{NVDIFFREC['n_levels']} levels x {NVDIFFREC['n_features_per_level']} features x 2^{args.log2_hashmap_size}.")


def device_name(device: torch.device) -> str:
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, nargs="+", default=None,
                        help="point counts (default 1M and 4M on CUDA, 20k on a CPU)")
    parser.add_argument("--backends", nargs="+", choices=("torch", "triton", "tcnn"), default=None,
                        help="default: every backend that runs on the device")
    parser.add_argument("--triton-layouts", nargs="+", type=launch_layout, default=None, metavar="FORWARD/BACKWARD",
                        help="launch layouts of the triton backend, one row each: levels, points or FORWARD/BACKWARD "
                             "(default: the four combinations)")
    parser.add_argument("--run-levels", nargs="+", type=int, default=None, metavar="K",
                        help="triton: time each value of hash_grid_triton.RUN_LEVELS (the coarsest levels whose "
                             "backward adds once per run of points in one cell corner); default: as the module has it")
    parser.add_argument("--points", nargs="+", choices=("uniform", "surface"), default=["uniform", "surface"])
    parser.add_argument("--input-grad", nargs="+", choices=("no", "yes"), default=["no", "yes"],
                        help="time without and/or with a gradient for the points (recon's training needs it)")
    parser.add_argument("--log2-hashmap-size", type=int, default=NVDIFFREC["log2_hashmap_size"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but this process sees no GPU; use --device cpu (torch backend, small N).")
    if args.n is None:
        args.n = [1_000_000, 4_000_000] if args.device.startswith("cuda") else [20_000]
    args.input_grad = [v == "yes" for v in args.input_grad]
    if args.triton_layouts is None:
        args.triton_layouts = [f"{f}/{b}" for f in TRITON_LAYOUTS for b in TRITON_LAYOUTS]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    print(caption(args), "", HEADER, sep="\n", flush=True)
    result = run(args)  # prints a table row per measurement
    if args.out is not None:
        write_json(args.out, result)
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
