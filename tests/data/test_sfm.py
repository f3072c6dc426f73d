"""Unposed photos: SfM recovers the built-in scene's cameras up to a similarity, is cached, and refuses failures."""
import math
import time

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from recon.color import linear_to_srgb
from recon.data.datamodule import NeRFDataModule
from recon.data.frames import DataError
from recon.data.sources import detect_format
from recon.data.synthetic_scene import CAMERA_ANGLE_X, CAMERA_RADIUS, render_views, scene_albedo, scene_mesh
from recon.render import make_rasterizer
from recon.render.camera import look_at

pycolmap = pytest.importorskip("pycolmap")

RES = 320
N_VIEWS = 36


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (s, R, t) minimising sum |s R src_i + t - dst_i|^2 (Umeyama 1991). src, dst: [N,3]."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(xd.T @ xs / len(src))
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
    rot = u @ d @ vt
    s = float((sig * np.diag(d)).sum() / (xs**2).sum(1).mean())
    return s, rot, mu_d - s * rot @ mu_s


def test_umeyama_recovers_a_similarity():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(20, 3))
    rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    rot *= np.sign(np.linalg.det(rot))
    s, r, t = umeyama(src, 2.5 * src @ rot.T + [1.0, -2.0, 0.5])
    assert math.isclose(s, 2.5, rel_tol=1e-9) and np.allclose(r, rot) and np.allclose(t, [1.0, -2.0, 0.5])


def _hash01(c: torch.Tensor) -> torch.Tensor:
    h = (c[..., 0] * 73856093) ^ (c[..., 1] * 19349663) ^ (c[..., 2] * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF).double() / 65535.0


def speckled_albedo(p: torch.Tensor, cell: float = 0.03) -> torch.Tensor:
    """The built-in albedo modulated by smooth 3D value noise (cells of 0.03 units): surface detail for SIFT.

    The built-in texture alone (flat checkers and stripes) gives ~150 features per 320 px view, mostly alike
    checker corners, and COLMAP registers two views; real objects have finer texture, which this stands in for.
    """
    q = p.double() / cell
    i0 = torch.floor(q)
    t = q - i0
    t = t * t * (3 - 2 * t)
    i0 = i0.long()
    noise = torch.zeros(len(p), dtype=torch.float64)
    for corner in range(8):
        d = torch.tensor([(corner >> k) & 1 for k in range(3)])
        w = torch.where(d.bool(), t, 1 - t).prod(-1)
        noise = noise + w * _hash01(i0 + d)
    return (scene_albedo(p) * (0.25 + noise[:, None].to(p.dtype))).clamp(0, 1)


