import math

import torch

from recon.light import EnvironmentLight, cube_to_dir, dir_to_cube, sample_cube
from recon.light.env_light import cube_texel_solid_angle, latlong_dirs

SMALL = dict(base_res=32, min_res=4, lut_resolution=32, lut_samples=128)


def _pixels(n_dirs: torch.Tensor, view_dist: float = 5.0):
    pos = torch.zeros_like(n_dirs)
    return pos, n_dirs, n_dirs * view_dist  # camera along the normal


def test_cube_round_trip_exact():
    res = 8
    face, uv = dir_to_cube(cube_to_dir(res))
    assert (face == torch.arange(6)[:, None, None]).all()
    c = (torch.arange(res) + 0.5) / res
    assert torch.allclose(uv[..., 0], c.expand(6, res, res), atol=1e-6)
    assert torch.allclose(uv[..., 1], c[:, None].expand(6, res, res), atol=1e-6)
    cube = torch.rand(6, res, res, 2)
    assert torch.allclose(sample_cube(cube, cube_to_dir(res)), cube, atol=1e-5)


def test_face_convention_and_solid_angle():
    d = cube_to_dir(2)
    centres = d.mean(dim=(1, 2))
    axes = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1.0]])
    assert ((centres / centres.norm(dim=-1, keepdim=True)) - axes).abs().max() < 1e-5
    assert abs(cube_texel_solid_angle(16).sum().item() * 6 - 4 * math.pi) < 1e-4


def test_constant_env_white_lambertian():
    light = EnvironmentLight(init_value=1.7, **SMALL)
    light.build_mips()
    n = torch.nn.functional.normalize(torch.randn(100, 3), dim=-1)
    arm = torch.tensor([0.0, 1.0, 0.0]).expand(100, 3)
    out = light.shade(*_pixels(n)[:2], torch.ones(100, 3), arm, n * 5, specular=False)
    assert torch.allclose(out, torch.full_like(out, 1.7), rtol=0.02)


def test_constant_env_mirror_matches_split_sum():
    light = EnvironmentLight(init_value=0.8, **SMALL)
    light.build_mips()
    for s in light.specular:
        assert torch.allclose(s, torch.full_like(s, 0.8), rtol=0.02)
    n = torch.nn.functional.normalize(torch.randn(50, 3), dim=-1)
    arm = torch.tensor([0.0, 0.08, 1.0]).expand(50, 3)
    out = light.shade(*_pixels(n)[:2], torch.ones(50, 3), arm, n * 5)
    from recon.light.bsdf import lookup_lut

    fg = lookup_lut(light.lut, torch.ones(50), torch.full((50,), 0.08)).sum(-1, keepdim=True)
    assert torch.allclose(out, 0.8 * fg.expand(50, 3), rtol=0.02)
    occluded = light.shade(*_pixels(n)[:2], torch.ones(50, 3), arm.clone().index_fill_(1, torch.tensor([0]), 0.5), n * 5)
    assert torch.allclose(occluded, out * 0.5)


def test_bright_face_lights_facing_normals():
    base = torch.full((6, 16, 16, 3), 0.05)
    base[0] = 5.0  # +x face bright
    light = EnvironmentLight(init=base, min_res=4, lut_resolution=32, lut_samples=128)
    light.build_mips()
    n = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0]])
    arm = torch.tensor([0.0, 0.6, 0.0]).expand(3, 3)
    out = light.shade(torch.zeros(3, 3), n, torch.full((3, 3), 0.8), arm, torch.tensor([[0, 0, 5.0]]).expand(3, 3))
    assert out[0].mean() > 2 * out[2].mean() and out[2].mean() > out[1].mean()


def test_gradients_reach_base():
    light = EnvironmentLight(init="random", **SMALL)
    light.build_mips()
    b = 2
    n = torch.nn.functional.normalize(torch.randn(b, 4, 4, 3), dim=-1)
    arm = torch.rand(b, 4, 4, 3)
    out = light.shade(torch.zeros(b, 4, 4, 3), n, torch.rand(b, 4, 4, 3), arm, torch.randn(b, 3) * 5)
    (out.mean() + light.regularizer()).backward()
    g = light.base.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_prefilter_smooths_and_keeps_mean():
    torch.manual_seed(0)
    light = EnvironmentLight(init=torch.rand(6, 32, 32, 3) * 2, min_res=4, lut_resolution=32, lut_samples=128)
    light.build_mips()

    def weighted_mean(c):
        w = cube_texel_solid_angle(c.shape[1]).repeat(6, 1, 1)[..., None]
        return (c * w).sum() / (w.sum() * c.shape[-1])

    ref = weighted_mean(light.base).item()
    var = [s.var().item() for s in light.specular]
    assert all(a > b for a, b in zip(var, var[1:]))
    for s in light.specular[1:] + [light.diffuse]:
        assert abs(weighted_mean(s).item() - ref) < 0.02 * ref


def test_latlong_round_trip():
    light = EnvironmentLight(init_value=0.3, base_res=16, min_res=4, lut_resolution=32, lut_samples=128)
    img = light.to_latlong(32)
    assert img.shape == (32, 64, 3) and torch.allclose(img, torch.full_like(img, 0.3))
    sky = (latlong_dirs(64)[..., 1:2] > 0).float().expand(64, 128, 3) * 2.0  # bright upper hemisphere
    light.from_latlong(sky)
    assert light.base[2].min() > 1.9 and light.base[3].max() < 0.1  # +y face lit, -y face dark
    light.clamp_(min=0, max=1.0)
    assert light.base.max() <= 1.0


