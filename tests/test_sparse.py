"""Constant sparse operators: the product and its backward against dense algebra; the mesh Laplacian through them."""
import pytest
import torch
import trimesh

from recon.geometry.fixed_mesh import FixedTopologyMesh
from recon.geometry.mesh import Mesh, laplacian_loss, laplacian_uniform
from recon.sparse import SparseOperator


def test_operator_equals_the_dense_matrix_and_sums_repeated_entries():
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 7, (40,), generator=g)
    cols = torch.randint(0, 11, (40,), generator=g)
    vals = torch.randn(40, generator=g, dtype=torch.float64)
    dense = torch.zeros(7, 11, dtype=torch.float64).index_put_((rows, cols), vals, accumulate=True)
    op = SparseOperator(rows, cols, vals, (7, 11))  # unsorted, with repeats
    x = torch.randn(11, 3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(op(x), dense @ x)
    assert torch.autograd.gradcheck(op, (x,))  # the backward is the precomputed transpose
    torch.testing.assert_close(SparseOperator.from_sparse(dense.to_sparse())(x), dense @ x)
    torch.testing.assert_close(SparseOperator.from_sparse(dense.to_sparse_csr())(x), dense @ x)
    with pytest.raises(ValueError, match=r"shape \(7, 11\) cannot multiply \(10, 3\)"):
        op(torch.zeros(10, 3, dtype=torch.float64))


def test_fixed_mesh_laplacian_through_the_operator_equals_torch_sparse():
    tm = trimesh.creation.icosphere(subdivisions=2)
    verts, faces = torch.tensor(tm.vertices, dtype=torch.float32), torch.tensor(tm.faces, dtype=torch.long)
    surface = FixedTopologyMesh(Mesh(verts=verts, faces=faces, uv=torch.rand(len(verts), 2), uv_faces=faces))
    with torch.no_grad():
        surface.offset.normal_(std=0.01, generator=torch.Generator().manual_seed(1))
    loss = surface.laplacian_regularizer()
    loss.backward()
    offset = surface.offset.detach().clone().requires_grad_(True)
    expected = laplacian_loss(verts + offset, faces, verts, lap=laplacian_uniform(len(verts), faces))
    expected.backward()
    assert loss.item() > 0
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(surface.offset.grad, offset.grad)
