"""HashGridEncoding backend='triton': values and gradients equal the torch backend's.

Each comparison runs twice: in Triton's interpreter on CPU tensors (numpy) and, marked `gpu`,
compiled on CUDA tensors. Triton picks interpreter or compiler once per process, when it is first
imported (TRITON_INTERPRET=1 in the environment then), so the interpreter cases run in-process
only under `TRITON_INTERPRET=1 pytest ...`; otherwise `test_cases_in_triton_interpreter` runs them
in a child process. Without the `triton` package all of them are skipped. Tests taking the `launch`
fixture run once per launch layout of the kernel (`levels`, `points`).
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from recon.materials import hash_grid
from recon.materials.hash_grid import HashGridEncoding
from recon.materials.mlp_texture import MLPTexture3D

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the triton package is not installed")

SMALL = dict(n_levels=6, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, max_resolution=64)
NVDIFFREC = dict(n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=16, max_resolution=4096)
CONFIGS = {
    "small-3d": dict(n_input_dims=3, **SMALL),
    "small-2d": dict(n_input_dims=2, **SMALL),
    "small-1d": dict(n_input_dims=1, **{**SMALL, "log2_hashmap_size": 5}),
    "3-features": dict(n_input_dims=3, **{**SMALL, "n_features_per_level": 3}),
    "1-feature": dict(n_input_dims=3, **{**SMALL, "n_features_per_level": 1}),
    "nvdiffrec": dict(n_input_dims=3, **NVDIFFREC),
}


def triton_interprets() -> bool:
    """Whether this process runs Triton kernels in the interpreter (imports triton)."""
    from recon.materials.hash_grid_triton import interpreting

    return interpreting()


@pytest.fixture(
    params=[
        pytest.param("interpreter", marks=needs_triton),
        pytest.param("cuda", marks=[needs_triton, pytest.mark.gpu]),
    ]
)
def device(request) -> torch.device:
    """CPU tensors through Triton's interpreter, or CUDA tensors through compiled kernels."""
    if request.param == "interpreter":
        if not triton_interprets():
            pytest.skip("triton runs compiled kernels in this process; test_cases_in_triton_interpreter runs this case")
        return torch.device("cpu")
    if triton_interprets():
        pytest.skip("triton runs its interpreter in this process (TRITON_INTERPRET=1): no compiled kernels")
    return torch.device("cuda")


@pytest.fixture(params=["levels", "points"])
def launch(request, monkeypatch) -> str:
    """The kernel's launch layout for both passes (hash_grid_triton.LAUNCH_LAYOUT), for this test (after `device`,
    which skips first where triton cannot run the case)."""
    from recon.materials import hash_grid_triton

    for phase in ("forward", "backward"):
        monkeypatch.setitem(hash_grid_triton.LAUNCH_LAYOUT, phase, request.param)
    return request.param


@needs_triton
def test_cases_in_triton_interpreter(in_triton_interpreter):
    """Every `interpreter` case of this module, in a child process that imports triton with TRITON_INTERPRET=1."""
    if triton_interprets():
        pytest.skip("this process interprets: the interpreter cases run in it directly")
    out = in_triton_interpreter(args=["-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider",
                                      "-k", "interpreter"], timeout=900)
    assert " passed" in out and "skipped" in out  # this test itself skips in the child


def random_table(enc: HashGridEncoding, seed: int = 0) -> HashGridEncoding:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        enc.params.copy_(torch.randn(enc.params.shape, generator=gen, dtype=enc.params.dtype))
    return enc


