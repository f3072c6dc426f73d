"""The memory estimate: it reproduces the benchmark runs it was calibrated on, grows with every setting it models,
and refuses an oversize fit before anything is built (through recon.fit.run_fit, train.py and the API)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import recon.resources
from recon.callbacks.failure_report import MEMORY_SETTINGS
from recon.data.frames import DataError
from recon.fit import compose_config, run_fit
from recon.resources import ResourceError, available_host_memory, check_resources, estimate_memory

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "results"


# runs made before the fused kernels existed (they ran the torch functions)
UNFUSED_SHADING = ["model.render.fused_shading=false", "model.loss.fused_kernel=false"]
UNFUSED = ["model.material.fused_mlp=false", *UNFUSED_SHADING]
COMPILED = ["model.render.compile=auto", *UNFUSED_SHADING]


@pytest.mark.parametrize("result, experiment, device, backend, measured, overrides", [
    ("quick-cuda-nvidia-h200.json", "quick", "cuda:0", "triton", "peak_gpu_memory_bytes", UNFUSED),
    ("quick-torch-hash-cuda-nvidia-h200.json", "quick", "cuda:0", "torch", "peak_gpu_memory_bytes", UNFUSED),
    ("nerf800-short-cuda-nvidia-h200.json", "nerf800", "cuda:0", "torch", "peak_gpu_memory_bytes", UNFUSED),
    ("nerf800-7e014e0-cuda-nvidia-h200.json", "nerf800", "cuda:0", "triton", "peak_gpu_memory_bytes", UNFUSED_SHADING),
    ("nerf800-a937619-cuda-nvidia-h200.json", "nerf800", "cuda:0", "triton", "peak_gpu_memory_bytes", []),
    ("nerf800-25e2aeb-cuda-nvidia-h200.json", "nerf800", "cuda:0", "triton", "peak_gpu_memory_bytes", []),
    ("nerf800-cuda-nvidia-h200.json", "nerf800", "cuda:0", "triton", "peak_gpu_memory_bytes", []),
    ("nerf800-compiled-cuda-nvidia-h200.json", "nerf800", "cuda:0", "triton", "peak_gpu_memory_bytes", COMPILED),
    ("cpu-small-cpu.json", "cpu_small", "cpu", "torch", "peak_host_memory_bytes", []),
])
def test_estimate_reproduces_the_benchmark_runs(result, experiment, device, backend, measured, overrides,
                                                monkeypatch):
    """The runs in bench/results the coefficients came from (recon/resources.py names them), within 15 %."""
    path = BENCH / result
    if not path.is_file():
        pytest.skip(f"{path} not present")
    monkeypatch.setattr(recon.resources, "triton_importable", lambda: True)  # as on the machine that ran them
    bench = json.loads(path.read_text())
    cfg = compose_config([f"experiment={experiment}", *overrides])
    settings = bench["config"]
    assert list(settings["resolution"]) == [cfg.data.resolution] * 2 and settings["batch"] == cfg.data.batch_size
    assert settings["tet_grid"] == cfg.model.geometry.tet_grid and settings["light_res"] == cfg.model.light.base_res
    estimate = estimate_memory(cfg, device=device, backend=backend)
    assert estimate.total_bytes == pytest.approx(bench[measured], rel=0.15)


def test_estimate_grows_with_every_memory_setting():
    base = estimate_memory(compose_config(["experiment=cpu"]), device="cuda:0", backend="triton").total_bytes
    for override in ("data.batch_size=8", "data.resolution=256", "model.geometry.tet_grid=80", "model.light.base_res=256",
                     "model.bake.texture_res=4096", "data.builtin.n_train=400"):
        grown = estimate_memory(compose_config(["experiment=cpu", override]), device="cuda:0", backend="triton")
        assert grown.total_bytes > base, override
    torch_hash = estimate_memory(compose_config(["experiment=cpu"]), device="cuda:0", backend="torch").total_bytes
    assert torch_hash > base


def test_ddp_splits_the_batch_over_the_processes():
    one = estimate_memory(compose_config(["experiment=quick"]), device="cuda:0", backend="triton")
    two = estimate_memory(compose_config(["experiment=quick", "trainer=ddp", "trainer.devices=2"]), device="cuda:0",
                          backend="triton")
    assert two.pass1["pixels"] * 2 == one.pass1["pixels"] and two.processes == one.processes == 1
    cpu = estimate_memory(compose_config(["experiment=cpu", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]))
    assert cpu.processes == 2 and cpu.required_bytes == 2 * cpu.total_bytes  # one host for both ranks


def test_refusal_names_the_estimate_the_free_memory_and_the_settings(monkeypatch):
    monkeypatch.setattr(recon.resources, "free_memory", lambda device: 2**30)
    cfg = compose_config(["experiment=cpu", "data.resolution=1024", "data.batch_size=16"])
    with pytest.raises(ResourceError) as info:
        check_resources(cfg)
    message, report = str(info.value), info.value.report
    assert report["kind"] == "resources" and report["free_bytes"] == 2**30 and report["estimate_bytes"] > 2**30
    assert "1.00 GiB free on cpu" in message and "data.resolution=1024x1024" in message and "data.batch_size=16" in message
    assert "Largest: pixels" in message and MEMORY_SETTINGS in message and "check_resources=false" in message
    assert check_resources(compose_config(["experiment=cpu"]), headroom=1e6) is not None  # fits: returns the estimate


def test_host_memory_is_measured():
    available = available_host_memory()
    assert available is not None and 0 < available <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_check_resources_false_skips_the_check(tmp_path, monkeypatch):
    """With the check off the fit starts (and here fails on its missing data, after the point of refusal)."""
    monkeypatch.setattr(recon.resources, "free_memory", lambda device: 1)
    overrides = ["experiment=cpu", f"data.path={tmp_path / 'missing'}", "callbacks.progress.refresh_rate=0"]
    with pytest.raises(ResourceError):
        run_fit(compose_config(overrides, tmp_path / "on"), tmp_path / "on")
    with pytest.raises(DataError, match="missing"):
        run_fit(compose_config([*overrides, "check_resources=false"], tmp_path / "off"), tmp_path / "off")


def test_train_py_refuses_an_oversize_fit(tmp_path):
    env = dict(os.environ, RECON_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", "experiment=cpu",
           "data.resolution=100000"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: estimated peak host memory") and "data.batch_size" in last and "Traceback" not in proc.stderr
    run = tmp_path / "run"
    assert json.loads((run / "failure.json").read_text())["kind"] == "resources"
    assert not (run / "checkpoints").exists() and not (run / "run.json").exists()  # nothing built, no step
    assert not (tmp_path / "cache").exists()  # not even the built-in scene
