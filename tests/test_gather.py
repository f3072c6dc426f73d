"""recon.gather: index_select-based gathers equal advanced indexing, values and gradients."""
import torch

from recon.gather import mask_index, masked_rows, take_rows


def test_gathers_match_advanced_indexing():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, 3, requires_grad=True)
    mask = torch.rand(2, 5, 4) > 0.4
    w = torch.randn(int(mask.sum()), 3)
    (masked_rows(x, mask_index(mask), mask.dim()) * w).sum().backward()
    g = x.grad.clone()
    x.grad = None
    assert torch.equal(masked_rows(x, mask_index(mask), 3), x[mask])
    (x[mask] * w).sum().backward()
    assert torch.allclose(g, x.grad)

    v = torch.randn(7, 3, requires_grad=True)
    idx = torch.tensor([[0, 6, 6], [2, 2, 2]])  # repeats accumulate
    (take_rows(v, idx) ** 2).sum().backward()
    gv = v.grad.clone()
    v.grad = None
    assert torch.equal(take_rows(v, idx), v[idx])
    (v[idx] ** 2).sum().backward()
    assert torch.allclose(gv, v.grad)