def probe_points(enc: HashGridEncoding, n_random: int, seed: int = 1) -> torch.Tensor:
    """Random points plus the hard cases: cube corners and faces, clamped points, and points on
    the vertex planes of every level (lattice coordinate k, i.e. x = (k - 1/2) / s_l)."""
    n_dims = enc.n_input_dims
    gen = torch.Generator().manual_seed(seed)
    x = [torch.rand(n_random, n_dims, generator=gen)]
    corners = torch.tensor([[(c >> d) & 1 for d in range(n_dims)] for c in range(2**n_dims)], dtype=torch.float32)
    x += [corners, torch.full((1, n_dims), 0.5), torch.tensor([[-0.25, 1.5, 0.5][:n_dims]])]
    for level in range(enc.n_levels):
        scale = float(enc.level_scale[level])
        vertex = torch.randint(1, int(enc.level_resolution[level]), (24, n_dims), generator=gen)
        on_planes = (vertex.double() - 0.5) / scale
        mixed = torch.rand(24, n_dims, generator=gen, dtype=torch.float64)
        mixed[:, 0] = on_planes[:, 0]  # one coordinate on a plane, the others anywhere
        x += [on_planes.float(), mixed.float()]
    return torch.cat(x)


def encode_and_backprop(enc: HashGridEncoding, backend: str, x: torch.Tensor, weight: torch.Tensor):
    """Output, table gradient and point gradient of sum(weight * enc(x)) with the given backend."""
    enc.backend = backend
    enc.params.grad = None
    x = x.detach().clone().requires_grad_(True)
    out = enc(x)
    (out * weight).sum().backward()
    return out.detach(), enc.params.grad.clone(), x.grad.clone()


def assert_sums_close(value: torch.Tensor, reference: torch.Tensor, magnitude: torch.Tensor, eps: float) -> None:
    """|value - reference| <= eps + 10 eps * magnitude, magnitude = the sum of |terms| of each entry."""
    assert reference.abs().max() > 0
    error = (value - reference).abs()
    excess = (error - 10 * eps * magnitude).max().item()
    assert excess <= eps, f"sums differ by up to {error.max().item():.3g}, beyond their rounding bound"


def assert_same_gradients(enc, x, weight, result, reference):
    """Atomic adds reorder the table's sums: bound the difference by the sum of |terms| per entry."""
    out, grad_table, grad_x = result
    ref_out, ref_grad_table, ref_grad_x = reference
    eps = 1e-6 if enc.params.dtype == torch.float32 else 1e-13
    torch.testing.assert_close(out, ref_out, rtol=10 * eps, atol=eps)
    _, grad_magnitude, _ = encode_and_backprop(enc, "torch", x, weight.abs())  # sum_i w_i |g_i| per entry
    assert_sums_close(grad_table, ref_grad_table, grad_magnitude, eps)
    # The point gradient sums levels of scale up to max_resolution: compare relative to its magnitude.
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=10 * eps, atol=10 * eps * ref_grad_x.abs().max().item())


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_matches_torch_backend(config, device, launch):
    enc = random_table(HashGridEncoding(backend="torch", **config)).to(device)
    assert 0 < enc.n_dense_levels < enc.n_levels  # both index kinds are exercised
    x = probe_points(enc, n_random=2000).to(device)
    weight = torch.randn(x.shape[0], enc.n_output_dims, generator=torch.Generator().manual_seed(2)).to(device)
    reference = encode_and_backprop(enc, "torch", x, weight)
    result = encode_and_backprop(enc, "triton", x, weight)
    assert result[0].shape == (x.shape[0], enc.n_output_dims) and result[0].dtype == torch.float32
    assert_same_gradients(enc, x, weight, result, reference)


def set_launch_layout(monkeypatch, forward: str, backward: str) -> None:
    from recon.materials import hash_grid_triton

    monkeypatch.setitem(hash_grid_triton.LAUNCH_LAYOUT, "forward", forward)
    monkeypatch.setitem(hash_grid_triton.LAUNCH_LAYOUT, "backward", backward)


