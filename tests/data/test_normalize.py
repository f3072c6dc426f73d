"""Scene normalization: a scaled and shifted capture is put back inside the tet grid; minimum views."""
import json

import numpy as np
import pytest
import torch
import trimesh
from test_nerfstudio import write_nerfstudio

from recon.data.datamodule import NeRFDataModule
from recon.data.frames import DataError, Frames
from recon.data.normalize import Normalization, fit_normalization, look_at_point
from recon.data.synthetic_scene import builtin_scene
from recon.render.camera import look_at

SCALE, SHIFT = 7.0, np.array([3.0, -2.0, 5.0])
GRID = 2.1


@pytest.fixture(scope="module")
def scene24(tmp_path_factory):
    """The built-in scene with 24 training views at 32 px (enough silhouettes for a tight visual hull)."""
    return builtin_scene(resolution=32, n_train=24, n_val=1, n_test=2,
                         cache_dir=tmp_path_factory.getbasetemp() / "builtin24", backend="torch")


def moved_capture(scene, root):
    """The scene as a nerfstudio capture whose world is scaled by 7 and shifted by (3, -2, 5)."""
    write_nerfstudio(scene, root)
    meta = json.loads((root / "transforms.json").read_text())
    for fr in meta["frames"]:
        m = np.array(fr["transform_matrix"])
        m[:3, 3] = SCALE * m[:3, 3] + SHIFT
        fr["transform_matrix"] = m.tolist()
    (root / "transforms.json").write_text(json.dumps(meta))
    return root


def gt_verts(scene) -> np.ndarray:
    return np.asarray(trimesh.load(scene / "gt_mesh.ply", process=False).vertices, dtype=np.float64)


def test_moved_capture_lands_in_the_grid_and_maps_back(scene24, tmp_path):
    root = moved_capture(scene24, tmp_path)
    dm = NeRFDataModule(path=str(root), resolution=None, grid_scale=GRID)  # nerfstudio: normalize defaults to auto
    train = dm.load_split("train")
    n = dm.normalization
    assert n.method == "visual_hull"
    verts_in = SCALE * gt_verts(scene24) + SHIFT  # the GT mesh in the capture's coordinates
    verts_n = n.to_normalized(verts_in)
    half = GRID / 2
    extent = np.abs(verts_n).max()
    assert extent <= half * 0.9 + 1e-6  # inside the grid, with the 10 % margin
    assert extent >= half * 0.6  # and filling it: the box is the object's, not the cameras'
    centre = (verts_n.max(0) + verts_n.min(0)) / 2
    assert np.abs(centre).max() < 0.1 * half
    assert np.allclose(n.to_world(verts_n), verts_in)
    assert torch.allclose(n.to_world(torch.tensor(verts_n)), torch.tensor(verts_in))
    raw = dm._load_raw("train")
    assert torch.allclose(train.c2w[:, :3, 3].double(), n.scale * raw.c2w[:, :3, 3].double() + torch.tensor(n.translation),
                          atol=1e-5)
    assert torch.equal(train.c2w[:, :3, :3], raw.c2w[:, :3, :3])
    assert dm.load_split("test").c2w[:, :3, 3].abs().max() < 10  # every split moved, not only train
    d = Normalization.from_dict(json.loads(json.dumps(n.as_dict())))
    assert d == n and np.allclose(d.matrix() @ np.append(verts_in[0], 1), np.append(verts_n[0], 1))


def test_normalization_is_equivariant_to_the_capture_similarity(scene24, tmp_path):
    moved = NeRFDataModule(path=str(moved_capture(scene24, tmp_path)), resolution=None).normalization
    plain = NeRFDataModule(path=str(scene24), resolution=None, normalize="auto").normalization
    assert moved.scale * SCALE == pytest.approx(plain.scale, rel=0.03)
    assert np.allclose(moved.to_normalized(SCALE * np.zeros(3) + SHIFT), plain.to_normalized(np.zeros(3)), atol=0.03)


def test_nerf_synthetic_and_builtin_default_to_none(scene24):
    dm = NeRFDataModule(path=str(scene24), resolution=None)
    assert dm.normalization.is_identity and dm.normalization.method == "none"
    assert torch.equal(dm.load_split("train").c2w, dm._load_raw("train").c2w)


def test_full_masks_fall_back_to_the_look_at_point():
    target = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    dirs = torch.nn.functional.normalize(torch.randn(8, 3, generator=torch.Generator().manual_seed(0),
                                                     dtype=torch.float64), dim=-1)
    c2w = look_at(target + 4.0 * dirs, target).float()
    assert np.allclose(look_at_point(c2w), target.numpy(), atol=1e-4)
    frames = Frames(torch.ones(8, 16, 16, 4), c2w, torch.tensor([[20.0, 20.0, 8.0, 8.0]]).repeat(8, 1))
    n = fit_normalization(frames, grid_scale=2.0, margin=0.0)
    assert n.method == "look_at"
    assert np.allclose(n.to_normalized(target.numpy()), 0, atol=1e-4)
    assert n.scale == pytest.approx(1.0 / (4.0 * 8 / 20), rel=1e-6)  # half-extent: distance * (W/2) / fx


def test_depth_scales_with_the_normalization(tmp_path):
    from test_views_depth import write_views

    from recon.data.synthetic_scene import scene_mesh

    v, f = scene_mesh(resolution=48)
    write_views((torch.from_numpy(v), torch.from_numpy(f)), tmp_path, radius=3.0)
    dm = NeRFDataModule(path=str(tmp_path), resolution=None)  # views: normalize defaults to auto
    got, raw = dm.load_split("train"), dm._load_raw("train")
    assert dm.normalization.method == "visual_hull" and dm.normalization.scale != 1.0
    assert torch.allclose(got.depth, raw.depth * dm.normalization.scale)


def test_bad_normalize_setting():
    with pytest.raises(DataError, match=r"data\.normalize='yes' is not one of auto, none"):
        NeRFDataModule(normalize="yes")


def test_min_views(scene, tmp_path):
    dm = NeRFDataModule(path=str(scene), resolution=None, min_views=7)  # the shared scene has 6 training views
    with pytest.raises(DataError, match=r"the train split of .* has 6 frame\(s\), fewer than data\.min_views=7"):
        dm.setup("fit")
    assert len(NeRFDataModule(path=str(scene), resolution=None, min_views=6).load_split("train")) == 6
