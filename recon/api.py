"""``recon.reconstruct``: one fit from Python (a job-queue worker, a notebook) with progress, cancellation and a
JSON result, on the same code path as ``train.py`` (``recon.fit.run_fit``).

    from recon import reconstruct
    result = reconstruct("/data/my_capture", "runs/job42", {"experiment": "cpu"},
                         on_progress=lambda f, stage, msg: print(f"{f:4.0%} {stage}: {msg}"), cancel=stop_event)
    result.status, result.paths["mesh.glb"], result.metrics["psnr"]

The run directory gets what ``train.py`` writes plus ``result.json`` (ReconResult) and ``.hydra/config.yaml`` /
``overrides.yaml`` (so ``recon.summarize`` reads it like a sweep job).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from recon import __version__

STATUSES = ("succeeded", "failed", "cancelled")
ERROR_KINDS = ("bad_input", "out_of_memory", "non_finite", "cancelled", "resources", "internal")
RESULT_FILE = "result.json"
RECORD_FILES = ("metrics.json", "timing.json", "run.json", "config_resolved.yaml", "failure.json")
EXIT_STATUS = {"succeeded": 0, "failed": 1, "cancelled": 2}  # `recon fit`'s exit status
_REPORT_KINDS = {"interrupted": "cancelled"}  # failure.json kinds -> ERROR_KINDS (SIGTERM/Ctrl-C: the job was stopped)
_PLAIN_VALUE = re.compile(r"[A-Za-z_/.][\w./:+@-]*")  # strings Hydra's grammar reads as strings without quotes
_KEYWORDS = {"true", "false", "null", "inf", "nan"}


@dataclass
class ReconResult:
    """What a reconstruction produced; ``result.json`` in the run directory (``to_json`` / ``from_json``).

    status: succeeded | failed | cancelled. paths: file name (relative to ``out_dir``, e.g. ``mesh.glb``,
    ``pass1/mesh.obj``) -> absolute path of every export and record present. metrics: ``metrics.json`` (test-view
    PSNR / SSIM / IoU, geometry against the ground truth when known). peak_gpu_memory_bytes: the CUDA allocator's
    peak during the run (None without CUDA); peak_host_memory_bytes: the process's peak resident memory (reset at the
    start on Linux, else since the process started). config: the resolved configuration. For failures: error_kind
    (one of ERROR_KINDS), message (what happened and what to change; for bad input it names the file), traceback
    (for internal errors) and checkpoint (the state to continue from with ``ckpt_path=``, when one was saved).
    """

    status: str
    out_dir: str
    paths: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    peak_gpu_memory_bytes: int | None = None
    peak_host_memory_bytes: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    error_kind: str | None = None
    message: str | None = None
    traceback: str | None = None
    checkpoint: str | None = None
    recon_version: str = __version__

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> ReconResult:
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# ---------------------------------------------------------------------------------------------------- inputs
def _override_value(value: Any) -> str:
    """A Python value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (os.PathLike, str)):
        text = os.fspath(value)
        if _PLAIN_VALUE.fullmatch(text) and text.lower() not in _KEYWORDS:
            return text
        quote = "'" if "'" not in text else '"'
        return f"{quote}{text}{quote}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_override_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"override value {value!r} ({type(value).__name__}) is not a number, string, bool, None or list.")


def _flatten(overrides: Mapping, prefix: str = "") -> list[str]:
    out = []
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ValueError(f"override key {key!r} must be a string (a config key such as 'data.resolution').")
        if isinstance(value, Mapping) and value:
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={_override_value(value)}")
    return out


