"""The `recon` command: `fit --json` and its exit status (a subprocess), cancellation by Ctrl-C, and the `eval`,
`summarize` and `estimate` wrappers."""
import json
import os
import signal
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from recon import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ["experiment=cpu", "model.pass1_steps=4", "model.pass2_steps=2", "data.resolution=32", "data.batch_size=2",
        "data.builtin.n_train=4", "data.builtin.n_test=2", "model.geometry.tet_grid=12", "model.light.base_res=16",
        "model.bake.texture_res=64", "callbacks.mesh_export.eval_samples=2000"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """`python -m recon.cli fit builtin RUN ... --json` once: (process, run dir)."""
    root = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, RECON_CACHE=str(root / "cache"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "recon.cli", "fit", "builtin", str(root / "jobs" / "run"), *TINY, "--json"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600), root / "jobs" / "run"


def test_fit_prints_the_result_json_and_exits_0(fitted):
    proc, run = fitted
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout holds the result only
    assert result["status"] == "succeeded" and result == json.loads((run / "result.json").read_text())
    assert Path(result["paths"]["mesh.glb"]).is_file() and result["metrics"]["n_views"] == 2
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert progress[0].startswith("[  0%] preparing data") and progress[-1] == "[100%] done: succeeded"
    assert any("] unwrap/bake:" in line for line in progress)


def test_eval_and_summarize_wrap_their_modules_with_json(fitted, capsys):
    proc, run = fitted
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cli.main(["eval", str(run), "--samples", "1000", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n_views"] == 2 and metrics == {k: v for k, v in json.loads((run / "metrics.json").read_text()).items()
                                                    if k in metrics}
    assert cli.main(["summarize", str(run.parent), "--json"]) == 0  # an API run is a job like a sweep's
    table = json.loads(capsys.readouterr().out)
    assert [row["job"] for row in table["rows"]] == ["run"] and table["rows"][0]["status"] == "finished"
    assert cli.main(["summarize", str(run.parent / "nothing")]) == 2


def test_failed_and_cancelled_fits_exit_1_and_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "cache"))
    assert cli.main(["fit", str(tmp_path / "missing"), str(tmp_path / "bad"), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["error_kind"] == "bad_input" and str(tmp_path / "missing") in result["message"]

    def interrupt(fraction, stage, message):  # Ctrl-C while pass 1 runs
        if message == "step 1 of 6":
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(cli, "_print_progress", interrupt)
    handler = signal.getsignal(signal.SIGINT)
    assert cli.main(["fit", "builtin", str(tmp_path / "stopped"), *TINY]) == 2
    assert (tmp_path / "stopped" / "checkpoints" / "cancelled-step1.ckpt").is_file()
    assert not (tmp_path / "stopped" / "mesh.obj").exists() and signal.getsignal(signal.SIGINT) is handler


def test_estimate_prints_json_and_flags_an_oversize_config(capsys):
    assert cli.main(["estimate", "experiment=cpu_small", "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    phases = [sum(estimate[phase].values()) for phase in ("setup", "pass1", "pass2")]
    assert estimate["fits"] and estimate["total_bytes"] == max(phases) > 0
    assert cli.main(["estimate", "experiment=cpu", "data.resolution=100000"]) == 1
    assert "would be refused" in capsys.readouterr().out
    assert cli.main(["estimate", "data.resolutoin=3"]) == 2


def test_console_script_is_installed():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "recon"]
    assert script.value == "recon.cli:main"
