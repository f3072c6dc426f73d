"""HashGridEncoding: tiny-cuda-nn layout and hashing, interpolation, gradients, backends, fitting."""
import math

import numpy as np
import pytest
import torch

from recon.materials.hash_grid import HashGridEncoding, tcnn_available

PRIMES = (1, 2654435761, 805459861)
SMALL = dict(n_levels=6, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, max_resolution=64)


def reference_encode(enc: HashGridEncoding, x: np.ndarray) -> np.ndarray:
    """Point-by-point transcription of tiny-cuda-nn's kernel_grid (linear interpolation), float64."""
    n_dims, n_feat = enc.n_input_dims, enc.n_features_per_level
    table = enc.params.detach().double().view(-1, n_feat).numpy()
    out = np.zeros((x.shape[0], enc.n_output_dims))
    for n in range(x.shape[0]):
        for level in range(enc.n_levels):
            scale = float(enc.level_scale[level])
            resolution = int(math.ceil(scale)) + 1
            size, offset = int(enc.level_size[level]), int(enc.level_offset[level])
            pos = [min(max(float(v), 0.0), 1.0) * scale + 0.5 for v in x[n]]
            grid = [math.floor(p) for p in pos]
            frac = [p - g for p, g in zip(pos, grid)]
            for corner in range(2**n_dims):
                bits = [(corner >> d) & 1 for d in range(n_dims)]
                vertex = [g + b for g, b in zip(grid, bits)]
                weight = math.prod(f if b else 1.0 - f for f, b in zip(frac, bits))
                stride, index = 1, 0
                for d in range(n_dims):
                    if stride > size:
                        break
                    index += vertex[d] * stride
                    stride *= resolution
                if size < stride:  # hashed level: uint32 products, XOR
                    index = 0
                    for d in range(n_dims):
                        index ^= (vertex[d] * PRIMES[d]) & 0xFFFFFFFF
                index %= size
                out[n, level * n_feat : (level + 1) * n_feat] += weight * table[offset + index]
    return out


def random_table(enc: HashGridEncoding, seed: int = 0) -> HashGridEncoding:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        enc.params.copy_(torch.randn(enc.params.shape, generator=gen, dtype=enc.params.dtype))
    return enc


def test_nvdiffrec_config_layout():
    enc = HashGridEncoding()  # nvdiffrec: 16 levels x 2 features, 2^19 entries, resolution 16..4096
    assert enc.n_output_dims == 32
    assert enc.level_resolution[:6].tolist() == [16, 24, 34, 49, 71, 102]
    assert enc.level_resolution[-1].item() == 4096
    # Levels 0-4 are dense (R^3 rounded up to a multiple of 8), the rest hashed into 2^19 rows.
    assert enc.level_size[:5].tolist() == [4096, 13824, 39304, 117656, 357912]
    assert enc.level_size[5:].tolist() == [2**19] * 11
    assert enc.level_hashed.tolist() == [False] * 5 + [True] * 11
    assert enc.params.shape == (2 * (4096 + 13824 + 39304 + 117656 + 357912 + 11 * 2**19),)
    assert enc.params.dtype == torch.float32
    assert enc.params.abs().max() <= 1e-4  # tiny-cuda-nn's uniform(-1e-4, 1e-4) init
    assert enc.params.std() > 5e-5


