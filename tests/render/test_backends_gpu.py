"""The torch and nvdiffrast backends agree on CUDA (skipped without a GPU; needs diffrp-nvdiffrast).

Tolerances, all in float32 on a seeded bumpy sphere (a few hundred triangles, two perspective views):
- coverage masks agree on > 99% of pixels (edges exactly through pixel centres may go either way:
  nvdiffrast snaps vertices to 1/16 pixel, the torch backend does not);
- on pixels covered by the same triangle in both (> 95% of covered pixels): u, v, z/w and
  interpolated attributes within 1e-4, rast_db and attribute derivatives within 1e-4 + 1e-3 * |value|;
- antialiased images within 1e-4 where a pixel and its four neighbours agree on triangle ids, and
  mean absolute difference < 1e-3 over the whole image;
- gradients of a fixed loss w.r.t. pos_clip and attr: cosine similarity > 0.99, relative norm
  difference < 5%;
- texture: linear within 1e-5, linear-mipmap-linear within 1e-4, texture/uv gradients cosine > 0.999.
"""
import math

import pytest
import torch

from recon.render import look_at, make_rasterizer, mvp_from_c2w, perspective, transform_pos

pytestmark = pytest.mark.gpu


def bumpy_sphere(n_lat: int = 12, n_lon: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """verts [Nv,3] float32 and faces [Nf,3] int64 of a UV sphere with seeded radial noise."""
    verts = [[0.0, 1.0, 0.0]]
    for i in range(1, n_lat):
        theta = math.pi * i / n_lat
        for j in range(n_lon):
            phi = 2 * math.pi * j / n_lon
            verts.append([math.sin(theta) * math.cos(phi), math.cos(theta), math.sin(theta) * math.sin(phi)])
    verts.append([0.0, -1.0, 0.0])

    def ring(i: int, j: int) -> int:
        return 1 + (i - 1) * n_lon + j % n_lon

    faces = [[0, ring(1, j + 1), ring(1, j)] for j in range(n_lon)]
    for i in range(1, n_lat - 1):
        for j in range(n_lon):
            a, b, c, d = ring(i, j), ring(i, j + 1), ring(i + 1, j), ring(i + 1, j + 1)
            faces += [[a, b, d], [a, d, c]]
    last = len(verts) - 1
    faces += [[last, ring(n_lat - 1, j), ring(n_lat - 1, j + 1)] for j in range(n_lon)]
    gen = torch.Generator().manual_seed(seed)
    v = torch.tensor(verts)
    v = v * (1.0 + 0.08 * torch.rand(v.shape[0], 1, generator=gen))
    return v, torch.tensor(faces)


@pytest.fixture(scope="module")
def backends():
    pytest.importorskip("nvdiffrast")
    return make_rasterizer("torch"), make_rasterizer("nvdiffrast", "cuda")


def scene(device: str = "cuda"):
    verts, faces = bumpy_sphere()
    eyes = torch.tensor([[0.3, 0.6, 2.8], [-2.2, -0.8, 1.5]])
    mvp = mvp_from_c2w(look_at(eyes), perspective(0.9, 1.0, 0.1, 100.0))
    gen = torch.Generator().manual_seed(1)
    attr = torch.rand(verts.shape[0], 3, generator=gen)
    return transform_pos(mvp, verts).to(device), faces.to(device), attr.to(device)


def cosine_and_rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm())), float((a.norm() - b.norm()).abs() / b.norm())


def test_auto_picks_nvdiffrast_on_cuda(backends):
    assert make_rasterizer("auto", "cuda").name == "nvdiffrast"


@pytest.mark.parametrize("res", [64, 256])
def test_rasterize_and_interpolate_agree(backends, res):
    pos, faces, attr = scene()
    results = []
    for backend in backends:
        rast, rast_db = backend.rasterize(pos, faces, (res, res))
        out, out_da = backend.interpolate(attr, rast, faces, rast_db=rast_db, diff_attrs="all")
        results.append((rast, rast_db, out, out_da))
    (rast_t, db_t, out_t, da_t), (rast_n, db_n, out_n, da_n) = results
    cov_t, cov_n = rast_t[..., 3] > 0, rast_n[..., 3] > 0
    assert (cov_t == cov_n).float().mean() > 0.99
    same = cov_t & cov_n & (rast_t[..., 3] == rast_n[..., 3])
    assert same.sum() > 0.95 * cov_n.sum()
    assert (rast_t[same][:, :3] - rast_n[same][:, :3]).abs().max() < 1e-4
    assert (out_t[same] - out_n[same]).abs().max() < 1e-4
    assert bool(((db_t[same] - db_n[same]).abs() <= 1e-4 + 1e-3 * db_n[same].abs()).all())
    assert bool(((da_t[same] - da_n[same]).abs() <= 1e-4 + 1e-3 * da_n[same].abs()).all())
    assert out_t[~cov_t].abs().max() == 0


