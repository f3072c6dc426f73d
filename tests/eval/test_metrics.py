"""Metrics against cases with known answers."""
import math

import numpy as np
import trimesh

from recon.eval.metrics import geometry_metrics, psnr, silhouette_iou, ssim


def test_psnr_known_values():
    a = np.full((8, 8, 3), 0.5)
    assert psnr(a, a) == math.inf
    b = a + 0.1  # mse = 0.01 -> 20 dB
    assert abs(psnr(a, b) - 20.0) < 1e-9
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.05, (256, 256, 3))
    a = np.full((256, 256, 3), 0.5)
    expect = 10 * math.log10(1 / np.mean(noise**2))
    assert abs(psnr(a + noise, a) - expect) < 1e-9 and abs(expect - 26.02) < 0.1


def test_ssim_identical_and_degraded():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 1, (32, 32, 3))
    assert abs(ssim(img, img) - 1.0) < 1e-12
    assert ssim(np.clip(img + rng.normal(0, 0.2, img.shape), 0, 1), img) < 0.9


def test_iou():
    a = np.zeros((4, 4))
    a[:2] = 1
    b = np.zeros((4, 4))
    b[1:3] = 1
    assert silhouette_iou(a, b) == 4 / 12 and silhouette_iou(a, a) == 1.0 and silhouette_iou(a * 0, a * 0) == 1.0


def test_chamfer_identical_is_zero_and_shift_is_distance():
    box = trimesh.creation.box(extents=(1, 1, 1))
    m = geometry_metrics(box, box, n_samples=20_000)
    assert m["chamfer_l1"] == 0 and m["chamfer_l2"] == 0 and m["fscore@0.01"] == 1.0
    assert abs(m["normal_consistency"] - 1) < 1e-12
    plane = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], [[0, 1, 2], [0, 2, 3]])
    d = 0.02
    shifted = plane.copy()
    shifted.apply_translation([0, 0, d])
    m = geometry_metrics(shifted, plane, n_samples=20_000)
    diag = math.sqrt(2)
    assert abs(m["chamfer_l1"] - d / diag) < 1e-9 and abs(m["chamfer_l2"] - (d / diag) ** 2) < 1e-9
    assert m["fscore@0.005"] == 0.0 and m["fscore@0.01"] == 0.0  # 0.02/1.414 = 1.4 % of the diagonal
