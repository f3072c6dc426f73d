import math

import torch

from recon.light.bsdf import ggx_lut, ggx_ndf, lookup_lut, smith_g_ibl


def _brute_force(n_dot_v: float, roughness: float, n: int = 2_000_000) -> torch.Tensor:
    """(scale, bias) by uniform hemisphere sampling of the same integral (Karis' G, Schlick's F split)."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    cos_t, phi = u[:, 0], 2 * math.pi * u[:, 1]
    sin_t = torch.sqrt(1 - cos_t**2)
    light = torch.stack((sin_t * torch.cos(phi), sin_t * torch.sin(phi), cos_t), -1)
    view = torch.tensor([math.sqrt(1 - n_dot_v**2), 0.0, n_dot_v], dtype=torch.float64)
    h = light + view
    h = h / h.norm(dim=-1, keepdim=True)
    v_dot_h = (h * view).sum(-1)
    n_dot_l = light[:, 2]
    f = ggx_ndf(h[:, 2], roughness) * smith_g_ibl(torch.tensor(n_dot_v, dtype=torch.float64), n_dot_l, roughness)
    f = f / (4 * n_dot_v)  # BRDF * n_dot_l; pdf 1/(2 pi)
    fc = (1 - v_dot_h) ** 5
    return torch.stack((((1 - fc) * f).mean(), (fc * f).mean())) * 2 * math.pi


def test_lut_range_and_shape():
    lut = ggx_lut(32, 128)
    assert lut.shape == (32, 32, 2)
    assert lut.min() >= 0 and lut.max() <= 1 + 1e-5
    assert ggx_lut(32, 128) is lut  # cached


def test_lut_limits():
    lut = ggx_lut(64, 256)
    assert abs(lut[-1, 0].sum().item() - 1) < 1e-2  # smooth mirror seen head-on reflects everything
    total = lut.sum(-1)
    grazing = total[:16]  # n_dot_v < 0.25
    assert (grazing[:, -1] < grazing[:, 0]).all()  # roughness 1 loses energy against roughness 0
    assert grazing[:, 32:].mean() < grazing[:, :32].mean()


def test_lut_matches_brute_force():
    res = 32
    lut = ggx_lut(res, 1024)
    for i, j in [(16, 16), (25, 22), (8, 28), (30, 31)]:
        n_dot_v, rough = (i + 0.5) / res, (j + 0.5) / res
        ref = _brute_force(n_dot_v, rough).float()
        assert torch.allclose(lut[i, j], ref, atol=1e-2), (i, j, lut[i, j], ref)
        got = lookup_lut(lut, torch.tensor(n_dot_v), torch.tensor(rough))
        assert torch.allclose(got, lut[i, j], atol=1e-6)
