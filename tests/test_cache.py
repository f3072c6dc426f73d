"""recon.cache: constant tensors built once per cache, written atomically, rebuilt when unreadable."""
import torch

from recon import cache
from recon.light import bsdf


def test_cached_tensor_builds_once_then_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("RECON_CACHE", str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return torch.arange(6.0).reshape(2, 3)

    first = cache.cached_tensor("table_v1", build)
    second = cache.cached_tensor("table_v1", build)
    assert torch.equal(first, second) and len(calls) == 1
    assert (tmp_path / "tensors" / "table_v1.pt").is_file()
    assert not [p for p in (tmp_path / "tensors").iterdir() if p.suffix == ".tmp"]  # no temporary left behind


def test_unreadable_file_is_rebuilt_and_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("RECON_CACHE", str(tmp_path))
    (tmp_path / "tensors").mkdir()
    (tmp_path / "tensors" / "table_v1.pt").write_bytes(b"not a tensor file")
    value = cache.cached_tensor("table_v1", lambda: torch.ones(3))
    assert torch.equal(value, torch.ones(3))
    assert torch.equal(cache.cached_tensor("table_v1", lambda: torch.zeros(3)), torch.ones(3))  # replaced

    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache directory would go")
    monkeypatch.setenv("RECON_CACHE", str(blocked))
    assert torch.equal(cache.cached_tensor("other_v1", lambda: torch.full((2,), 7.0)), torch.full((2,), 7.0))


def test_brdf_table_from_the_cache_equals_the_computed_one(tmp_path, monkeypatch):
    monkeypatch.setenv("RECON_CACHE", str(tmp_path))
    monkeypatch.setattr(bsdf, "_LUT_CACHE", {})
    computed = bsdf.ggx_lut(16, 32)
    monkeypatch.setattr(bsdf, "_LUT_CACHE", {})
    monkeypatch.setattr(bsdf, "_compute_lut", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert torch.equal(bsdf.ggx_lut(16, 32), computed)
    assert computed.shape == (16, 16, 2) and float(computed[..., 0].max()) <= 1.0
