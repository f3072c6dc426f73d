"""NeRFDataModule format detection: each layout picks its reader and yields batches; unknown layouts fail clearly."""
import pytest
import torch
from test_colmap import write_colmap
from test_llff import write_llff
from test_nerfstudio import write_nerfstudio

from recon.data.datamodule import NeRFDataModule
from recon.data.frames import DataError


@pytest.mark.parametrize("fmt", ["nerf_synthetic", "nerfstudio", "llff", "colmap"])
def test_auto_detects_format_and_yields_batches(scene, tmp_path, fmt, monkeypatch):
    root = {"nerf_synthetic": lambda: scene, "nerfstudio": lambda: write_nerfstudio(scene, tmp_path / "ns"),
            "llff": lambda: write_llff(scene, tmp_path / "llff"),
            "colmap": lambda: write_colmap(scene, tmp_path / "colmap")}[fmt]()
    import recon.data.sources as sources

    called = []
    original = sources.READERS[fmt]
    monkeypatch.setitem(sources.READERS, fmt, lambda *a, **k: called.append(fmt) or original(*a, **k))
    data = NeRFDataModule(path=str(root), resolution=16, batch_size=2, resident=False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert called and batch["img"].shape == (2, 16, 16, 4) and batch["mvp"].shape == (2, 4, 4)
    assert torch.isfinite(batch["mvp"]).all()
    assert len(next(iter(data.val_dataloader()))["img"]) == 1


def test_explicit_format_overrides_detection(scene, tmp_path):
    root = write_nerfstudio(scene, tmp_path)
    with pytest.raises(DataError, match=r"poses_bounds\.npy not found"):
        NeRFDataModule(path=str(root), format="llff").load_split("train")


def test_unknown_layout_lists_what_was_looked_for(tmp_path):
    with pytest.raises(DataError, match=r"holds none of transforms_train\.json.*transforms\.json.*poses_bounds\.npy"):
        NeRFDataModule(path=str(tmp_path)).load_split("train")


def test_unknown_format_name():
    with pytest.raises(DataError, match=r"data.format='colmpa' is not one of auto, nerf_synthetic, nerfstudio, llff, colmap"):
        NeRFDataModule(format="colmpa")