def as_overrides(overrides: Any) -> list[str]:
    """Hydra override strings from a list of ``key=value`` strings or a (nested) dict such as
    ``{"experiment": "cpu", "data": {"resolution": 64}}``; ValueError for anything else."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return _flatten(overrides)
    if isinstance(overrides, (str, bytes)):
        raise ValueError(f"overrides={overrides!r} is a single string: pass a list of 'key=value' strings or a dict.")
    if isinstance(overrides, (list, tuple)):
        bad = [o for o in overrides if not isinstance(o, str)]
        if bad:
            raise ValueError(f"overrides must be 'key=value' strings; got {bad[0]!r} ({type(bad[0]).__name__}).")
        return list(overrides)
    raise ValueError(f"overrides must be a list of 'key=value' strings or a dict, not {type(overrides).__name__}.")


def as_cancel_check(cancel: Any) -> Callable[[], bool] | None:
    """A zero-argument check from a threading/multiprocessing Event (anything with ``is_set()``) or a callable."""
    if cancel is None:
        return None
    if callable(getattr(cancel, "is_set", None)):
        return lambda: bool(cancel.is_set())
    if callable(cancel):
        return lambda: bool(cancel())
    raise ValueError(f"cancel must be an Event (with is_set()) or a callable returning bool, not {type(cancel).__name__}.")


def source_overrides(source: str | os.PathLike | None) -> tuple[list[str], str]:
    """The data overrides ``train.py`` would get for ``source`` and its format ("builtin" for the built-in scene).

    A directory's layout is detected from its marker file (recon.data.sources.detect_format) and picks the data
    group of that name (``data=nerfstudio data.path=...``); a DataError names a folder that is missing or holds
    none of the markers.
    """
    from recon.data.sources import detect_format

    if source is None or (isinstance(source, str) and source == "builtin"):
        return ["data.path=null"], "builtin"
    root = Path(source).expanduser().resolve()
    fmt = detect_format(root)
    return [f"data={fmt}", f"data.path={_override_value(str(root))}"], fmt


# ---------------------------------------------------------------------------------------------------- outcome
def classify_failure(error: BaseException) -> dict[str, Any]:
    """``status``, ``error_kind``, ``message``, ``traceback`` (internal errors) and ``checkpoint`` of an exception a
    fit raised."""
    from hydra.errors import HydraException, InstantiationException

    from recon.callbacks.failure_report import FitCancelled, FitFailure
    from recon.data.frames import DataError

    def outcome(kind: str, message: str, trace: str | None = None, checkpoint: str | None = None) -> dict[str, Any]:
        return {"status": "cancelled" if kind == "cancelled" else "failed", "error_kind": kind, "message": message,
                "traceback": trace, "checkpoint": checkpoint}

    if isinstance(error, FitFailure):  # a report: resources, out of memory, non-finite, interrupted, cancelled
        kind = _REPORT_KINDS.get(error.kind, error.kind)
        return outcome(kind if kind in ERROR_KINDS else "internal", str(error), checkpoint=error.report.get("checkpoint"))
    if isinstance(error, FitCancelled):  # no FailureReport configured: no checkpoint
        return outcome("cancelled", str(error))
    cause = error.__cause__ if isinstance(error, InstantiationException) and error.__cause__ is not None else error
    if isinstance(cause, DataError) or isinstance(error, InstantiationException) and isinstance(cause, ValueError):
        return outcome("bad_input", str(cause))  # the data readers and the constructors name the file or setting
    if isinstance(error, HydraException):
        return outcome("bad_input", str(error))  # a misspelt key or a wrong type in the overrides
    if isinstance(error, torch.OutOfMemoryError):
        return outcome("out_of_memory", str(error))
    if isinstance(error, FloatingPointError):
        return outcome("non_finite", str(error))
    return outcome("internal", traceback.format_exception_only(error)[-1].strip(), "".join(traceback.format_exception(error)))


def _cuda_devices() -> range:
    """The CUDA devices to reset / read (none until this process has initialised CUDA)."""
    return range(torch.cuda.device_count()) if torch.cuda.is_available() and torch.cuda.is_initialized() else range(0)


def _reset_peak_memory() -> None:
    for device in _cuda_devices():
        torch.cuda.reset_peak_memory_stats(device)
    try:  # Linux: reset the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory() -> tuple[int | None, int | None]:
    gpu = max((int(torch.cuda.max_memory_allocated(d)) for d in _cuda_devices()), default=None)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return gpu, int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return gpu, int(peak if sys.platform == "darwin" else peak * 1024)


def collect_paths(out_dir: Path) -> dict[str, str]:
    """Every export (and pass-1 export) and run record present in ``out_dir``: relative name -> absolute path."""
    from recon.callbacks.mesh_export import EXPORT_FILES

    names = [*EXPORT_FILES, *(f"pass1/{n}" for n in EXPORT_FILES), *RECORD_FILES]
    return {name: str(out_dir / name) for name in names if (out_dir / name).is_file()}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_hydra_record(out_dir: Path, cfg, overrides: list[str]) -> None:
    """``.hydra/config.yaml`` and ``overrides.yaml``, the record a Hydra run leaves (read by recon.summarize)."""
    from omegaconf import OmegaConf

    from recon.export.obj import atomic_write_bytes

    atomic_write_bytes(out_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg).encode())
    atomic_write_bytes(out_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)).encode())


def _release_memory() -> None:
    gc.collect()  # the trainer, system and data module form reference cycles
    for device in _cuda_devices():
        if torch.cuda.memory_reserved(device):  # a device this process used (no new context on the others)
            with torch.cuda.device(device):
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- the call
def reconstruct(
    source: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    overrides: list[str] | Mapping[str, Any] | None = None,
    on_progress: Callable[[float, str, str], None] | None = None,
    cancel: Any = None,
) -> ReconResult:
    """Fit a textured mesh to ``source`` into ``out_dir`` (what ``python train.py`` does) and return the result.

    source: a scene directory in any layout recon reads (NeRF-synthetic, nerfstudio, LLFF, COLMAP, views + depth,
    unposed photos), or None / "builtin" for the built-in scene. overrides: Hydra ``key=value`` strings or a nested
    dict, applied after the data choice (they win). on_progress(fraction, stage, message): fraction in [0, 1] never
    decreasing, stages in the order of ``recon.callbacks.progress_report.STAGES``, then 1.0 with stage "done" once
    ``result.json`` is written. cancel: an Event or a callable returning True to stop; checked before every step,
    the fit stops with ``checkpoints/cancelled-step<N>.ckpt`` and exports nothing.
    Never raises for a failed run: the result says why (``error_kind``). Raises ValueError for arguments of the
    wrong type. Memory (GPU and host) is released before it returns, so fits can follow each other in a process.
    """
    from recon.callbacks.progress_report import STAGE_START, ProgressReport
    from recon.export.obj import atomic_write_bytes

    extra = as_overrides(overrides)
    is_cancelled = as_cancel_check(cancel)
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source must be a scene directory path, 'builtin' or None, not {type(source).__name__}.")
    if on_progress is not None and not callable(on_progress):
        raise ValueError(f"on_progress must be callable (fraction, stage, message), not {type(on_progress).__name__}.")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _reset_peak_memory()
    progress = ProgressReport(on_progress, is_cancelled)
    progress.report(STAGE_START["preparing data"], "preparing data", f"{source or 'built-in scene'} -> {out}")
    config: dict = {}
    outcome: dict[str, Any] = {"status": "succeeded"}
    try:
        _fit(source, out, extra, progress, config)
    except Exception as error:  # noqa: BLE001 - every failure becomes the result, never an exception
        outcome = classify_failure(error)
    _release_memory()
    gpu_peak, host_peak = _peak_memory()
    succeeded = outcome["status"] == "succeeded"
    result = ReconResult(out_dir=str(out), paths=collect_paths(out),
                         metrics=_read_json(out / "metrics.json") if succeeded else {},
                         wall_seconds=time.perf_counter() - start, peak_gpu_memory_bytes=gpu_peak,
                         peak_host_memory_bytes=host_peak, config=config, **outcome)
    atomic_write_bytes(out / RESULT_FILE, result.to_json().encode())
    progress.report(1.0, "done", result.status if succeeded else f"{result.status}: {result.message}")
    return result


def _fit(source, out: Path, extra: list[str], progress, config: dict) -> None:
    """Compose, record and run the fit; ``config`` receives the resolved configuration."""
    from omegaconf import OmegaConf

    from recon.callbacks.failure_report import FitCancelled
    from recon.callbacks.progress_report import STAGE_START
    from recon.fit import compose_config, run_fit

    if progress.cancel is not None and progress.cancel():
        raise FitCancelled("cancelled before the fit started: nothing was run.")
    data, fmt = source_overrides(source)
    cfg = compose_config([*data, *extra], out)
    config.update(OmegaConf.to_container(cfg, resolve=True))
    _write_hydra_record(out, cfg, [*data, *extra])
    if fmt == "images":
        progress.report(STAGE_START["poses"], "poses", "structure-from-motion of the photos (cached after the first run)")
    run_fit(cfg, out, extra_callbacks=[progress])
