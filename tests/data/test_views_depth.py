"""Multi-view renders with depth: the built-in object rendered on a known orbit reads back exactly; depth loss."""
import json
import math

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from recon.color import linear_to_srgb
from recon.data.datamodule import NeRFDataModule
from recon.data.depth import depth_loss
from recon.data.frames import DataError, Frames
from recon.data.sources import detect_format
from recon.data.synthetic_scene import CAMERA_ANGLE_X, render_views, scene_mesh, scene_sdf
from recon.data.views_depth import PRESETS, load_views, orbit_c2w
from recon.render import make_rasterizer
from recon.render.camera import look_at, perspective, transform_pos

RES = 32
FOV = math.degrees(CAMERA_ANGLE_X)  # the built-in renderer's field of view
ANGLES = [(0.0, 0.0), (40.0, 20.0), (95.0, -15.0), (150.0, 35.0), (200.0, 5.0), (260.0, -30.0), (315.0, 60.0)]


@pytest.fixture(scope="module")
def mesh():
    v, f = scene_mesh(resolution=64)
    return torch.from_numpy(v), torch.from_numpy(f)


def true_c2w(az: float, el: float, radius: float, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """The camera the docs describe, built with look_at (independently of the reader's closed form)."""
    a, e = math.radians(az), math.radians(el)
    eye = np.asarray(center) + radius * np.array([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)])
    return look_at(torch.tensor(eye), torch.tensor(center, dtype=torch.float64)).numpy()


@torch.no_grad()
def render_depth(verts, faces, c2w: torch.Tensor, res: int) -> torch.Tensor:
    """Camera-space depth along -z [N,H,W] of the mesh (0 off the object), via the rasterizer."""
    r = make_rasterizer("torch", "cpu")
    w2c = torch.linalg.inv(c2w)
    pos_clip = transform_pos(perspective(CAMERA_ANGLE_X) @ w2c, verts)
    rast, _ = r.rasterize(pos_clip, faces, (res, res))
    z_cam = (torch.cat([verts, torch.ones_like(verts[:, :1])], -1) @ w2c.transpose(-1, -2))[..., 2:3]  # [N,Nv,1]
    depth, _ = r.interpolate(-z_cam.contiguous(), rast, faces)
    return torch.where(rast[..., 3] > 0, depth[..., 0], torch.zeros_like(depth[..., 0]))


