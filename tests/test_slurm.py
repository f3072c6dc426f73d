"""`hydra/launcher=slurm`: the submitit parameters, the sbatch script a sweep would submit, and resuming a requeued job."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from recon.config import register_configs

ROOT = Path(__file__).resolve().parents[1]


def compose_with_hydra(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.fixture
def submitit():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is not installed (pip install -e '.[cluster]')")
    import submitit

    return submitit


def test_launcher_follows_the_trainer(submitit):
    cfg = compose_with_hydra("hydra/launcher=slurm", "trainer.devices=4")
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    p = launcher.params
    assert (p["gpus_per_node"], p["tasks_per_node"], p["nodes"]) == (4, 4, 1)
    assert p["timeout_min"] == 240 and p["partition"] is None
    assert p["max_num_timeout"] == 3 and p["signal_delay_s"] == 120  # requeued on time-out / preemption
    assert p["submitit_folder"].startswith(cfg.hydra.sweep.dir) and p["submitit_folder"].endswith(".submitit/%j")

    multi = instantiate(compose_with_hydra("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8",
                                           "trainer.num_nodes=2", "hydra.launcher.partition=gpu").hydra.launcher)
    assert (multi.params["gpus_per_node"], multi.params["tasks_per_node"], multi.params["nodes"]) == (8, 8, 2)
    assert multi.params["partition"] == "gpu"


def test_requeued_run_resumes_from_last_checkpoint(tmp_path):
    """What a requeued job does: the same command in the same run dir, `ckpt_path=last`, continues where it stopped.

    The first run has no checkpoint yet (a fresh job with ckpt_path=last starts from step 0); it stops after
    4 of 8 steps (standing in for the time-out); the rerun restores last.ckpt and runs steps 4..8 only.
    """
    env = dict(os.environ, RECON_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run}", "experiment=cpu_small", "data.resolution=32",
           "data.batch_size=2", "data.builtin.n_train=8", "data.builtin.n_test=2", "model.geometry.tet_grid=12",
           "model.light.base_res=16", "model.bake.texture_res=64", "callbacks.mesh_export.evaluate=false", "model.pass1_steps=8",
           "model.pass2_steps=0",
           "callbacks=resumable", "callbacks.checkpoint.every_n_train_steps=2", "trainer.enable_checkpointing=true",
           "ckpt_path=last"]
    first = subprocess.run([*cmd, "trainer.max_steps=4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "no last checkpoint available" in first.stderr and sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    second = subprocess.run([*cmd, "trainer.max_steps=8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restoring states from the checkpoint path at " + str(run / "checkpoints" / "last.ckpt") in second.stderr
    assert json.loads((run / "timing.json").read_text())["steps"] == 8


def test_sbatch_script_a_sweep_submits(submitit, tmp_path, monkeypatch):
    """Run the plugin's own launch() up to the submission, with a stand-in `srun` so submitit builds its executor."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    captured = {}

    def map_array(self, fn, *args):
        captured["executor"], captured["args"] = self, args
        raise RuntimeError("stop before sbatch")

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    cfg = compose_with_hydra("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                             "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(RuntimeError, match="stop before sbatch"):
        launcher.launch([["model.geometry.tet_grid=64"], ["model.geometry.tet_grid=96"]], initial_job_idx=0)
    executor = captured["executor"]._executor
    assert executor.max_num_timeout == 3
    assert list(captured["args"][0]) == [["model.geometry.tet_grid=64"], ["model.geometry.tet_grid=96"]]
    script = executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --time=240", "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@120"):
        assert line in script, (line, script)
