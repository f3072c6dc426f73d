"""NeRF-synthetic reader: values, conventions and clear errors on bad input."""
import json
import math

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from recon.data.datamodule import NeRFDataModule
from recon.data.frames import DataError, Frames, projection_from_intrinsics
from recon.data.nerf_synthetic import load_nerf_synthetic


def write_scene(root, n=3, size=(16, 16), channels=4, splits=("train", "val", "test"), angle=0.7):
    rng = np.random.default_rng(0)
    for split in splits:
        (root / split).mkdir(parents=True, exist_ok=True)
        frames = []
        for i in range(n):
            img = rng.integers(0, 256, (*size, channels), dtype=np.uint8)
            iio.imwrite(root / split / f"r_{i}.png", img)
            m = np.eye(4)
            m[:3, 3] = [0, 0, 4 + i]
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": m.tolist()})
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": angle, "frames": frames}))
    return root


def test_reads_images_poses_and_intrinsics(tmp_path):
    root = write_scene(tmp_path, n=2, size=(8, 12))
    frames = load_nerf_synthetic(root, "train")
    assert frames.images.shape == (2, 8, 12, 4)
    raw = iio.imread(root / "train" / "r_1.png").astype(np.float32) / 255
    assert np.allclose(frames.images[1, ..., 3].numpy(), raw[..., 3])  # alpha untouched
    lin = frames.images[1, ..., :3].numpy()
    expect = np.where(raw[..., :3] <= 0.04045, raw[..., :3] / 12.92, ((raw[..., :3] + 0.055) / 1.055) ** 2.4)
    assert np.allclose(lin, expect, atol=1e-6)  # sRGB -> linear
    assert torch.allclose(frames.c2w[1, :3, 3], torch.tensor([0.0, 0.0, 5.0]))
    fx = 0.5 * 12 / math.tan(0.35)
    assert torch.allclose(frames.intrinsics[0], torch.tensor([fx, fx, 6.0, 4.0]))


def test_projection_maps_pixels_to_ndc_with_row_zero_on_top():
    w, h, fx, fy, cx, cy = 40, 20, 30.0, 25.0, 21.0, 9.0
    proj = projection_from_intrinsics(fx, fy, cx, cy, w, h)
    # a camera-space point (NeRF: looking down -z, y up) that projects to pixel (u, v), v from the top
    x, y, z = 0.3, 0.2, -2.0
    u, v = cx + fx * x / -z, cy - fy * y / -z
    clip = proj @ torch.tensor([x, y, z, 1.0])
    ndc = clip[:2] / clip[3]
    assert torch.allclose(ndc, torch.tensor([2 * u / w - 1, 2 * v / h - 1]), atol=1e-6)
    assert clip[3] > 0 and -1 < clip[2] / clip[3] < 1


def test_resize_scales_intrinsics_and_keeps_straight_colour():
    img = torch.zeros(1, 8, 8, 4)
    img[..., :3] = 0.5
    img[:, :4, :, 3] = 1.0  # top half covered
    f = Frames(img, torch.eye(4)[None], torch.tensor([[8.0, 8.0, 4.0, 4.0]]))
    r = f.resized((4, 4))
    assert r.resolution == (4, 4)
    assert torch.allclose(r.intrinsics, torch.tensor([[4.0, 4.0, 2.0, 2.0]]))
    assert torch.allclose(r.images[0, :2, :, :3], torch.full((2, 4, 3), 0.5))  # colour not darkened at edges
    assert torch.allclose(r.images[0, :2, :, 3], torch.ones(2, 4)) and r.images[0, 2:, :, 3].abs().max() == 0


def test_missing_transforms_json_names_file(tmp_path):
    root = write_scene(tmp_path, splits=("train",))
    with pytest.raises(DataError, match=r"transforms_test\.json not found.*transforms_train\.json"):
        load_nerf_synthetic(root, "test")


def test_bad_json_names_file_and_position(tmp_path):
    root = write_scene(tmp_path)
    (root / "transforms_val.json").write_text('{"camera_angle_x": 0.7, "frames": [')
    with pytest.raises(DataError, match=r"transforms_val\.json is not valid JSON \(line 1"):
        load_nerf_synthetic(root, "val")


def test_missing_image_names_frame_and_path(tmp_path):
    root = write_scene(tmp_path)
    (root / "train" / "r_1.png").unlink()
    with pytest.raises(DataError, match=r"frame 1 of .*transforms_train\.json points at './train/r_1'"):
        load_nerf_synthetic(root, "train")


