"""MLPTexture3D: range, shapes, box mapping, gradients and fitting a colour field."""
import math

import pytest
import torch

from recon.materials.mlp_texture import MLPTexture3D

AABB = torch.tensor([[-1.0, -0.5, 0.0], [1.0, 1.5, 3.0]])
SMALL_ENCODING = dict(n_levels=6, log2_hashmap_size=12, base_resolution=4, max_resolution=64)


def make_texture(**kwargs) -> MLPTexture3D:
    torch.manual_seed(0)
    return MLPTexture3D(AABB, encoding=kwargs.pop("encoding", SMALL_ENCODING), backend="torch", **kwargs)


def test_nvdiffrec_architecture():
    tex = MLPTexture3D(AABB, channels=9)
    assert tex.encoder.n_levels == 16 and tex.encoder.n_features_per_level == 2
    assert tex.encoder.log2_hashmap_size == 19 and tex.encoder.level_resolution[-1] == 4096
    linears = [m for m in tex.net if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(32, 32), (32, 32), (9, 32)]
    assert all(m.bias is None for m in linears)
    assert sum(isinstance(m, torch.nn.ReLU) for m in tex.net) == 2
    torch.testing.assert_close(tex.min_max, torch.tensor([[0.0] * 9, [1.0] * 9]))
    assert {"aabb", "min_max"} <= set(tex.state_dict())


def test_output_within_min_max():
    min_max = torch.tensor([[0.0, 0.1, -1.0, 0.0], [1.0, 0.9, 1.0, 0.5]])
    tex = make_texture(channels=4, min_max=min_max)
    with torch.no_grad():  # large random weights saturate the sigmoid at both ends
        tex.encoder.params.normal_(0.0, 1.0)
        for m in tex.net:
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 3.0)
    points = torch.randn(20000, 3) * 3  # inside and outside the box
    out = tex.sample(points)
    assert out.shape == (20000, 4)
    assert (out >= min_max[0] - 1e-6).all() and (out <= min_max[1] + 1e-6).all()
    # Saturation reaches both ends of the range, so the bounds are the ones in use.
    assert (out - min_max[0]).abs().min(0).values.max() < 1e-3
    assert (out - min_max[1]).abs().min(0).values.max() < 1e-3


@pytest.mark.parametrize("shape", [(5,), (2, 7), (2, 3, 4), (0,), (4, 0), ()])
def test_leading_shapes(shape):
    tex = make_texture(channels=5)
    points = torch.rand(*shape, 3)
    out = tex.sample(points)
    assert out.shape == (*shape, 5) and out.dtype == torch.float32
    if points.numel():
        torch.testing.assert_close(out.reshape(-1, 5), tex(points.reshape(-1, 3)))
    with pytest.raises(ValueError, match="3"):
        tex.sample(torch.rand(4, 2))


def test_box_mapping_and_clamping():
    tex = make_texture()
    unit = torch.rand(100, 3)
    points = AABB[0] + unit * (AABB[1] - AABB[0])
    expected = torch.sigmoid(tex.net(tex.encoder(unit)))
    torch.testing.assert_close(tex.sample(points), expected)
    # Outside the box: the value at the nearest point on the box.
    outside = points + torch.tensor([5.0, 0.0, -7.0])
    clamped = torch.maximum(torch.minimum(outside, AABB[1]), AABB[0])
    torch.testing.assert_close(tex.sample(outside), tex.sample(clamped))
    # Moving the box moves the field with it.
    before = tex.sample(points)
    tex.set_aabb(AABB + 10.0)
    torch.testing.assert_close(tex.sample(points + 10.0), before)
    with pytest.raises(ValueError, match="aabb"):
        tex.set_aabb(torch.tensor([[1.0, 0, 0], [0.0, 1, 1]]))


def test_gradient_reaches_table_and_every_layer():
    tex = make_texture()
    tex.sample(torch.rand(500, 3) * 2 - 0.5).square().sum().backward()
    assert tex.encoder.params.grad is not None and tex.encoder.params.grad.abs().sum() > 0
    for name, param in tex.net.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_encoder_grad_scale_passes_through():
    tex = make_texture(encoding={**SMALL_ENCODING, "grad_scale": 128.0})
    assert tex.encoder.grad_scale == 128.0
    assert tex.encoder.backend == "torch"


