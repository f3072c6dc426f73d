"""COLMAP sparse-model reader: the built-in scene written as a COLMAP model, read back exactly; clear errors."""
import math
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from test_llff import all_frames

from recon.data.colmap import colmap_to_nerf, load_colmap, nerf_to_colmap, rotation_to_quaternion
from recon.data.frames import DataError
from recon.data.nerf_synthetic import load_nerf_synthetic
from recon.data.synthetic_scene import CAMERA_ANGLE_X

pycolmap = pytest.importorskip("pycolmap")

RES = 32
FOCAL = 0.5 * RES / math.tan(0.5 * CAMERA_ANGLE_X)


def write_colmap_text(model_dir, c2ws, names, camera="PINHOLE", params=None, size=(RES, RES)):
    """cameras.txt (one shared camera) + images.txt (world-to-camera quaternion and translation) + points3D.txt."""
    model_dir.mkdir(parents=True, exist_ok=True)
    params = params if params is not None else [FOCAL, FOCAL, RES / 2, RES / 2]
    (model_dir / "cameras.txt").write_text(f"1 {camera} {size[0]} {size[1]} {' '.join(repr(float(p)) for p in params)}\n")
    lines = []
    for i, (c2w, name) in enumerate(zip(c2ws, names)):
        w2c = nerf_to_colmap(c2w)
        q, t = rotation_to_quaternion(w2c[:, :3]), w2c[:, 3]
        lines += [f"{i + 1} {' '.join(repr(float(x)) for x in [*q, *t])} 1 {name}", ""]  # second line: no 2D points
    (model_dir / "images.txt").write_text("\n".join(lines) + "\n")
    (model_dir / "points3D.txt").write_text("")


def write_colmap(scene, root, binary=False, rgb_with_masks=False, mask_naming="{name}.png", **camera):
    """The built-in scene's 9 views as images/000.png ... + sparse/0 (text, or binary via pycolmap)."""
    (root / "images").mkdir(parents=True)
    frames = all_frames(scene)
    names = []
    for i, (src, _) in enumerate(frames):
        name = f"{i:03d}.png"
        if rgb_with_masks:
            rgba = iio.imread(src)
            (root / "masks").mkdir(exist_ok=True)
            iio.imwrite(root / "images" / name, rgba[..., :3])
            iio.imwrite(root / "masks" / mask_naming.format(name=name, stem=f"{i:03d}"), rgba[..., 3])
        else:
            shutil.copy(src, root / "images" / name)
        names.append(name)
    model = root / "sparse" / "0"
    write_colmap_text(model, [c for _, c in frames], names, **camera)
    if binary:
        rec = pycolmap.Reconstruction(str(model))
        for f in model.iterdir():
            f.unlink()
        rec.write_binary(str(model))
    return root


def test_convention_round_trip():
    c2w = np.eye(4)
    c2w[:3, :3] = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    c2w[:3, :3] *= np.sign(np.linalg.det(c2w[:3, :3]))
    c2w[:3, 3] = [1, 2, 3]
    w2c = nerf_to_colmap(c2w)
    assert np.allclose(colmap_to_nerf(w2c), c2w)
    # COLMAP's camera looks down +z: the NeRF camera's -z axis in world space is row 2 of the COLMAP rotation
    assert np.allclose(w2c[2, :3], -c2w[:3, 2]) and np.allclose(w2c[1, :3], -c2w[:3, 1])
    assert np.allclose(w2c[:, :3] @ c2w[:3, 3] + w2c[:, 3], 0)  # the camera centre maps to the origin


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("split, index", [("train", [1, 2, 3, 4, 5, 6, 7]), ("test", [0, 8]), ("val", [0, 8])])
def test_reads_back_the_scene_exactly(scene, tmp_path, binary, split, index):
    root = write_colmap(scene, tmp_path, binary=binary)
    assert (root / "sparse/0" / ("cameras.bin" if binary else "cameras.txt")).is_file()
    f = load_colmap(root, split)
    truth = all_frames(scene)
    assert [p.rsplit("/", 1)[-1] for p in f.paths] == [f"{i:03d}.png" for i in index]
    assert torch.allclose(f.c2w, torch.tensor(np.stack([truth[i][1] for i in index])).float(), atol=1e-5)
    assert torch.allclose(f.intrinsics, torch.tensor([FOCAL, FOCAL, 16.0, 16.0]).expand(len(index), 4), atol=1e-5)
    ref = torch.cat([load_nerf_synthetic(scene, s).images for s in ("train", "val", "test")])
    assert torch.equal(f.images, ref[index])


