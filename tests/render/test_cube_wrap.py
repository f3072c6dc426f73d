"""recon.render.cube: bilinear cube-map lookups that filter across face edges and corners as nvdiffrast's cube mode."""
from __future__ import annotations

import math

import torch

from recon.render.cube import cube_taps, cube_taps_wrapped, cube_to_dir, dir_to_cube, sample_cube


def _directions(n: int = 100_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)


def _tap_angles(res: int, dirs: torch.Tensor, taps) -> torch.Tensor:
    """Angle, in texel widths, between each weighted tap's texel centre and the looked-up direction."""
    face, uv = dir_to_cube(dirs)
    idx, w = taps(res, face, uv)
    centers = cube_to_dir(res).reshape(-1, 3)
    angle = torch.acos((centers[idx] * dirs[:, None]).sum(-1).clamp(-1, 1)) / (math.pi / 2 / res)
    return torch.where(w > 0, angle, torch.zeros_like(angle))


def test_wrapped_taps_are_the_texels_around_the_direction():
    """Every tap with weight lies within two texel widths of the direction, across edges and at corners too: a
    wrong face or mirror in the wrapping tables puts a tap across the face (6-10 texels off)."""
    dirs = _directions()
    for res in (4, 8, 16):
        face, uv = dir_to_cube(dirs)
        idx, w = cube_taps_wrapped(res, face, uv)
        assert idx.min() >= 0 and idx.max() < 6 * res * res
        assert w.min() >= 0 and torch.allclose(w.sum(-1), torch.ones(len(dirs)), atol=1e-6)
        assert _tap_angles(res, dirs, cube_taps_wrapped).max() < 2.0


def test_corner_footprints_share_the_missing_tap():
    """Right at a cube corner the footprint covers three texels, one of each face, in equal parts."""
    res = 8
    corner = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, -1.0]]), dim=-1)
    face, uv = dir_to_cube(corner)
    idx, w = cube_taps_wrapped(res, face, uv)
    for row_idx, row_w in zip(idx, w):
        texels = {int(i) for i, wi in zip(row_idx, row_w) if wi > 0}
        assert len(texels) == 3 and len({t // (res * res) for t in texels}) == 3  # one texel of each of three faces
        torch.testing.assert_close(row_w[row_w > 0], torch.full((3,), 1 / 3), atol=1e-6, rtol=0)


def test_lookup_is_continuous_across_edges():
    """A cube holding a linear function of its texel directions: the wrapped lookup follows the function at the
    seams about twice as closely as filtering clamped inside each face, and texel centres and constants are exact."""
    dirs = _directions(50_000, seed=1)
    a = torch.tensor([0.3, -0.5, 0.8])
    for res, bound in ((16, 0.016), (32, 0.008)):
        cube = (cube_to_dir(res) @ a)[..., None]
        wrapped = sample_cube(cube, dirs)[:, 0]
        face, uv = dir_to_cube(dirs)
        idx, w = cube_taps(res, face, uv)
        clamped = (cube.reshape(-1)[idx] * w).sum(-1)
        err_wrapped, err_clamped = (wrapped - dirs @ a).abs().max(), (clamped - dirs @ a).abs().max()
        assert err_wrapped < bound and err_wrapped < 0.6 * err_clamped, (res, err_wrapped, err_clamped)
    cube = torch.rand(6, 8, 8, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sample_cube(cube, cube_to_dir(8)), cube, atol=1e-6, rtol=0)
    torch.testing.assert_close(sample_cube(torch.full((6, 8, 8, 2), 0.7), dirs), torch.full((len(dirs), 2), 0.7))


def test_wrapped_lookup_gradient_matches_finite_differences():
    dirs = _directions(2000, seed=3)
    cube = torch.rand(6, 4, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: sample_cube(c, dirs.double()), (cube,), eps=1e-6, atol=1e-6)
