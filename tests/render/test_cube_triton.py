"""recon.render.cube_triton: nvdiffrast's cube-mode lookups as Triton kernels.

On the CPU the kernels run in Triton's interpreter (a child process) against the PyTorch lookup of
`recon.render.cube` in float64, whose gradients to the directions come from autograd through `dir_to_cube`: values,
the gradients to every level's texels (the cube corners included), to the directions and to the level. On CUDA the
same check runs compiled, and the kernels are compared with nvdiffrast itself.
"""
from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the triton package is not installed")


def reference_lookup(levels, dirs, level):
    """The PyTorch cube lookup (nvdiffrast's wrapping at the seams) with gradients to the directions too."""
    from recon.render.cube import dir_to_cube, sample_cube

    coords = dir_to_cube(dirs)  # not detached: the bilinear weights carry the directions' gradient
    if level is None or len(levels) == 1:
        return sample_cube(levels[0], dirs, coords)
    level = level.clamp(0, len(levels) - 1)
    out = 0
    for k, cube in enumerate(levels):
        out = out + sample_cube(cube, dirs, coords) * (1 - (level - k).abs()).clamp_min(0)[..., None]
    return out


def lookup_inputs(n, res, n_levels, device, seed=0):
    """Texels, directions (a fifth of them near the cube's edges and corners) and fractional levels that run a
    little past both ends of the chain."""
    g = torch.Generator().manual_seed(seed)
    levels = [torch.rand(6, res >> k, res >> k, 3, generator=g, dtype=torch.float64) for k in range(n_levels)]
    dirs = torch.randn(n, 3, generator=g, dtype=torch.float64)
    near = n // 5
    dirs[:near] = torch.randn(near, 3, generator=g, dtype=torch.float64).sign() + 0.03 * torch.randn(
        near, 3, generator=g, dtype=torch.float64)
    level = torch.rand(n, generator=g, dtype=torch.float64) * (n_levels - 0.8) - 0.1 if n_levels > 1 else None
    upstream = torch.rand(n, 3, generator=g, dtype=torch.float64)
    to = dict(device=device)
    return ([lv.to(**to) for lv in levels], dirs.to(**to), None if level is None else level.to(**to), upstream.to(**to))


def off_texel_centres(dirs, levels, margin=1e-4):
    """Directions whose face coordinates are more than ``margin`` texels from a texel centre's row and column on
    every level. The bilinear lookup's derivative jumps there, so float32 and float64 coordinates (or two float32
    formulas) may fall on either side: the directions' gradients are compared on these."""
    from recon.render.cube import dir_to_cube

    _, uv = dir_to_cube(dirs.double())
    keep = torch.ones(dirs.shape[0], dtype=torch.bool, device=dirs.device)
    for lv in levels:
        p = uv * lv.shape[1] - 0.5
        d = (p - p.round()).abs()
        keep &= (d > margin).all(-1)
    return keep


def compare_with_reference(n, res, n_levels, device, runs=True, copies=64):
    """Largest errors of `cube_lookup` (float32) against `reference_lookup` (float64), relative to the largest
    reference value: ``{"value", "tex", "dirs", "level"}`` (the directions' gradient off the texel centres,
    `off_texel_centres`)."""
    from recon.render import cube_triton

    cube_triton.RUNS, cube_triton.MAX_COPIES = runs, copies
    levels, dirs, level, upstream = lookup_inputs(n, res, n_levels, device)
    ref_in = [lv.clone().requires_grad_(True) for lv in levels] + [dirs.clone().requires_grad_(True)]
    got_in = [lv.float().requires_grad_(True) for lv in levels] + [dirs.float().requires_grad_(True)]
    if level is not None:
        ref_in.append(level.clone().requires_grad_(True))
        got_in.append(level.float().requires_grad_(True))
    k = len(levels)
    ref = reference_lookup(ref_in[:k], ref_in[k], ref_in[k + 1] if level is not None else None)
    got = cube_triton.cube_lookup(got_in[:k], got_in[k], got_in[k + 1] if level is not None else None)
    ref_grads = torch.autograd.grad(ref, ref_in, upstream)
    got_grads = torch.autograd.grad(got, got_in, upstream.float())

    def rel(a, b):
        a, b = a.detach().double(), b.detach()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    errors = {"value": rel(got, ref), "tex": max(rel(a, b) for a, b in zip(got_grads[:k], ref_grads[:k])),
              "dirs": rel(got_grads[k][off_texel_centres(dirs, levels)], ref_grads[k][off_texel_centres(dirs, levels)])}
    if level is not None:
        errors["level"] = rel(got_grads[k + 1], ref_grads[k + 1])
    return errors


