"""Benchmark presets end to end and per training stage: `python bench/run.py cpu-small [quick nerf800] [--out DIR]`.

For each preset (a Hydra experiment; `cpu-small` is `experiment=cpu_small`):
1. runs `train.py experiment=<preset>` as a subprocess and measures its wall time and peak host memory, then reads
   the run's ``timing.json`` and ``metrics.json``;
2. rebuilds the same composed config in this process and times ``--profile-steps`` hand-driven training steps,
   stage by stage (CUDA events on a GPU, ``time.perf_counter`` on a CPU);
3. writes ``<out>/<preset>-<device>.json`` and ``.md`` and regenerates ``<out>/README.md`` from every JSON there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/, not the repository root, on sys.path
    sys.path.insert(0, str(ROOT))

from recon.export.obj import atomic_write_bytes
from recon.system import background

# One training step, stage by stage; "mesh" is marching tets in pass 1 and normals/tangents of the fixed mesh in
# pass 2, "material" the hash-grid MLP (pass 1) or the texture lookup (pass 2), "light" the prefiltering of the
# environment light's mip chain.
STAGES = ("light", "mesh", "rasterize", "material", "shading/antialias", "loss", "backward", "optimizer")
RESULT_KEYS = (
    "preset", "device", "torch", "git_commit", "config", "wall_seconds", "mesh_seconds", "fit_seconds",
    "export_seconds", "iterations_per_second", "peak_gpu_memory_bytes", "peak_host_memory_bytes", "triangles",
    "quality", "stages", "step_ms",
)


# ---------------------------------------------------------------------------------------------- config
def experiment_name(preset: str) -> str:
    """Preset name on the command line -> file in conf/experiment/ (`cpu-small` -> `cpu_small`)."""
    return preset.replace("-", "_")


def compose_config(preset: str, overrides: list[str] | tuple[str, ...] = ()):
    """The config `train.py experiment=<preset> [overrides]` would run with (`recon.fit.compose_config`)."""
    from recon.fit import compose_config as compose_train

    return compose_train([f"experiment={experiment_name(preset)}", *overrides])


def config_summary(cfg) -> dict:
    res = cfg.data.resolution
    res = [int(r) for r in res] if not isinstance(res, int) else [int(res), int(res)]
    return {"resolution": res, "batch": int(cfg.data.batch_size), "tet_grid": int(cfg.model.geometry.tet_grid),
            "pass1_steps": int(cfg.model.pass1_steps), "pass2_steps": int(cfg.model.pass2_steps),
            "steps": int(cfg.trainer.max_steps), "texture_res": int(cfg.model.bake.texture_res),
            "light_res": int(cfg.model.light.base_res)}


def training_device(cfg) -> torch.device:
    """The device the preset trains on (`recon.resources.training_device`: CUDA unless the trainer says cpu)."""
    from recon.resources import training_device as device_of

    return torch.device(device_of(cfg))


def device_label(device: torch.device) -> str:
    """'cpu' or 'cuda-<gpu name slug>' (e.g. cuda-nvidia-h100-80gb-hbm3), used in result file names."""
    if device.type != "cuda":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _entries(path: Path) -> int:
    return sum(1 for _ in path.iterdir()) if path.is_dir() else 0


def cache_state(cfg) -> dict:
    """What an earlier run on this machine left for this one, read before it starts: ``scene`` (the built-in scene
    is generated; None with data.path set), ``nvdiffrast_plugin`` (built; None without nvdiffrast), and the number
    of entries in Triton's and Inductor's kernel caches. A run that finds them all warm skips 30-60 s of start-up."""
    import hydra

    from recon.render.nvdiffrast import plugin_built

    scene = hydra.utils.instantiate(cfg.data).scene_cached()
    triton_dir = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")
    try:
        from triton import knobs
        triton_dir = knobs.cache.dir or triton_dir
    except Exception:  # older Triton without knobs, or none
        pass
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_dir
        inductor = Path(inductor_dir())
    except Exception:
        inductor = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/nonexistent"))
    return {"scene": scene, "nvdiffrast_plugin": plugin_built() if training_device(cfg).type == "cuda" else None,
            "triton_cache_entries": _entries(Path(triton_dir)), "inductor_cache_entries": _entries(inductor)}


def git_commit(root: Path = ROOT) -> str | None:
    """The commit of the code being benchmarked: ``$RECON_GIT_COMMIT`` where set (a copy of the tree without its
    history, e.g. a ``git archive`` of that commit), else ``root``'s HEAD when ``root`` is a repository's top level;
    None otherwise (a copy nested in some other checkout would report that checkout's commit)."""
    if os.environ.get("RECON_GIT_COMMIT"):
        return os.environ["RECON_GIT_COMMIT"]

    def git(*args: str) -> str | None:
        out = subprocess.run(["git", *args], check=False, cwd=root, capture_output=True, text=True, timeout=10)
        return (out.stdout.strip() or None) if out.returncode == 0 else None

    try:
        top = git("rev-parse", "--show-toplevel")
        if top is None or Path(top).resolve() != Path(root).resolve():
            return None
        return git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------- end to end
def training_env(python: str | None) -> dict[str, str]:
    """The training process's environment: this one's, unbuffered; with another interpreter (``--python``, e.g. an
    environment of `bench/isolated_env.py`) without PYTHONPATH and PYTHONHOME, so that it imports its own packages
    only (recon itself comes from the repository root, train.py's folder)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if python is not None:
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
    return env


def run_end_to_end(preset: str, run_dir: Path, overrides: list[str] | tuple[str, ...] = (),
                   python: str | None = None) -> dict:
    """Run train.py for ``preset`` into ``run_dir``; wall time, peak host memory, timing.json and metrics.json.

    python: the interpreter to run it with (default this one's; see `training_env`).
    Peak host memory is the child's maximum resident set size from wait4 (bytes; Linux reports KiB, macOS bytes).
    """
    cmd = [python or sys.executable, str(ROOT / "train.py"), f"experiment={experiment_name(preset)}",
           f"hydra.run.dir={run_dir}", *overrides]
    log_path = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    t0_epoch, t0 = time.time(), time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=training_env(python))
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not every child's so far
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"train.py experiment={experiment_name(preset)} failed (exit {proc.returncode}); "
                           f"log {log_path}:\n{tail}")
    maxrss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    timing = json.loads((run_dir / "timing.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    mesh = run_dir / "mesh.obj"
    return {"wall_seconds": wall, "mesh_seconds": mesh.stat().st_mtime - t0_epoch if mesh.is_file() else None,
            "peak_host_memory_bytes": int(maxrss), "timing": timing, "metrics": metrics}


# ---------------------------------------------------------------------------------------------- per stage
class StageTimer:
    """Marks stage boundaries: CUDA events on the stream (one synchronize per step) or perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks, then the marks are cleared."""
        if self.cuda:
            self.marks[-1].synchronize()
            out = [a.elapsed_time(b) for a, b in zip(self.marks[:-1], self.marks[1:])]
        else:
            out = [(b - a) * 1e3 for a, b in zip(self.marks[:-1], self.marks[1:])]
        self.marks = []
        return out


def build_for_profile(cfg, device: torch.device):
    """Datamodule, ReconSystem (on ``device``), optimizer and scheduler of a composed config, as train.py builds them."""
    import hydra
    import lightning as L

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    system = hydra.utils.instantiate(cfg.model).to(device)
    datamodule.prepare_data()
    datamodule.setup("fit")
    conf = system.configure_optimizers()
    return datamodule, system, conf["optimizer"], conf["lr_scheduler"]["scheduler"]


def _batches(datamodule, device: torch.device):
    """Endless training batches on ``device`` (the datamodule's own loader and device-side gather). The indices move
    with ``non_blocking=True`` as Lightning moves them to a CUDA device: a blocking copy would wait for the GPU every
    step, a wait the training loop does not have."""
    while True:
        for batch in datamodule.train_dataloader():
            batch = {k: v.to(device, non_blocking=device.type == "cuda") if torch.is_tensor(v) else v
                     for k, v in batch.items()}
            yield datamodule.on_after_batch_transfer(batch, 0)


def training_step_stages(system, batch: dict, opt, sched, timer: StageTimer) -> torch.Tensor:
    """One training step as ReconSystem.training_step + Lightning's backward/step, with a timer mark per stage."""
    img = batch["img"]
    timer.mark()
    system.light.build_mips()                                                     # light
    timer.mark()
    out = system.render(batch["mvp"], batch["cam_pos"], tuple(img.shape[1:3]),   # mesh, rasterize, material,
                        smoothness=system.surface is None, mark=timer.mark,       # shading/antialias
                        material_images=False)
    bg = background(system.loss_cfg.get("background", "random"), img.shape[:3], img.device)  # loss
    loss = system.losses(out, img, bg)["total"]
    timer.mark()
    loss.backward()                                                               # backward
    timer.mark()
    opt.step()                                                                    # optimizer
    sched.step()
    opt.zero_grad(set_to_none=True)
    system.on_train_batch_end(None, batch, 0)
    timer.mark()
    return loss.detach()


def start_pass2(system, run_dir: Path | None) -> None:
    """Put a profiled system into pass 2 on a realistic mesh: the pass-1 export of the end-to-end run (``run_dir/pass1``)
    when it exists, else a bake of the system's own (barely trained) surface."""
    from recon.eval.evaluate import load_export
    from recon.geometry.fixed_mesh import FixedTopologyMesh
    from recon.materials.pbr import TexturePBRMaterial

    if run_dir is not None and (run_dir / "pass1" / "mesh.obj").is_file():
        exp = load_export(run_dir / "pass1", str(system.device))
        tex = torch.cat([exp["kd"], exp["ks"], exp["nrm"]], -1)[0]
        system.surface = FixedTopologyMesh(exp["mesh"]).to(system.device)
        system.textures = TexturePBRMaterial(tex, system.bounds).to(system.device)
    else:
        system.begin_pass2()


def _time_steps(system, datamodule, opt, sched, device: torch.device, steps: int, warmup: int) -> dict:
    timer = StageTimer(device)
    batches = _batches(datamodule, device)
    per_stage: dict[str, list[float]] = {name: [] for name in STAGES}
    wall = []
    for i in range(warmup + steps):
        batch = next(batches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        training_step_stages(system, batch, opt, sched, timer)
        ms = timer.intervals_ms()  # synchronizes on CUDA
        t1 = time.perf_counter()
        if i >= warmup:
            wall.append((t1 - t0) * 1e3)
            for name, v in zip(STAGES, ms):
                per_stage[name].append(v)
    totals = np.sum([per_stage[n] for n in STAGES], axis=0)

    def stats(v) -> dict:
        return {"median_ms": float(np.median(v)), "p90_ms": float(np.percentile(v, 90))}

    return {"stages": {n: stats(per_stage[n]) for n in STAGES}, "step_ms": stats(totals),
            "wall_step_ms": float(np.median(wall))}


def profile_stages(cfg, steps: int = 30, warmup: int = 5, device: torch.device | None = None,
                   run_dir: Path | None = None) -> dict:
    """Time ``steps`` hand-driven training steps of each pass of ``cfg`` stage by stage, after ``warmup`` untimed steps.

    Pass 2 runs on the end-to-end run's pass-1 export (``run_dir/pass1``) when given, so its mesh and textures have
    the real size. Returns ``stages`` {name: {median_ms, p90_ms}}, ``step_ms`` {median_ms, p90_ms} of the stages'
    per-step sum, ``wall_step_ms`` (median wall time of a whole step, with a synchronize on CUDA), the same under
    ``pass2`` (when the preset has a pass 2), ``device`` and ``steps``. On CUDA the stages are spans between events
    on the stream: GPU time, plus any host gap (launch overhead, host syncs such as the marching-tets compaction).
    """
    device = device or training_device(cfg)
    datamodule, system, opt, sched = build_for_profile(cfg, device)
    system.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = {"device": device_label(device), "steps": steps, "warmup": warmup,
              **_time_steps(system, datamodule, opt, sched, device, steps, warmup)}
    if int(cfg.model.pass2_steps) > 0:
        start_pass2(system, run_dir)
        conf = system.configure_optimizers()
        result["pass2"] = _time_steps(system, datamodule, conf["optimizer"], conf["lr_scheduler"]["scheduler"], device,
                                      steps, warmup)
        result["pass2"]["triangles"] = int(system.surface.faces.shape[0])
        result["pass2"]["texture_res"] = system.textures.resolution
    if device.type == "cuda":
        result["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return result


# ---------------------------------------------------------------------------------------------- results
def assemble_result(preset: str, cfg, e2e: dict, prof: dict) -> dict:
    timing, metrics = e2e.get("timing", {}), e2e.get("metrics", {})
    geo = metrics.get("geometry", {})
    fscore = {k: v for k, v in geo.items() if k.startswith("fscore")}
    fit = timing.get("fit_seconds")
    steps = timing.get("steps") or int(cfg.trainer.max_steps)
    device_name = torch.cuda.get_device_name() if prof["device"].startswith("cuda") else (platform.processor() or platform.machine())
    return {
        "preset": preset, "device": prof["device"], "device_name": device_name, "torch": torch.__version__,
        "git_commit": git_commit(), "config": config_summary(cfg),
        "wall_seconds": e2e.get("wall_seconds"), "mesh_seconds": e2e.get("mesh_seconds"),
        "fit_seconds": fit, "export_seconds": timing.get("export_seconds"),
        "export_write_seconds": timing.get("export_write_seconds"),
        "iterations_per_second": steps / fit if fit else None,
        "peak_gpu_memory_bytes": timing.get("peak_gpu_memory_bytes"),
        "peak_host_memory_bytes": e2e.get("peak_host_memory_bytes"),
        "triangles": {"extracted": timing.get("extracted_triangles"), "visible": timing.get("visible_triangles"),
                      "exported": timing.get("exported_triangles", metrics.get("triangles"))},
        "quality": {"psnr": metrics.get("psnr"), "ssim": metrics.get("ssim"), "iou": metrics.get("iou"),
                    "chamfer_l1": geo.get("chamfer_l1"), **fscore, "triangles": metrics.get("triangles")},
        "pass1_seconds": timing.get("pass1_seconds"), "pass2_seconds": timing.get("pass2_seconds"),
        "bake_seconds": {k: timing.get(k) for k in ("cull_seconds", "simplify_seconds", "unwrap_seconds", "bake_seconds")},
        "unwrap": {k: timing.get(f"unwrap_{k}") for k in ("charts", "atlas_used", "xatlas_seconds", "components",
                                                           "small_component_faces")}
                  | {"tangents_seconds": timing.get("tangents_seconds")},
        "steady_iterations_per_second": {p: timing.get(f"{p}_iterations_per_second") for p in ("pass1", "pass2")},
        "first_steps": {k: timing.get(k) for k in ("pass1_first_steps", "pass1_first_steps_seconds", "pass2_first_steps",
                                                   "pass2_first_steps_seconds")},
        "startup_seconds": timing.get("startup_seconds"),
        "segments": timing.get("segments"), "validation": timing.get("validation"),
        "graph_shading": {k: timing.get(f"graph_shading_{k}") for k in ("rows", "covered_max", "overflows")},
        "pass1_graph_shading": {k: timing.get(f"pass1_graph_shading_{k}") for k in ("rows", "covered_max", "overflows")},
        "stages": prof["stages"], "step_ms": prof["step_ms"], "wall_step_ms": prof.get("wall_step_ms"),
        "pass2": prof.get("pass2"), "profile_steps": prof.get("steps"),
    }


def _fmt(x, spec: str = ".2f", scale: float = 1.0) -> str:
    if x is None:
        return "–"
    if isinstance(x, (int, float)):
        return format(x * scale if scale != 1.0 else x, spec)
    return str(x)


def _fscore(q: dict):
    """F-score at 1 % of the ground-truth diagonal (metrics.json's ``fscore@0.01``)."""
    return q.get("fscore@0.01")


SUMMARY_HEADER = ("preset", "device", "res", "batch", "grid", "steps", "wall s", "mesh s", "fit s", "export s", "it/s",
                  "peak GPU GiB", "peak host GiB", "triangles", "PSNR", "SSIM", "IoU", "chamfer L1", "F@1%",
                  "step ms")


def summary_row(r: dict) -> list[str]:
    c, q = r["config"], r.get("quality", {})
    gib = 1.0 / 2**30
    return [r.get("name") or r["preset"], r["device"], "x".join(str(v) for v in c["resolution"]), str(c["batch"]), str(c["tet_grid"]),
            str(c["steps"]), _fmt(r.get("wall_seconds"), ".1f"), _fmt(r.get("mesh_seconds"), ".1f"),
            _fmt(r.get("fit_seconds"), ".1f"),
            _fmt(r.get("export_seconds"), ".1f"), _fmt(r.get("iterations_per_second"), ".1f"),
            _fmt(r.get("peak_gpu_memory_bytes"), ".2f", gib), _fmt(r.get("peak_host_memory_bytes"), ".2f", gib),
            _fmt(r.get("triangles", {}).get("exported"), "d"), _fmt(q.get("psnr"), ".2f"), _fmt(q.get("ssim"), ".4f"),
            _fmt(q.get("iou"), ".4f"), _fmt(q.get("chamfer_l1"), ".5f"), _fmt(_fscore(q), ".4f"),
            _fmt(r.get("step_ms", {}).get("median_ms"), ".1f")]


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _before_fit_seconds(r: dict) -> float | None:
    """Seconds from the process start to the fit's start: time to the mesh less fitting and export."""
    parts = (r.get("mesh_seconds"), r.get("fit_seconds"), r.get("export_seconds"))
    return None if None in parts else parts[0] - parts[1] - parts[2]


def result_markdown(r: dict) -> str:
    """One preset's result: the summary row, then the stage table (median / p90 ms per training step, each pass)."""
    p2 = r.get("pass2")
    rows = []
    for name, s in r["stages"].items():
        s2 = p2["stages"].get(name) if p2 else None
        rows.append([name, _fmt(s["median_ms"], ".2f"), _fmt(s["p90_ms"], ".2f")]
                    + ([_fmt(s2["median_ms"], ".2f"), _fmt(s2["p90_ms"], ".2f")] if p2 else []))
    total = [_fmt(r["step_ms"].get("median_ms"), ".2f"), _fmt(r["step_ms"].get("p90_ms"), ".2f")]
    if p2:
        total += [_fmt(p2["step_ms"]["median_ms"], ".2f"), _fmt(p2["step_ms"]["p90_ms"], ".2f")]
    rows.append(["**total**", *total])
    header = ("stage", "pass 1 median ms", "pass 1 p90 ms") + (("pass 2 median ms", "pass 2 p90 ms") if p2 else ())
    passes = (f"\n\nPass 1 {_fmt(r.get('pass1_seconds'), '.1f')} s (bake included), pass 2 "
              f"{_fmt(r.get('pass2_seconds'), '.1f')} s; at the boundary: "
              + ", ".join(f"{k.replace('_seconds', '')} {_fmt(v, '.1f')} s" for k, v in (r.get("bake_seconds") or {}).items())
              + "." if r.get("pass1_seconds") is not None else "")
    unwrap = r.get("unwrap") or {}
    if unwrap.get("xatlas_seconds") is not None:
        passes += (f" In the unwrap xatlas took {_fmt(unwrap['xatlas_seconds'], '.2f')} s for {unwrap.get('charts')} charts "
                   f"covering {_fmt(unwrap.get('atlas_used'), '.2f')} of the atlas; the tangent frames after it "
                   f"{_fmt(unwrap.get('tangents_seconds'), '.2f')} s.")
        if unwrap.get("components") is not None:
            passes += (f" The unwrapped surface has {unwrap['components']} connected pieces, "
                       f"{unwrap.get('small_component_faces')} faces in pieces under 64 faces.")
    steady, first = r.get("steady_iterations_per_second") or {}, r.get("first_steps") or {}
    if steady.get("pass1") is not None:
        passes += (f" Steady state {_fmt(1e3 / steady['pass1'], '.1f')} ms per pass-1 step"
                   + (f", {_fmt(1e3 / steady['pass2'], '.1f')} ms per pass-2 step" if steady.get("pass2") else "") + ".")
    if first.get("pass1_first_steps_seconds") is not None:
        passes += (f" The first {first['pass1_first_steps']} steps of pass 1 took "
                   f"{_fmt(first['pass1_first_steps_seconds'], '.1f')} s (first-use compilation)"
                   + (f"; the pass switch and the first {first['pass2_first_steps']} steps of pass 2 "
                      f"{_fmt(first['pass2_first_steps_seconds'], '.1f')} s (bake, pass-1 export, compilation)"
                      if first.get("pass2_first_steps_seconds") is not None else "") + ".")
    before = _before_fit_seconds(r)
    if before is not None:
        caches = r.get("caches") or {}
        left = caches.get("scene") and caches.get("nvdiffrast_plugin") and caches.get("triton_cache_entries", 0) > 0
        passes += (f" Before the first step {before:.1f} s (imports, data, compiling; "
                   + ("warm start: scene cached, plugin and kernels compiled by an earlier run" if r.get("warm_start")
                      else "warm caches left by earlier runs on this machine" if left else "cold start") + ").")
    startup = r.get("startup_seconds")
    if startup and "imported" in startup:
        passes += (f" Since the training process started: imports done at {startup['imported']:.1f} s, config and run "
                   f"folder at {startup.get('run_fit', float('nan')):.1f} s, everything built (data module, model, "
                   f"trainer) at {startup.get('built', float('nan')):.1f} s, data ready (scene, frames) at "
                   f"{startup['data_ready']:.1f} s, fit start (model on the device, optimisers) at "
                   f"{startup['fit_start']:.1f} s, first step from {startup['first_step_start']:.1f} s to "
                   f"{startup['first_step_end']:.1f} s.")
    elif startup:
        passes += (" Since the training process started: data ready (imports, config, scene, frames) at "
                   f"{startup['data_ready']:.1f} s, fit start (model on the device, optimisers) at "
                   f"{startup['fit_start']:.1f} s, first step from {startup['first_step_start']:.1f} s to "
                   f"{startup['first_step_end']:.1f} s.")
    segments, validation = r.get("segments") or [], r.get("validation") or {}
    if segments:
        passes += (" Milliseconds per step by segment, validation left out: "
                   + ", ".join(f"{a}-{b} {_fmt(seg['ms_per_step'], '.1f')}" for seg in segments for a, b in [seg["steps"]])
                   + " (the first segment holds the first-use compilation, the one where pass 2 begins the bake).")
    if validation.get("runs"):
        passes += f" {validation['runs']} validation runs took {validation['seconds']:.1f} s."
    if r.get("python"):
        passes += f" train.py ran with {r['python']}, without PYTHONPATH."
    if r.get("export_write_seconds") is not None and r.get("export_seconds") is not None:
        passes += (f" The final export took {r['export_seconds']:.1f} s, {r['export_write_seconds']:.1f} s of it "
                   "writing the files.")
    caches = r.get("caches")
    if caches:
        plugin = {True: "built", False: "not built", None: "–"}[caches.get("nvdiffrast_plugin")]
        scene = {True: "cached", False: "not cached", None: "not built-in"}[caches.get("scene")]
        passes += (f" Caches at the start: scene {scene}, nvdiffrast plugin {plugin}, "
                   f"{caches.get('triton_cache_entries', 0)} Triton and {caches.get('inductor_cache_entries', 0)} "
                   "Inductor cache entries.")
    if r.get("overrides"):
        passes += " Overrides: " + " ".join(f"`{o}`" for o in r["overrides"]) + "."
    stages = ("\n\nNo per-stage profile (--profile-steps 0)." if not r["stages"] else
              f"\n\nPer-stage time of one training step ({r.get('profile_steps')} steps after warm-up"
              + (f"; pass 2 on {p2.get('triangles')} triangles, {p2.get('texture_res')}² textures" if p2 else "")
              + "):\n\n" + _table(header, rows))
    return (f"## {r['preset']} on {r['device']} ({r.get('device_name') or ''}, torch {r['torch']}, "
            f"commit {(r.get('git_commit') or 'unknown')[:10]})\n\n" + _table(SUMMARY_HEADER, [summary_row(r)]) + passes
            + stages + "\n")


def write_result(r: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``<preset>-<device>.json`` and ``.md`` atomically; returns both paths."""
    missing = [k for k in RESULT_KEYS if k not in r]
    if missing:
        raise ValueError(f"benchmark result lacks {missing}")
    stem = f"{r.get('name') or r['preset']}-{r['device']}"
    jpath, mpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic_write_bytes(jpath, (json.dumps(r, indent=2) + "\n").encode())
    atomic_write_bytes(mpath, result_markdown(r).encode())
    return jpath, mpath


def write_summary(out_dir: Path) -> Path:
    """Regenerate ``out_dir/README.md``: one row per result JSON in ``out_dir``."""
    results = []
    for p in sorted(out_dir.glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(r, dict) and "preset" in r and "config" in r:
            results.append(r)
    text = ("# Benchmark results\n\nGenerated by `python bench/run.py` from the JSON files in this folder; "
            "see `bench/README.md` for what each column means.\n\n" + _table(SUMMARY_HEADER, [summary_row(r) for r in results])
            + "\n")
    path = out_dir / "README.md"
    atomic_write_bytes(path, text.encode())
    return path


# ---------------------------------------------------------------------------------------------- main
WARM_START_OVERRIDES = ("model.pass1_steps=20", "model.pass2_steps=20", "trainer.val_check_interval=10",
                        "callbacks.mesh_export.eval_samples=1000")


def warm_start(preset: str, overrides: list[str], python: str | None = None) -> float:
    """Run ``preset`` for 20 + 20 steps and throw the run away: what any earlier run on the machine leaves behind
    (the built-in scene in the cache, nvdiffrast's compiled plugin, Triton's and Inductor's kernel caches).
    Returns its wall seconds."""
    with tempfile.TemporaryDirectory(prefix=f"bench-warm-{preset}-") as tmp:
        return run_end_to_end(preset, Path(tmp) / "run", [*overrides, *WARM_START_OVERRIDES], python)["wall_seconds"]


def bench_preset(preset: str, out_dir: Path, profile_steps: int, warmup: int, run_dir: Path | None,
                 overrides: list[str], warm: bool = False, name: str | None = None, python: str | None = None) -> dict:
    cfg = compose_config(preset, overrides)
    warm_seconds = warm_start(preset, overrides, python) if warm else None
    caches = cache_state(cfg)

    def profile(run: Path) -> dict:
        if profile_steps <= 0:  # the end-to-end run alone
            return {"device": device_label(training_device(cfg)), "stages": {}, "step_ms": {}, "steps": 0}
        return profile_stages(cfg, steps=profile_steps, warmup=warmup, run_dir=run)

    if run_dir is None:
        with tempfile.TemporaryDirectory(prefix=f"bench-{preset}-") as tmp:
            e2e = run_end_to_end(preset, Path(tmp) / "run", overrides, python)
            prof = profile(Path(tmp) / "run")
    else:
        e2e = run_end_to_end(preset, run_dir / preset, overrides, python)
        prof = profile(run_dir / preset)
    r = assemble_result(preset, cfg, e2e, prof)
    r["warm_start"], r["warm_start_seconds"], r["name"] = warm, warm_seconds, name or preset
    r["overrides"], r["caches"] = list(overrides), caches
    r["python"] = python  # None: this interpreter and its environment
    jpath, _ = write_result(r, out_dir)
    print(result_markdown(r))
    print(f"wrote {jpath} and {jpath.with_suffix('.md')}")
    return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("presets", nargs="+", help="experiments in conf/experiment/ (cpu-small, quick, nerf800, ...)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--profile-steps", type=int, default=30, help="steps of the per-stage profile (0: none)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before the profiled ones")
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="keep the training runs in RUN_DIR/<preset> (default: a temporary folder, deleted)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra Hydra override for both the run and the profile (repeatable)")
    ap.add_argument("--warm-start", action="store_true",
                    help="first run the preset for a few steps, so the timed run finds the scene cached and the CUDA "
                         "plugin and kernels compiled, as every run after a machine's first does")
    ap.add_argument("--name", default=None, help="result file name (default: the preset's)")
    ap.add_argument("--python", default=None,
                    help="run train.py with this interpreter, without PYTHONPATH: e.g. DIR/bin/python of "
                         "`python bench/isolated_env.py DIR`, recon's dependencies alone (default: this one)")
    args = ap.parse_args(argv)
    if args.python is not None and not os.access(args.python, os.X_OK):
        ap.error(f"--python {args.python}: not an executable file")
    for preset in args.presets:
        if not (ROOT / "conf" / "experiment" / f"{experiment_name(preset)}.yaml").is_file():
            ap.error(f"unknown preset {preset!r}: no conf/experiment/{experiment_name(preset)}.yaml")
    for preset in args.presets:
        bench_preset(preset, args.out, args.profile_steps, args.warmup, args.run_dir, args.override, args.warm_start,
                     args.name, args.python)
    print(f"summary: {write_summary(args.out)}")


if __name__ == "__main__":
    main()
