"""`recon.reconstruct`: progress through every stage, cancellation with a checkpoint, bad input and oversize jobs as
failed results, result.json's schema, and memory released between fits in one process."""
import gc
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser

import recon
import recon.resources
from recon.api import ERROR_KINDS, STATUSES, ReconResult, as_cancel_check, as_overrides, source_overrides
from recon.callbacks.progress_report import ProgressReport
from recon.system import ReconSystem

# the cheapest two-pass fit: 6 + 2 steps at 32 px on 4 views, 12^3 tet grid (a few seconds on 2 cores)
TINY = {"experiment": "cpu", "model": {"pass1_steps": 6, "pass2_steps": 2, "geometry": {"tet_grid": 12},
                                       "light": {"base_res": 16}, "bake": {"texture_res": 64}},
        "data": {"resolution": 32, "batch_size": 2, "builtin": {"n_train": 4, "n_test": 2}},
        "callbacks": {"mesh_export": {"eval_samples": 2000}, "progress": {"refresh_rate": 0}}}
RESULT_SCHEMA = {  # result.json: key -> accepted types
    "status": (str,), "out_dir": (str,), "paths": (dict,), "metrics": (dict,), "wall_seconds": (float,),
    "peak_gpu_memory_bytes": (int, type(None)), "peak_host_memory_bytes": (int, type(None)), "config": (dict,),
    "error_kind": (str, type(None)), "message": (str, type(None)), "traceback": (str, type(None)),
    "checkpoint": (str, type(None)), "recon_version": (str,),
}


