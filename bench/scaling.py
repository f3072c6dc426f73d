"""Data-parallel scaling: the same preset on 1 and N GPUs of one machine, same global batch.

`python bench/scaling.py nerf800 --devices 1 2 [--override KEY=VALUE ...] [--name NAME]`

Each device count runs `train.py experiment=<preset>` end to end (``trainer.devices=1`` on the default trainer, or
``trainer=ddp trainer.devices=N``); ``data.batch_size`` is the global batch, so every run sees the same views per
step. Reported per run, from its ``timing.json`` and ``metrics.json``: steady-state iterations/s of each pass
(`recon.callbacks.mesh_export.steady_throughput`: the passes' first steps, the compile-on-first-use and the bake
left out), the speed-up over the first device count, wall and fit time, peak GPU memory of every rank, and test
PSNR / chamfer-L1 of the export. Writes ``<out>/scaling-<name>-<device>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.run import _fmt, _table, compose_config, config_summary, device_label, experiment_name, git_commit, run_end_to_end  # noqa: E402
from recon.export.obj import atomic_write_bytes  # noqa: E402

# NVLink multicast (NVLS) stays off: the machines this runs on share their GPUs, and a program using multicast can
# take them out of service. DDP's all-reduce does not need it.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def device_overrides(n: int) -> list[str]:
    """Trainer overrides for ``n`` GPUs: the plain trainer for one, Lightning DDP (one process per GPU) for more."""
    return ["trainer.devices=1"] if n == 1 else ["trainer=ddp", f"trainer.devices={n}"]


def run_summary(n: int, e2e: dict) -> dict:
    """One run's figures: throughput of each pass, times, memory per rank and quality."""
    timing, metrics = e2e["timing"], e2e.get("metrics", {})
    geo = metrics.get("geometry", {})
    return {
        "devices": n,
        "pass1_iterations_per_second": timing.get("pass1_iterations_per_second"),
        "pass2_iterations_per_second": timing.get("pass2_iterations_per_second"),
        "wall_seconds": e2e["wall_seconds"], "fit_seconds": timing.get("fit_seconds"),
        "pass1_seconds": timing.get("pass1_seconds"), "pass2_seconds": timing.get("pass2_seconds"),
        "unwrap_seconds": timing.get("unwrap_seconds"), "bake_seconds": timing.get("bake_seconds"),
        "peak_gpu_memory_bytes_per_rank": timing.get("peak_gpu_memory_bytes_per_rank"),
        "peak_host_memory_bytes": e2e["peak_host_memory_bytes"],
        "exported_triangles": timing.get("exported_triangles"),
        "quality": {"psnr": metrics.get("psnr"), "ssim": metrics.get("ssim"), "iou": metrics.get("iou"),
                    "chamfer_l1": geo.get("chamfer_l1"), "fscore@0.01": geo.get("fscore@0.01")},
    }


def speedups(runs: list[dict]) -> None:
    """Adds ``speedup_pass1``/``speedup_pass2`` (iterations/s over the first run's) and ``efficiency`` to each run."""
    base = runs[0]
    for r in runs:
        for p in ("pass1", "pass2"):
            a, b = base.get(f"{p}_iterations_per_second"), r.get(f"{p}_iterations_per_second")
            r[f"speedup_{p}"] = b / a if a and b else None
        s = r["speedup_pass1"]
        r["efficiency_pass1"] = s * base["devices"] / r["devices"] if s else None


