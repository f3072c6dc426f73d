"""Progress of a fit as (fraction, stage, message) for a caller's callback, and a cancel check before every step."""
from __future__ import annotations

from typing import Callable

import lightning as L

from recon.callbacks.failure_report import FitCancelled
from recon.callbacks.mesh_export import MeshExport

# Stages in the order a fit goes through them, each with the fraction reported when it begins. Training spans
# [TRAIN_START, TRAIN_END] in proportion to the steps of both passes; "poses" only for unposed photos (SfM),
# "unwrap/bake" and "pass 2" only with model.pass2_steps > 0, "evaluate" only with callbacks.mesh_export.evaluate.
STAGES = ("preparing data", "poses", "pass 1", "unwrap/bake", "pass 2", "export", "evaluate")
STAGE_START = {"preparing data": 0.0, "poses": 0.02, "export": 0.9, "evaluate": 0.95}
TRAIN_START, TRAIN_END = 0.05, 0.9

ProgressFn = Callable[[float, str, str], None]


class ProgressReport(L.Callback):
    """Calls ``on_progress(fraction, stage, message)`` as a fit advances, and stops it when ``cancel()`` is true.

    fraction: in [0, 1], never decreasing; stage: one of STAGES, in that order (a caller reports "preparing data"
    and "poses" through ``report`` before the fit starts, and 1.0 when everything is written). Training steps are
    reported at most ``updates_per_pass`` times per pass, plus the first step of each pass.
    cancel: a zero-argument callable; checked before every training step, it raises FitCancelled when true, which
    FailureReport turns into ``checkpoints/cancelled-step<N>.ckpt`` and ``failure.json``; nothing is exported.
    """

    def __init__(self, on_progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None,
                 updates_per_pass: int = 100):
        self.on_progress = on_progress
        self.cancel = cancel
        self.updates_per_pass = max(1, int(updates_per_pass))
        self.fraction = 0.0
        self.stage: str | None = None
        self._steps = (1, 0)  # pass1_steps, pass2_steps

    def report(self, fraction: float, stage: str, message: str = "") -> None:
        """Tell the caller: ``fraction`` is clamped to [previous fraction, 1]."""
        self.fraction = min(1.0, max(self.fraction, float(fraction)))
        self.stage = stage
        if self.on_progress is not None:
            self.on_progress(self.fraction, stage, message)

    def _train_fraction(self, step: int) -> float:
        total = max(1, sum(self._steps))
        return TRAIN_START + (TRAIN_END - TRAIN_START) * min(step, total) / total

    def _begin(self, stage: str) -> None:  # MeshExport's listener
        what = {"export": "writing the mesh, its textures and the light probe",
                "evaluate": "rendering the export at the test views"}
        self.report(STAGE_START[stage], stage, what.get(stage, ""))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, MeshExport) and self._begin not in callback.listeners:
                callback.listeners.append(self._begin)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps = (int(pl_module.pass1_steps), int(pl_module.pass2_steps))
        step = trainer.global_step
        self.report(self._train_fraction(step), f"pass {pl_module.current_pass}", f"step {step} of {sum(self._steps)}")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.cancel is not None and self.cancel():
            raise FitCancelled(f"cancelled at step {trainer.global_step}")
        if getattr(pl_module, "pass_switch_due", False):  # ReconSystem bakes after this hook, before the step
            step = trainer.global_step
            self.report(self._train_fraction(step), "unwrap/bake",
                        f"pass 1 done at step {step}: extracting, decimating, unwrapping and baking the mesh")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step, stage = trainer.global_step, f"pass {pl_module.current_pass}"
        pass_steps = self._steps[0] if stage == "pass 1" else self._steps[1]
        every = max(1, pass_steps // self.updates_per_pass)
        if stage != self.stage or step % every == 0:
            self.report(self._train_fraction(step), stage, f"step {step} of {sum(self._steps)}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._let_go_of_module()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._let_go_of_module()

    def _let_go_of_module(self) -> None:
        # Lightning gives every callback the module's log/log_dict (bound methods); this callback outlives the fit
        # (its caller reports the end), so it drops them and the module, with its GPU memory, can be freed
        for name in ("log", "log_dict"):
            self.__dict__.pop(name, None)