@pytest.mark.parametrize(
    "config",
    [
        dict(n_input_dims=3, **SMALL),
        dict(n_input_dims=2, **SMALL),
        dict(n_input_dims=3, n_levels=16, log2_hashmap_size=19, base_resolution=16, max_resolution=4096),
    ],
    ids=["small-3d", "small-2d", "nvdiffrec"],
)
def test_matches_tcnn_reference(config):
    enc = random_table(HashGridEncoding(backend="torch", **config).double())
    assert 0 < enc.n_dense_levels < enc.n_levels  # both index kinds are exercised
    gen = torch.Generator().manual_seed(1)
    n_dims = config["n_input_dims"]
    x = torch.rand(40, n_dims, generator=gen, dtype=torch.float64)
    x[:4] = torch.tensor([0.0, 1.0, 1.0, 0.0])[:n_dims]  # faces of the cube: dense index wraps
    x[4:8] = 1.0
    x[8:10] = torch.tensor([-0.3, 1.7, 0.5])[:n_dims]  # clamped
    expected = reference_encode(enc, x.numpy())
    np.testing.assert_allclose(enc(x).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


def test_output_shape_dtype_and_empty_input():
    enc = HashGridEncoding(n_levels=12, n_features_per_level=4, log2_hashmap_size=12, max_resolution=512)
    out = enc(torch.rand(100, 3))
    assert out.shape == (100, 48) and out.dtype == torch.float32
    assert enc(torch.rand(0, 3)).shape == (0, 48)
    assert enc(torch.rand(7, 3, dtype=torch.float64)).dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        enc(torch.rand(5, 2))


def lattice_point(enc: HashGridEncoding, level: int, vertex: torch.Tensor) -> torch.Tensor:
    """Position in [0,1]^D of integer lattice vertex [N,D] of a level (lattice = scale * x + 0.5)."""
    return (vertex.double() - 0.5) / enc.level_scale[level].double()


def dense_rows(enc: HashGridEncoding, level: int, vertex: torch.Tensor) -> torch.Tensor:
    res = int(enc.level_resolution[level])
    strides = torch.tensor([res**d for d in range(enc.n_input_dims)])
    return int(enc.level_offset[level]) + (vertex * strides).sum(-1)


@pytest.mark.parametrize("level", [0, 1])
def test_dense_level_reproduces_vertex_values(level):
    enc = random_table(HashGridEncoding(**SMALL).double())
    assert not enc.level_hashed[level]
    res = int(enc.level_resolution[level])
    gen = torch.Generator().manual_seed(2)
    # Vertex 0 sits half a cell outside the cube; vertices 1 .. res - 1 are reachable.
    vertex = torch.randint(1, res, (64, 3), generator=gen)
    out = enc(lattice_point(enc, level, vertex))
    rows = enc.params.detach().view(-1, 2)[dense_rows(enc, level, vertex)]
    torch.testing.assert_close(out[:, 2 * level : 2 * level + 2], rows, rtol=0, atol=1e-9)


@pytest.mark.parametrize("level", [1, 5])
def test_cell_centre_is_mean_of_corners(level):
    enc = random_table(HashGridEncoding(**SMALL).double())
    res = int(enc.level_resolution[level])
    gen = torch.Generator().manual_seed(3)
    cell = torch.randint(1, res - 1, (32, 3), generator=gen)
    x = lattice_point(enc, level, cell.double() + 0.5)
    out = enc(x)[:, 2 * level : 2 * level + 2]
    table = enc.params.detach().view(-1, 2)
    corners = torch.tensor([[(c >> d) & 1 for d in range(3)] for c in range(8)])
    if enc.level_hashed[level]:
        index, weights = enc.corner_indices(x)
        rows = index[level].t()  # [N,8]
        torch.testing.assert_close(weights[level], torch.full_like(weights[level], 1 / 8))
    else:
        rows = dense_rows(enc, level, cell[:, None, :] + corners)  # [N,8]
    torch.testing.assert_close(out, table[rows].mean(1), rtol=0, atol=1e-9)


def test_continuity_across_cell_boundaries():
    enc = random_table(HashGridEncoding(**SMALL).double())
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(200, 3, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    # Put coordinate 0 exactly on a vertex plane of the finest level, then step across it.
    scale = enc.level_scale[-1].double()
    x[:, 0] = (torch.round(x[:, 0] * scale + 0.5) - 0.5) / scale
    eps = 1e-9
    lipschitz = 2 * enc.level_scale.max().item() * enc.params.abs().max().item() * 3  # per unit of |dx|_inf
    for delta in (torch.tensor([eps, 0, 0]), torch.tensor([-eps, 0, 0]), torch.full((3,), eps)):
        change = (enc(x + delta.double()) - enc(x)).abs().max().item()
        assert change <= lipschitz * eps * 1.01


def test_corner_indices_stay_inside_their_level():
    enc = HashGridEncoding()
    gen = torch.Generator().manual_seed(5)
    corners = torch.tensor([[0.0, 0, 0], [1, 1, 1], [1, 0, 1], [-2, 3, 0.5]])
    x = torch.cat([torch.rand(5000, 3, generator=gen), corners])
    index, weights = enc.corner_indices(x)
    assert index.shape == (16, 8, x.shape[0]) and index.dtype == torch.int64
    lo = enc.level_offset[:, None, None]
    assert ((index >= lo) & (index < lo + enc.level_size[:, None, None])).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(16, x.shape[0]))
    assert (weights >= 0).all()


def test_table_gradient_matches_finite_differences():
    enc = HashGridEncoding(n_levels=3, log2_hashmap_size=6, base_resolution=2, max_resolution=8).double()
    assert enc.level_hashed.tolist() == [False, False, True]
    random_table(enc)
    x = torch.rand(20, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def encode(params):
        with torch.no_grad():
            enc.params.copy_(params)
        return enc(x)

    # Analytic gradient of a random projection vs central differences on every table entry.
    proj = torch.randn(20, enc.n_output_dims, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    params0 = enc.params.detach().clone()
    enc.params.grad = None
    (enc(x) * proj).sum().backward()
    numeric = torch.zeros_like(params0)
    h = 1e-6
    for i in range(params0.numel()):
        step = torch.zeros_like(params0)
        step[i] = h
        numeric[i] = ((encode(params0 + step) - encode(params0 - step)) * proj).sum() / (2 * h)
    torch.testing.assert_close(enc.params.grad, numeric, rtol=1e-6, atol=1e-8)
    assert (enc.params.grad != 0).any()


def test_input_gradient_matches_finite_differences():
    enc = random_table(HashGridEncoding(**SMALL).double())
    x = torch.rand(15, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 0.9 + 0.05
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: enc(p), (x,), eps=1e-7, atol=1e-5, rtol=1e-4)


def test_grad_scale_multiplies_table_gradient_only():
    torch.manual_seed(0)
    enc = HashGridEncoding(**SMALL)
    x = torch.rand(64, 3, requires_grad=True)
    grads = []
    for scale in (1.0, 128.0):
        enc.grad_scale = scale
        enc.params.grad, x.grad = None, None
        enc(x).square().sum().backward()
        grads.append((enc.params.grad.clone(), x.grad.clone()))
    torch.testing.assert_close(grads[1][0], 128.0 * grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])
    assert HashGridEncoding(grad_scale=128.0, **SMALL).grad_scale == 128.0


def test_deterministic():
    torch.manual_seed(3)
    a = HashGridEncoding(**SMALL)
    torch.manual_seed(3)
    b = HashGridEncoding(**SMALL)
    assert torch.equal(a.params, b.params)
    x = torch.rand(1000, 3)
    assert torch.equal(a(x), a(x)) and torch.equal(a(x), b(x))
    a(x).sum().backward()
    first = a.params.grad.clone()
    a.params.grad = None
    a(x).sum().backward()
    torch.testing.assert_close(a.params.grad, first, rtol=0, atol=1e-6)  # scatter order may vary


def test_backend_selection():
    with pytest.raises(ValueError, match="backend"):
        HashGridEncoding(backend="cuda")
    enc = HashGridEncoding(backend="auto", **SMALL)
    assert enc(torch.rand(3, 3)).shape == (3, 12)  # CPU input -> torch backend
    if tcnn_available():
        with pytest.raises(ValueError, match="backend='torch'"):
            HashGridEncoding(backend="tcnn", **SMALL)(torch.rand(3, 3))
    else:
        with pytest.raises(ImportError, match="pip install") as err:
            HashGridEncoding(backend="tcnn", **SMALL)
        assert "backend='torch'" in str(err.value)


def test_state_dict_holds_only_the_table():
    enc = HashGridEncoding(**SMALL)
    assert list(enc.state_dict()) == ["params"]
    other = HashGridEncoding(**SMALL)
    other.load_state_dict(enc.state_dict())
    x = torch.rand(10, 3)
    assert torch.equal(other(x), enc(x))


def test_fits_a_3d_function():
    """A hash grid and a linear head fit a smooth 3D function in 200 Adam steps (~2 s on 2 CPU cores)."""
    torch.manual_seed(0)
    enc = HashGridEncoding(n_levels=8, log2_hashmap_size=14, base_resolution=4, max_resolution=64)
    head = torch.nn.Linear(enc.n_output_dims, 1)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-2)

    def target(x):
        wave = torch.sin(2 * math.pi * x[:, 0]) * torch.cos(2 * math.pi * x[:, 1])
        return wave + 0.5 * torch.sin(4 * math.pi * x[:, 2])

    for _ in range(200):
        x = torch.rand(2048, 3)
        loss = (head(enc(x))[:, 0] - target(x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.rand(8192, 3)
    with torch.no_grad():
        mse = (head(enc(x))[:, 0] - target(x)).square().mean().item()
    assert mse < 1e-3, mse  # the target's variance is 0.375; ~1e-4 is typical


@pytest.mark.gpu
def test_cuda_torch_backend_matches_cpu():
    enc = random_table(HashGridEncoding(backend="torch"))
    x = torch.rand(4096, 3)
    out_cpu = enc(x)
    out_cpu.square().sum().backward()
    grad_cpu = enc.params.grad.clone()
    enc = enc.to("cuda")
    enc.params.grad = None
    out_gpu = enc(x.cuda())
    out_gpu.square().sum().backward()
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.params.grad.cpu(), grad_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_tcnn_backend_matches_torch_backend():
    if not tcnn_available():
        pytest.skip("tinycudann is not installed")
    enc = random_table(HashGridEncoding(backend="torch")).to("cuda")
    x = torch.rand(10000, 3, device="cuda")
    outs, grads = [], []
    for backend in ("torch", "tcnn"):
        enc.backend = backend
        enc.params.grad = None
        out = enc(x)
        (out * torch.linspace(-1, 1, out.shape[1], device="cuda")).sum().backward()
        outs.append(out)
        grads.append(enc.params.grad.clone())
    # Same layout, hash and offsets: what differs is float32 rounding of the lattice position
    # (tiny-cuda-nn uses a fused multiply-add), ~1e-4 cells at the finest level. A wrong index
    # would show as O(1) differences.
    assert (outs[0] - outs[1]).abs().max() < 1e-2
    assert (outs[0] - outs[1]).abs().mean() < 1e-4
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=2e-3)