def test_prefilter_operator_matches_direct_sampling_and_finite_differences():
    """The cached sparse prefilter equals GGX importance sampling read straight from the pooled chain, and its
    hand-written backward (the precomputed transpose) matches finite differences."""
    from recon.light.bsdf import ggx_ndf, hammersley, importance_sample_ggx
    from recon.light.env_light import _tangent_frame, avg_pool_cube

    torch.manual_seed(0)
    light = EnvironmentLight(init=torch.rand(6, 16, 16, 3, dtype=torch.float64), min_res=4, lut_resolution=16,
                             lut_samples=64)
    light.build_mips()
    pooled = [light.base, avg_pool_cube(light.base), avg_pool_cube(avg_pool_cube(light.base))]
    rough, res = light.level_roughness(1), 8
    s = max(light.prefilter_samples, min(1024, 2**17 // (6 * res * res)))
    h = importance_sample_ggx(hammersley(s, "cpu"), rough).double()
    l_t = 2 * h[:, 2:3] * h - torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    keep = l_t[:, 2] > 1e-4
    h, l_t = h[keep], l_t[keep]
    lod = (0.5 * torch.log2(1 / (s * ggx_ndf(h[:, 2], rough) / 4) / (4 * math.pi / (6 * res * res))) + 1)
    src = (1 + lod.clamp_min(0).round().long()).clamp(max=2)
    n = cube_to_dir(res, "cpu")[2, 3, 5].double()  # one texel of face +y
    t, b = _tangent_frame(n)
    dirs = (t * l_t[:, 0:1] + b * l_t[:, 1:2] + n * l_t[:, 2:3]).float()
    from recon.render.cube import cube_taps

    def clamped(cube, d):  # the operator's taps: bilinear inside the face the direction hits
        face, uv = dir_to_cube(d)
        idx, w = cube_taps(cube.shape[1], face, uv)
        return (cube.reshape(-1, cube.shape[-1])[idx] * w[..., None].to(cube.dtype)).sum(-2)

    direct = sum(clamped(pooled[k], dirs[i]) * l_t[i, 2] for i, k in enumerate(src.tolist())) / l_t[:, 2].sum()
    assert torch.allclose(light.specular[1][2, 3, 5], direct, rtol=1e-5, atol=1e-7)

    key = light._operator.key
    light.build_mips()
    assert light._operator.key is key  # built once, reused

    op = light._prefilter_operator([4, 2, 1], torch.device("cpu"), torch.float64)

    def f(base):  # build_mips' product on a 4^2 chain
        chain = torch.cat([base.reshape(-1, 1), avg_pool_cube(base).reshape(-1, 1),
                           avg_pool_cube(avg_pool_cube(base)).reshape(-1, 1)])
        return op(chain)

    assert torch.autograd.gradcheck(f, (torch.rand(6, 4, 4, 1, dtype=torch.float64, requires_grad=True),))


def test_shade_through_the_torch_rasterizer_equals_the_plain_lookups():
    """`shade(rasterizer=...)` routes the cube and BSDF-table lookups through the backend: the torch backend gives the
    same radiance and gradients as the lookups of `recon.render.cube`."""
    from recon.render import make_rasterizer

    torch.manual_seed(0)
    light = EnvironmentLight(init_value=0.5, **SMALL)
    with torch.no_grad():
        light.base.add_(torch.rand_like(light.base))
    n = torch.nn.functional.normalize(torch.randn(200, 3), dim=-1)
    kd = torch.rand(200, 3)
    arm = torch.stack([torch.zeros(200), torch.rand(200), torch.rand(200)], -1).requires_grad_(True)
    outs, grads = [], []
    for rast in (None, make_rasterizer("torch")):
        light.zero_grad()
        arm.grad = None
        light.build_mips()
        out = light.shade(torch.zeros(200, 3), n, kd, arm, n * 5, rasterizer=rast)
        (out * torch.linspace(0, 1, 600).reshape(200, 3)).sum().backward()
        outs.append(out.detach())
        grads.append((light.base.grad.clone(), arm.grad.clone()))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)


def test_light_from_a_probe_file_and_fixed(tmp_path):
    """``init=PATH.hdr`` loads a lat-long probe (to within the cube's resampling), ``trainable=False`` keeps it out of
    the gradients; a missing or misshapen probe is named."""
    import pytest

    from recon.data.synthetic_scene import pbr_light_latlong
    from recon.export.hdr import write_hdr

    probe = pbr_light_latlong("sky", 32)
    write_hdr(tmp_path / "probe.hdr", probe)
    fixed = EnvironmentLight(init=str(tmp_path / "probe.hdr"), trainable=False, **SMALL)
    assert not fixed.trainable and not fixed.base.requires_grad
    assert (fixed.to_latlong(32) - probe).abs().mean() < 0.05 * probe.mean()  # RGBE + resampling
    fixed.build_mips()
    out = fixed.shade(*_pixels(torch.tensor([[0.0, 1.0, 0.0]]))[:2], torch.ones(1, 3), torch.tensor([[0.0, 0.5, 0.0]]),
                      torch.tensor([[0.0, 5.0, 0.0]]))
    assert not out.requires_grad
    with pytest.raises(FileNotFoundError, match="nope.hdr"):
        EnvironmentLight(init=str(tmp_path / "nope.hdr"), **SMALL)
    write_hdr(tmp_path / "square.hdr", probe[:, :32])
    with pytest.raises(ValueError, match="twice as wide"):
        EnvironmentLight(init=str(tmp_path / "square.hdr"), **SMALL)
    with pytest.raises(ValueError, match="constant"):
        EnvironmentLight(init="sky", **SMALL)