def scaling_markdown(result: dict) -> str:
    header = ("GPUs", "pass 1 it/s", "pass 2 it/s", "speed-up p1", "speed-up p2", "fit s", "wall s",
              "peak GPU GiB per rank", "PSNR", "SSIM", "chamfer L1", "F@1%")
    rows = []
    for r in result["runs"]:
        q = r["quality"]
        peaks = r.get("peak_gpu_memory_bytes_per_rank") or []
        rows.append([str(r["devices"]), _fmt(r["pass1_iterations_per_second"], ".2f"),
                     _fmt(r["pass2_iterations_per_second"], ".2f"), _fmt(r["speedup_pass1"], ".2f"),
                     _fmt(r["speedup_pass2"], ".2f"), _fmt(r["fit_seconds"], ".1f"), _fmt(r["wall_seconds"], ".1f"),
                     " / ".join(f"{p / 2**30:.2f}" for p in peaks) or "–", _fmt(q["psnr"], ".2f"),
                     _fmt(q["ssim"], ".4f"), _fmt(q["chamfer_l1"], ".5f"), _fmt(q["fscore@0.01"], ".4f")])
    c = result["config"]
    return (f"## Scaling: {result['name']} on {result['device']} ({result['device_name']}, torch {result['torch']}, "
            f"commit {(result.get('git_commit') or 'unknown')[:10]})\n\n"
            f"{'x'.join(map(str, c['resolution']))} px, global batch {c['batch']}, tet grid {c['tet_grid']}, "
            f"{c['pass1_steps']} + {c['pass2_steps']} steps, {c['texture_res']}² textures. Overrides: "
            f"`{' '.join(result['overrides']) or 'none'}`.\n\n" + _table(header, rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", help="experiment in conf/experiment/ (nerf800, quick, ...)")
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="GPU counts to run (default: 1 2)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="for every run (repeatable)")
    ap.add_argument("--name", default=None, help="result name (default: the preset)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--run-dir", type=Path, default=None, help="keep the runs in RUN_DIR/<name>-<N>gpu")
    ap.add_argument("--previous", type=Path, default=None,
                    help="a scaling JSON of the same preset and overrides whose runs come first (runs split over "
                         "several invocations, e.g. under a per-command time limit)")
    args = ap.parse_args(argv)
    if not (ROOT / "conf" / "experiment" / f"{experiment_name(args.preset)}.yaml").is_file():
        ap.error(f"unknown preset {args.preset!r}: no conf/experiment/{experiment_name(args.preset)}.yaml")
    available = torch.cuda.device_count()
    if available and max(args.devices) > available:  # on a CPU the "devices" are processes
        ap.error(f"--devices {max(args.devices)} needs {max(args.devices)} GPUs; this machine has {available}")
    for k, v in NO_MULTICAST.items():
        os.environ.setdefault(k, v)
    name = args.name or args.preset
    cfg = compose_config(args.preset, args.override)
    runs = []
    if args.previous is not None:
        prev = json.loads(args.previous.read_text())
        if prev.get("base_preset") != args.preset or prev.get("overrides") != args.override:
            ap.error(f"{args.previous} ran {prev.get('base_preset')} with {prev.get('overrides')}, not "
                     f"{args.preset} with {args.override}: runs with different settings do not compare")
        runs = [{k: v for k, v in r.items() if not k.startswith(("speedup_", "efficiency_"))} for r in prev["runs"]]
    with tempfile.TemporaryDirectory(prefix=f"scaling-{name}-") as tmp:
        base = args.run_dir or Path(tmp)
        for n in args.devices:
            e2e = run_end_to_end(args.preset, base / f"{name}-{n}gpu", [*args.override, *device_overrides(n)])
            runs.append(run_summary(n, e2e))
            print(json.dumps(runs[-1], indent=2), flush=True)
    speedups(runs)
    device = device_label(torch.device("cuda", 0)) if available else "cpu"
    result = {"name": name, "base_preset": args.preset, "device": device,
              "device_name": torch.cuda.get_device_name(0) if available else "cpu", "torch": torch.__version__,
              "git_commit": git_commit(), "overrides": args.override, "config": config_summary(cfg), "runs": runs}
    stem = args.out / f"scaling-{name}-{device}"
    atomic_write_bytes(stem.with_suffix(".json"), (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(stem.with_suffix(".md"), scaling_markdown(result).encode())
    print(scaling_markdown(result))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
