"""`python -m recon.summarize`: one table of a Hydra sweep, from a fake multirun tree and from a real CPU sweep."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recon import summarize

ROOT = Path(__file__).resolve().parents[1]


def fake_job(root: Path, num: int, overrides: list[str], config: dict, metrics: dict | None = None,
             timing: dict | None = None, mesh: bool = False) -> Path:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if timing is not None:
        (job / "timing.json").write_text(json.dumps(timing))
    if mesh:
        (job / "mesh.obj").write_text("")
    return job


def config(tet_grid: int, resolution: int, name: str = "cpu") -> dict:
    return {"name": name, "seed": 0, "data": {"resolution": resolution, "batch_size": 4},
            "model": {"geometry": {"tet_grid": tet_grid}, "max_steps": "${trainer.max_steps}"},
            "trainer": {"max_steps": 600, "default_root_dir": "${hydra:runtime.output_dir}"}}


def metrics(psnr, ssim=0.9, iou=0.95, chamfer=0.004) -> dict:
    return {"psnr": psnr, "ssim": ssim, "iou": iou, "n_views": 8, "geometry": {"chamfer_l1": chamfer, "chamfer_l2": 1e-5}}


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun" / "cpu" / "2025-01-01_00-00-00"
    timing = {"fit_seconds": 70.25, "export_seconds": 3.0, "peak_gpu_memory_bytes": 3 * 2**30}
    fake_job(root, 0, ["experiment=cpu", "model.geometry.tet_grid=32", "data.resolution=64"], config(32, 64),
             metrics(30.5), timing)
    fake_job(root, 1, ["experiment=cpu", "model.geometry.tet_grid=32", "data.resolution=128"], config(32, 128),
             metrics("inf", 1.0, 1.0, 0.0), timing)
    fake_job(root, 2, ["experiment=cpu", "model.geometry.tet_grid=48", "data.resolution=64"], config(48, 64),
             None, {"fit_seconds": 12.0}, mesh=True)       # exported, evaluation off
    fake_job(root, 10, ["experiment=cpu", "model.geometry.tet_grid=48", "data.resolution=128"], config(48, 128))  # failed
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_table_has_swept_keys_metrics_and_status(sweep):
    columns, rows = summarize.summarize(sweep)
    assert columns == ["job", "model.geometry.tet_grid", "data.resolution", "psnr", "ssim", "iou", "chamfer_l1",
                       "fit_seconds", "peak_gpu_memory_gib", "status"]  # experiment=cpu is common to all: no column
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]  # Hydra's job order, not the string order
    assert [(r["model.geometry.tet_grid"], r["data.resolution"]) for r in rows] == [("32", "64"), ("32", "128"),
                                                                                   ("48", "64"), ("48", "128")]
    assert rows[0]["psnr"] == 30.5 and rows[0]["chamfer_l1"] == 0.004 and rows[0]["fit_seconds"] == 70.25
    assert rows[0]["peak_gpu_memory_gib"] == 3.0 and rows[1]["psnr"] == float("inf")
    assert [r["status"] for r in rows] == ["finished", "finished", "exported", "no metrics"]
    assert rows[3]["psnr"] is None and rows[3]["fit_seconds"] is None

    table = summarize.format_table(columns, rows).splitlines()
    assert len(table) == 2 + 4 and table[0].split()[:3] == ["job", "model.geometry.tet_grid", "data.resolution"]
    assert table[2].split() == ["0", "32", "64", "30.50", "0.9000", "0.9500", "0.00400", "70.2", "3.00", "finished"]
    assert table[5].split() == ["10", "48", "128", "-", "-", "-", "-", "-", "-", "no", "metrics"]


def test_keys_a_preset_changes_show_up_without_an_override_per_key(tmp_path):
    root = tmp_path / "sweep"
    fake_job(root, 0, ["experiment=cpu"], config(40, 128, "cpu"), metrics(31.0))
    fake_job(root, 1, ["experiment=cpu_small"], config(24, 64, "cpu_small"), metrics(25.0))
    columns, rows = summarize.summarize(root)
    assert columns[:5] == ["job", "experiment", "name", "data.resolution", "model.geometry.tet_grid"]
    assert [(r["experiment"], r["data.resolution"], r["model.geometry.tet_grid"]) for r in rows] == [
        ("cpu", "128", "40"), ("cpu_small", "64", "24")]


def test_cli_prints_and_writes_csv_atomically(sweep, tmp_path, capsys):
    assert summarize.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "4 jobs" in out and "summary.csv" in out
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]
    assert float(rows[0]["fit_seconds"]) == 70.25 and rows[3]["psnr"] == "" and rows[1]["psnr"] == "inf"
    assert not [p for p in sweep.iterdir() if p.name.startswith(".summary.csv")]  # no temporary file left
    elsewhere = tmp_path / "out" / "table.csv"
    assert summarize.main([str(sweep), "--csv", str(elsewhere)]) == 0 and elsewhere.read_text().startswith("job,")


def test_a_directory_without_jobs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert summarize.main([str(tmp_path / "empty")]) == 2
    assert "holds no Hydra jobs" in capsys.readouterr().err
    assert summarize.main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(summarize.NoJobsError):
        summarize.summarize(tmp_path / "empty")


def test_real_cpu_sweep_summarizes_four_jobs(tmp_path):
    """A 2 x 2 sweep of tiny CPU fits (about 45 s on 2 cores), then the CLI as a user runs it."""
    sweep_dir = tmp_path / "sweep"
    env = dict(os.environ, RECON_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=cpu_small", "model.geometry.tet_grid=12,16",
           "data.resolution=32,48", "model.pass1_steps=8", "model.pass2_steps=2", "data.builtin.n_train=8",
           "data.builtin.n_test=2", "model.light.base_res=16", "model.bake.texture_res=64", "callbacks.mesh_export.eval_samples=2000",
           f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "recon.summarize", str(sweep_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["job", "model.geometry.tet_grid", "data.resolution"]
    body = [line.split() for line in lines[2:6]]
    assert [row[:3] for row in body] == [["0", "12", "32"], ["1", "12", "48"], ["2", "16", "32"], ["3", "16", "48"]]
    assert all(row[-1] == "finished" and 0 < float(row[3]) < 60 and 0 <= float(row[5]) <= 1 for row in body), lines
    with open(sweep_dir / "summary.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4
