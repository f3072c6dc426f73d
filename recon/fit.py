"""One fit from a composed config: the body of ``train.py``, shared with ``recon.reconstruct``.

``compose_config`` composes ``conf/train.yaml`` with overrides the way ``train.py``'s Hydra does (for callers
without ``@hydra.main``); ``run_fit`` writes the resolved config, checks the memory, instantiates the data module,
system, callbacks, logger and trainer, and fits.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from recon import startup
from recon.callbacks.failure_report import FitCancelled, FitFailure, write_failure
from recon.callbacks.startup_gc import ResumeCollection
from recon.config import register_configs, write_run_config
from recon.resources import ResourceError, check_resources

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # train.py's config_path

# Seconds since the process started at the steps before a fit (`mark_startup`): "imported" (train.py, its imports
# done), "run_fit" (Hydra's config and run folder ready), "memory_checked" and "built" (data module, model,
# callbacks, logger and trainer instantiated). The MeshExport callback adds them to timing.json's startup_seconds.
startup_marks: dict[str, float] = {}


def mark_startup(name: str) -> None:
    """Record `startup_marks[name]` now (nothing where the process's age is not known)."""
    from recon.callbacks.mesh_export import process_age

    age = process_age()
    if age is not None:
        startup_marks[name] = age


def compose_config(overrides: Sequence[str] = (), out_dir: str | Path | None = None) -> DictConfig:
    """``conf/train.yaml`` composed with Hydra ``key=value`` overrides: the config ``train.py`` would get.

    out_dir: the run directory. Given, it stands for ``hydra.runtime.output_dir`` and every interpolation is
    resolved (``${hydra:runtime.output_dir}`` becomes ``out_dir``); the ``hydra`` node is left out, as in train.py.
    Raises Hydra's ConfigCompositionException for a misspelt key or a wrong type (the typed schemas).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    if not (CONF_DIR / "train.yaml").is_file():
        raise FileNotFoundError(f"{CONF_DIR / 'train.yaml'} not found: recon runs from its source tree "
                                "(pip install -e <repository>), where conf/ lives beside recon/.")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=out_dir is not None)
    if out_dir is None:
        return cfg
    with read_write(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(Path(out_dir).resolve())
    hydra_config, previous = HydraConfig.instance(), HydraConfig.instance().cfg
    hydra_config.set_config(cfg)  # what ${hydra:...} reads
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        OmegaConf.resolve(cfg)
    finally:
        hydra_config.cfg = previous
    return cfg


def run_fit(cfg: DictConfig, out_dir: str | Path, extra_callbacks: Sequence[L.Callback] = ()) -> None:
    """Fit ``cfg`` (a composed train config) into ``out_dir``: what ``python train.py`` does.

    Writes ``config_resolved.yaml``, refuses a fit whose estimated memory exceeds the free memory (unless
    ``check_resources=false``), builds everything from the config (``extra_callbacks`` run after the configured
    ones) and trains; the callbacks export and evaluate.
    Raises FitFailure with the report (``failure.json``) of a stop recon can explain: ResourceError before
    anything is built; out of memory, non-finite values, SIGTERM, a cancellation, with their checkpoint. Anything
    else passes through (a DataError names the input file and the fix).
    """
    for name in [k for k in startup_marks if k != "imported"]:  # an earlier fit in this process
        del startup_marks[name]
    mark_startup("run_fit")
    L.seed_everything(cfg.seed, workers=True)
    write_run_config(cfg, out_dir)  # config_resolved.yaml + version
    if cfg.check_resources:
        try:
            check_resources(cfg)
        except ResourceError as e:
            rank_zero_only(write_failure)(out_dir, e.report)
            raise
    mark_startup("memory_checked")
    datamodule = hydra.utils.instantiate(cfg.data)
    system = hydra.utils.instantiate(cfg.model)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()] + list(extra_callbacks)
    callbacks.append(ResumeCollection())  # train.py paused garbage collection for start-up (recon.startup)
    logger = hydra.utils.instantiate(cfg.logger)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    mark_startup("built")
    try:
        trainer.fit(system, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except (torch.OutOfMemoryError, FloatingPointError, SIGTERMException, FitCancelled):
        reports = [c.report for c in callbacks if getattr(c, "report", None)]
        if not reports:
            raise
        raise FitFailure(reports[0]["message"], reports[0]) from None  # the report, not a traceback
    finally:
        startup.resume()  # a fit that ended before its first step (nothing when it already ran)