@pytest.mark.parametrize("res", [64, 256])
def test_antialias_and_gradients_agree(backends, res):
    pos0, faces, attr0 = scene()
    gen = torch.Generator(device="cuda").manual_seed(2)
    weights = torch.rand(pos0.shape[0], res, res, 3, generator=gen, device="cuda")
    outs, grads, ids = [], [], []
    for backend in backends:
        pos = pos0.clone().requires_grad_()
        attr = attr0.clone().requires_grad_()
        rast, _ = backend.rasterize(pos, faces, (res, res))
        color, _ = backend.interpolate(attr, rast, faces)
        aa = backend.antialias(color, rast, pos, faces)
        (aa * weights).sum().backward()
        outs.append(aa.detach())
        grads.append((pos.grad, attr.grad))
        ids.append(rast[..., 3])
    # Pixels whose own and 4-neighbour triangle ids agree see identical antialiasing work.
    agree = ids[0] == ids[1]
    cross = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], device="cuda", dtype=torch.float32)
    stable = torch.nn.functional.conv2d((~agree)[:, None].float(), cross[None, None], padding=1)[:, 0] == 0
    assert stable.float().mean() > 0.95
    assert (outs[0] - outs[1]).abs()[stable].max() < 1e-4
    assert (outs[0] - outs[1]).abs().mean() < 1e-3
    for g_torch, g_nvdr in zip(*grads):
        cos, rel = cosine_and_rel(g_torch, g_nvdr)
        assert cos > 0.99 and rel < 0.05, (cos, rel)


@pytest.mark.parametrize("boundary", ["wrap", "clamp"])
def test_texture_agrees(backends, boundary):
    gen = torch.Generator(device="cuda").manual_seed(3)
    tex0 = torch.rand(1, 64, 64, 3, generator=gen, device="cuda")
    uv0 = torch.rand(2, 32, 32, 2, generator=gen, device="cuda") * 2.0 - 0.5
    uv_da = torch.rand(2, 32, 32, 4, generator=gen, device="cuda") * 0.2 - 0.1  # up to ~6 texels: levels 0..3
    weights = torch.rand(2, 32, 32, 3, generator=gen, device="cuda")
    for mode, tol in (("linear", 1e-5), ("linear-mipmap-linear", 1e-4)):
        outs, grads = [], []
        for backend in backends:
            tex, uv = tex0.clone().requires_grad_(), uv0.clone().requires_grad_()
            out = backend.texture(tex, uv, uv_da, filter_mode=mode, boundary_mode=boundary)
            (out * weights).sum().backward()
            outs.append(out.detach())
            grads.append((tex.grad, uv.grad))
        assert (outs[0] - outs[1]).abs().max() < tol, mode
        for g_torch, g_nvdr in zip(*grads):
            cos, _ = cosine_and_rel(g_torch, g_nvdr)
            assert cos > 0.999, (mode, cos)


def test_cube_texture_agrees_away_from_face_edges(backends):
    """nvdiffrast's cube-mode trilinear lookup equals recon's PyTorch one where the filter footprint stays inside a
    face (nvdiffrast blends across face edges, the PyTorch lookup clamps): values within 1e-5, gradients w.r.t. each
    level and the mip level with cosine > 0.999."""
    from recon.render.cube import dir_to_cube

    gen = torch.Generator(device="cuda").manual_seed(5)
    levels0 = [torch.rand(6, r, r, 3, generator=gen, device="cuda") for r in (32, 16, 8)]
    dirs = torch.nn.functional.normalize(torch.randn(20000, 3, generator=gen, device="cuda"), dim=-1)
    _, uv = dir_to_cube(dirs)
    inside = ((uv > 1.5 / 8) & (uv < 1 - 1.5 / 8)).all(-1)
    dirs = dirs[inside]
    level0 = torch.rand(dirs.shape[0], generator=gen, device="cuda") * 2.0
    weights = torch.rand(dirs.shape[0], 3, generator=gen, device="cuda")
    outs, grads = [], []
    for backend in backends:
        levels = [lv.clone().requires_grad_() for lv in levels0]
        level = level0.clone().requires_grad_()
        out = backend.cube_texture(levels, dirs, level)
        (out * weights).sum().backward()
        outs.append(out.detach())
        grads.append([lv.grad for lv in levels] + [level.grad])
    assert dirs.shape[0] > 5000
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    for g_torch, g_nvdr in zip(*grads):
        cos, _ = cosine_and_rel(g_torch, g_nvdr)
        assert cos > 0.999, cos
    single = [backend.cube_texture(levels0[:1], dirs) for backend in backends]  # no level: bilinear on level 0
    assert (single[0] - single[1]).abs().max() < 1e-5


