"""nerfstudio / instant-ngp transforms.json reader: the built-in scene re-expressed, read back exactly; clear errors."""
import json
import math
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from recon.data.frames import DataError
from recon.data.nerf_synthetic import load_nerf_synthetic
from recon.data.nerfstudio import load_nerfstudio, transforms_metadata
from recon.data.synthetic_scene import CAMERA_ANGLE_X

RES = 32
FOCAL = 0.5 * RES / math.tan(0.5 * CAMERA_ANGLE_X)



def write_nerfstudio(scene, root, split_lists=True, **top):
    """Copy the built-in scene into a nerfstudio layout: images/<split>_<i>.png + one transforms.json."""
    (root / "images").mkdir(parents=True)
    frames, lists = [], {}
    for split in ("train", "val", "test"):
        meta = json.loads((scene / f"transforms_{split}.json").read_text())
        lists[f"{split}_filenames"] = []
        for i, fr in enumerate(meta["frames"]):
            name = f"images/{split}_{i}.png"
            shutil.copy(scene / f"{fr['file_path']}.png", root / name)
            frames.append({"file_path": name, "transform_matrix": fr["transform_matrix"]})
            lists[f"{split}_filenames"].append(name)
    meta = {"fl_x": FOCAL, "fl_y": FOCAL, "cx": RES / 2, "cy": RES / 2, "w": RES, "h": RES, "frames": frames,
            "scale": 0.33, "offset": [0.5, 0.5, 0.5], "aabb_scale": 4, **top}
    if split_lists:
        meta.update(lists)
    (root / "transforms.json").write_text(json.dumps(meta))
    return root


