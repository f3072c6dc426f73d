"""recon.gather: index_select-based gathers equal advanced indexing, values and gradients."""
import torch

from recon.gather import mask_index, masked_rows, scatter_rows, take_rows


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


def test_scatter_rows_inverts_masked_rows_with_gradients():
    torch.manual_seed(1)
    mask = torch.rand(2, 5, 4) > 0.5
    index = mask_index(mask)
    rows = torch.randn(index.shape[0], 3, dtype=torch.float64, requires_grad=True)
    image = scatter_rows(rows, index, mask.numel()).reshape(2, 5, 4, 3)
    expected = torch.zeros(2, 5, 4, 3, dtype=torch.float64)
    expected[mask] = rows.detach()
    assert torch.equal(image, expected) and torch.equal(masked_rows(image, index, 3), rows)
    assert torch.autograd.gradcheck(lambda r: scatter_rows(r, index, mask.numel()) ** 2, (rows,))
