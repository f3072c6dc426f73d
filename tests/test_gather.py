"""recon.gather: index_select-based gathers equal advanced indexing, values and gradients."""
import pytest
import torch

from recon.gather import gather_rows, mask_index, masked_rows, scatter_rows, select_rows, take_rows


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


@pytest.mark.parametrize("shape,dtype", [((9, 4), torch.float32), ((9, 2, 4), torch.float32), ((9, 4), torch.int64),
                                         ((9, 3), torch.float64)])
def test_gather_rows_equals_index_select(shape, dtype):
    """The path CUDA takes for rows of 16-byte multiples (`select_rows`), run on the CPU: values and gradients."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(*shape, generator=g) * 10).to(dtype)
    index = torch.tensor([3, 0, 8, 3, 5])  # a repeat: the gradient accumulates
    assert torch.equal(gather_rows(x, index), x.index_select(0, index))
    assert torch.equal(select_rows(x, index), x.index_select(0, index))
    if dtype.is_floating_point:
        x.requires_grad_(True)
        w = torch.randn(index.shape[0], *shape[1:], generator=g, dtype=dtype)
        (grad,) = torch.autograd.grad((gather_rows(x, index) * w).sum(), x)
        (expected,) = torch.autograd.grad((x.index_select(0, index) * w).sum(), x)
        torch.testing.assert_close(grad, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_select_rows_on_cuda_equals_index_select():
    g = torch.Generator(device="cuda").manual_seed(3)
    for shape, dtype in (((50_000, 4), torch.float32), ((50_000, 3), torch.float32), ((50_000, 4), torch.int64)):
        x = (torch.randn(*shape, device="cuda", generator=g) * 100).to(dtype)
        index = torch.randint(0, shape[0], (20_000,), device="cuda", generator=g)
        assert torch.equal(select_rows(x, index), x.index_select(0, index))
        assert torch.equal(masked_rows(x.reshape(100, 500, -1), index, 2), x.index_select(0, index))
