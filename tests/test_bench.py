"""bench/run.py: the per-stage profiler on a tiny config, and the JSON / Markdown writers on a fake result."""
import importlib.util
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TINY = ["data.resolution=32", "model.geometry.tet_grid=12", "data.builtin.n_train=6", "data.builtin.n_val=1",
        "data.builtin.n_test=1"]


@pytest.fixture
def tiny_cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "cache"))
    return bench.compose_config("cpu-small", TINY)


def test_presets_compose():
    small = bench.config_summary(bench.compose_config("cpu-small"))
    assert small == {"resolution": [64, 64], "batch": 2, "tet_grid": 24, "pass1_steps": 120, "pass2_steps": 40,
                     "steps": 160, "texture_res": 256, "light_res": 32}
    quick = bench.config_summary(bench.compose_config("quick"))
    assert quick == {"resolution": [512, 512], "batch": 4, "tet_grid": 64, "pass1_steps": 800, "pass2_steps": 400,
                     "steps": 1200, "texture_res": 1024, "light_res": 256}
    full = bench.config_summary(bench.compose_config("nerf800"))
    assert full["tet_grid"] == 128 and full["steps"] == 10000 and full["texture_res"] == 2048 and full["light_res"] == 512
    assert bench.compose_config("cpu-small").trainer.accelerator == "cpu"  # inherited from the cpu preset


