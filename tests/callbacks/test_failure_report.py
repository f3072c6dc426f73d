"""Failures a person can act on: out of memory and non-finite values stop with the fix, a checkpoint and failure.json."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["experiment=cpu", "model.pass1_steps=4", "model.pass2_steps=0", "data.resolution=32", "data.batch_size=2",
        "data.builtin.n_train=4", "data.builtin.n_test=2", "model.geometry.tet_grid=12", "model.light.base_res=16",
        "model.bake.texture_res=64"]


def fit_with_fault(tmp_path: Path, kind: str, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RECON_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *TINY,
           "+callbacks.fault._target_=faults.RaiseAt", "+callbacks.fault.step=2", f"+callbacks.fault.kind={kind}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kind", ["oom", "nan_loss", "nan_grad"])
def test_failure_is_reported_with_checkpoint(tmp_path, kind):
    proc = fit_with_fault(tmp_path, kind)
    assert proc.returncode == 1
    run = tmp_path / "run"
    report = json.loads((run / "failure.json").read_text())
    assert report["step"] == 2 and report["kind"] == ("out_of_memory" if kind == "oom" else "non_finite")
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "Traceback" not in proc.stderr.split("error: ")[-1]
    if kind == "oom":
        assert "requested 2.50 GiB" in last_line and "data.batch_size" in last_line and "tet_grid" in last_line
    elif kind == "nan_loss":
        assert "non-finite loss at step 2" in last_line and "alpha=" in last_line
    else:
        assert "non-finite gradient at step 2 in geometry.sdf" in last_line
    ckpt = torch.load(report["checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (run / "mesh.obj").exists()  # a failed fit exports nothing that looks finished


@pytest.mark.parametrize("kind", ["nan_loss", "nan_grad"])
def test_skip_nonfinite_keeps_training(tmp_path, kind):
    """Opt-in: the bad steps are dropped (parameters untouched), the fit finishes and exports; timing.json counts them."""
    proc = fit_with_fault(tmp_path, kind, "model.optim.skip_nonfinite=true", "callbacks.mesh_export.eval_samples=2000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    timing = json.loads((run / "timing.json").read_text())
    # nan_loss keeps the loss NaN from step 2 on (steps 2 and 3 dropped); nan_grad poisons every later gradient
    assert timing["skipped_steps"] == 2 and (run / "mesh.obj").is_file() and not (run / "failure.json").exists()


def test_deferred_check_names_the_first_bad_step_and_keeps_parameters_finite(tmp_path):
    """Read every 3 steps (the GPU default reads every 50): the NaN gradient of step 2 is found after step 3, its
    update was cancelled on the device, and the report still names step 2 and the parameter."""
    proc = fit_with_fault(tmp_path, "nan_grad", "model.optim.nonfinite_check_every=3")
    assert proc.returncode == 1
    report = json.loads((tmp_path / "run" / "failure.json").read_text())
    assert report["kind"] == "non_finite" and report["step"] == 3
    assert "non-finite gradient at step 2 in geometry.sdf" in proc.stderr.strip().splitlines()[-1]
    ckpt = torch.load(report["checkpoint"], map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "mesh.obj").exists()


def test_deferred_skip_counts_every_dropped_step(tmp_path):
    proc = fit_with_fault(tmp_path, "nan_loss", "model.optim.skip_nonfinite=true", "model.optim.nonfinite_check_every=3",
                          "callbacks.mesh_export.eval_samples=2000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())
    assert timing["skipped_steps"] == 2 and (tmp_path / "run" / "mesh.obj").is_file()


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    """Preemption: Lightning stops after the current step, the report names the checkpoint, and a run started with
    ckpt_path= from it finishes the schedule and exports."""
    proc = fit_with_fault(tmp_path, "sigterm")
    assert proc.returncode == 1
    report = json.loads((tmp_path / "run" / "failure.json").read_text())
    assert report["kind"] == "interrupted" and report["step"] == 3  # step 2 finished, then the stop
    expected = f"error: stopped by SIGTERM at step 3. Continue with ckpt_path={report['checkpoint']} (same overrides)."
    assert proc.stderr.strip().splitlines()[-1] == expected
    env = dict(os.environ, RECON_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *TINY,
           f"ckpt_path={report['checkpoint']}", "callbacks.mesh_export.eval_samples=2000"]
    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())
    assert timing["steps"] == 4 and (tmp_path / "run" / "mesh.obj").is_file()


# 8 views, 2 per step: 4 steps an epoch; pass 1 is steps 0-4, pass 2 steps 5-9; last.ckpt every 3 steps.
RESUMABLE = ["experiment=cpu", "model.pass1_steps=5", "model.pass2_steps=5", "data.resolution=32", "data.batch_size=2",
             "data.builtin.n_train=8", "data.builtin.n_test=2", "model.geometry.tet_grid=12", "model.light.base_res=16",
             "model.bake.texture_res=64", "callbacks=resumable", "trainer.enable_checkpointing=true",
             "callbacks.checkpoint.every_n_train_steps=3", "callbacks.mesh_export.eval_samples=2000"]


def _train(tmp_path: Path, run: str, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RECON_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / run}", *RESUMABLE, *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = _train(tmp, "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


@pytest.mark.parametrize("kill_at,resumes_at", [(4, 3), (8, 6)], ids=["mid-pass-1", "mid-pass-2"])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, kill_at, resumes_at):
    """SIGKILL (nothing of the run's own handling runs) mid-epoch in pass 1 and in pass 2; `ckpt_path=last` in the
    same run dir continues from the last periodic checkpoint and ends with the uninterrupted run's mesh and metrics:
    the same views per step (the sampler resumes mid-epoch), the same random draws (seeded per step), the same
    pass-2 modules rebuilt from the checkpoint."""
    import trimesh

    killed = _train(tmp_path, "run", "+callbacks.fault._target_=faults.RaiseAt", f"+callbacks.fault.step={kill_at}",
                    "+callbacks.fault.kind=sigkill")
    assert killed.returncode == -9 and not (tmp_path / "run" / "mesh.obj").exists()
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == resumes_at
    resumed = _train(tmp_path, "run", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "timing.json").read_text())["steps"] == 10
    a = trimesh.load(uninterrupted / "mesh.obj", force="mesh", process=False)
    b = trimesh.load(tmp_path / "run" / "mesh.obj", force="mesh", process=False)
    assert a.vertices.shape == b.vertices.shape and abs(a.vertices - b.vertices).max() < 1e-4
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (uninterrupted, tmp_path / "run"))
    assert abs(ma["psnr"] - mb["psnr"]) < 1e-3 and abs(ma["geometry"]["chamfer_l1"] - mb["geometry"]["chamfer_l1"]) < 1e-5