def test_simple_pinhole_and_missing_points_file(scene, tmp_path):
    root = write_colmap(scene, tmp_path, camera="SIMPLE_PINHOLE", params=[FOCAL, 15.0, 17.0])
    (root / "sparse/0/points3D.txt").unlink()  # the reader needs no 3D points
    f = load_colmap(root, "test")
    assert torch.allclose(f.intrinsics[0], torch.tensor([FOCAL, FOCAL, 15.0, 17.0]), atol=1e-5)


@pytest.mark.parametrize("naming", ["{name}.png", "{stem}.png"])
def test_rgb_images_take_masks_folder(scene, tmp_path, naming):
    root = write_colmap(scene, tmp_path, rgb_with_masks=True, mask_naming=naming)
    f = load_colmap(root, "test")
    alpha = iio.imread(all_frames(scene)[8][0])[..., 3]
    assert torch.equal(f.images[1, ..., 3], torch.from_numpy((alpha > 127).astype(np.float32)))


@pytest.mark.parametrize("model, params, dist", [
    ("OPENCV", [FOCAL, FOCAL, 16.0, 16.0, 0.2, 0.0, 0.01, 0.0], [0.2, 0.0, 0.01, 0.0]),
    ("SIMPLE_RADIAL", [FOCAL, 16.0, 16.0, -0.15], [-0.15, 0.0, 0.0, 0.0]),
    ("FULL_OPENCV", [FOCAL, FOCAL, 16.0, 16.0, 0.1, 0.0, 0.0, 0.0, 0.02, 0.0, 0.0, 0.0], [0.1, 0, 0, 0, 0.02, 0, 0, 0]),
])
def test_distortion_is_removed_with_opencv(scene, tmp_path, model, params, dist):
    cv2 = pytest.importorskip("cv2")
    root = write_colmap(scene, tmp_path, camera=model, params=params)
    got, plain = load_colmap(root, "train"), load_nerf_synthetic(scene, "train")
    raw = iio.imread(root / "images/001.png").astype(np.float32) / 255
    kmat = np.array([[FOCAL, 0, RES / 2 - 0.5], [0, FOCAL, RES / 2 - 0.5], [0, 0, 1]])
    expect = cv2.undistort(raw, kmat, np.array(dist, dtype=np.float64))
    assert np.allclose(got.images[0, ..., 3].numpy(), expect[..., 3], atol=1e-6)
    assert not torch.allclose(got.images[0], plain.images[0], atol=1e-3)
    assert torch.allclose(got.intrinsics[0], torch.tensor([FOCAL, FOCAL, 16.0, 16.0]), atol=1e-5)


def test_undistortion_moves_a_point_to_its_pinhole_projection():
    """A dot drawn where the distorted camera sees a 3D point lands where the pinhole camera projects it."""
    pytest.importorskip("cv2")
    from recon.data.colmap import undistort

    k, dist = [40.0, 40.0, 32.0, 32.0], [0.3, 0.0, 0.0, 0.0]
    u_d, v_d = 50.5, 20.5  # the centre of pixel (50, 20) (COLMAP and recon: the image's corner is at 0)
    xd, yd = (u_d - 32) / 40, (v_d - 32) / 40
    x, y = xd, yd
    for _ in range(50):  # invert x_d = x (1 + k1 r^2) by fixed-point iteration
        f = 1 + 0.3 * (x * x + y * y)
        x, y = xd / f, yd / f
    img = np.zeros((64, 64, 1), np.float32)
    img[20, 50] = 1.0
    out = undistort(img, k, dist)
    out = out[..., 0] if out.ndim == 3 else out
    vs, us = np.nonzero(out > 0.02)
    u, v = np.average(us + 0.5, weights=out[vs, us]), np.average(vs + 0.5, weights=out[vs, us])
    assert abs(u - (40 * x + 32)) < 0.2 and abs(v - (40 * y + 32)) < 0.2, (u, v, 40 * x + 32, 40 * y + 32)


# ----------------------------------------------------------------------------------------- errors
def test_missing_model(tmp_path):
    with pytest.raises(DataError, match=r"no COLMAP model under .*sparse/0/cameras\.bin\|txt"):
        load_colmap(tmp_path, "train")