@pytest.mark.parametrize("n_input_dims", [1, 2, 3])
def test_launch_layouts_agree(n_input_dims, device, monkeypatch):
    """Every forward / backward pair of launch layouts: the grid each pass asks for, the same output
    (bit for bit: same operations per level), table gradient (up to the order of the atomic adds)
    and point gradient (up to the order of the level sum), with and without a point gradient."""
    from recon.materials import hash_grid_triton

    config = CONFIGS[{1: "small-1d", 2: "small-2d", 3: "small-3d"}[n_input_dims]]
    enc = random_table(HashGridEncoding(backend="triton", **config)).to(device)
    x = probe_points(enc, n_random=600).to(device)
    assert x.shape[0] % hash_grid_triton.BLOCK_INTERPRETER and x.shape[0] % hash_grid_triton.BLOCK_POINTS
    weight = torch.randn(x.shape[0], enc.n_output_dims, generator=torch.Generator().manual_seed(9)).to(device)
    grids = []
    kernel, interpreting = hash_grid_triton._hash_grid_kernel, hash_grid_triton.interpreting()

    class RecordGrid:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(hash_grid_triton, "interpreting", lambda: interpreting)
    monkeypatch.setattr(hash_grid_triton, "_hash_grid_kernel", RecordGrid())
    results = {}
    for forward in hash_grid_triton.LAUNCH_LAYOUTS:
        for backward in hash_grid_triton.LAUNCH_LAYOUTS:
            set_launch_layout(monkeypatch, forward, backward)
            grids.clear()
            results[forward, backward] = encode_and_backprop(enc, "triton", x, weight)
            enc.params.grad = None
            (enc(x) * weight).sum().backward()  # points without gradient
            results[forward, backward] += (enc.params.grad.clone(),)
            assert [len(grid) for grid in grids] == [1 if layout == "points" else 2 for layout in (forward, backward)] * 2
            assert all(grid[1] == enc.n_levels for grid in grids if len(grid) == 2)
    _, magnitude, _ = encode_and_backprop(enc, "torch", x, weight.abs())
    out, grad_table, grad_x, grad_table_only = results["levels", "levels"]
    assert grad_x.abs().max() > 0 and (grad_x == 0).any()  # some points outside the cube
    for layouts, result in results.items():
        torch.testing.assert_close(result[0], out, rtol=0, atol=0, msg=f"{layouts}")
        assert_sums_close(result[1], grad_table, magnitude, 1e-6)
        assert_sums_close(result[3], grad_table, magnitude, 1e-6)
        torch.testing.assert_close(result[2], grad_x, rtol=1e-6, atol=1e-6 * grad_x.abs().max().item(), msg=f"{layouts}")


@needs_triton
def test_unknown_launch_layout_is_refused(monkeypatch):
    from recon.materials import hash_grid_triton

    enc = HashGridEncoding(backend="torch", **SMALL)
    monkeypatch.setitem(hash_grid_triton.LAUNCH_LAYOUT, "forward", "tiles")
    with pytest.raises(ValueError, match="launch layout 'tiles'"):
        hash_grid_triton.hash_grid_encode(
            torch.rand(3, 3), enc.params, enc.level_scale, enc.level_multiplier, enc.level_size, enc.level_offset,
            enc.n_dense_levels, enc.n_features_per_level,
        )


def test_encoding_triton_layout_overrides_the_module_setting(device, monkeypatch):
    """HashGridEncoding(triton_layout=...) (model.material.encoding.triton_layout) picks each pass's launch layout
    whatever LAUNCH_LAYOUT says, with the same values; a bad name is refused with the setting's name."""
    from recon.materials import hash_grid_triton

    grids = []
    kernel, interpreting = hash_grid_triton._hash_grid_kernel, hash_grid_triton.interpreting()

    class RecordGrid:
        def __getitem__(self, grid):
            grids.append(len(grid))
            return kernel[grid]

    monkeypatch.setattr(hash_grid_triton, "interpreting", lambda: interpreting)
    monkeypatch.setattr(hash_grid_triton, "_hash_grid_kernel", RecordGrid())
    x = torch.rand(300, 3, generator=torch.Generator().manual_seed(0)).to(device)
    outs = []
    for layout, expected in (("points/levels", [1, 2]), ("levels", [2, 2]), (None, [2, 2])):
        enc = random_table(HashGridEncoding(backend="triton", triton_layout=layout, **SMALL)).to(device)
        grids.clear()
        out = enc(x)
        out.sum().backward()
        assert grids == expected, (layout, grids)
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="model.material.encoding.triton_layout='tiles'"):
        HashGridEncoding(backend="torch", triton_layout="tiles", **SMALL)


