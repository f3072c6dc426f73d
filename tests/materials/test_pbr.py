"""PBR material channels: bounds, the neural field's smoothness term, the pass-2 texture's projection."""
import pytest
import torch

from recon.materials.pbr import CHANNELS, NeuralPBRMaterial, TexturePBRMaterial, channel_bounds


def test_bounds_validation():
    b = channel_bounds()
    assert b.shape == (2, CHANNELS) and b[0, 4] == pytest.approx(0.08)  # roughness floor
    with pytest.raises(ValueError, match="min exceeds max"):
        channel_bounds(kd_min=(0.5, 0, 0), kd_max=(0.4, 1, 1))
    with pytest.raises(ValueError, match="3 values"):
        channel_bounds(ks_min=(0, 0))


def test_neural_material_in_bounds_with_smoothness():
    torch.manual_seed(0)
    b = channel_bounds(kd_min=(0.1, 0.2, 0.3), kd_max=(0.5, 0.6, 0.7))
    aabb = torch.tensor([[-1.0, -1, -1], [1, 1, 1]])
    mat = NeuralPBRMaterial(aabb, b, n_neurons=16, n_hidden_layers=1,
                            encoding={"n_levels": 4, "log2_hashmap_size": 10, "max_resolution": 64})
    pts = torch.rand(500, 3) * 2 - 1
    out = mat(pts, smoothness=True)
    values = torch.cat([out["kd"], out["ks"], out["nrm"]], -1)
    assert ((values >= b[0] - 1e-6) & (values <= b[1] + 1e-6)).all()
    assert out["kd_grad"].shape == (500, 1) and (out["kd_grad"] >= 0).all() and out["kd_grad"].max() > 0
    out["kd_grad"].mean().backward()  # the regulariser reaches the network
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mat.parameters())
    torch.testing.assert_close(mat.sample(pts), values)


def test_smoothness_fraction_samples_every_kth_point_without_bias():
    """smoothness_fraction=0.25 jitters every 4th point from a random start: the network sees 1.25x the points
    instead of 2x, kd_grad is zero elsewhere, and its mean estimates the full term's (averaged over draws)."""
    torch.manual_seed(0)
    aabb = torch.tensor([[-1.0, -1, -1], [1, 1, 1]])
    enc = {"n_levels": 4, "log2_hashmap_size": 10, "max_resolution": 64}
    full = NeuralPBRMaterial(aabb, n_neurons=16, n_hidden_layers=1, encoding=enc, smoothness_jitter=0.2)
    part = NeuralPBRMaterial(aabb, n_neurons=16, n_hidden_layers=1, encoding=enc, smoothness_jitter=0.2,
                             smoothness_fraction=0.25)
    part.load_state_dict(full.state_dict())
    pts = torch.rand(1001, 3) * 2 - 1
    seen = []
    sample = part.field.sample
    part.field.sample = lambda x, *mask: seen.append(x.shape[0]) or sample(x, *mask)
    out = part(pts, smoothness=True, generator=torch.Generator().manual_seed(1))
    assert seen == [1001 + 250]
    nonzero = out["kd_grad"][:, 0].nonzero()[:, 0]
    assert len(nonzero) == 250 and (nonzero.diff() == 4).all() and nonzero[0] < 4
    with torch.no_grad():
        means = [[m(pts, smoothness=True, generator=torch.Generator().manual_seed(s))["kd_grad"].mean()
                  for s in range(200)] for m in (full, part)]
    full_mean, part_mean = (torch.stack(m).mean() for m in means)
    assert abs(part_mean - full_mean) < 0.03 * full_mean, (part_mean, full_mean)
    out["kd_grad"].mean().backward()  # the sampled term still trains the network
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    with pytest.raises(ValueError, match="smoothness_fraction"):
        NeuralPBRMaterial(aabb, encoding=enc, smoothness_fraction=0.0)


@pytest.mark.parametrize("position_grad", [True, False])
def test_position_grad_decides_whether_the_points_get_gradients(position_grad):
    """nvdiffrec lets the material's gradient move the surface points; position_grad=False detaches them, and the
    network still trains."""
    torch.manual_seed(0)
    aabb = torch.tensor([[-1.0, -1, -1], [1, 1, 1]])
    mat = NeuralPBRMaterial(aabb, n_neurons=16, n_hidden_layers=1, position_grad=position_grad,
                            encoding={"n_levels": 4, "log2_hashmap_size": 10, "max_resolution": 64})
    pts = (torch.rand(300, 3) * 2 - 1).requires_grad_()
    out = mat(pts, smoothness=True)
    (out["kd"].sum() + out["ks"].sum() + out["kd_grad"].sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mat.parameters())
    if position_grad:
        assert pts.grad is not None and pts.grad.abs().sum() > 0
    else:
        assert pts.grad is None


def test_texture_clamp_projects_into_bounds():
    tex = torch.randn(8, 8, CHANNELS) * 3
    mat = TexturePBRMaterial(tex)
    mat.clamp_()
    t = mat.texture.detach()[0]
    b = channel_bounds()
    assert ((t[..., :6] >= b[0, :6]) & (t[..., :6] <= b[1, :6])).all()
    torch.testing.assert_close(t[..., 6:].norm(dim=-1), torch.ones(8, 8))
    assert (t[..., 8] >= 0).all()
    # the in-place projection gives exactly the out-of-place reference: clamp, then F.normalize of the normals
    ref = torch.maximum(torch.minimum(tex[None], b[1]), b[0])
    ref[..., 6:] = torch.nn.functional.normalize(ref[..., 6:], dim=-1, eps=1e-8)
    torch.testing.assert_close(mat.texture.detach(), ref, rtol=0, atol=1e-7)
    zero = TexturePBRMaterial(torch.zeros(4, 4, CHANNELS), bounds=torch.stack([torch.full((CHANNELS,), -1.0),
                                                                                torch.ones(CHANNELS)]))
    zero.clamp_()  # a zero normal stays finite (eps), as with F.normalize
    assert torch.isfinite(zero.texture).all() and (zero.texture[..., 6:] == 0).all()
    with pytest.raises(ValueError, match="PBR texture"):
        TexturePBRMaterial(torch.zeros(8, 8, 3))