def orbit_cameras(n: int) -> np.ndarray:
    """n cameras [n,4,4] on a ring 10 degrees apart in azimuth, elevation alternating 10 and 30 degrees."""
    out = []
    for k in range(n):
        az, el = 2 * math.pi * k / n, math.radians(10.0 if k % 2 == 0 else 30.0)
        eye = CAMERA_RADIUS * torch.tensor([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)],
                                           dtype=torch.float64)
        out.append(look_at(eye, torch.zeros(3, dtype=torch.float64)).numpy())
    return np.stack(out)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """36 RGBA photos of the built-in object (speckled texture), 320 px, in a bare folder; the true cameras."""
    root = tmp_path_factory.mktemp("photos")
    verts, faces = scene_mesh(resolution=96)
    c2w = orbit_cameras(N_VIEWS)
    images = render_views(torch.from_numpy(verts), torch.from_numpy(faces), torch.from_numpy(c2w).float(), RES,
                          make_rasterizer("torch", "cpu"), supersample=1, albedo=speckled_albedo)
    for i, img in enumerate(images):
        srgb = torch.cat([linear_to_srgb(img[..., :3]), img[..., 3:]], -1)
        iio.imwrite(root / f"view_{i:03d}.png", (srgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy())
    return root, c2w


@pytest.fixture(scope="module")
def sfm_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sfm_cache")


@pytest.mark.slow
def test_sfm_recovers_cameras_up_to_similarity_and_is_cached(photos, sfm_cache, monkeypatch):
    root, truth = photos
    assert detect_format(root) == "images"
    sfm = {"cache_dir": str(sfm_cache)}
    t0, cpu0 = time.perf_counter(), time.process_time()
    dm = NeRFDataModule(path=str(root), resolution=None, sfm=sfm)
    frames = {split: dm.load_split(split) for split in ("train", "test")}
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    index = [int(p.rsplit("_", 1)[1][:3]) for split in ("train", "test") for p in frames[split].paths]
    assert sorted(index) == list(range(N_VIEWS))  # every view registered
    assert len(frames["test"]) == math.ceil(N_VIEWS / 8)  # every 8th held out

    est = torch.cat([frames[s].c2w for s in ("train", "test")]).double().numpy()
    tru = truth[index]
    s, rot, t = umeyama(est[:, :3, 3], tru[:, :3, 3])
    centre_err = np.linalg.norm(s * est[:, :3, 3] @ rot.T + t - tru[:, :3, 3], axis=1)
    rel = np.einsum("nji,jk,nkl->nil", tru[:, :3, :3], rot, est[:, :3, :3])  # R_true^T R R_est: identity if right
    rot_err = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    size = np.linalg.norm(tru[:, :3, 3].max(0) - tru[:, :3, 3].min(0))  # the cameras' bounding-box diagonal
    focal = 0.5 * RES / math.tan(0.5 * CAMERA_ANGLE_X)
    fx = frames["train"].intrinsics[0, 0].item()
    print(f"SfM: {len(index)}/{N_VIEWS} registered, rotation error max {rot_err.max():.3f} mean {rot_err.mean():.3f} deg, "
          f"centre error max {centre_err.max():.4f} = {100 * centre_err.max() / size:.2f} % of {size:.2f}, "
          f"focal {fx:.1f} (true {focal:.1f}), {seconds:.1f} s wall, {cpu:.1f} s CPU")
    assert rot_err.max() < 2.0
    assert centre_err.max() < 0.02 * size
    assert abs(fx - focal) < 0.1 * focal

    # a second run reads the cached model instead of repeating SfM
    import recon.data.sfm as sfm_module

    monkeypatch.setattr(sfm_module, "run_sfm", lambda *a, **k: pytest.fail("SfM ran again instead of using the cache"))
    again = NeRFDataModule(path=str(root), resolution=None, sfm=sfm).load_split("test")
    assert torch.equal(again.c2w, frames["test"].c2w)


@pytest.mark.slow
def test_features_come_only_from_the_object(photos, sfm_cache):
    """With alpha masks, every 2D point SfM used lies on the object (alpha > 0.5), none on the backdrop."""
    root, _ = photos
    from recon.data.sfm import ensure_sfm

    model_dir, summary = ensure_sfm(root, cache_dir=sfm_cache)
    print(f"SfM summary: {summary}")
    assert summary["registered"] >= 0.8 * N_VIEWS and 0 < summary["mean_reprojection_error_px"] < 1.0
    rec = pycolmap.Reconstruction(str(model_dir))
    checked = 0
    for i in rec.reg_image_ids():
        image = rec.images[i]
        alpha = iio.imread(root / image.name)[..., 3]
        xy = np.array([p.xy for p in image.points2D])
        px = np.clip(np.floor(xy).astype(int), 0, RES - 1)
        assert (alpha[px[:, 1], px[:, 0]] > 127).all(), image.name
        checked += len(xy)
    assert checked > 1000


@pytest.mark.slow
def test_sequential_matching_registers_photos_taken_in_order(photos, tmp_path):
    root, _ = photos
    from recon.data.sfm import ensure_sfm

    _, summary = ensure_sfm(root, matcher="sequential", cache_dir=tmp_path)
    print(f"SfM (sequential): {summary}")
    assert summary["registered"] >= 0.8 * N_VIEWS and summary["mean_reprojection_error_px"] < 1.0


def test_too_few_registered_images_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):  # unrelated noise images: nothing matches, nothing registers
        iio.imwrite(tmp_path / f"{i}.png", rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    dm = NeRFDataModule(path=str(tmp_path), format="images", resolution=None,
                        background_color=[0.0, 0.0, 0.0], sfm={"cache_dir": str(tmp_path / "cache")})
    with pytest.raises(DataError, match=r"registered 0 of the 4 images in .*fewer than data\.sfm\.min_registered=0\.8"):
        dm.load_split("train")


def test_too_few_photos_and_bad_settings(tmp_path):
    iio.imwrite(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"holds 1 image file\(s\).*at least 3"):
        NeRFDataModule(path=str(tmp_path), format="images", sfm={"cache_dir": str(tmp_path)}).load_split("train")
    with pytest.raises(DataError, match=r"data\.sfm\.matcher='vocab' is not one of exhaustive, sequential"):
        NeRFDataModule(path=str(tmp_path), format="images", sfm={"matcher": "vocab"}).load_split("train")
    with pytest.raises(DataError, match=r"data\.sfm\.min_registered=80 must be a fraction"):
        NeRFDataModule(path=str(tmp_path), format="images", sfm={"min_registered": 80}).load_split("train")
