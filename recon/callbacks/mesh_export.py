"""Export the reconstruction: after pass 1 (into ``pass1/``) and when fitting ends, then evaluate the files."""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from recon.color import linear_to_srgb
from recon.eval.evaluate import RUN_INFO, evaluate_run, format_table
from recon.export.gltf import write_glb
from recon.export.hdr import write_hdr
from recon.export.obj import PNG_LEVEL, atomic_write_bytes, check_png_level, encode_textures, texture_pixels, write_textured_obj
from recon.geometry.mesh import Mesh
from recon.materials.pbr import split_channels

THROUGHPUT_WARMUP = 20  # steps of each pass left out of its steady-state throughput
EXPORT_FILES = ("probe.hdr", "texture_kd.png", "texture_ks.png", "texture_n.png", "mesh.mtl", "mesh.glb", "mesh.obj")


def write_result(out_dir: str | Path, mesh: Mesh, texture: torch.Tensor, light_latlong: torch.Tensor | None,
                 to_world=None, png_level: int = PNG_LEVEL) -> Path:
    """Write every export of a textured PBR mesh into ``out_dir``; returns the OBJ path.

    mesh: UV-unwrapped. texture: [R,R,9] (kd, ks = occlusion/roughness/metallic, tangent-space normal).
    light_latlong: [H,2H,3] linear HDR or None. to_world: maps the fit's (normalized) positions back to the input's
    coordinates (``datamodule.normalization.to_world``); None keeps them. png_level: the PNGs' zlib level, 0-9.
    Files: ``probe.hdr``, ``texture_kd.png`` (sRGB), ``texture_ks.png``
    (linear ORM, nvdiffrec's layout), ``texture_n.png``, ``mesh.mtl``, ``mesh.glb`` (glTF PBR metallic-roughness;
    its occlusion is 1 - ks.occlusion, glTF's visibility convention) and ``mesh.obj``.
    Everything is written into a hidden staging folder first and then renamed into place, ``mesh.glb`` and
    ``mesh.obj`` last: a crash while encoding leaves no new file, and an existing ``mesh.obj`` always belongs to a
    complete export.
    """
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if to_world is not None:  # back to the input's coordinates (a similarity: normals and tangents keep their directions)
        mesh = Mesh(verts=torch.as_tensor(to_world(mesh.verts), dtype=mesh.verts.dtype, device=mesh.verts.device),
                    faces=mesh.faces, normals=mesh.normals, uv=mesh.uv, uv_faces=mesh.uv_faces, tangents=mesh.tangents,
                    handedness=mesh.handedness)
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        ch = split_channels(texture)
        if light_latlong is not None:
            write_hdr(stage / "probe.hdr", light_latlong)
        orm = torch.cat([1 - ch["ks"][..., 0:1], ch["ks"][..., 1:3]], -1)
        # the albedo and normal maps are the same PNGs in both files: encoded once, with the others, in threads
        pngs = encode_textures(texture_pixels(ch["kd"], ks=ch["ks"], orm=orm, normal_ts=ch["nrm"]), level=png_level)
        with ThreadPoolExecutor(2) as pool:  # the GLB's buffers and the OBJ's text side by side
            jobs = [pool.submit(write_glb, stage / "mesh.glb", mesh, ch["kd"], orm, ch["nrm"], pngs=pngs),
                    pool.submit(write_textured_obj, stage, mesh, ch["kd"], ks=ch["ks"], normal_ts=ch["nrm"],
                                pngs=pngs)]
            for job in jobs:
                job.result()  # re-raises a writer's error here
        for name in EXPORT_FILES:
            if (stage / name).is_file():
                (stage / name).replace(out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir / "mesh.obj"


def _to_world(trainer: L.Trainer):
    """The datamodule's normalized-to-input coordinate map, or None when the fit ran in the input's coordinates."""
    norm = getattr(trainer.datamodule, "normalization", None)
    return None if norm is None or norm.is_identity else norm.to_world


def log_hparams_with_metrics(trainer: L.Trainer, pl_module: L.LightningModule, metrics: dict, timing: dict) -> None:
    """The run's hyperparameters with its final test metrics, for TensorBoard's HParams tab (runs compare there)."""
    if trainer.logger is None:
        return
    geo = metrics.get("geometry", {})
    final = {"hparams/psnr": metrics.get("psnr"), "hparams/ssim": metrics.get("ssim"), "hparams/iou": metrics.get("iou"),
             "hparams/chamfer_l1": geo.get("chamfer_l1"), "hparams/fit_seconds": timing.get("fit_seconds")}
    final = {k: float(v) for k, v in final.items() if isinstance(v, (int, float))}
    trainer.logger.log_hyperparams(dict(pl_module.hparams), metrics=final)


def throughput_marks(pl_module: L.LightningModule, max_steps: int) -> tuple[int, ...]:
    """Global steps after which the steady-state throughput windows start and end: each pass's first steps
    (plugin compilation, JIT, allocator growth; in pass 2 also the bake) are left out of its window."""
    max_steps = int(max_steps) if max_steps and max_steps > 0 else int(getattr(pl_module, "pass1_steps", 0))
    p1 = min(int(getattr(pl_module, "pass1_steps", max_steps)), max_steps)
    p2 = max(max_steps - p1, 0)
    marks = [max(1, min(THROUGHPUT_WARMUP, p1 // 10)), p1]
    if p2 > 0:
        marks += [p1 + max(1, min(THROUGHPUT_WARMUP, p2 // 10)), p1 + p2]
    return tuple(marks)


def steady_throughput(step_times: dict[int, float], pl_module: L.LightningModule, max_steps: int) -> dict:
    """``pass1_iterations_per_second`` / ``pass2_...``: steps per second inside each pass's window (see
    `throughput_marks`), the figure that compares runs (one GPU against several, backends, settings) without the
    one-off costs that ``fit_seconds`` includes."""
    marks = throughput_marks(pl_module, max_steps)
    out = {}
    for name, (a, b) in zip(("pass1", "pass2"), zip(marks[0::2], marks[1::2])):
        if a in step_times and b in step_times and b > a:
            out[f"{name}_iterations_per_second"] = (b - a) / (step_times[b] - step_times[a])
    return out


def start_up_seconds(step_times: dict[int, float], t0: float | None, pl_module: L.LightningModule, max_steps: int) -> dict:
    """What each pass's first steps cost beyond its steady state, the one-off costs ``fit_seconds`` hides:
    ``pass1_first_steps_seconds`` (fit start to the end of pass 1's first window mark: first-use compilation of the
    CUDA plugin, Triton and Inductor kernels, allocator growth) and ``pass2_first_steps_seconds`` (end of pass 1 to
    pass 2's first mark: the bake, the pass-1 export, pass 2's first compilations), with ``..._first_steps``, the
    number of steps each covers."""
    marks, out = throughput_marks(pl_module, max_steps), {}
    if t0 is not None and marks[0] in step_times:
        out["pass1_first_steps"] = marks[0]
        out["pass1_first_steps_seconds"] = step_times[marks[0]] - t0
    if len(marks) == 4 and marks[1] in step_times and marks[2] in step_times:
        out["pass2_first_steps"] = marks[2] - marks[1]
        out["pass2_first_steps_seconds"] = step_times[marks[2]] - step_times[marks[1]]
    return out


class SegmentClock:
    """Where a fit's time goes along the schedule: the wall time of every ``segment_steps`` steps with the validation
    runs inside them left out, and the validation runs' own time (timing.json's ``segments`` and ``validation``).

    ``step_end(step)`` after each training step, ``validation_start()`` / ``validation_end()`` around each
    validation run; ``sync`` waits for the device first (a CUDA synchronize: once per segment and twice per
    validation run), so the times are the device's as well as the host's. The first segment holds the first-use
    compilation, the one in which pass 2 starts the pass switch (the bake)."""

    def __init__(self, segment_steps: int, sync: Callable[[], None] = lambda: None, clock=time.perf_counter):
        if segment_steps < 1:
            raise ValueError(f"callbacks.mesh_export.segment_steps must be >= 1, got {segment_steps}")
        self.segment_steps, self.sync, self.clock = int(segment_steps), sync, clock
        self.segments: list[dict] = []
        self._start: tuple[int, float] | None = None  # (step, time) where the current segment began
        self._validation = 0.0  # seconds of validation inside the current segment
        self._validation_total, self._validation_runs = 0.0, 0
        self._validation_t0: float | None = None

    def start(self, step: int = 0) -> None:
        self.sync()
        self._start, self._validation = (int(step), self.clock()), 0.0

    def step_end(self, step: int, last: bool = False) -> None:
        if self._start is None or not (step % self.segment_steps == 0 or last) or step <= self._start[0]:
            return
        self.sync()
        now = self.clock()
        first, t0 = self._start
        seconds = now - t0 - self._validation
        self.segments.append({"steps": [first, int(step)], "ms_per_step": seconds * 1e3 / (step - first),
                              "validation_seconds": self._validation})
        self._start, self._validation = (int(step), now), 0.0

    def validation_start(self) -> None:
        self.sync()
        self._validation_t0 = self.clock()

    def validation_end(self) -> None:
        if self._validation_t0 is None:
            return
        self.sync()
        seconds = self.clock() - self._validation_t0
        self._validation_t0 = None
        self._validation += seconds
        self._validation_total += seconds
        self._validation_runs += 1

    def summary(self) -> dict:
        return {"segments": list(self.segments),
                "validation": {"runs": self._validation_runs, "seconds": self._validation_total}}


def process_age() -> float | None:
    """Seconds since this process started (Linux, from /proc, to 10 ms), None where that is not known."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def peak_memory_per_rank(trainer: L.Trainer, pl_module: L.LightningModule) -> list[int] | None:
    """Peak allocated GPU memory of every rank (gathered to all), or None off CUDA."""
    if not (torch.cuda.is_available() and pl_module.device.type == "cuda"):
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(pl_module.device)], device=pl_module.device)
    if trainer.world_size > 1:
        peak = trainer.strategy.all_gather(peak)
    return [int(v) for v in peak.flatten().tolist()]


def vertex_albedo(mesh: Mesh, kd: torch.Tensor) -> torch.Tensor:
    """sRGB albedo per vertex [V,3] in 0..255 from the [R,R,3] linear albedo texture (nearest texel of one corner's
    UV; a vertex on a seam takes one side's), for viewers that show vertex colours."""
    res = kd.shape[0]
    corner_uv = mesh.uv[mesh.uv_faces.reshape(-1)]
    texel = (corner_uv * res - 0.5).round().long().clamp(0, res - 1)
    color = kd[texel[:, 1], texel[:, 0]]  # recon's UV convention: u along columns, v down the rows
    out = torch.zeros(mesh.verts.shape[0], 3, device=kd.device, dtype=kd.dtype)
    out[mesh.faces.reshape(-1)] = color
    return (linear_to_srgb(out.clamp(0, 1)) * 255).round().to(torch.uint8)


def log_mesh(trainer: L.Trainer, mesh: Mesh, kd: torch.Tensor) -> None:
    """The exported mesh with its albedo as vertex colours in TensorBoard's mesh dashboard (tag ``mesh``)."""
    writer = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
    if not hasattr(writer, "add_mesh") or mesh.uv is None:
        return
    writer.add_mesh("mesh", vertices=mesh.verts[None].float().cpu(), faces=mesh.faces[None].int().cpu(),
                    colors=vertex_albedo(mesh, kd)[None].cpu(), global_step=trainer.global_step)


def final_summary(out_dir: Path, timing: dict, metrics: dict | None) -> str:
    """The few lines printed when a fit ends: where the exports are, the test metrics, time and peak memory."""
    files = [name for name in ("mesh.obj", "mesh.glb", "probe.hdr") if (out_dir / name).is_file()]
    extra = "textures; pass-1 result in pass1/" if (out_dir / "pass1").is_dir() else "textures"
    lines = ["", "=" * 72, f"recon finished: {out_dir}", f"  exports    {', '.join(files)} (+ {extra})"]
    if metrics:
        geo = metrics.get("geometry", {})
        psnr = metrics["psnr"]  # "inf" (a string in JSON) for a perfect match
        psnr = f"{psnr:.2f}" if isinstance(psnr, (int, float)) else str(psnr)
        quality = f"PSNR {psnr} dB, SSIM {metrics['ssim']:.4f}, IoU {metrics['iou']:.4f}"
        if "chamfer_l1" in geo:
            quality += f", chamfer-L1 {geo['chamfer_l1']:.5f} of the diagonal"
        lines.append(f"  test views {quality} (metrics.json)")
    fit, steps = timing.get("fit_seconds"), timing.get("steps")
    rates = ", ".join(f"pass {p} {timing[f'pass{p}_iterations_per_second']:.1f} it/s" for p in (1, 2)
                      if f"pass{p}_iterations_per_second" in timing)
    if fit is not None:
        lines.append(f"  time       fit {fit:.1f} s for {steps} steps ({rates}), export {timing['export_seconds']:.1f} s")
    if timing.get("peak_gpu_memory_bytes"):
        lines.append(f"  memory     peak GPU {timing['peak_gpu_memory_bytes'] / 2**30:.2f} GiB per process")
    lines.append(f"  look       python -m recon.render_turntable {out_dir}   |   tensorboard --logdir {out_dir / 'tb'}")
    return "\n".join(lines + ["=" * 72])


class MeshExport(L.Callback):
    """Writes the exports (see `write_result`) into ``out_dir`` when training ends (rank zero), and the pass-1
    result into ``out_dir/pass1/`` at the pass boundary; then evaluates the final files into ``metrics.json``.

    save_extracted: also write the full-resolution surface before clean-up as ``mesh_extracted.ply``.
    evaluate: run recon.eval on the export, with ``eval_samples`` surface samples for the geometry metrics.
    background_pass1: write the pass-1 export in a thread while pass 2 trains (its files appear as a whole, as
    always; the fit waits for it before the final export and fails if it failed). None: when training on CUDA, where
    the host mostly waits for the GPU; on a CPU the writing would take cores from training, so it writes at once.
    png_level: zlib level of the texture PNGs, 0-9 (`recon.export.obj.PNG_LEVEL`: fastest; 9: smallest files).
    segment_steps: timing.json's ``segments``: the fit's milliseconds per step over every this many steps, validation
    runs left out and timed on their own (`SegmentClock`).
    ``listeners`` are called with "export" and "evaluate" as each of those stages begins (progress reports).
    """

    def __init__(self, out_dir: str, save_extracted: bool = False, evaluate: bool = True, eval_samples: int = 100_000,
                 background_pass1: bool | None = None, png_level: int = PNG_LEVEL, segment_steps: int = 500):
        self.out_dir = Path(out_dir)
        self.png_level = check_png_level(png_level)
        self.segment_steps = int(segment_steps)
        self._clock = SegmentClock(self.segment_steps)  # validates segment_steps here, at instantiation
        self._sync: Callable[[], None] = lambda: None  # waits for the training device (set at fit start)
        self.save_extracted = save_extracted
        self.evaluate = evaluate
        self.eval_samples = int(eval_samples)
        self.background_pass1 = background_pass1
        self._pass1_writer: threading.Thread | None = None
        self._pass1_error: BaseException | None = None
        self._t0: float | None = None
        self._pass_seconds: dict[str, float] = {}
        self._step_times: dict[int, float] = {}  # global step -> time, at the ends of the throughput windows
        self._marks: tuple[int, ...] | None = None
        self._startup: dict[str, float | None] = {}  # seconds since the process started, at the fit's milestones
        self.listeners: list[Callable[[str], None]] = []

    def _begin(self, stage: str) -> None:
        for listener in self.listeners:
            listener(stage)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from recon.fit import startup_marks

        self._startup.update(startup_marks)  # imports, config, memory check, instantiation (where run_fit ran)
        self._startup["data_ready"] = process_age()  # after the data module's prepare_data and setup

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        self._sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self._clock = SegmentClock(self.segment_steps, self._sync)
        self._clock.start(trainer.global_step)
        self._t0 = time.perf_counter()
        self._startup["fit_start"] = process_age()  # the model on its device, optimisers configured
        dm = trainer.datamodule
        info = {"data_dir": str(Path(dm.scene_dir()).resolve()), "format": dm.format if dm.path else "nerf_synthetic",
                "resolution": list(dm.resolution) if dm.resolution else None,
                "background_color": list(dm.background_color) if dm.background_color else None,
                "mask_tolerance": dm.mask_tolerance, "light": dict(pl_module.hparams.get("light", {}))}
        norm = getattr(dm, "normalization", None)
        if norm is not None:
            info["normalization"] = norm.as_dict()
        atomic_write_bytes(self.out_dir / RUN_INFO, json.dumps(info, indent=2).encode())

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if "first_step_start" not in self._startup:
            self._startup["first_step_start"] = process_age()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if "first_step_end" not in self._startup:
            self._startup["first_step_end"] = process_age()
        if self._marks is None:  # the schedule is fixed for the fit: computed once, not every step
            self._marks = throughput_marks(pl_module, trainer.max_steps)
        if trainer.global_step in self._marks:
            self._sync()
            self._step_times[trainer.global_step] = time.perf_counter()
        if trainer.is_global_zero:
            self._clock.step_end(trainer.global_step, last=trainer.global_step == trainer.max_steps)
        result = getattr(pl_module, "pass1_result", None)
        if result is None:
            return
        pl_module.pass1_result = None
        if trainer.is_global_zero:
            self._pass_seconds["pass1_seconds"] = time.perf_counter() - self._t0 if self._t0 else None
            args = (result["mesh"].detach().to("cpu"), result["texture"].detach().cpu(),
                    None if result["light"] is None else result["light"].detach().cpu(), _to_world(trainer))
            background = self.background_pass1
            if background is None:
                background = pl_module.device.type == "cuda"
            if not background:
                self._write_pass1(*args)
                return
            self._pass1_writer = threading.Thread(target=self._write_pass1, args=args, kwargs={"keep_error": True},
                                                  name="recon-pass1-export")
            self._pass1_writer.start()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._clock.validation_start()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._clock.validation_end()

    def _write_pass1(self, mesh: Mesh, texture: torch.Tensor, light: torch.Tensor | None, to_world,
                     keep_error: bool = False) -> None:
        try:
            write_result(self.out_dir / "pass1", mesh, texture, light, to_world, self.png_level)
        except BaseException as err:  # in the thread: kept for `_join_pass1` to raise in the fit's thread
            if not keep_error:
                raise
            self._pass1_error = err
            return
        rank_zero_info(f"pass 1 exported to {self.out_dir / 'pass1'} ({mesh.faces.shape[0]} triangles)")

    def _join_pass1(self, raise_error: bool = True) -> None:
        """Wait for a pass-1 export running in its thread; re-raise its error (naming the folder) if it failed."""
        if self._pass1_writer is not None:
            self._pass1_writer.join()
            self._pass1_writer = None
        err, self._pass1_error = self._pass1_error, None
        if err is not None and raise_error:
            raise RuntimeError(f"the pass-1 export into {self.out_dir / 'pass1'} failed: {err!r}") from err

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._join_pass1(raise_error=False)  # its files are complete or absent: let it finish, report the first error

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_end, not on_fit_end: the module is still on its training device here
        peaks = peak_memory_per_rank(trainer, pl_module)  # a collective: every rank, before rank 0 goes on alone
        if not trainer.is_global_zero:
            return
        self._join_pass1()
        if trainer.interrupted:
            rank_zero_info("fit interrupted: no mesh exported.")
            return
        self._begin("export")
        fit_seconds = time.perf_counter() - self._t0 if self._t0 else None
        t0 = time.perf_counter()
        with torch.no_grad():
            if self.save_extracted and pl_module.current_pass == 1:
                ply = pl_module.geometry.extract_mesh().to_trimesh().export(file_type="ply")
                atomic_write_bytes(self.out_dir / "mesh_extracted.ply", ply)
            result = pl_module.result()
        t_write = time.perf_counter()
        obj = write_result(self.out_dir, result["mesh"], result["texture"], result["light"], _to_world(trainer),
                           self.png_level)
        export_seconds = time.perf_counter() - t0
        log_mesh(trainer, result["mesh"], split_channels(result["texture"])["kd"])
        mesh = result["mesh"]
        rank_zero_info(f"exported {obj} ({mesh.faces.shape[0]} triangles, {result['texture'].shape[0]}^2 textures)")
        timing = {"fit_seconds": fit_seconds, "export_seconds": export_seconds,
                  "export_write_seconds": export_seconds - (t_write - t0),  # the files; the rest gathers the result
                  "steps": trainer.global_step,
                  "passes": pl_module.current_pass, "skipped_steps": getattr(pl_module, "skipped_steps", 0),
                  **self._pass_seconds, **result["stats"],
                  "exported_triangles": int(mesh.faces.shape[0])}
        if "pass1_seconds" in timing and fit_seconds is not None:
            timing["pass2_seconds"] = fit_seconds - timing["pass1_seconds"]
        timing.update(steady_throughput(self._step_times, pl_module, trainer.max_steps))
        timing.update(start_up_seconds(self._step_times, self._t0, pl_module, trainer.max_steps))
        timing.update(self._clock.summary())
        if all(v is not None for v in self._startup.values()):
            timing["startup_seconds"] = dict(self._startup)  # since the process started
        if peaks is not None:
            timing["peak_gpu_memory_bytes"] = max(peaks)
            timing["peak_gpu_memory_bytes_per_rank"] = peaks
        atomic_write_bytes(self.out_dir / "timing.json", json.dumps(timing, indent=2).encode())
        if self.evaluate:
            self._begin("evaluate")
            metrics = evaluate_run(self.out_dir, backend=pl_module.rasterizer.name, device=str(pl_module.device),
                                   n_samples=self.eval_samples)
            rank_zero_info("test metrics of the exported mesh:\n" + format_table(metrics))
            log_hparams_with_metrics(trainer, pl_module, metrics, timing)
        else:
            metrics = None
        rank_zero_info(final_summary(self.out_dir, timing, metrics))