def test_missing_cameras_file(scene, tmp_path):
    root = write_colmap(scene, tmp_path)
    (root / "sparse/0/cameras.txt").unlink()
    with pytest.raises(DataError, match=r"no COLMAP model under"):
        load_colmap(root, "train")
    with pytest.raises(DataError, match=r"sparse/0/cameras\.bin \(or cameras\.txt\) not found"):
        load_colmap(root, "train", model_dir="sparse/0")


def test_missing_images_file(scene, tmp_path):
    root = write_colmap(scene, tmp_path, binary=True)
    (root / "sparse/0/images.bin").unlink()
    with pytest.raises(DataError, match=r"sparse/0/images\.bin not found next to .*cameras\.bin"):
        load_colmap(root, "train")


def test_corrupt_model_file(scene, tmp_path):
    root = write_colmap(scene, tmp_path)
    (root / "sparse/0/cameras.txt").write_text("1 PINHOLE 32 32 forty\n")
    with pytest.raises(DataError, match=r"cannot read the COLMAP model .*cameras\.txt"):
        load_colmap(root, "train")
    root = write_colmap(scene, tmp_path / "bin", binary=True)
    (root / "sparse/0/cameras.bin").write_bytes(b"\x01\x00")  # truncated: pycolmap reads zeros
    with pytest.raises(DataError, match=r"camera 1 in .*cameras\.bin .*the focal length must be > 0"):
        load_colmap(root, "train")


def test_missing_images_folder(scene, tmp_path):
    root = write_colmap(scene, tmp_path)
    shutil.rmtree(root / "images")
    with pytest.raises(DataError, match=r"images not found: the images of the COLMAP model .*images\.txt"):
        load_colmap(root, "train")


def test_missing_image(scene, tmp_path):
    root = write_colmap(scene, tmp_path)
    (root / "images/003.png").unlink()
    with pytest.raises(DataError, match=r"image '003\.png' \(id 4\) of .*images\.txt has no image file: .*003\.png"):
        load_colmap(root, "train")


def test_unreadable_image(scene, tmp_path):
    root = write_colmap(scene, tmp_path)
    (root / "images/003.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*003\.png"):
        load_colmap(root, "train")


def test_camera_size_mismatch(scene, tmp_path):
    root = write_colmap(scene, tmp_path, size=(64, 64))
    message = r"camera 1 in .*cameras\.txt \(used by image '001\.png'.*\) is 64x64 but the image .*001\.png is 32x32"
    with pytest.raises(DataError, match=message):
        load_colmap(root, "train")


def test_unsupported_camera_model(scene, tmp_path):
    root = write_colmap(scene, tmp_path, camera="OPENCV_FISHEYE", params=[FOCAL, FOCAL, 16, 16, 0.1, 0, 0, 0])
    with pytest.raises(DataError, match=r"uses the camera model OPENCV_FISHEYE.*image_undistorter"):
        load_colmap(root, "train")


def test_mask_size_mismatch(scene, tmp_path):
    root = write_colmap(scene, tmp_path, rgb_with_masks=True)
    iio.imwrite(root / "masks" / "002.png.png", np.full((16, 16), 255, np.uint8))
    with pytest.raises(DataError, match=r"mask .*002\.png\.png is 16x16 but its image .*002\.png is 32x32"):
        load_colmap(root, "train")


def test_missing_and_empty_mask(scene, tmp_path):
    root = write_colmap(scene, tmp_path, rgb_with_masks=True)
    iio.imwrite(root / "masks" / "002.png.png", np.zeros((RES, RES), np.uint8))
    with pytest.raises(DataError, match=r"mask .*002\.png\.png is empty"):
        load_colmap(root, "train")
    (root / "masks" / "002.png.png").unlink()
    with pytest.raises(DataError, match=r"masks has no mask for image .*002\.png \(looked for 002\.png\.png"):
        load_colmap(root, "train")


def test_rgb_without_masks(scene, tmp_path):
    root = write_colmap(scene, tmp_path, rgb_with_masks=True)
    shutil.rmtree(root / "masks")
    with pytest.raises(DataError, match=r"image .*001\.png has no alpha channel and .*masks does not exist"):
        load_colmap(root, "train")


def test_too_few_registered_images(scene, tmp_path):
    frames = all_frames(scene)
    write_colmap_text(tmp_path / "sparse/0", [frames[0][1]], ["000.png"])
    (tmp_path / "images").mkdir()
    shutil.copy(frames[0][0], tmp_path / "images/000.png")
    with pytest.raises(DataError, match=r"images\.txt has 1 registered image\(s\); .*at least 2"):
        load_colmap(tmp_path, "test")
