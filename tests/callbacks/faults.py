"""Fault injection for the failure tests: a callback that breaks a fit at a given step (used through Hydra)."""
import os
import signal

import lightning as L
import torch


class RaiseAt(L.Callback):
    """At ``step``: ``oom`` raises CUDA's out-of-memory error; ``nan_loss`` makes the alpha weight NaN (the loss
    becomes NaN, parameters stay good); ``nan_grad`` makes the SDF's gradient NaN; ``sigterm`` sends the process
    SIGTERM, as a scheduler preempting the job would; ``sigkill`` kills it outright (a crash, the OOM killer, a
    lost node): nothing runs after it."""

    def __init__(self, step: int, kind: str):
        self.step, self.kind = int(step), kind

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if self.kind == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB (GPU 0; 79.1 GiB total)")
        if self.kind == "nan_loss":
            pl_module.loss_cfg["alpha_weight"] = float("nan")
        if self.kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        if self.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "nan_grad":
            pl_module.geometry.sdf.register_hook(lambda g: torch.full_like(g, float("nan")))