def test_fits_a_colour_field():
    """A smooth albedo over the box is learned from random samples in 300 Adam steps (~3 s)."""
    tex = make_texture(encoding=dict(n_levels=8, log2_hashmap_size=14, base_resolution=4, max_resolution=64))
    opt = torch.optim.Adam(tex.parameters(), lr=1e-2)

    def albedo(p):
        u = (p - AABB[0]) / (AABB[1] - AABB[0])
        return torch.stack(
            [
                0.5 + 0.4 * torch.sin(2 * math.pi * u[:, 0]),
                0.5 + 0.3 * torch.cos(2 * math.pi * (u[:, 1] + u[:, 2])),
                0.2 + 0.6 * u[:, 0] * u[:, 2],
            ],
            dim=-1,
        )

    def random_points(n):
        return AABB[0] + torch.rand(n, 3) * (AABB[1] - AABB[0])

    for _ in range(300):
        p = random_points(2048)
        loss = (tex.sample(p) - albedo(p)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = random_points(8192)
    with torch.no_grad():
        mse = (tex.sample(p) - albedo(p)).square().mean().item()
    assert mse < 2e-4, mse  # per-channel variance of the target is 0.02 - 0.08; ~2e-5 is typical


@pytest.mark.gpu
def test_moves_to_cuda():
    tex = make_texture().to("cuda")
    assert tex.aabb.is_cuda and tex.min_max.is_cuda and tex.encoder.level_offset.is_cuda
    out = tex.sample(torch.rand(3, 8, 3, device="cuda"))
    assert out.shape == (3, 8, 3) and out.is_cuda


FUSED_CHECK = """
import torch
from recon.materials import mlp_texture, mlp_triton
calls = []
original = mlp_triton.fused_mlp
mlp_triton.fused_mlp = lambda *a: calls.append(1) or original(*a)
worst = 0.0
for n in (1, 300, 2100):  # one block, a partial block, several backward programs
    out, grads = [], []
    for fused in (False, True):
        torch.manual_seed(0)
        tex = mlp_texture.MLPTexture3D(torch.tensor([[-1.0] * 3, [1.0] * 3]), channels=9, backend="torch",
                                       encoding=dict(n_levels=16, log2_hashmap_size=10, base_resolution=4,
                                                     max_resolution=64), fused_mlp=fused)
        p = torch.rand(n, 3, generator=torch.Generator().manual_seed(n)) * 2 - 1
        y = tex.sample(p)
        (y * torch.linspace(-1, 1, 9)).sum().backward()
        out.append(y.detach())
        grads.append([t.grad for t in tex.parameters()])
    worst = max(worst, float((out[0] - out[1]).abs().max()))
    for a, b in zip(*grads):
        worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))
assert len(calls) == 3, calls
print("max error", worst)
"""


def test_fused_mlp_matches_torch_layers_in_triton_interpreter(in_triton_interpreter):
    """The Triton MLP (values, weight and hash-table gradients) against torch's layers, in Triton's interpreter."""
    import importlib.util


    if importlib.util.find_spec("triton") is None:
        pytest.skip("the triton package is not installed")
    assert float(in_triton_interpreter(FUSED_CHECK).split("max error")[1]) < 1e-5


@pytest.mark.gpu
def test_fused_mlp_matches_torch_layers_on_cuda():
    """What a CUDA fit runs (nvdiffrec's 32-32-9 network on 16x2 hash features, TensorFloat-32 products) against
    torch's float32 layers."""
    out, grads = [], []
    lo, hi = AABB.cuda()
    p = lo + torch.rand(200_003, 3, device="cuda") * (hi - lo)
    for fused in (False, True):
        torch.manual_seed(0)
        tex = MLPTexture3D(AABB, channels=9, fused_mlp=fused).to("cuda")
        y = tex.sample(p)
        (y * torch.linspace(-1, 1, 9, device="cuda")).sum().backward()
        out.append(y.detach())
        grads.append({n: t.grad for n, t in tex.named_parameters()})
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=2e-3)  # outputs in [0, 1]
    for name in grads[0]:
        a, b = grads[1][name], grads[0][name]
        assert (a - b).norm() < 1e-2 * b.norm(), name  # relative error of the whole gradient
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9999, name