CHECK = """
import json
out = {f"{levels}-{runs}-{copies}": compare_with_reference(1500, 8, levels, "cpu", runs, copies)
       for levels in (1, 3) for runs, copies in ((True, 64), (False, 64), (True, 1))}
print("errors", json.dumps(out))
"""


@needs_triton
def test_kernels_match_the_torch_lookup_in_triton_interpreter(in_triton_interpreter):
    import json

    out = in_triton_interpreter("import torch\n" + "".join(inspect.getsource(f) for f in (
        reference_lookup, lookup_inputs, off_texel_centres, compare_with_reference)) + CHECK)
    errors = json.loads(out.split("errors", 1)[1])
    assert set(errors) == {f"{levels}-{variant}" for levels in (1, 3) for variant in ("True-64", "False-64", "True-1")}
    for case, err in errors.items():
        assert err["value"] < 1e-6, (case, err)
        assert err["tex"] < 1e-5 and err["dirs"] < 1e-5, (case, err)
        assert err.get("level", 0.0) < 1e-5, (case, err)


@needs_triton
def test_gradient_copies_only_for_small_chains():
    from recon.render.cube_triton import gradient_copies

    assert gradient_copies(6 * 16 * 16 * 3, 64) == 64  # the diffuse cube
    assert gradient_copies(6 * 3 * sum((512 >> k) ** 2 for k in range(6)), 64) == 1  # the specular chain
    assert gradient_copies(6 * 128 * 128 * 3, 64) == 3
    assert gradient_copies(6 * 16 * 16 * 3, 1) == 1