def test_unreadable_image_names_file(tmp_path):
    root = write_scene(tmp_path)
    (root / "train" / "r_2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"cannot read image .*r_2\.png"):
        load_nerf_synthetic(root, "train")


def test_images_of_different_sizes_are_refused(tmp_path):
    root = write_scene(tmp_path)
    iio.imwrite(root / "test" / "r_2.png", np.zeros((10, 16, 4), np.uint8))
    with pytest.raises(DataError, match=r"differ in size: .*r_0\.png is 16x16 but .*r_2\.png is 16x10"):
        load_nerf_synthetic(root, "test")


def test_rgb_without_background_colour_is_refused_and_works_with_one(tmp_path):
    root = write_scene(tmp_path, channels=3)
    with pytest.raises(DataError, match=r"no alpha channel.*data\.background_color"):
        load_nerf_synthetic(root, "train")
    img = np.full((16, 16, 3), 255, np.uint8)
    img[4:8, 4:8] = [200, 10, 10]
    iio.imwrite(root / "train" / "r_0.png", img)
    frames = load_nerf_synthetic(root, "train", background_color=(1.0, 1.0, 1.0))
    assert frames.images[0, ..., 3].sum() == 16 and frames.images[0, 5, 5, 3] == 1


def test_bad_pose_is_refused(tmp_path):
    root = write_scene(tmp_path)
    meta = json.loads((root / "transforms_train.json").read_text())
    meta["frames"][0]["transform_matrix"][0][0] = float("nan")
    (root / "transforms_train.json").write_text(json.dumps(meta).replace("NaN", "NaN"))
    with pytest.raises(DataError, match="NaN or Inf"):
        load_nerf_synthetic(root, "train")
    del meta["frames"][0]["transform_matrix"]
    (root / "transforms_train.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="no 4x4 'transform_matrix'"):
        load_nerf_synthetic(root, "train")


def test_datamodule_batches(tmp_path):
    root = write_scene(tmp_path, n=5)
    dm = NeRFDataModule(path=str(root), resolution=8, batch_size=2)
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["img"].shape == (2, 8, 8, 4) and batch["mvp"].shape == (2, 4, 4) and batch["cam_pos"].shape == (2, 3)
    with pytest.raises(DataError, match="data.path=.*is not a directory"):
        NeRFDataModule(path=str(tmp_path / "nope")).load_split("train")


def test_resident_batches_match_host_batches(tmp_path):
    root = write_scene(tmp_path, n=4)
    dm = NeRFDataModule(path=str(root), resolution=8, batch_size=2, resident=True)
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    host = NeRFDataModule(path=str(root), resolution=8, batch_size=2, resident=False)
    ref = next(iter(host.val_dataloader()))
    for k in ("img", "mvp", "cam_pos"):
        assert torch.equal(batch[k], ref[k])


def test_images_convert_to_linear_exactly_in_threads(tmp_path, monkeypatch):
    """8-bit RGBA converts by a 256-entry table, equal to srgb_to_linear of the [0,1] values (to the last bit that
    torch's vectorised and scalar pow can differ in: the 800x800 frames of a split came out identical); other
    images (16-bit grey here, coverage from the backdrop) take the general path; read_all keeps file order."""
    import imageio.v3 as iio
    import numpy as np

    from recon import parallel
    from recon.color import srgb_to_linear
    from recon.data.images import read_all, read_image, read_linear_rgba

    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        img = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
        img[0, 0, :3] = [0, 10, 255]  # both branches of the sRGB curve and its ends
        paths.append(tmp_path / f"r_{i}.png")
        iio.imwrite(paths[-1], img)
    monkeypatch.setattr(parallel, "MAX_THREADS", 3)
    got = read_all(paths, lambda p: read_linear_rgba(p, None, 0.02), "the test split")
    for i, p in enumerate(paths):
        rgb, alpha = read_image(p)
        expected = np.concatenate([srgb_to_linear(torch.from_numpy(rgb)).numpy(), alpha[..., None]], -1)
        np.testing.assert_allclose(got[i], expected, rtol=5e-7, atol=0, err_msg=str(i))  # a few float32 ulp
    deep = tmp_path / "deep.png"  # 16-bit grey: the general path, coverage from the backdrop colour
    grey = (rng.random((5, 6)) * 65535).astype(np.uint16)
    grey[0] = 65535
    iio.imwrite(deep, grey)
    rgb, _ = read_image(deep)
    got = read_linear_rgba(deep, (1.0, 1.0, 1.0), 0.02)
    np.testing.assert_allclose(got[..., :3], srgb_to_linear(torch.from_numpy(rgb)).numpy(), rtol=5e-7, atol=0)
    assert (got[0, :, 3] == 0).all() and got[1:, :, 3].mean() > 0.5  # the white row is backdrop
