"""Fit a textured mesh to multi-view images: `python train.py [experiment=cpu] [data.path=DIR] [key=value ...]`."""
import sys

from recon import startup

startup.pause()  # no garbage collection while start-up builds its objects: resumed after the first step (recon.startup)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from recon.callbacks.failure_report import FitFailure  # noqa: E402
from recon.config import register_configs  # noqa: E402
from recon.fit import mark_startup, run_fit  # noqa: E402

mark_startup("imported")  # timing.json's startup_seconds: how long the imports took
register_configs()  # typed schemas: a misspelt key fails at compose time, not at step 4000


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run_fit(cfg, HydraConfig.get().runtime.output_dir)  # seed, config_resolved.yaml, memory check, instantiate, fit
    except FitFailure as e:
        sys.exit(f"error: {e}")  # the report, not a traceback; exit status 1


if __name__ == "__main__":
    main()