def test_cube_texture_agrees_at_edges_and_corners(backends):
    """The torch lookup filters across face edges and corners with nvdiffrast's wrapping tables
    (`recon.render.cube.cube_taps_wrapped`): bilinear values agree everywhere, directions on and near the seams and
    the cube's corners included."""
    pytest.importorskip("nvdiffrast")
    gen = torch.Generator(device="cuda").manual_seed(11)
    cube = torch.rand(6, 16, 16, 3, generator=gen, device="cuda")
    dirs = torch.nn.functional.normalize(torch.randn(200_000, 3, generator=gen, device="cuda"), dim=-1)
    near_edge = dirs.abs().sort(-1).values  # push half of them to within a texel of an edge or a corner
    edge = torch.nn.functional.normalize(dirs.sign() * torch.stack([near_edge[:, 2], near_edge[:, 2] * (1 - 0.05 *
                                         torch.rand(200_000, generator=gen, device="cuda")), near_edge[:, 0]], -1), dim=-1)
    dirs = torch.cat([dirs, edge, torch.nn.functional.normalize(dirs.sign(), dim=-1)])
    outs = [backend.cube_texture([cube], dirs) for backend in backends]
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=0)


def test_strided_cube_lookups_match_the_pixel_order(backends):
    """``cube_stride``: the lookups run reordered and come back in the pixels' order: the same values exactly, the
    same gradients to the mip level and the directions exactly, and to every texel away from the cube's corners up to
    the order of the atomic additions. (At the 4 corner texels of each face, where nvdiffrast spreads one footprint
    over three faces, its gradient depends on which lookups share a warp: `bench/cube_lookup.py` measures that
    against the exact gradient.)"""
    pytest.importorskip("nvdiffrast")
    from recon.render.nvdiffrast import NvdiffrastRasterizer

    gen = torch.Generator(device="cuda").manual_seed(7)
    levels0 = [torch.rand(6, r, r, 3, generator=gen, device="cuda") for r in (64, 32, 16)]
    dirs0 = torch.nn.functional.normalize(torch.randn(50_001, 3, generator=gen, device="cuda"), dim=-1)
    level0 = torch.rand(dirs0.shape[0], generator=gen, device="cuda") * 2.0
    weights = torch.rand(dirs0.shape[0], 3, generator=gen, device="cuda")
    for use_level in (True, False):
        results = []
        for stride in (0, 4096):
            ras = NvdiffrastRasterizer("cuda", cube_stride=stride)
            levels = [lv.clone().requires_grad_() for lv in (levels0 if use_level else levels0[:1])]
            dirs = dirs0.clone().requires_grad_()
            level = level0.clone().requires_grad_() if use_level else None
            out = ras.cube_texture(levels, dirs.reshape(50_001, 1, 3), level.reshape(50_001, 1) if use_level else None)
            assert out.shape == (50_001, 1, 3)
            (out[:, 0] * weights).sum().backward()
            results.append((out.detach(), [lv.grad for lv in levels], [dirs.grad] + ([level.grad] if use_level else [])))
        (out_a, texels_a, pixels_a), (out_b, texels_b, pixels_b) = results
        assert torch.equal(out_a, out_b)
        for a, b in zip(pixels_a, pixels_b):
            assert torch.equal(a, b)
        for a, b in zip(texels_a, texels_b):
            away = torch.ones_like(a, dtype=torch.bool)
            away[:, 0, 0] = away[:, 0, -1] = away[:, -1, 0] = away[:, -1, -1] = False
            torch.testing.assert_close(b[away], a[away], rtol=1e-4, atol=1e-5 * float(a.abs().max()) + 1e-7)
