"""Resume Python's garbage collection after the fit's first training step (`recon.startup`)."""
from __future__ import annotations

import lightning as L

from recon import startup


class ResumeCollection(L.Callback):
    """Calls `recon.startup.resume` once the first training step is done: the fit's set-up (the model on its device,
    the plugin and kernels loaded, Lightning's loop) has built its objects by then. Nothing when train.py did not
    pause collection (the Python API, tests)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        startup.resume()  # nothing once resumed