@needs_triton
def test_cube_lookup_names_bad_inputs():
    from recon.render.cube_triton import cube_lookup

    cube = torch.zeros(6, 8, 8, 3)
    with pytest.raises(ValueError, match=r"level 1 is \(6, 8, 8, 3\).*needs \(6, 4, 4, 3\)"):
        cube_lookup([cube, cube], torch.ones(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"directions must be \[\.\.\., 3\]"):
        cube_lookup([cube], torch.ones(4, 2))
    with pytest.raises(ValueError, match="float32 texels"):
        cube_lookup([cube.double()], torch.ones(4, 3))
    with pytest.raises(ValueError, match="3 levels for 4 directions"):
        cube_lookup([cube, torch.zeros(6, 4, 4, 3)], torch.ones(4, 3), torch.zeros(3))


def test_rasterizer_refuses_unknown_or_conflicting_cube_settings():
    from recon.render import make_rasterizer
    from recon.render import nvdiffrast as nvdr_backend

    with pytest.raises(ValueError, match="cube_kernel='cuda'.*triton, nvdiffrast"):
        nvdr_backend.NvdiffrastRasterizer("cuda", cube_kernel="cuda")
    with pytest.raises(ValueError, match="cube_kernel='trition'.*triton, nvdiffrast"):
        make_rasterizer("torch", "cpu", cube_kernel="trition")  # a typo is named on any backend
    with pytest.raises(ValueError, match="cube_stride=4096.*set cube_stride=0"):
        nvdr_backend.NvdiffrastRasterizer("cuda", cube_stride=4096, cube_kernel="triton")


# Compiled, a face coordinate's division rounds within about 2 ulp (1e-7 of the face) instead of exactly, which moves a
# lookup by res x 1e-7 texels: the bound on CUDA scales with the cube's size (nvdiffrast's own reciprocal rounds
# towards zero, so its coordinates differ by as much).
COORD_ROUNDING = 2e-7


@pytest.mark.gpu
@pytest.mark.parametrize("runs, copies", [(True, 64), (False, 64), (True, 1)])
def test_kernels_match_the_torch_lookup_on_cuda(runs, copies):
    tol = COORD_ROUNDING * 64
    try:
        for n_levels in (1, 6):
            err = compare_with_reference(200_000, 64, n_levels, "cuda", runs, copies)
            assert err["value"] < tol and err["tex"] < tol and err["dirs"] < tol, (n_levels, err)
            assert err.get("level", 0.0) < tol, (n_levels, err)
    finally:
        from recon.render import cube_triton

        cube_triton.RUNS, cube_triton.MAX_COPIES = True, 1


@pytest.mark.gpu
def test_kernels_match_nvdiffrast():
    """Against nvdiffrast's cube-mode texture: the same values and gradients to the directions and the level. Texel
    gradients: the kernels' equal the exact ones (float64 `reference_lookup`) everywhere, and nvdiffrast's nearly
    everywhere: its warp-coalesced atomic adds run in divergent branches where a footprint meets a cube corner, and
    its sums at texels near the corners depend on which lookups share a warp (`bench/cube_lookup.py`)."""
    from recon.render.nvdiffrast import NvdiffrastRasterizer

    ndr = NvdiffrastRasterizer("cuda")
    tri = NvdiffrastRasterizer("cuda", cube_kernel="triton")
    for n_levels, res in ((1, 16), (6, 512)):
        levels, dirs, level, upstream = lookup_inputs(300_000, res, n_levels, "cuda", seed=1)
        results = []
        for ras in (ndr, tri):
            ins = [lv.float().requires_grad_(True) for lv in levels] + [dirs.float().requires_grad_(True)]
            lvl = None if level is None else level.float().requires_grad_(True)
            out = ras.cube_texture(ins[:-1], ins[-1], lvl)
            grads = torch.autograd.grad(out, ins + ([lvl] if lvl is not None else []), upstream.float())
            results.append((out, grads))
        (out_n, g_n), (out_t, g_t) = results
        exact_in = [lv.clone().requires_grad_(True) for lv in levels]
        exact = torch.autograd.grad(reference_lookup(exact_in, dirs, level), exact_in, upstream)
        tol = COORD_ROUNDING * res
        torch.testing.assert_close(out_t, out_n, rtol=0, atol=tol)
        keep = off_texel_centres(dirs, levels)
        assert keep.float().mean() > 0.99
        scale = g_n[n_levels].abs().max()
        torch.testing.assert_close(g_t[n_levels][keep] / scale, g_n[n_levels][keep] / scale, rtol=0, atol=tol)
        if level is not None:
            scale = g_n[-1].abs().max()
            torch.testing.assert_close(g_t[-1] / scale, g_n[-1] / scale, rtol=0, atol=tol)
        for k in range(n_levels):
            scale = exact[k].abs().max()
            tex_tol = max(tol, 1e-5)  # float32 sums of a few hundred lookups per texel of a 16² cube: 3.9e-6 seen
            torch.testing.assert_close(g_t[k].double() / scale, exact[k] / scale, rtol=0, atol=tex_tol)
            r = levels[k].shape[1]
            off_corners = torch.ones(6, r, r, dtype=torch.bool, device="cuda")
            off_corners[:, [0, 0, -1, -1], [0, -1, 0, -1]] = False  # nvdiffrast 20-25 % off there
            agree = ((g_t[k] - g_n[k]).abs() / scale <= tex_tol)[off_corners].float().mean()
            assert agree > 0.99, (k, float(agree))


def test_triton_is_the_configured_cube_kernel():
    from recon.fit import compose_config

    cfg = compose_config(["experiment=nerf800"])
    assert cfg.model.render.cube_kernel == "triton" and cfg.model.render.cube_stride == 0
