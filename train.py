"""Fit a textured mesh to multi-view images: `python train.py [experiment=cpu] [data.path=DIR] [key=value ...]`."""
import sys

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from recon.config import register_configs, write_run_config

register_configs()  # typed schemas: a misspelt key fails at compose time, not at step 4000


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    L.seed_everything(cfg.seed, workers=True)
    write_run_config(cfg, HydraConfig.get().runtime.output_dir)  # config_resolved.yaml + version
    datamodule = hydra.utils.instantiate(cfg.data)
    system = hydra.utils.instantiate(cfg.model)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    logger = hydra.utils.instantiate(cfg.logger)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    try:
        trainer.fit(system, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except (torch.OutOfMemoryError, FloatingPointError, SIGTERMException):
        reports = [c.report for c in callbacks if getattr(c, "report", None)]
        if not reports:
            raise
        sys.exit(f"error: {reports[0]['message']}")  # the report, not a traceback; exit status 1


if __name__ == "__main__":
    main()
