"""Turn a failed or stopped fit into a report a person can act on: a checkpoint of the last good state and the fix.

Out of GPU memory: the numbers (requested, free, total) and the settings that reduce memory. Non-finite loss or
gradient (raised by ReconSystem with the step and the loss terms): the same checkpoint, so nothing is lost.
Ctrl-C or SIGTERM (a scheduler's preemption; Lightning stops after the current step): a checkpoint to resume from.
A cancellation (``FitCancelled``, raised before a step by ``recon.reconstruct``'s cancel check): the same.
All write ``failure.json`` into the run directory; ``train.py`` prints the message instead of a traceback.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from recon.export.obj import atomic_write_bytes

MEMORY_SETTINGS = "data.batch_size, data.resolution, model.geometry.tet_grid, model.bake.texture_res, model.light.base_res"


class FitFailure(RuntimeError):
    """A fit stopped for a reason recon can explain; the message says what happened and what to change.

    report: what ``failure.json`` holds (``kind``, ``step``, ``message``, ``checkpoint``, ...).
    """

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = dict(report) if report else {"kind": "internal", "message": message}

    @property
    def kind(self) -> str:
        return str(self.report.get("kind", "internal"))


class FitCancelled(Exception):
    """Raised before a training step when the caller asked the fit to stop (see ProgressReport's ``cancel``)."""


def write_failure(out_dir: str | Path, report: dict) -> None:
    """``failure.json`` in the run directory, written atomically."""
    atomic_write_bytes(Path(out_dir) / "failure.json", json.dumps(report, indent=2).encode())


def oom_message(exception: BaseException, device: torch.device | None, step: int, checkpoint: Path | None) -> str:
    """The out-of-memory report: requested / free / total memory where known, and the settings to lower."""
    text = str(exception)
    requested = re.search(r"Tried to allocate ([0-9.]+ [KMGT]i?B)", text)
    parts = [f"out of GPU memory at step {step}"]
    if requested:
        parts.append(f"requested {requested.group(1)}")
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        parts.append(f"free {free / 2**30:.2f} GiB of {total / 2**30:.2f} GiB")
    saved = f" The last good state is in {checkpoint} (resume with ckpt_path=...)." if checkpoint else ""
    return (", ".join(parts) + f". Lower one of {MEMORY_SETTINGS} (e.g. data.batch_size=4 halves the image "
            f"memory; tet_grid 96 instead of 128 needs about half the grid memory).{saved}")


class FailureReport(L.Callback):
    """On an out-of-memory, non-finite or interrupted stop: save ``checkpoints/failed-step<N>.ckpt`` and ``failure.json``;
    on a cancellation ``checkpoints/cancelled-step<N>.ckpt`` (the state after N steps: it resumes)."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.report: dict | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        oom = isinstance(exception, torch.OutOfMemoryError)
        stopped = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        cancelled = isinstance(exception, FitCancelled)
        if not (oom or stopped or cancelled or isinstance(exception, FloatingPointError)):
            return
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()  # room to write the checkpoint
        prefix = "cancelled" if cancelled else "failed"
        ckpt = self.out_dir / "checkpoints" / f"{prefix}-step{trainer.global_step}.ckpt"
        try:  # the parameters are those before the failing step: no optimiser step has used the bad values
            trainer.save_checkpoint(ckpt)
        except Exception:  # noqa: BLE001 - a report without checkpoint beats no report
            ckpt = None
        if oom:
            message = oom_message(exception, pl_module.device, trainer.global_step, ckpt)
        elif stopped or cancelled:
            how = "cancelled" if cancelled else "stopped by SIGTERM" if isinstance(exception, SIGTERMException) else "stopped by Ctrl-C"
            message = f"{how} at step {trainer.global_step}." + (
                f" Continue with ckpt_path={ckpt} (same overrides)." if ckpt else "")
        else:
            message = f"{exception}{f' The last good state is in {ckpt}.' if ckpt else ''}"
        kind = "out_of_memory" if oom else "interrupted" if stopped else "cancelled" if cancelled else "non_finite"
        self.report = {"kind": kind, "step": trainer.global_step,
                       "message": message, "checkpoint": str(ckpt) if ckpt else None}
        self._write()

    @rank_zero_only
    def _write(self) -> None:
        write_failure(self.out_dir, self.report)