@pytest.mark.parametrize("n_input_dims", [2, 3])
def test_float64_matches_torch_backend(n_input_dims, device, launch):
    enc = random_table(HashGridEncoding(backend="torch", n_input_dims=n_input_dims, **SMALL).double()).to(device)
    x = probe_points(enc, n_random=1000).to(device)  # float32 points, float64 table: cast like torch
    weight = torch.randn(x.shape[0], enc.n_output_dims, dtype=torch.float64).to(device)
    reference = encode_and_backprop(enc, "torch", x, weight)
    result = encode_and_backprop(enc, "triton", x, weight)
    assert result[0].dtype == torch.float64 and result[2].dtype == torch.float32
    assert_same_gradients(enc, x, weight, result, reference)


def test_grad_scale_scales_table_gradient_only(device, launch):
    enc = random_table(HashGridEncoding(backend="torch", grad_scale=128.0, **SMALL)).to(device)
    x = torch.rand(700, 3, generator=torch.Generator().manual_seed(3)).to(device)
    weight = torch.randn(700, enc.n_output_dims, generator=torch.Generator().manual_seed(4)).to(device)
    reference = encode_and_backprop(enc, "torch", x, weight)
    result = encode_and_backprop(enc, "triton", x, weight)
    assert_same_gradients(enc, x, weight, result, reference)
    enc.grad_scale = 1.0
    unscaled = encode_and_backprop(enc, "triton", x, weight)
    _, magnitude, _ = encode_and_backprop(enc, "torch", x, weight.abs())
    assert_sums_close(result[1], 128.0 * unscaled[1], 128.0 * magnitude, 1e-6)
    torch.testing.assert_close(result[2], unscaled[2], rtol=1e-5, atol=1e-5 * unscaled[2].abs().max().item())


def test_gradients_match_finite_differences(device, launch):
    """gradcheck (float64) of the table and point gradients on a tiny grid with dense and hashed levels."""
    enc = random_table(HashGridEncoding(n_levels=3, log2_hashmap_size=6, base_resolution=2, max_resolution=8)).double()
    enc = enc.to(device)
    assert enc.level_hashed.tolist() == [False, False, True]
    from recon.materials.hash_grid_triton import hash_grid_encode

    def encode(x, table):
        return hash_grid_encode(
            x, table, enc.level_scale, enc.level_multiplier, enc.level_size, enc.level_offset,
            enc.n_dense_levels, enc.n_features_per_level,
        )

    gen = torch.Generator().manual_seed(5)
    x = (torch.rand(24, 3, generator=gen, dtype=torch.float64) * 0.9 + 0.05).to(device).requires_grad_(True)
    table = enc.params.detach().clone().requires_grad_(True)
    # Fast mode compares u^T J v for random u, v over all table entries and points: one wrong row or
    # weight shows up. (The full Jacobian takes minutes in the interpreter.)
    assert torch.autograd.gradcheck(encode, (x, table), eps=1e-7, atol=1e-6, rtol=1e-5, fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: encode(x.detach(), t), (table,), eps=1e-6, atol=1e-9, fast_mode=True)


def test_points_without_gradient_and_empty_input(device, launch):
    enc = random_table(HashGridEncoding(backend="triton", **SMALL)).to(device)
    x = torch.rand(300, 3, dtype=torch.float64).to(device)  # float64 points, float32 table
    out = enc(x)
    out.sum().backward()
    enc.backend = "torch"
    torch.testing.assert_close(out.detach(), enc(x).detach(), rtol=1e-5, atol=1e-6)
    assert out.dtype == torch.float32 and enc.params.grad.abs().sum() > 0
    enc.backend = "triton"
    empty = torch.zeros(0, 3, device=device, requires_grad=True)
    out = enc(empty)
    assert out.shape == (0, enc.n_output_dims)
    out.sum().backward()
    assert empty.grad.shape == (0, 3)
    with torch.no_grad():
        strided = torch.rand(400, 6, device=device)[:, ::2]  # a non-contiguous view
        torch.testing.assert_close(enc(strided), enc(strided.contiguous()), rtol=0, atol=0)


