"""bench/isolated_env.py: the dependency closure from pyproject.toml, the linked environment, and bench/run.py's
interpreter switch."""
import importlib.util
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


iso = _load("bench_isolated_env", "isolated_env.py")


def test_closure_follows_requirements_markers_and_extras():
    found, missing = iso.dependency_closure(iso.project_requirements())
    for name in ("torch", "lightning", "hydra-core", "omegaconf", "numpy", "trimesh", "scipy"):
        assert name in found, name
    assert "antlr4-python3-runtime" in found and "lightning-utilities" in found  # transitive: omegaconf's, lightning's
    assert "pytest" not in found and "ruff" not in found  # installed here, but only in the test and dev groups
    with_test, _ = iso.dependency_closure(iso.project_requirements(extras=("test",)))
    assert "pytest" in with_test and "ruff" not in with_test

    reqs = [Requirement("numpy; python_version < '3.0'"), Requirement("fsspec[http]"),
            Requirement("not-a-real-package-xyz>=1")]
    found, missing = iso.dependency_closure(reqs)
    assert "numpy" not in found  # its marker is false here
    assert "fsspec" in found and "aiohttp" in found  # the extra's requirement is followed
    assert missing == ["not-a-real-package-xyz>=1"]
    plain, _ = iso.dependency_closure([Requirement("fsspec")])
    assert "aiohttp" not in plain


def test_unknown_extra_is_refused():
    with pytest.raises(ValueError, match="no optional dependency group"):
        iso.project_requirements(extras=("gpu-magic",))


def test_namespace_folders_from_two_places_are_merged(tmp_path):
    a, b, site = tmp_path / "a" / "ns", tmp_path / "b" / "ns", tmp_path / "site"
    for d, mod in ((a, "one.py"), (b, "two.py")):
        d.mkdir(parents=True)
        (d / mod).write_text("X = 1\n")
    site.mkdir()
    iso.link_into(a, site / "ns")
    assert (site / "ns").is_symlink()
    iso.link_into(b, site / "ns")
    assert not (site / "ns").is_symlink() and sorted(p.name for p in (site / "ns").iterdir()) == ["one.py", "two.py"]
    iso.link_into(a, site / "ns")  # again: nothing changes
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "one.py").write_text("X = 2\n")
    with pytest.raises(FileExistsError, match="two installed distributions"):
        iso.link_into(tmp_path / "c" / "one.py", site / "ns" / "one.py")


def test_environment_has_recon_dependencies_only(tmp_path, monkeypatch):
    info = iso.build(tmp_path / "env")
    code = ("import importlib.util as u, lightning, omegaconf, recon; "
            "print([m for m in ('pytest', 'ruff', 'pip') if u.find_spec(m)])")
    monkeypatch.setenv("PYTHONPATH", "/nonexistent-on-purpose")
    bench = _load("bench_run_for_env", "run.py")
    env = bench.training_env(info["python"])
    assert "PYTHONPATH" not in env and env["PYTHONUNBUFFERED"] == "1"
    assert bench.training_env(None)["PYTHONPATH"] == "/nonexistent-on-purpose"
    out = subprocess.run([info["python"], "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"  # lightning and recon import; pytest, ruff and pip are not there
    assert "torch" in info["linked"] and "pytest" not in info["linked"]
    with pytest.raises(FileExistsError, match="exists"):
        iso.build(tmp_path / "env")