def edit(root, fn):
    meta = json.loads((root / "transforms.json").read_text())
    fn(meta)
    (root / "transforms.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_reads_back_the_scene_exactly(scene, tmp_path, split):
    root = write_nerfstudio(scene, tmp_path)
    got, truth = load_nerfstudio(root, split), load_nerf_synthetic(scene, split)
    assert len(got) == len(truth)
    assert torch.allclose(got.c2w, truth.c2w, atol=1e-5)
    assert torch.allclose(got.intrinsics, truth.intrinsics, atol=1e-4)
    assert torch.equal(got.images, truth.images)
    assert transforms_metadata(root) == {"scale": 0.33, "offset": [0.5, 0.5, 0.5], "aabb_scale": 4}


def test_per_frame_intrinsics_override_and_angle_fallback(scene, tmp_path):
    root = write_nerfstudio(scene, tmp_path)

    def fn(meta):
        for k in ("fl_x", "fl_y", "cx", "cy"):
            del meta[k]
        meta["camera_angle_x"] = CAMERA_ANGLE_X
        meta["frames"][1].update(fl_x=30.0, fl_y=31.0, cx=15.0, cy=17.0)
    edit(root, fn)
    f = load_nerfstudio(root, "train")
    assert torch.allclose(f.intrinsics[0], torch.tensor([FOCAL, FOCAL, 16.0, 16.0]), atol=1e-4)
    assert torch.allclose(f.intrinsics[1], torch.tensor([30.0, 31.0, 15.0, 17.0]))


def test_deterministic_split_holds_out_every_kth_sorted_frame(scene, tmp_path):
    root = write_nerfstudio(scene, tmp_path, split_lists=False)
    names = sorted(fr["file_path"] for fr in json.loads((root / "transforms.json").read_text())["frames"])
    test = load_nerfstudio(root, "test", train_fraction=0.75)  # k = 4: sorted frames 0, 4, 8
    train = load_nerfstudio(root, "train", train_fraction=0.75)
    assert [p.split("/")[-1] for p in test.paths] == [names[i].split("/")[-1] for i in (0, 4, 8)]
    assert len(train) == 6 and not set(train.paths) & set(test.paths)
    assert load_nerfstudio(root, "val", train_fraction=0.75).paths == test.paths


def test_mask_path_combines_with_alpha(scene, tmp_path):
    root = write_nerfstudio(scene, tmp_path)
    mask = np.zeros((RES, RES), np.uint8)
    mask[:, : RES // 2] = 255  # keep only the left half
    iio.imwrite(root / "mask.png", mask)
    edit(root, lambda meta: meta["frames"][0].update(mask_path="mask.png"))
    got, truth = load_nerfstudio(root, "train"), load_nerf_synthetic(scene, "train")
    assert torch.equal(got.images[0, :, : RES // 2, 3], truth.images[0, :, : RES // 2, 3])
    assert got.images[0, :, RES // 2 :, 3].abs().max() == 0
    assert torch.equal(got.images[0, ..., :3], truth.images[0, ..., :3])


def test_rgb_images_with_masks_need_no_background_color(scene, tmp_path):
    root = write_nerfstudio(scene, tmp_path)
    rgba = iio.imread(root / "images/train_0.png")
    iio.imwrite(root / "images/train_0.png", rgba[..., :3])
    iio.imwrite(root / "mask.png", rgba[..., 3])
    edit(root, lambda meta: meta["frames"][0].update(mask_path="mask.png"))
    got = load_nerfstudio(root, "train")
    assert torch.equal(got.images[0, ..., 3], torch.from_numpy((rgba[..., 3] > 127).astype(np.float32)))


def test_distortion_is_removed_with_opencv(scene, tmp_path):
    cv2 = pytest.importorskip("cv2")
    root = write_nerfstudio(scene, tmp_path, k1=0.2, k2=0.0, p1=0.01, p2=0.0)
    got, plain = load_nerfstudio(root, "train"), load_nerf_synthetic(scene, "train")
    raw = iio.imread(root / "images/train_0.png").astype(np.float32) / 255
    kmat = np.array([[FOCAL, 0, RES / 2], [0, FOCAL, RES / 2], [0, 0, 1]])
    expect = cv2.undistort(raw, kmat, np.array([0.2, 0.0, 0.01, 0.0, 0.0]))
    assert np.allclose(got.images[0, ..., 3].numpy(), expect[..., 3], atol=1e-6)
    assert not torch.allclose(got.images[0], plain.images[0], atol=1e-3)
    assert torch.allclose(got.intrinsics, plain.intrinsics, atol=1e-4)  # intrinsics unchanged


# ----------------------------------------------------------------------------------------- errors
def test_missing_transforms_json(tmp_path):
    with pytest.raises(DataError, match=r"transforms\.json not found"):
        load_nerfstudio(tmp_path, "train")


def test_bad_json(scene, tmp_path):
    root = write_nerfstudio(scene, tmp_path)
    (root / "transforms.json").write_text('{"frames": [')
    with pytest.raises(DataError, match=r"transforms\.json is not valid JSON \(line 1"):
        load_nerfstudio(root, "train")


def test_missing_image(scene, tmp_path):
    root = write_nerfstudio(scene, tmp_path)
    (root / "images/train_2.png").unlink()
    with pytest.raises(DataError, match=r"'images/train_2\.png'.*transforms\.json.*no file exists"):
        load_nerfstudio(root, "train")


def test_unreadable_image(scene, tmp_path):
    root = write_nerfstudio(scene, tmp_path)
    (root / "images/train_2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*train_2\.png"):
        load_nerfstudio(root, "train")


def test_frame_without_transform(scene, tmp_path):
    root = write_nerfstudio(scene, tmp_path)
    edit(root, lambda meta: meta["frames"][3].pop("transform_matrix"))
    with pytest.raises(DataError, match=r"frame 3 \('images/train_3\.png'\) of .*transforms\.json has no 'transform_matrix'"):
        load_nerfstudio(root, "train")


@pytest.mark.parametrize("bad, message", [
    (lambda m: m.__setitem__((0, 0), float("nan")), "NaN or Inf"),
    (lambda m: m.__setitem__((slice(None), 0), -m[:, 0]), "determinant"),
    (lambda m: m.__setitem__((0, 1), m[0, 1] + 0.2), "not orthonormal"),
])
def test_non_finite_or_non_rigid_transform(scene, tmp_path, bad, message):
    root = write_nerfstudio(scene, tmp_path)

    def fn(meta):
        m = np.array(meta["frames"][1]["transform_matrix"])
        bad(m)
        meta["frames"][1]["transform_matrix"] = [[float(x) for x in row] for row in m]
    edit(root, fn)
    with pytest.raises(DataError, match=rf"frame 1 .*transforms\.json.*{message}"):
        load_nerfstudio(root, "train")


def test_uniform_scale_in_rotation_is_removed(scene, tmp_path):
    root = write_nerfstudio(scene, tmp_path)

    def fn(meta):
        m = np.array(meta["frames"][1]["transform_matrix"])
        m[:3, :3] *= 2.5
        meta["frames"][1]["transform_matrix"] = m.tolist()
    edit(root, fn)
    assert torch.allclose(load_nerfstudio(root, "train").c2w, load_nerf_synthetic(scene, "train").c2w, atol=1e-5)


def test_intrinsics_size_mismatch(scene, tmp_path):
    root = write_nerfstudio(scene, tmp_path, w=64)
    with pytest.raises(DataError, match=r"transforms\.json: the JSON says w=64 but the image .*train_0\.png is 32x32"):
        load_nerfstudio(root, "train")


def test_mask_size_mismatch(scene, tmp_path):
    root = write_nerfstudio(scene, tmp_path)
    iio.imwrite(root / "mask.png", np.full((16, 16), 255, np.uint8))
    edit(root, lambda meta: meta["frames"][0].update(mask_path="mask.png"))
    with pytest.raises(DataError, match=r"mask .*mask\.png is 16x16 but its image .*train_0\.png is 32x32"):
        load_nerfstudio(root, "train")


def test_empty_mask(scene, tmp_path):
    root = write_nerfstudio(scene, tmp_path)
    iio.imwrite(root / "mask.png", np.zeros((RES, RES), np.uint8))
    edit(root, lambda meta: meta["frames"][0].update(mask_path="mask.png"))
    with pytest.raises(DataError, match=r"mask .*mask\.png of frame 0 .* is empty"):
        load_nerfstudio(root, "train")


def test_split_list_naming_an_unknown_frame(scene, tmp_path):
    root = write_nerfstudio(scene, tmp_path)
    edit(root, lambda meta: meta["test_filenames"].append("images/nope.png"))
    with pytest.raises(DataError, match=r"transforms\.json: 'images/nope\.png' in test_filenames"):
        load_nerfstudio(root, "test")
