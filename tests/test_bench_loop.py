"""bench/loop.py: step statistics, where a sync came from, and a tiny run of the real loop."""
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import loop  # noqa: E402 (bench/loop.py)


def test_step_statistics_per_window():
    times = {s: 0.01 * s for s in range(10)}
    times[10] = times[9] + 0.05  # step 9 took 50 ms
    s = loop.step_statistics(times, 0, 10, skip=2)
    assert s["steps"] == 8 and abs(s["median_ms"] - 10.0) < 1e-6 and abs(s["mean_ms"] - 15.0) < 1e-6
    assert loop.step_statistics(times, 5, 10, skip=5) is None  # everything skipped


def test_recon_frame_names_the_package_line():
    stack = [traceback.FrameSummary(str(ROOT / "recon" / "gather.py"), 20, "mask_index", line="x.nonzero()"),
             traceback.FrameSummary("/usr/lib/python3/site-packages/torch/x.py", 3, "f", line="y")]
    assert loop.recon_frame(stack) == "recon/gather.py:20 x.nonzero()"
    assert loop.recon_frame(stack[1:]) == "(outside recon)"


def test_loop_measures_both_passes(tmp_path):
    out = tmp_path / "loop.json"
    cmd = [sys.executable, str(ROOT / "bench" / "loop.py"), "cpu-small", "--pass1-steps", "6", "--pass2-steps", "4",
           "--skip", "2", "--override", "data.resolution=32", "--override", "model.geometry.tet_grid=12",
           "--override", "data.builtin.n_train=6", "--override", "data.builtin.n_test=1", "--out", str(out)]
    env = {**os.environ, "RECON_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["pass1"]["steps"] == 4 and r["pass2"]["steps"] == 2 and r["pass1"]["median_ms"] > 0
    assert "cpu-small pass2: median" in proc.stdout


def test_compare_interleaves_the_variants_and_reports_differences():
    calls = []

    def fake(variant):
        calls.append(variant)
        ms = 10.0 + (2.0 if variant == "B" else 0.0) + len(calls) * 0.1
        return {"pass1": {"median_ms": ms}, "pass2": None if variant == "B" and len(calls) == 4 else {"median_ms": ms}}

    r = loop.compare(fake, rounds=2)
    assert calls == ["A", "B", "A", "B"]
    d = r["difference_ms"]["pass1"]
    assert abs(d["mean"] - 2.1) < 1e-9 and abs(d["min"] - 2.1) < 1e-9 and abs(d["max"] - 2.1) < 1e-9
    assert abs(r["difference_ms"]["pass2"]["mean"] - 2.1) < 1e-9  # the round without a pass-2 figure is left out


def test_loop_compare_runs_both_variants(tmp_path):
    out = tmp_path / "ab.json"
    cmd = [sys.executable, str(ROOT / "bench" / "loop.py"), "cpu-small", "--pass1-steps", "4", "--pass2-steps", "0",
           "--skip", "1", "--override", "data.resolution=32", "--override", "model.geometry.tet_grid=12",
           "--override", "data.builtin.n_train=6", "--override", "data.builtin.n_test=1",
           "--compare", "model.material.smoothness_fraction=0.5", "--rounds", "1", "--out", str(out)]
    env = {**os.environ, "RECON_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["variants"]["B"][-1] == "model.material.smoothness_fraction=0.5" and len(r["rounds"]) == 1
    assert r["rounds"][0]["A"]["pass1"]["steps"] == 3 and "pass1" in r["difference_ms"]
    assert "B - A =" in proc.stdout
