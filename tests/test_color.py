import torch

from recon.color import linear_to_srgb, srgb_to_linear


def test_srgb_round_trip_and_known_values():
    x = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert torch.allclose(linear_to_srgb(srgb_to_linear(x)), x, atol=1e-7)
    # mid-grey: sRGB 0.5 is linear 0.214041
    assert abs(srgb_to_linear(torch.tensor(0.5, dtype=torch.float64)).item() - 0.2140411) < 1e-6
    assert abs(linear_to_srgb(torch.tensor(1.0)).item() - 1.0) < 1e-6


def test_linear_to_srgb_gradient_is_finite_at_zero():
    x = torch.zeros(4, requires_grad=True)
    linear_to_srgb(x).sum().backward()
    assert torch.isfinite(x.grad).all()