def test_mlp_texture_trains_the_same(device):
    """The material network's loss gradients (table, MLP and world positions) agree between backends."""
    torch.manual_seed(0)
    aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    material = MLPTexture3D(aabb, encoding={**SMALL, "grad_scale": 128.0}, backend="torch").to(device)
    random_table(material.encoder)
    points = (torch.rand(500, 3, generator=torch.Generator().manual_seed(6)) * 2.4 - 1.2).to(device)
    grads = []
    for backend in ("torch", "triton"):
        material.encoder.backend = backend
        material.zero_grad()
        p = points.clone().requires_grad_(True)
        material.sample(p).square().sum().backward()
        grads.append([p.grad] + [q.grad.clone() for q in material.parameters()])
    for ref, got in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@needs_triton
def test_cpu_input_is_refused_without_the_interpreter(monkeypatch):
    from recon.materials import hash_grid_triton

    monkeypatch.setattr(hash_grid_triton, "interpreting", lambda: False)
    enc = HashGridEncoding(backend="triton", **SMALL)
    with pytest.raises(ValueError, match="backend='torch'"):
        enc(torch.rand(3, 3))
    enc.backend = "auto"  # CPU input: the torch backend, triton is never asked
    assert enc(torch.rand(3, 3)).shape == (3, enc.n_output_dims)
    with pytest.raises(ValueError, match="n_input_dims <= 3"):
        HashGridEncoding(n_input_dims=4, backend="triton", **SMALL)


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(hash_grid, "_triton_cache", {"module": None, "error": ImportError("No module named 'triton'")})
    assert not hash_grid.triton_available()
    with pytest.raises(ImportError, match="pip install triton") as err:
        HashGridEncoding(backend="triton", **SMALL)
    assert "backend='torch'" in str(err.value)
    enc = HashGridEncoding(backend="auto", **SMALL)  # auto falls back to torch
    assert enc(torch.rand(5, 3)).shape == (5, enc.n_output_dims)


@needs_triton
@pytest.mark.gpu
def test_auto_picks_triton_on_cuda(monkeypatch):
    monkeypatch.setattr(hash_grid, "tcnn_available", lambda: False)
    enc = HashGridEncoding(backend="auto", **SMALL).to("cuda")
    x = torch.rand(10, 3, device="cuda")
    assert enc._use_triton(x) and not enc._use_triton(x.cpu())
    assert not HashGridEncoding(n_input_dims=4, backend="auto", **SMALL).to("cuda")._use_triton(
        torch.rand(10, 4, device="cuda")
    )


@needs_triton
@pytest.mark.gpu
def test_large_batch_matches_torch_backend(launch):
    """Many blocks per level, a ragged last block, and nvdiffrec's full-size table (on CUDA)."""
    if triton_interprets():
        pytest.skip("triton runs its interpreter in this process (TRITON_INTERPRET=1): no compiled kernels")
    enc = random_table(HashGridEncoding(backend="torch", **NVDIFFREC)).to("cuda")
    x = torch.rand(1_000_003, 3, generator=torch.Generator().manual_seed(7)).to("cuda")
    weight = torch.randn(x.shape[0], enc.n_output_dims, generator=torch.Generator().manual_seed(8)).to("cuda")
    reference = encode_and_backprop(enc, "torch", x, weight)
    result = encode_and_backprop(enc, "triton", x, weight)
    assert_same_gradients(enc, x, weight, result, reference)


