"""`trainer=ddp`: two CPU processes (gloo, Lightning's subprocess launcher) follow a one-process run step by step."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# The equality test runs pass 1 only (pass 2 starts from an xatlas unwrap, which is not bit-reproducible between
# two runs whose pass-1 parameters differ by rounding); test_ddp_runs_both_passes covers the switch.
# No albedo-smoothness term: it averages over each rank's covered pixels and jitters them from the global RNG, so
# under DDP it is not the one-process term; the test compares what recon's sampler and background guarantee.
STEPS = 5  # 8 views, batch 2: 4 steps per epoch, so the last step draws from the second epoch's order
TINY = ["experiment=cpu_small", "data.resolution=32", "data.batch_size=2", "data.builtin.n_train=8",
        "data.builtin.n_test=2", "model.light.base_res=16", "model.bake.texture_res=64", "callbacks.mesh_export.evaluate=false"]
# a checkpoint after every step, to compare the parameters of both runs along the way
EVERY_STEP = ["trainer.enable_checkpointing=true", "+callbacks.ckpt._target_=lightning.pytorch.callbacks.ModelCheckpoint",
              "+callbacks.ckpt.every_n_train_steps=1", "+callbacks.ckpt.save_top_k=-1"]


def fit(tmp_path: Path, name: str, *overrides: str) -> Path:
    run = tmp_path / name
    env = dict(os.environ, RECON_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run}", f"+callbacks.ckpt.dirpath={run / 'ckpt'}",
           *TINY, f"model.pass1_steps={STEPS}", "model.pass2_steps=0", "model.geometry.tet_grid=12",
           "model.loss.kd_smooth_weight=0", *EVERY_STEP, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def params(run: Path, step: int) -> dict:
    (path,) = (run / "ckpt").glob(f"*step={step}.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_two_process_ddp_matches_one_process(tmp_path):
    """Same seed, same global batch (2 views; 1 per rank under DDP): the same parameters after every step.

    After step 1 the runs agree to float rounding (DDP averages the two half-batch gradients; a one-process run
    takes the mean over both views in one sum). Adam (eps 1e-15) divides by each entry's gradient RMS, so entries
    whose gradient is itself rounding-level (cancelling sums, ~1e-9) can move differently, and the later steps
    agree to ~1e-3 relative (well inside the 1e-2 bound). Backgrounds drawn from the global RNG instead of per view
    put the runs ~0.5 apart (relative) from step 1 on.
    """
    single = fit(tmp_path, "single")
    ddp = fit(tmp_path, "ddp", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
    torch.testing.assert_close(params(ddp, 1), params(single, 1), rtol=1e-5, atol=1e-6)
    for step in range(2, STEPS + 1):
        a, b = params(single, step), params(ddp, step)
        for key in a:
            rel = ((a[key] - b[key]).norm() / a[key].norm().clamp_min(1e-12)).item()
            assert rel <= 1e-2, (step, key, rel)
    # one run dir, one export, one Hydra config: rank 1 wrote into rank 0's run dir and only its log
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("mesh.obj")) == ["ddp/mesh.obj", "single/mesh.obj"]
    assert sorted(p.parent.name for p in tmp_path.rglob(".hydra")) == ["ddp", "single"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ddp", "single"]
    assert not list((ddp / "ckpt").glob("*rank*")) and len(list((ddp / "ckpt").glob("*.ckpt"))) == STEPS


def test_ddp_runs_both_passes(tmp_path):
    """At the pass switch rank 0 bakes and broadcasts the mesh and texture, and DDP is re-wrapped around the pass-2
    parameters: both ranks train them (no "unused parameters" stop), one export is written."""
    run = tmp_path / "ddp2"
    env = dict(os.environ, RECON_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run}", *TINY, "model.pass1_steps=3",
           "model.pass2_steps=2", "model.geometry.tet_grid=12", "trainer=ddp", "trainer.devices=2",
           "trainer.accelerator=cpu", "trainer.enable_checkpointing=true",
           "+callbacks.ckpt._target_=lightning.pytorch.callbacks.ModelCheckpoint", f"+callbacks.ckpt.dirpath={run / 'ckpt'}",
           "+callbacks.ckpt.every_n_train_steps=1", "+callbacks.ckpt.save_top_k=-1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run / "mesh.obj").is_file() and (run / "pass1" / "mesh.obj").is_file()
    before, after = params(run, 4), params(run, 5)  # two pass-2 steps: the vertex offsets and texture moved
    assert before["surface.offset"].shape == after["surface.offset"].shape
    assert (after["textures.texture"] - before["textures.texture"]).abs().max() > 0
    assert (after["geometry.sdf"] == before["geometry.sdf"]).all()  # pass-1 networks frozen in pass 2


def test_ddp_sweep_writes_one_dir_per_job(tmp_path):
    """`-m` with trainer=ddp: the rank Lightning starts re-runs the command line and walks the sweep in step with
    rank 0; with hydra.sweep.dir set, each job has one run dir, one Hydra config and one export."""
    sweep = tmp_path / "sweep"
    env = dict(os.environ, RECON_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *TINY, "model.pass1_steps=3", "model.pass2_steps=0",
           "model.geometry.tet_grid=12,16",
           "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.relative_to(sweep).as_posix() for p in sweep.rglob("mesh.obj")) == ["0/mesh.obj", "1/mesh.obj"]
    assert sorted(p.parent.name for p in sweep.rglob(".hydra")) == ["0", "1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "sweep"]


def test_ddp_leaves_the_constant_buffers_alone():
    """DDP's default broadcasts every buffer from rank 0 before each forward pass: ~0.7 GB of DMTet tables a step at
    tet_grid=128. recon's buffers are constants (or, in pass 2, broadcast once at the switch), so the trainer
    config turns that off."""
    import hydra

    from recon.fit import compose_config

    strategy = hydra.utils.instantiate(compose_config(["trainer=ddp"]).trainer.strategy)
    assert strategy._ddp_kwargs.get("broadcast_buffers") is False
    assert strategy._ddp_kwargs.get("find_unused_parameters") is False