def write_views(mesh, root, angles=ANGLES, radius=2.7, depth="npy", cameras=None, center=(0.0, 0.0, 0.0)):
    """views/000.png ... (RGBA) + depth/ + cameras.json with explicit angles; returns the true c2w and depth."""
    (root / "views").mkdir(parents=True)
    c2w = torch.tensor(np.stack([true_c2w(a, e, radius, center) for a, e in angles])).float()
    images = render_views(*mesh, c2w, RES, make_rasterizer("torch", "cpu"), supersample=1)
    depths = render_depth(*mesh, c2w, RES)
    if depth:
        (root / "depth").mkdir()
    for i, img in enumerate(images):
        srgb = torch.cat([linear_to_srgb(img[..., :3]), img[..., 3:]], -1)
        iio.imwrite(root / "views" / f"{i:03d}.png", (srgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy())
        if depth == "npy":
            np.save(root / "depth" / f"{i:03d}.npy", depths[i].numpy())
        elif depth == "png":
            iio.imwrite(root / "depth" / f"{i:03d}.png", np.round(depths[i].numpy() * 1000).astype(np.uint16))
    meta = cameras if cameras is not None else {
        "fov": FOV, "radius": radius, "center": list(center),
        "views": [{"file": f"{i:03d}.png", "azimuth": a, "elevation": e} for i, (a, e) in enumerate(angles)]}
    (root / "cameras.json").write_text(json.dumps(meta))
    return c2w, depths


def test_orbit_pose_matches_look_at_and_is_defined_at_the_poles():
    for az, el in ANGLES + [(123.0, -80.0)]:
        assert np.allclose(orbit_c2w(az, el, 2.5, (0.1, 0.2, 0.3)), true_c2w(az, el, 2.5, (0.1, 0.2, 0.3)), atol=1e-12)
    top = orbit_c2w(30.0, 90.0, 2.0)
    assert np.allclose(top[:3, 3], [0, 2, 0]) and np.allclose(top[:3, 2], [0, 1, 0])  # above, looking down
    assert np.allclose(top[:3, :3].T @ top[:3, :3], np.eye(3)) and np.isclose(np.linalg.det(top[:3, :3]), 1)
    assert np.allclose(orbit_c2w(90.0, 0.0, 1.0)[:3, 3], [1, 0, 0])  # azimuth 90 is on +x


@pytest.mark.parametrize("depth_format", ["npy", "png"])
def test_reads_back_poses_images_and_depth(mesh, tmp_path, depth_format):
    c2w, depths = write_views(mesh, tmp_path, depth=depth_format, center=(0.05, -0.1, 0.0))
    assert detect_format(tmp_path) == "views"
    f = load_views(tmp_path, "train")
    assert len(f) == len(ANGLES) and load_views(tmp_path, "test").paths == f.paths  # < 16 views: none held out
    assert torch.allclose(f.c2w, c2w, atol=1e-5)
    fx = 0.5 * RES / math.tan(0.5 * CAMERA_ANGLE_X)
    assert torch.allclose(f.intrinsics, torch.tensor([fx, fx, RES / 2, RES / 2]).expand(len(f), 4), atol=1e-4)
    alpha = torch.from_numpy(np.stack([iio.imread(tmp_path / "views" / f"{i:03d}.png")[..., 3] for i in range(len(f))]))
    assert torch.equal(f.images[..., 3], alpha.float() / 255)
    if depth_format == "npy":
        assert torch.equal(f.depth, depths)
    else:  # millimetres: rounding to 0.5 mm
        assert (f.depth - depths).abs().max() <= 0.0005 + 1e-6 and torch.equal(f.depth > 0, depths > 0)


def test_depth_unprojects_onto_the_surface(mesh, tmp_path):
    """Depth, intrinsics and pose agree: each pixel's depth lifted through the camera lies on the object."""
    write_views(mesh, tmp_path)
    f = load_views(tmp_path, "train")
    h, w = f.resolution
    v, u = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    fx, fy, cx, cy = f.intrinsics[0]
    inner = (f.depth > 0) & (f.images[..., 3] > 0.99)
    d = f.depth
    cam = torch.stack([(u - cx) / fx * d, -(v - cy) / fy * d, -d, torch.ones_like(d)], -1)  # y up, looking down -z
    world = torch.einsum("nij,nhwj->nhwi", f.c2w, cam)[..., :3][inner]
    sdf = scene_sdf(world.double())
    assert inner.sum() > 500 and sdf.abs().quantile(0.95) < 0.02 and sdf.abs().max() < 0.06  # mesh res 64 facets


def test_presets(mesh, tmp_path):
    angles = PRESETS["zero123pp"]["views"]
    c2w, _ = write_views(mesh, tmp_path, angles=angles, radius=3.0, depth=None,
                         cameras={"preset": "zero123pp", "radius": 3.0})
    f = load_views(tmp_path, "val")
    assert torch.allclose(f.c2w, c2w, atol=1e-5) and f.depth is None
    assert np.allclose([a for a, _ in angles], [30, 90, 150, 210, 270, 330]) and {e for _, e in angles} == {20, -10}
    fx = 0.5 * RES / math.tan(math.radians(15.0))  # the preset's 30 degree field of view
    assert torch.allclose(f.intrinsics[:, 0], torch.full((6,), fx))
    (tmp_path / "cameras.json").write_text(json.dumps({"preset": "orbit", "n": 6, "elevation": 20, "start": 30}))
    orbit = load_views(tmp_path, "train")
    assert torch.allclose(orbit.c2w[1], torch.tensor(orbit_c2w(90.0, 20.0, 2.0)).float(), atol=1e-6)


def test_every_eighth_view_held_out_with_sixteen_views(mesh, tmp_path):
    angles = [(22.5 * k, 10.0) for k in range(16)]
    write_views(mesh, tmp_path, angles=angles, depth=None)
    assert [p[-7:] for p in load_views(tmp_path, "test").paths] == ["000.png", "008.png"]
    assert len(load_views(tmp_path, "train")) == 14


def test_resize_keeps_depth_values_unblended():
    depth = torch.zeros(1, 4, 4)
    depth[0, :, :2] = 2.0  # a near surface on the left, unknown (0) on the right
    depth[0, 1, 1] = 5.0
    f = Frames(torch.rand(1, 4, 4, 4), torch.eye(4)[None], torch.tensor([[4.0, 4.0, 2.0, 2.0]]), depth=depth)
    small, big = f.resized((2, 2)).depth, f.resized((8, 8)).depth
    assert small.shape == (1, 2, 2) and big.shape == (1, 8, 8)
    assert set(small.unique().tolist()) <= {0.0, 2.0, 5.0} and set(big.unique().tolist()) == {0.0, 2.0, 5.0}
    assert torch.equal(big[0, ::2, ::2], depth[0])
    moved = f.transformed(2.0, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(moved.depth, 2 * depth) and torch.equal(moved.c2w[0, :3, 3], torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("resident", [True, False])
def test_datamodule_serves_depth(mesh, tmp_path, resident):
    c2w, depths = write_views(mesh, tmp_path)
    dm = NeRFDataModule(path=str(tmp_path), resolution=16, batch_size=3, resident=resident, normalize="none")
    dm.setup("fit")
    loader = dm.val_dataloader()
    batch = next(iter(loader))
    batch = dm.on_after_batch_transfer(batch, 0)
    assert batch["depth"].shape == (1, 16, 16, 1) and batch["img"].shape == (1, 16, 16, 4)
    assert torch.equal(batch["depth"][0, ..., 0], depths[0, 1::2, 1::2])  # nearest: the pixel at each new centre
    train = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert train["depth"].shape == (3, 16, 16, 1)


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad, message", [
    (lambda d: d.__setitem__((3, 4), np.nan), r"depth map .*002\.npy holds 1 NaN or Inf"),
    (lambda d: d.__setitem__((3, 4), np.inf), r"depth map .*002\.npy holds 1 NaN or Inf"),
    (lambda d: d.__setitem__((3, 4), -0.5), r"depth map .*002\.npy holds negative depths"),
])
def test_bad_depth_values(mesh, tmp_path, bad, message):
    write_views(mesh, tmp_path)
    d = np.load(tmp_path / "depth/002.npy")
    bad(d)
    np.save(tmp_path / "depth/002.npy", d)
    with pytest.raises(DataError, match=message):
        load_views(tmp_path, "train")


def test_depth_size_and_type_mismatch(mesh, tmp_path):
    write_views(mesh, tmp_path)
    np.save(tmp_path / "depth/001.npy", np.ones((16, 16), np.float32))
    with pytest.raises(DataError, match=r"depth map .*001\.npy is 16x16 but its view .*001\.png is 32x32"):
        load_views(tmp_path, "train")
    (tmp_path / "depth/001.npy").unlink()
    iio.imwrite(tmp_path / "depth/001.png", np.ones((RES, RES), np.uint8))
    with pytest.raises(DataError, match=r"depth map .*001\.png is a uint8 PNG"):
        load_views(tmp_path, "train")
    (tmp_path / "depth/001.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read depth map .*001\.png"):
        load_views(tmp_path, "train")


def test_views_without_depth_file_get_unknown_depth(mesh, tmp_path):
    write_views(mesh, tmp_path)
    (tmp_path / "depth/003.npy").unlink()
    f = load_views(tmp_path, "train")
    assert f.depth[3].abs().max() == 0 and f.depth[2].max() > 0


def test_camera_file_errors(mesh, tmp_path):
    with pytest.raises(DataError, match=r"cameras\.json not found"):
        load_views(tmp_path, "train")
    write_views(mesh, tmp_path, depth=None)
    meta = json.loads((tmp_path / "cameras.json").read_text())
    del meta["views"][2]["azimuth"]
    (tmp_path / "cameras.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"view 2 \('002\.png'\) of .*cameras\.json has no 'azimuth'"):
        load_views(tmp_path, "train")
    meta["views"][2].update(azimuth="north")
    (tmp_path / "cameras.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"view 2 .*'azimuth' is 'north', not a number"):
        load_views(tmp_path, "train")
    meta["views"][2].update(azimuth=10, file="nope.png")
    (tmp_path / "cameras.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"view 2 of .*cameras\.json names 'nope\.png', but .*nope\.png does not exist"):
        load_views(tmp_path, "train")
    (tmp_path / "cameras.json").write_text(json.dumps({"preset": "zero123pp"}))
    with pytest.raises(DataError, match=r"preset 'zero123pp' has 6 views but .*views holds 7 images"):
        load_views(tmp_path, "train")
    (tmp_path / "cameras.json").write_text(json.dumps({"preset": "zero123"}))
    with pytest.raises(DataError, match=r"preset 'zero123' is not one of orbit, zero123pp"):
        load_views(tmp_path, "train")


# ----------------------------------------------------------------------------------------- depth loss
def test_depth_loss_is_l1_over_pixels_valid_in_both():
    pred = torch.tensor([1.0, 2.0, 3.0, float("nan"), 5.0]).reshape(1, 1, 5, 1).requires_grad_()
    ref = torch.tensor([1.5, 0.0, 2.0, 4.0, 7.0]).reshape(1, 1, 5, 1)  # pixel 1: unknown depth
    pred_mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0]).reshape(1, 1, 5, 1)  # pixel 3: not rendered (NaN depth)
    ref_mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]).reshape(1, 1, 5, 1)  # pixel 4: background in the photo
    loss = depth_loss(pred, ref, pred_mask, ref_mask)
    assert torch.isclose(loss, torch.tensor((0.5 + 1.0) / 2))
    loss.backward()
    assert torch.allclose(pred.grad.flatten(), torch.tensor([-0.5, 0.0, 0.5, 0.0, 0.0]))  # finite, masked
    empty = depth_loss(pred, ref, torch.zeros_like(pred_mask), ref_mask)
    assert empty.item() == 0 and empty.requires_grad