def test_profile_stages_times_every_stage(tiny_cfg):
    prof = bench.profile_stages(tiny_cfg, steps=5, warmup=2, device=torch.device("cpu"))
    assert list(prof["stages"]) == list(bench.STAGES) and list(prof["pass2"]["stages"]) == list(bench.STAGES)
    for name, s in [*prof["stages"].items(), *prof["pass2"]["stages"].items()]:
        assert s["median_ms"] > 0 and s["p90_ms"] >= s["median_ms"], (name, s)
    assert prof["pass2"]["triangles"] > 0 and prof["pass2"]["texture_res"] == 256
    total = sum(s["median_ms"] for s in prof["stages"].values())
    assert prof["step_ms"]["median_ms"] > 0
    assert 0.5 * prof["wall_step_ms"] <= total <= 1.5 * prof["wall_step_ms"], prof

    # an independent full step: the system's own training_step + backward + optimizer step
    datamodule, system, opt, sched = bench.build_for_profile(tiny_cfg, torch.device("cpu"))
    batches = bench._batches(datamodule, torch.device("cpu"))
    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer warns and does nothing
        for i in range(7):
            batch = next(batches)
            t0 = time.perf_counter()
            system.training_step(batch, i).backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
    full = sorted(times)[len(times) // 2]
    assert full / 3 <= total <= full * 3, (total, full, prof["stages"])


def fake_result(preset: str, device: str = "cpu") -> dict:
    stages = {name: {"median_ms": 1.0 + i, "p90_ms": 2.0 + i} for i, name in enumerate(bench.STAGES)}
    return {
        "preset": preset, "device": device, "device_name": "x86_64", "torch": "2.13.0", "git_commit": None,
        "config": {"resolution": [64, 64], "batch": 2, "tet_grid": 24, "steps": 150, "texture_res": 256},
        "pass1_seconds": 30.0, "pass2_seconds": 10.0, "bake_seconds": {"unwrap_seconds": 1.0},
        "steady_iterations_per_second": {"pass1": 40.0, "pass2": 50.0},
        "first_steps": {"pass1_first_steps": 20, "pass1_first_steps_seconds": 12.5, "pass2_first_steps": 20,
                        "pass2_first_steps_seconds": 3.25},
        "export_write_seconds": 3.5,
        "startup_seconds": {"data_ready": 2.5, "fit_start": 3.25, "first_step_start": 4.0, "first_step_end": 4.75},
        "pass2": {"stages": {name: {"median_ms": 0.5, "p90_ms": 0.7} for name in bench.STAGES},
                  "step_ms": {"median_ms": 4.0, "p90_ms": 5.6}, "triangles": 4000, "texture_res": 256},
        "wall_seconds": 60.0, "mesh_seconds": 50.0, "fit_seconds": 40.0, "export_seconds": 5.0,
        "iterations_per_second": 3.75, "peak_gpu_memory_bytes": None, "peak_host_memory_bytes": 2**30,
        "triangles": {"extracted": 5000, "visible": 4000, "exported": 4000},
        "quality": {"psnr": 25.0, "ssim": 0.9, "iou": 0.97, "chamfer_l1": 0.01, "fscore@0.01": 0.8, "triangles": 4000},
        "stages": stages, "step_ms": {"median_ms": 28.0, "p90_ms": 35.0}, "wall_step_ms": 29.0, "profile_steps": 30,
    }


def test_writers_json_markdown_and_summary(tmp_path):
    for preset in ("cpu-small", "quick"):
        jpath, mpath = bench.write_result(fake_result(preset), tmp_path)
        data = json.loads(jpath.read_text())
        assert jpath.name == f"{preset}-cpu.json" and set(bench.RESULT_KEYS) <= set(data)
        assert set(data["stages"]) == set(bench.STAGES)
        md = mpath.read_text()
        assert all(f"| {name} |" in md for name in bench.STAGES) and "| **total** | 28.00 | 35.00 | 4.00 | 5.60 |" in md
        assert "Pass 1 30.0 s" in md and "unwrap 1.0 s" in md
        assert "Steady state 25.0 ms per pass-1 step, 20.0 ms per pass-2 step." in md
        assert "The first 20 steps of pass 1 took 12.5 s" in md and "of pass 2 3.2 s" in md
        assert "data ready (imports, config, scene, frames) at 2.5 s, fit start" in md and "from 4.0 s to 4.8 s" in md
        assert "The final export took 5.0 s, 3.5 s of it writing the files." in md
        assert "Overrides" not in md
    r = {**fake_result("quick"), "name": "quick-eager", "overrides": ["model.render.compile=off"],
         "stages": {}, "step_ms": {}, "pass2": None, "profile_steps": 0}  # --profile-steps 0: the run alone
    md = bench.write_result(r, tmp_path)[1].read_text()
    assert "Overrides: `model.render.compile=off`." in md and "No per-stage profile" in md and "| light |" not in md
    marks = {"imported": 1.25, "run_fit": 1.5, "memory_checked": 1.75, "built": 2.0}  # train.py's own milestones
    r = {**fake_result("quick"), "name": "quick-marks",
         "startup_seconds": {**marks, **fake_result("quick")["startup_seconds"]}}
    r["segments"] = [{"steps": [0, 500], "ms_per_step": 20.04, "validation_seconds": 0.0},
                     {"steps": [500, 1000], "ms_per_step": 12.25, "validation_seconds": 0.5}]
    r["validation"], r["python"] = {"runs": 2, "seconds": 0.75}, "/tmp/env/bin/python"
    md = bench.write_result(r, tmp_path)[1].read_text()
    assert ("imports done at 1.2 s, config and run folder at 1.5 s, everything built (data module, model, trainer) "
            "at 2.0 s, data ready (scene, frames) at 2.5 s") in md
    assert "validation left out: 0-500 20.0, 500-1000 12.2 (the first segment" in md and "2 validation runs took 0.8 s." in md
    assert "train.py ran with /tmp/env/bin/python, without PYTHONPATH." in md
    assert "In the unwrap" not in md  # results from before the unwrap's details
    r["unwrap"] = {"charts": 3300, "atlas_used": 0.62, "xatlas_seconds": 1.875, "tangents_seconds": 0.125}
    md = bench.write_result(r, tmp_path)[1].read_text()
    assert ("In the unwrap xatlas took 1.88 s for 3300 charts covering 0.62 of the atlas; the tangent frames after "
            "it 0.12 s.") in md and "connected pieces" not in md
    r["unwrap"].update(components=41, small_component_faces=380)
    md = bench.write_result(r, tmp_path)[1].read_text()
    assert "The unwrapped surface has 41 connected pieces, 380 faces in pieces under 64 faces." in md
    (tmp_path / "notes.json").write_text("[1, 2]")  # not a result: ignored
    summary = bench.write_summary(tmp_path).read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| preset")]
    assert len(rows) == 4 and {r.split(" | ")[0][2:] for r in rows} == {"cpu-small", "quick", "quick-eager", "quick-marks"}
    assert "| 40.0 |" in rows[0] and "| 25.00 |" in rows[0] and "| 0.8000 |" in rows[0]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_cache_state_reports_what_an_earlier_run_left(tmp_path, monkeypatch):
    """A benchmark says which start-up caches it found: the built-in scene, the nvdiffrast plugin, kernel caches."""
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    cfg = bench.compose_config("cpu-small")
    state = bench.cache_state(cfg)
    assert state["scene"] is False and state["nvdiffrast_plugin"] is None  # CPU preset: no plugin involved
    assert isinstance(state["triton_cache_entries"], int) and isinstance(state["inductor_cache_entries"], int)
    from recon.data.synthetic_scene import builtin_scene_dir
    scene = builtin_scene_dir(cfg.data.resolution, **cfg.data.builtin, cache_dir=tmp_path / "cache")
    scene.mkdir(parents=True)
    (scene / "transforms_test.json").write_text("{}")
    assert bench.cache_state(cfg)["scene"] is True
    assert bench.cache_state(bench.compose_config("cpu-small", [f"data.path={tmp_path}"]))["scene"] is None
    r = {**fake_result("cpu-small"), "caches": {"scene": True, "nvdiffrast_plugin": None, "triton_cache_entries": 3,
                                                "inductor_cache_entries": 0}}
    md = bench.write_result(r, tmp_path)[1].read_text()
    assert "Caches at the start: scene cached, nvdiffrast plugin –, 3 Triton and 0 Inductor cache entries." in md


def test_write_result_rejects_incomplete(tmp_path):
    r = fake_result("cpu-small")
    del r["stages"]
    with pytest.raises(ValueError, match="stages"):
        bench.write_result(r, tmp_path)


def test_device_label_cpu():
    assert bench.device_label(torch.device("cpu")) == "cpu"


def test_scaling_speedup_and_table():
    """bench/scaling.py: per-pass speed-up over the one-GPU run, efficiency, every rank's memory in the table."""
    spec = importlib.util.spec_from_file_location("bench_scaling", ROOT / "bench" / "scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    assert scaling.device_overrides(1) == ["trainer.devices=1"]
    assert scaling.device_overrides(2) == ["trainer=ddp", "trainer.devices=2"]

    def e2e(p1, p2, peaks, psnr):
        return {"wall_seconds": 100.0, "peak_host_memory_bytes": 2**30, "metrics": {"psnr": psnr, "geometry": {}},
                "timing": {"pass1_iterations_per_second": p1, "pass2_iterations_per_second": p2, "fit_seconds": 80.0,
                           "peak_gpu_memory_bytes_per_rank": peaks}}

    runs = [scaling.run_summary(1, e2e(5.0, 10.0, [20 * 2**30], 40.0)),
            scaling.run_summary(2, e2e(9.0, 16.0, [11 * 2**30, 10 * 2**30], 40.1))]
    scaling.speedups(runs)
    assert runs[0]["speedup_pass1"] == 1.0 and runs[1]["speedup_pass1"] == pytest.approx(1.8)
    assert runs[1]["speedup_pass2"] == pytest.approx(1.6) and runs[1]["efficiency_pass1"] == pytest.approx(0.9)
    result = {"name": "x", "device": "cuda-test", "device_name": "test", "torch": "t", "git_commit": None,
              "overrides": [], "runs": runs, "config": bench.config_summary(bench.compose_config("cpu-small"))}
    md = scaling.scaling_markdown(result)
    assert "| 2 | 9.00 | 16.00 | 1.80 | 1.60 |" in md and "11.00 / 10.00" in md


def test_kernel_time_by_launch_site():
    """bench/kernels.py --by-source: an op's time goes to the recon function that called it, a backward op's to
    its autograd node (CPU time stands in for GPU time here)."""
    from torch.profiler import ProfilerActivity, profile

    from recon.gather import select_rows, take_rows

    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    x = torch.randn(1000, 64, requires_grad=True)
    index = torch.randint(0, 1000, (5000,))
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        for _ in range(2):
            take_rows(x, index).square().sum().backward()
    rows = kernels.source_table(prof.events(), 2, 50, time_us=lambda evt: evt.self_cpu_time_total)
    found = {(r["site"], r["op"]): r["calls_per_step"] for r in rows}
    line = select_rows.__code__.co_firstlineno  # the innermost recon function: take_rows calls select_rows
    assert found[(f"recon/gather.py:{line} select_rows", "aten::index_select")] == 1.0
    assert ("backward: IndexSelectBackward0", "aten::scatter_add_") in found or \
        ("backward: IndexSelectBackward0", "aten::index_add_") in found
    assert all(r["ms_per_step"] > 0 for r in rows) and rows == sorted(rows, key=lambda r: -r["ms_per_step"])

    class Op:  # an op as older torch records it: the Python stack on the op itself, innermost frame first
        name, cpu_parent = "aten::gather", None
        stack = ["torch/nn/functional.py(10): f", "/x/recon/render/shading.py(227): render_pbr", "/x/train.py(3): main"]

    assert kernels.launch_site(Op()) == "recon/render/shading.py:227 render_pbr"

    # ops with no recon frame (as torch 2.11 records CUDA profiles: no Python stacks) inside a StageScopes range
    scopes = kernels.StageScopes()
    y = torch.randn(300, 300)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        scopes.mark()  # a step's start: light
        torch.mm(y, y)
        scopes.mark()  # mesh
        torch.mm(y, y).sum()
        for _ in range(len(bench.STAGES) - 1):
            scopes.mark()  # ... to the end of the last stage
    rows = kernels.source_table(prof.events(), 1, 50, time_us=lambda evt: evt.self_cpu_time_total)
    found = {(r["site"], r["op"]) for r in rows}
    assert ("stage: light", "aten::mm") in found and ("stage: mesh", "aten::mm") in found
    assert ("stage: mesh", "aten::sum") in found and not any(r["site"] == "(elsewhere)" for r in rows)
    stages = kernels.stage_table(prof.key_averages(), 1)
    assert [r["stage"] for r in stages] == list(bench.STAGES)[:len(stages)] and len(stages) >= 2
    host = {r["stage"]: r["host_ms_per_step"] for r in stages}
    assert host["light"] > 0 and host["mesh"] > 0  # each range holds a 300x300 product

    class Evt:  # a profiled host event: name, parent, host time
        device_type = torch.autograd.DeviceType.CPU

        def __init__(self, name, parent=None, us=0.0):
            self.name, self.cpu_parent, self.cpu_time_total = name, parent, us

    mesh, loss = Evt("stage:mesh"), Evt("stage:loss")
    nonzero = Evt("aten::nonzero", Evt("aten::_local_scalar_dense", mesh))
    events = [Evt("cudaStreamSynchronize", nonzero, 300.0), Evt("cudaStreamSynchronize", nonzero, 100.0),
              Evt("cudaMemcpy", Evt("aten::item", loss), 50.0), Evt("cudaLaunchKernel", nonzero, 900.0)]
    syncs = kernels.sync_table(events, 2)
    assert [(r["stage"], r["call"], r["wait_ms_per_step"], r["calls_per_step"]) for r in syncs] == [
        ("mesh", "aten::nonzero -> cudaStreamSynchronize", 0.2, 1.0), ("loss", "aten::item -> cudaMemcpy", 0.025, 0.5)]


def test_git_commit_names_the_benchmarked_tree(tmp_path, monkeypatch):
    """The repository's HEAD at its top level; nothing for a copy nested in another checkout (which would report the
    outer checkout's commit); $RECON_GIT_COMMIT for a copy without history."""
    import subprocess

    monkeypatch.delenv("RECON_GIT_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if head:  # a checkout with its history
        assert bench.git_commit() == head
    nested = ROOT / "bench" / "results"  # inside the repository, not its top level
    assert bench.git_commit(nested) is None
    assert bench.git_commit(tmp_path) is None  # no repository at all
    monkeypatch.setenv("RECON_GIT_COMMIT", "0123abc")
    assert bench.git_commit(nested) == "0123abc"


def test_cube_lookup_orders_agree_on_cpu(tmp_path):
    """bench/cube_lookup.py: every order is a permutation, gives the scanline values and per-pixel gradients (it
    asserts so itself), its exact texel-gradient reference finds autograd's gradients exact and a wrong one wrong,
    and the directions are unit normals of a sphere's visible side."""
    spec = importlib.util.spec_from_file_location("bench_cube_lookup", ROOT / "bench" / "cube_lookup.py")
    cube = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cube)
    for name in ("strided", "random"):
        perm = cube.ordering(name, 1000, torch.device("cpu"), stride=7)
        assert torch.equal(perm.sort().values, torch.arange(1000))
    assert cube.ordering("scanline", 10, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="unknown order"):
        cube.ordering("zigzag", 10, torch.device("cpu"))
    normals, reflected = cube.sphere_directions(2000, 4, torch.device("cpu"))
    assert normals.shape == reflected.shape == (2000, 3)
    torch.testing.assert_close(normals.norm(dim=-1), torch.ones(2000), atol=1e-5, rtol=0)
    torch.testing.assert_close(reflected.norm(dim=-1), torch.ones(2000), atol=1e-5, rtol=0)
    result = cube.main(["--device", "cpu", "--pixels", "1500", "--base-res", "32", "--reps", "1", "--stride", "16",
                        "--out", str(tmp_path / "cube.json")])
    assert result["pixels"] == 1500 and len(result["rows"]) == 6
    assert json.loads((tmp_path / "cube.json").read_text())["rows"] == result["rows"]
    # autograd's gradients are exact: the forward-pass reference agrees at the corners and elsewhere
    assert all(r["corner_gradient_error"] < 1e-4 and r["other_gradient_error"] < 1e-4 for r in result["rows"])
    # and the reference sees a wrong corner gradient
    from recon.render import make_rasterizer

    ras = make_rasterizer("torch", "cpu")
    cube_levels = [torch.rand(6, 8, 8, 3, requires_grad=True)]
    dirs = torch.nn.functional.normalize(torch.randn(3000, 3), dim=-1)
    upstream = torch.rand(3000, 3)
    (grad,) = torch.autograd.grad(ras.cube_texture(cube_levels, dirs), cube_levels, upstream)
    gen = torch.Generator().manual_seed(0)
    assert cube.texel_gradient_errors(ras, cube_levels, dirs, None, upstream, [grad], gen)["corner"] < 1e-4
    grad[2, 0, 7] *= 1.1
    errors = cube.texel_gradient_errors(ras, cube_levels, dirs, None, upstream, [grad], gen)
    assert 0.09 < errors["corner"] < 0.11 and errors["other"] < 1e-4


def test_unwrap_bench_times_each_setting(tmp_path):
    """bench/unwrap.py: a DMTet surface decimated and unwrapped per setting, with charts and atlas share."""
    spec = importlib.util.spec_from_file_location("bench_unwrap", ROOT / "bench" / "unwrap.py")
    bench_unwrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_unwrap)
    result = bench_unwrap.main(["--grid", "32", "--faces", "3000", "--resolution", "256", "--settings", "600:0", "600:1",
                                "--out", str(tmp_path / "unwrap.json")])
    assert result["extracted_faces"] > result["faces"] and result["faces"] <= 3000
    assert [(r["piece_faces"], r["chart_rounds"]) for r in result["rows"]] == [(600, 0), (600, 1)]
    for row in result["rows"]:
        assert row["charts"] >= result["faces"] // 600 and 0.2 < row["atlas_used"] <= 1.0 and row["unwrap_seconds"] > 0
    assert json.loads((tmp_path / "unwrap.json").read_text())["rows"] == result["rows"]
    with pytest.raises(ValueError, match="PIECE_FACES:CHART_ROUNDS"):
        bench_unwrap.parse_setting("1500")
    assert bench_unwrap.parse_setting("1500:0:1024") == (1500, 0, 1024)


def test_unwrap_bench_takes_an_exported_mesh(tmp_path):
    """--mesh: an OBJ whose vertices are split at every face (as UV seams split an export) is welded back into one
    surface, then unwrapped per setting, here packed on the atlas's grid and on one of half its size."""
    import trimesh

    spec = importlib.util.spec_from_file_location("bench_unwrap", ROOT / "bench" / "unwrap.py")
    bench_unwrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_unwrap)
    sphere = trimesh.creation.icosphere(subdivisions=3)  # 642 vertices, 1280 faces
    split = trimesh.Trimesh(sphere.vertices[sphere.faces].reshape(-1, 3), np.arange(3 * len(sphere.faces)).reshape(-1, 3),
                            process=False)
    split.export(tmp_path / "mesh.obj")
    welded = bench_unwrap.fitted_surface(tmp_path / "mesh.obj")
    assert welded.verts.shape[0] == len(sphere.vertices) and welded.faces.shape[0] == len(sphere.faces)
    result = bench_unwrap.main(["--mesh", str(tmp_path / "mesh.obj"), "--faces", "5000", "--resolution", "256",
                                "--settings", "400:0", "400:0:128"])
    assert result["mesh"].endswith("mesh.obj") and result["grid"] is None and result["faces"] == len(sphere.faces)
    assert [r["pack_resolution"] for r in result["rows"]] == [256, 128]
    assert all(0.2 < r["atlas_used"] <= 1.0 and r["charts"] >= 1 for r in result["rows"])
    with pytest.raises(SystemExit):
        bench_unwrap.main(["--mesh", str(tmp_path / "missing.obj")])
