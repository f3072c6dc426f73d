"""The Triton CSR product behind recon.sparse (the light's prefilter, the mesh Laplacian): equal to the dense product,
in Triton's interpreter on the CPU (a child process: Triton picks interpreter or compiler when first imported) and,
marked `gpu`, compiled on CUDA, where `EnvironmentLight.build_mips` and the pass-2 Laplacian run through it."""
import importlib.util
import inspect

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the triton package is not installed")


def random_csr(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A CSR matrix with 32-bit indices (as the light builds) and its dense twin: empty rows, and a row longer than
    several of the kernel's blocks."""
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(rows, cols, generator=g)
    d[d < 0.85] = 0
    d[3] = 0
    d[5] = torch.rand(cols, generator=g) + 0.1
    s = d.to_sparse_csr()
    a = torch.sparse_csr_tensor(s.crow_indices().int(), s.col_indices().int(), s.values(), s.shape)
    return a, d


CHECK = """
import torch
from recon.spmm_triton import CHUNK, csr_matmul, interpreting, row_chunks
assert interpreting()
worst = 0.0
chunked = 0
# 300 and 700 columns: row 5 is longer than CHUNK (cut into 2 and 3 chunks), the rest short or empty
for rows, cols, ch in ((40, 300, 3), (7, 200, 1), (6, 5, 16), (12, 700, 3)):
    a, d = random_csr(rows, cols)
    chunked += row_chunks(a.crow_indices()) is not None
    x = torch.randn(cols, ch, generator=torch.Generator().manual_seed(1))
    ref = d @ x
    for _ in range(2):  # the second product reuses the kept chunk list
        worst = max(worst, float((csr_matmul(a, x) - ref).abs().max() / ref.abs().max()))
assert chunked == 2, chunked
print("max error", worst)
"""


@needs_triton
def test_csr_matmul_in_triton_interpreter(in_triton_interpreter):
    out = in_triton_interpreter("import torch\n" + inspect.getsource(random_csr) + CHECK)
    assert float(out.split("max error")[1]) < 1e-6  # relative to the largest output


@needs_triton
def test_row_chunks_cover_each_long_row_once():
    from recon.spmm_triton import row_chunks

    crow = torch.tensor([0, 3, 3, 13, 14, 14], dtype=torch.int32)  # rows of 3, 0, 10, 1, 0 entries
    assert row_chunks(crow, chunk=10) is None  # balanced: the row kernel does it
    row, start, end = row_chunks(crow, chunk=4)
    assert row.tolist() == [0, 2, 2, 2, 3]  # empty rows have no chunk, the 10-entry row three
    assert start.tolist() == [0, 3, 7, 11, 13] and end.tolist() == [3, 7, 11, 13, 14]


@needs_triton
def test_csr_matmul_names_bad_inputs():
    from recon.spmm_triton import csr_matmul

    a, d = random_csr(6, 9)
    with pytest.raises(ValueError, match="sparse CSR"):
        csr_matmul(d, torch.zeros(9, 3))
    with pytest.raises(ValueError, match=r"x must be \[9, C<=16\]"):
        csr_matmul(a, torch.zeros(8, 3))
    with pytest.raises(ValueError, match="float32"):
        csr_matmul(a, torch.zeros(9, 3, dtype=torch.float64))


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_light_prefilter_by_triton_matches_torch_sparse_on_cuda(monkeypatch):
    """build_mips on CUDA through the Triton kernel (forward and transposed backward) against torch's sparse products
    of the same operator."""
    from recon import sparse
    from recon.light import env_light

    torch.manual_seed(0)
    light = env_light.EnvironmentLight(base_res=64, min_res=8, init="random").cuda()
    weights = [torch.rand(6, 64 >> i, 64 >> i, 3, device="cuda") for i in range(light.num_levels)]
    results = []
    for use_triton in (True, False):
        if not use_triton:
            monkeypatch.setattr(sparse, "_triton_spmm", lambda: None)
        light.base.grad = None
        light.build_mips()
        loss = sum((lv * w).sum() for lv, w in zip(light.specular, weights)) + light.diffuse.sum()
        loss.backward()
        results.append(([lv.detach().clone() for lv in light.specular], light.base.grad.clone()))
    assert sparse._triton_spmm() is None  # the second pass really ran torch's product
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mesh_laplacian_by_triton_matches_torch_sparse_on_cuda():
    """The pass-2 relative Laplacian on CUDA (Triton CSR, forward and transposed backward) against torch's COO product."""
    import trimesh

    from recon.geometry.fixed_mesh import FixedTopologyMesh
    from recon.geometry.mesh import Mesh, laplacian_loss, laplacian_uniform

    tm = trimesh.creation.icosphere(subdivisions=5)
    verts, faces = torch.tensor(tm.vertices, dtype=torch.float32), torch.tensor(tm.faces, dtype=torch.long)
    mesh = Mesh(verts=verts.cuda(), faces=faces.cuda(), uv=torch.rand(verts.shape[0], 2).cuda(), uv_faces=faces.cuda())
    surface = FixedTopologyMesh(mesh).cuda()
    with torch.no_grad():
        surface.offset.normal_(std=0.01)
    loss = surface.laplacian_regularizer()
    loss.backward()
    offset = surface.offset.detach().clone().requires_grad_(True)
    lap = laplacian_uniform(verts.shape[0], mesh.faces)
    expected = laplacian_loss(mesh.verts + offset, mesh.faces, mesh.verts, lap=lap)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(surface.offset.grad, offset.grad, rtol=1e-4, atol=1e-9)