def test_benchmark_runs_on_cpu(tmp_path, capsys):
    """bench/hash_grid.py: the torch backend on a CPU at tiny sizes, a Markdown row and a JSON record per case."""
    spec = importlib.util.spec_from_file_location("bench_hash_grid", Path(__file__).parents[2] / "bench" / "hash_grid.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "hash_grid.json"
    bench.main(["--device", "cpu", "--n", "300", "--repeats", "2", "--warmup", "1", "--log2-hashmap-size", "12",
                "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["config"]["log2_hashmap_size"] == 12 and result["config"]["n_levels"] == 16
    cases = {(r["points"], r["input_grad"], r["backend"]) for r in result["results"]}
    assert cases == {(p, g, "torch") for p in ("uniform", "surface") for g in (False, True)}
    for row in result["results"]:
        assert 0 < row["forward_ms"] and 0 < row["backward_ms"] and row["max_abs_diff_vs_torch"] == 0.0
    assert capsys.readouterr().out.count("| 300 |") == 4


def test_benchmark_times_launch_layouts(device, tmp_path, capsys):
    """bench/hash_grid.py --triton-layouts: one triton row per FORWARD/BACKWARD pair, outputs equal to the torch backend's."""
    spec = importlib.util.spec_from_file_location("bench_hash_grid", Path(__file__).parents[2] / "bench" / "hash_grid.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "hash_grid.json"
    bench.main(["--device", device.type, "--n", "300", "--repeats", "1", "--warmup", "0", "--log2-hashmap-size", "12",
                "--backends", "torch", "triton", "--triton-layouts", "levels", "points/levels", "--points", "surface",
                "--input-grad", "yes", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(r["backend"], r["launch_layout"]) for r in rows] == [
        ("torch", None), ("triton", "levels/levels"), ("triton", "points/levels")]
    for row in rows:
        assert 0 < row["forward_ms"] and 0 < row["backward_ms"] and row["max_abs_diff_vs_torch"] < 1e-5
    printed = capsys.readouterr().out
    assert "| triton levels/levels |" in printed and "| triton points/levels |" in printed
    with pytest.raises(SystemExit):
        bench.parse_args(["--triton-layouts", "levels/tiles"])


def scanline_points(n: int, n_dims: int = 3) -> torch.Tensor:
    """Points in scanline order over a sphere (as covered pixels come): runs of neighbours share cells."""
    import math

    side = math.ceil(math.sqrt(n))
    i = torch.arange(n, dtype=torch.float64)
    theta, phi = (i // side + 0.5) / side * math.pi, (i % side + 0.5) / side * 2 * math.pi
    unit = torch.stack([theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos()], dim=-1)
    return (0.5 + 0.35 * unit).float()[:, :n_dims]


@pytest.mark.parametrize("config", ["small-3d", "small-2d", "3-features", "1-feature", "float64"])
def test_run_sums_match_torch_backend(config, device, launch):
    """run_levels (every level here): the table gradient summed over runs of points in one cell corner before its
    atomic add equals the torch backend's; points in scanline order make long runs, random ones single points, and
    the last block is partial. Triton's interpreter scans slowly (a Python loop): there one case, one block."""
    interpreter = device.type == "cpu"
    if interpreter and (config != "small-3d" or launch != "levels"):
        pytest.skip("one case in the interpreter (its scan is slow); all of them compiled on CUDA")
    dtype = torch.float64 if config == "float64" else torch.float32
    enc = HashGridEncoding(backend="torch", **CONFIGS["small-3d" if config == "float64" else config])
    enc = random_table(enc.to(dtype)).to(device)
    enc.run_levels = enc.n_levels
    x = torch.cat([scanline_points(300 if interpreter else 2500, enc.n_input_dims),
                   probe_points(enc, n_random=40 if interpreter else 300)]).to(device)
    assert not interpreter or x.shape[0] < 1024  # one block (BLOCK_INTERPRETER)
    weight = torch.randn(x.shape[0], enc.n_output_dims, generator=torch.Generator().manual_seed(5), dtype=dtype)
    weight = weight.to(device)
    reference = encode_and_backprop(enc, "torch", x, weight)
    result = encode_and_backprop(enc, "triton", x, weight)
    assert_same_gradients(enc, x, weight, result, reference)


def test_run_levels_out_of_range_is_refused():
    with pytest.raises(ValueError, match="run_levels=7 must be in 0..n_levels=6"):
        HashGridEncoding(backend="torch", run_levels=7, **SMALL)


@needs_triton
@pytest.mark.parametrize("supported", [True, False])
def test_run_sums_are_compiled_in_only_where_they_run(supported, monkeypatch):
    """The backward compiles the run sums in (constexpr RUNS) only when some level uses them and Triton has
    `tl.gather` (3.2 on); with an older Triton every level adds point by point."""
    from recon.materials import hash_grid_triton

    launches = []

    class Record:
        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append((meta["FORWARD"], args[-1], meta["RUNS"]))  # n_runs last

    monkeypatch.setattr(hash_grid_triton, "_hash_grid_kernel", Record())
    monkeypatch.setattr(hash_grid_triton, "interpreting", lambda: True)  # CPU tensors, no device context
    monkeypatch.setattr(hash_grid_triton, "RUNS_SUPPORTED", supported)
    enc = HashGridEncoding(backend="torch", **SMALL)
    for run_levels in (4, 0):
        x = torch.rand(10, 3, requires_grad=True)
        out = hash_grid_triton.hash_grid_encode(
            x, enc.params, enc.level_scale, enc.level_multiplier, enc.level_size, enc.level_offset,
            enc.n_dense_levels, enc.n_features_per_level, run_levels=run_levels)
        out.backward(torch.ones_like(out))
    backward = [(n_runs, runs) for forward, n_runs, runs in launches if not forward]
    assert backward == [(4, True), (0, False)] if supported else [(0, False), (0, False)]
    assert not any(runs for forward, _, runs in launches if forward)


def _masked_encode(enc: HashGridEncoding, backend: str, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor):
    """Output, table gradient and point gradient of sum(weight * enc(x, mask)) with the given backend."""
    enc.backend = backend
    enc.params.grad = None
    x = x.detach().clone().requires_grad_(True)
    out = enc(x, mask)
    (out * weight).sum().backward()
    return out.detach(), enc.params.grad.clone(), x.grad.clone()


@pytest.mark.parametrize("runs", [False, True], ids=["atomic", "runs"])
def test_row_mask_skips_rows(runs, device, launch):
    """A row mask (the padding rows of a fixed-size batch left out): masked rows are zero and get no gradient, the
    other rows and the table gradient are those of the kept rows alone, as the torch backend's zeroed rows give;
    the same with run sums, where masked points break the runs of the points around them."""
    interpreter = device.type == "cpu"
    if interpreter and runs and launch != "levels":
        pytest.skip("one run-sum case in the interpreter (its scan is slow)")
    enc = random_table(HashGridEncoding(backend="torch", **CONFIGS["small-3d"])).to(device)
    enc.run_levels = enc.n_levels if runs else 0
    x = torch.cat([scanline_points(300 if interpreter else 2500, 3), probe_points(enc, n_random=40)]).to(device)
    gen = torch.Generator().manual_seed(7)
    mask = (torch.rand(x.shape[0], generator=gen) < 0.7).to(device)
    mask[-100:] = False  # a tail of padding rows, as a fixed-size batch has
    weight = torch.randn(x.shape[0], enc.n_output_dims, generator=gen).to(device)
    reference = _masked_encode(enc, "torch", x, weight, mask)
    result = _masked_encode(enc, "triton", x, weight, mask)
    out, grad_table, grad_x = result
    assert (out[~mask] == 0).all() and (grad_x[~mask] == 0).all() and out[mask].abs().sum() > 0
    assert_same_gradients(enc, x, weight * mask[:, None], result, reference)


def test_row_mask_must_match_the_points():
    enc = HashGridEncoding(n_input_dims=3, backend="torch", **SMALL)
    x = torch.rand(10, 3)
    with pytest.raises(ValueError, match=r"row_mask must be a bool tensor \[10\]"):
        enc(x, torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="row_mask must be a bool tensor"):
        enc(x, torch.ones(10))
    kept = torch.arange(10) % 3 == 0
    torch.testing.assert_close(enc(x, kept), enc(x) * kept[:, None])