@pytest.fixture(scope="module", autouse=True)
def scene_cache(tmp_path_factory):
    """One cache for the module: the built-in scene is generated once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECON_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def read_result(out: Path) -> dict:
    """result.json, checked against RESULT_SCHEMA."""
    data = json.loads((out / "result.json").read_text())
    assert set(data) == set(RESULT_SCHEMA), set(data) ^ set(RESULT_SCHEMA)
    for key, types in RESULT_SCHEMA.items():
        assert isinstance(data[key], types), (key, data[key])
    assert data["status"] in STATUSES and (data["error_kind"] is None) == (data["status"] == "succeeded")
    assert data["error_kind"] is None or data["error_kind"] in ERROR_KINDS
    assert all(isinstance(v, str) and Path(v).is_file() for v in data["paths"].values())
    return data


def modules_alive() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is ReconSystem)


def test_fit_reports_every_stage_and_returns_its_files(tmp_path):
    calls = []
    result = recon.reconstruct(None, tmp_path / "run", TINY, on_progress=lambda *a: calls.append(a))
    assert result.status == "succeeded", (result.message, result.traceback)
    fractions, stages = [c[0] for c in calls], [c[1] for c in calls]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert list(dict.fromkeys(stages)) == ["preparing data", "pass 1", "unwrap/bake", "pass 2", "export", "evaluate",
                                           "done"]
    run = tmp_path / "run"
    for name in ("mesh.obj", "mesh.glb", "mesh.mtl", "probe.hdr", "texture_kd.png", "pass1/mesh.obj", "metrics.json"):
        assert result.paths[name] == str(run / name) and (run / name).is_file(), name
    assert result.metrics == json.loads((run / "metrics.json").read_text()) and result.metrics["n_views"] == 2
    assert result.config["data"]["resolution"] == 32 and result.config["trainer"]["default_root_dir"] == str(run)
    assert result.peak_host_memory_bytes > 0 and result.wall_seconds > 0 and result.error_kind is None
    saved = read_result(run)
    assert ReconResult.from_json(json.dumps(saved)) == result
    assert (run / ".hydra" / "config.yaml").is_file()  # recon.summarize reads API runs like sweep jobs
    assert modules_alive() == 0  # trainer, system and data module released


def test_cancel_mid_pass_1_keeps_a_checkpoint_and_exports_nothing(tmp_path):
    """The second fit in this process: an Event set while pass 1 runs stops it before the next step."""
    cancel, stages = threading.Event(), []

    def on_progress(fraction, stage, message):
        stages.append(stage)
        if message == "step 2 of 8":
            cancel.set()

    result = recon.reconstruct("builtin", tmp_path / "run", TINY, on_progress=on_progress, cancel=cancel)
    run = tmp_path / "run"
    assert result.status == "cancelled" and result.error_kind == "cancelled", result.message
    assert Path(result.checkpoint) == run / "checkpoints" / "cancelled-step2.ckpt"
    assert torch.load(result.checkpoint, map_location="cpu", weights_only=False)["global_step"] == 2
    assert "ckpt_path=" in result.message
    assert not (run / "mesh.obj").exists() and not (run / "mesh.glb").exists() and not (run / "pass1").exists()
    assert json.loads((run / "failure.json").read_text())["kind"] == "cancelled"
    assert read_result(run)["status"] == "cancelled" and "unwrap/bake" not in stages and stages[-1] == "done"
    assert modules_alive() == 0


def write_nerfstudio(scene: Path, problem: str) -> Path:
    """A transforms.json folder with one problem: 'invalid_json' or 'missing_image'. Returns the file to name."""
    scene.mkdir()
    if problem == "invalid_json":
        (scene / "transforms.json").write_text('{"frames": [ {"file_path": "images/0.png",, } ]}')
        return scene / "transforms.json"
    frames = [{"file_path": f"images/{i}.png", "transform_matrix": torch.eye(4).tolist()} for i in range(4)]
    (scene / "transforms.json").write_text(json.dumps({"fl_x": 30, "fl_y": 30, "cx": 16, "cy": 16, "w": 32, "h": 32,
                                                       "frames": frames}))
    return scene / "images"


@pytest.mark.parametrize("problem", ["invalid_json", "missing_image"])
def test_bad_input_is_a_failed_result_that_names_the_file(tmp_path, problem):
    named = write_nerfstudio(tmp_path / "scene", problem)
    result = recon.reconstruct(tmp_path / "scene", tmp_path / "run", TINY)
    assert result.status == "failed" and result.error_kind == "bad_input", (result.message, result.traceback)
    assert str(named) in result.message and result.traceback is None
    assert result.config["data"]["format"] == "nerfstudio"  # detected from transforms.json, as train.py would
    assert read_result(tmp_path / "run")["error_kind"] == "bad_input"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_oversize_job_is_refused_before_any_step(tmp_path, monkeypatch):
    monkeypatch.setattr(recon.resources, "free_memory", lambda device: 64 * 2**20)  # 64 MiB free
    stages = []
    result = recon.reconstruct(None, tmp_path / "run", TINY, on_progress=lambda f, s, m: stages.append(s))
    run = tmp_path / "run"
    assert result.status == "failed" and result.error_kind == "resources", result.message
    assert "estimated peak host memory" in result.message and "0.06 GiB free on cpu" in result.message
    assert "data.batch_size" in result.message and "check_resources=false" in result.message
    assert stages == ["preparing data", "done"]  # no step: the fit never reached pass 1
    assert not (run / "checkpoints").exists() and not (run / "run.json").exists() and not (run / "tb").exists()
    assert json.loads((run / "failure.json").read_text())["kind"] == "resources"
    assert read_result(run)["error_kind"] == "resources"


def test_wrong_argument_types_raise_value_error(tmp_path):
    for overrides in ("data.resolution=32", 42, ["data.resolution=32", 7], {"data": {"path": {1, 2}}}):
        with pytest.raises(ValueError, match="override"):
            recon.reconstruct(None, tmp_path / "run", overrides)
    with pytest.raises(ValueError, match="cancel"):
        recon.reconstruct(None, tmp_path / "run", cancel="yes")
    with pytest.raises(ValueError, match="source"):
        recon.reconstruct(42, tmp_path / "run")
    assert not (tmp_path / "run" / "result.json").exists()


def test_dict_overrides_become_hydra_overrides_that_parse_back():
    values = {"data": {"path": "/data/my scene's/x", "resolution": [64, 48], "background_color": None},
              "name": "1e5", "model": {"optim": {"skip_nonfinite": True, "lr_light": 0.005}}, "experiment": "cpu",
              "a": "~/x", "b": "x,y", "c": "k=v", "d": "null", "e": ""}
    overrides = as_overrides(values)
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(overrides)}
    assert parsed == {"data.path": "/data/my scene's/x", "data.resolution": [64, 48], "data.background_color": None,
                      "name": "1e5", "model.optim.skip_nonfinite": True, "model.optim.lr_light": 0.005,
                      "experiment": "cpu", "a": "~/x", "b": "x,y", "c": "k=v", "d": "null", "e": ""}
    assert as_overrides(["a=1"]) == ["a=1"] and as_overrides(None) == []


def test_cancel_accepts_events_and_callables():
    event = threading.Event()
    check = as_cancel_check(event)
    assert not check()
    event.set()
    assert check() and as_cancel_check(lambda: 1)() is True and as_cancel_check(None) is None


def test_source_picks_the_data_group_train_py_would_get(tmp_path):
    assert source_overrides(None) == (["data.path=null"], "builtin") == source_overrides("builtin")
    (tmp_path / "views").mkdir()
    (tmp_path / "views" / "cameras.json").write_text("{}")
    assert source_overrides(tmp_path / "views") == (["data=views", f"data.path={tmp_path / 'views'}"], "views")


def test_progress_is_throttled_per_pass():
    calls = []
    progress = ProgressReport(lambda *a: calls.append(a), updates_per_pass=100)
    module = SimpleNamespace(pass1_steps=1000, pass2_steps=500, current_pass=1, pass_switch_due=False)
    trainer = SimpleNamespace(global_step=0)
    progress.on_train_start(trainer, module)
    for step in range(1, 1501):
        module.current_pass = 1 if step <= 1000 else 2
        trainer.global_step = step
        progress.on_train_batch_end(trainer, module, None, None, 0)
    per_pass = {s: sum(1 for c in calls if c[1] == s) for s in ("pass 1", "pass 2")}
    assert per_pass["pass 1"] <= 101 and per_pass["pass 2"] <= 101 and calls[-1][0] == pytest.approx(0.9)
