"""LLFF reader: the built-in scene re-expressed as poses_bounds.npy, read back exactly; clear errors."""
import json
import math
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from recon.data.frames import DataError
from recon.data.llff import llff_to_nerf, load_llff, nerf_to_llff
from recon.data.nerf_synthetic import load_nerf_synthetic
from recon.data.synthetic_scene import CAMERA_ANGLE_X

RES = 32
FOCAL = 0.5 * RES / math.tan(0.5 * CAMERA_ANGLE_X)



def all_frames(scene):
    """(image path, c2w [4,4]) of the built-in scene's 9 views, train then val then test."""
    out = []
    for split in ("train", "val", "test"):
        for fr in json.loads((scene / f"transforms_{split}.json").read_text())["frames"]:
            out.append((scene / f"{fr['file_path']}.png", np.array(fr["transform_matrix"])))
    return out


def write_llff(scene, root, hwf_scale=1.0, rgb_with_masks=False):
    """images/000.png ... + poses_bounds.npy (LLFF [down, right, back] axes); optionally RGB + masks/."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i, (src, c2w) in enumerate(all_frames(scene)):
        if rgb_with_masks:
            rgba = iio.imread(src)
            (root / "masks").mkdir(exist_ok=True)
            iio.imwrite(root / "images" / f"{i:03d}.jpg", rgba[..., :3], quality=100)
            iio.imwrite(root / "masks" / f"{i:03d}.png", rgba[..., 3])
        else:
            shutil.copy(src, root / "images" / f"{i:03d}.png")
        hwf = np.array([[RES], [RES], [FOCAL]]) * hwf_scale
        rows.append(np.concatenate([np.concatenate([nerf_to_llff(c2w), hwf], 1).ravel(), [2.0, 5.0]]))
    np.save(root / "poses_bounds.npy", np.stack(rows))
    return root


def test_convention_round_trip():
    c2w = np.eye(4)
    c2w[:3, :3] = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    c2w[:3, :3] *= np.sign(np.linalg.det(c2w[:3, :3]))
    c2w[:3, 3] = [1, 2, 3]
    llff = nerf_to_llff(c2w)
    assert np.allclose(llff[:, 0], -c2w[:3, 1]) and np.allclose(llff[:, 1], c2w[:3, 0])  # down = -up, right = x
    assert np.allclose(llff_to_nerf(llff), c2w)


@pytest.mark.parametrize("split, index", [("train", [1, 2, 3, 4, 5, 6, 7]), ("test", [0, 8]), ("val", [0, 8])])
def test_reads_back_the_scene_exactly(scene, tmp_path, split, index):
    root = write_llff(scene, tmp_path)
    f = load_llff(root, split)
    truth = all_frames(scene)
    assert [p.rsplit("/", 1)[-1] for p in f.paths] == [f"{i:03d}.png" for i in index]
    assert torch.allclose(f.c2w, torch.tensor(np.stack([truth[i][1] for i in index])).float(), atol=1e-5)
    assert torch.allclose(f.intrinsics, torch.tensor([FOCAL, FOCAL, 16.0, 16.0]).expand(len(index), 4), atol=1e-4)
    ref = torch.cat([load_nerf_synthetic(scene, s).images for s in ("train", "val", "test")])
    assert torch.equal(f.images, ref[index])


def test_focal_scales_with_downscaled_images(scene, tmp_path):
    root = write_llff(scene, tmp_path, hwf_scale=4.0)  # poses computed on 128 px images, 32 px copies in images/
    f = load_llff(root, "train")
    assert torch.allclose(f.intrinsics[0], torch.tensor([FOCAL, FOCAL, 16.0, 16.0]), atol=1e-4)


def test_rgb_images_take_masks_folder(scene, tmp_path):
    root = write_llff(scene, tmp_path, rgb_with_masks=True)
    f = load_llff(root, "test")
    alpha = iio.imread(all_frames(scene)[8][0])[..., 3]
    assert torch.equal(f.images[1, ..., 3], torch.from_numpy((alpha > 127).astype(np.float32)))


# ----------------------------------------------------------------------------------------- errors
def test_missing_poses_bounds(tmp_path):
    with pytest.raises(DataError, match=r"poses_bounds\.npy not found"):
        load_llff(tmp_path, "train")


def test_bad_poses_bounds(scene, tmp_path):
    root = write_llff(scene, tmp_path)
    np.save(root / "poses_bounds.npy", np.zeros((9, 15)))
    with pytest.raises(DataError, match=r"poses_bounds\.npy has shape \(9, 15\); expected N x 17"):
        load_llff(root, "train")
    (root / "poses_bounds.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read .*poses_bounds\.npy"):
        load_llff(root, "train")


def test_missing_image(scene, tmp_path):
    root = write_llff(scene, tmp_path)
    (root / "images" / "004.png").unlink()
    with pytest.raises(DataError, match=r"poses_bounds\.npy holds 9 poses but .*images holds 8 images"):
        load_llff(root, "train")


def test_unreadable_image(scene, tmp_path):
    root = write_llff(scene, tmp_path)
    (root / "images" / "004.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*004\.png"):
        load_llff(root, "train")


@pytest.mark.parametrize("bad, message", [
    (lambda p: p.__setitem__((3, 0), np.nan), "NaN or Inf"),
    (lambda p: p.__setitem__((3, slice(0, 15, 5)), -p[3, 0:15:5]), "determinant"),
    (lambda p: p.__setitem__((3, 1), p[3, 1] + 0.3), "not orthonormal"),
])
def test_non_finite_or_non_rigid_pose(scene, tmp_path, bad, message):
    root = write_llff(scene, tmp_path)
    pb = np.load(root / "poses_bounds.npy")
    bad(pb)
    np.save(root / "poses_bounds.npy", pb)
    with pytest.raises(DataError, match=rf"row 3 of .*poses_bounds\.npy \(image 003\.png\).*{message}"):
        load_llff(root, "train")


def test_hwf_that_does_not_fit_the_image(scene, tmp_path):
    root = write_llff(scene, tmp_path)
    pb = np.load(root / "poses_bounds.npy")
    pb[:, 4] = 48  # height 48, width 32: another aspect ratio
    np.save(root / "poses_bounds.npy", pb)
    with pytest.raises(DataError, match=r"row 1 of .*poses_bounds\.npy.*does not fit the 32x32 image .*001\.png"):
        load_llff(root, "train")


def test_rgb_without_masks(scene, tmp_path):
    root = write_llff(scene, tmp_path, rgb_with_masks=True)
    shutil.rmtree(root / "masks")
    with pytest.raises(DataError, match=r"image .*001\.jpg has no alpha channel and .*masks does not exist"):
        load_llff(root, "train")


def test_mask_size_mismatch(scene, tmp_path):
    root = write_llff(scene, tmp_path, rgb_with_masks=True)
    iio.imwrite(root / "masks" / "002.png", np.full((16, 16), 255, np.uint8))
    with pytest.raises(DataError, match=r"mask .*002\.png is 16x16 but its image .*002\.jpg is 32x32"):
        load_llff(root, "train")


def test_empty_mask(scene, tmp_path):
    root = write_llff(scene, tmp_path, rgb_with_masks=True)
    iio.imwrite(root / "masks" / "002.png", np.zeros((RES, RES), np.uint8))
    with pytest.raises(DataError, match=r"mask .*002\.png is empty"):
        load_llff(root, "train")
