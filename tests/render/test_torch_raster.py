"""The pure PyTorch rasterizer: coverage, depth, barycentrics, gradients, antialiasing, texturing, cameras."""
import math

import pytest
import torch

from recon.render import TorchRasterizer, look_at, make_rasterizer, mvp_from_c2w, perspective, transform_pos
from recon.render import nvdiffrast as nvdr_backend
from recon.render.torch_raster import edge_opposite_vertices, mip_level

F64 = torch.float64


@pytest.fixture
def rasterizer() -> TorchRasterizer:
    return TorchRasterizer()


def clip(xy, z=None, w=None, dtype=F64) -> torch.Tensor:
    """[1,N,4] clip-space positions from NDC xy [N,2] (z = 0, w = 1 unless given)."""
    xy = torch.as_tensor(xy, dtype=dtype)
    n = xy.shape[0]
    z = torch.zeros(n, dtype=dtype) if z is None else torch.as_tensor(z, dtype=dtype)
    w = torch.ones(n, dtype=dtype) if w is None else torch.as_tensor(w, dtype=dtype)
    return torch.cat([xy * w[:, None], (z * w)[:, None], w[:, None]], dim=1)[None]


def centre(i: int, n: int) -> float:
    """NDC coordinate of pixel centre i of n."""
    return -1.0 + (2 * i + 1) / n


def tilted_quad_scene(dtype=F64):
    """A slightly non-planar quad seen in perspective: (pos_clip [1,4,4], faces [2,3], verts [4,3])."""
    verts = torch.tensor([[-0.6, -0.5, 0.1], [0.55, -0.45, -0.1], [0.5, 0.6, 0.05], [-0.52, 0.48, 0.0]], dtype=dtype)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    # At 24x24 every pixel centre is >= 0.026 pixel from every edge (finite differences stay clear).
    mvp = mvp_from_c2w(look_at(torch.tensor([[0.1, 0.2, 2.6]], dtype=dtype)), perspective(0.9, 1.0, 0.1, 10.0))
    return transform_pos(mvp, verts), faces, verts


# ------------------------------------------------------------------------------------------------ coverage
def test_full_screen_quad_covers_every_pixel(rasterizer):
    pos = clip([[-1, -1], [1, -1], [1, 1], [-1, 1]])
    rast_out, _ = rasterizer.rasterize(pos, torch.tensor([[0, 1, 2], [0, 2, 3]]), (13, 17))
    assert rast_out.shape == (1, 13, 17, 4)
    assert bool((rast_out[..., 3] > 0).all())
    assert set(rast_out[..., 3].unique().tolist()) == {1.0, 2.0}


def test_shared_diagonal_through_pixel_centres_counts_area(rasterizer):
    # Square of 8x8 pixels split along a diagonal that passes exactly through 8 pixel centres.
    pos = clip([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    both, _ = rasterizer.rasterize(pos, faces, (16, 16))
    counts = [int((rasterizer.rasterize(pos, faces[k : k + 1], (16, 16))[0][..., 3] > 0).sum()) for k in range(2)]
    assert int((both[..., 3] > 0).sum()) == 64
    assert sum(counts) == 64  # the 8 centres on the diagonal are drawn exactly once
    assert min(counts) >= 28


def test_mesh_edges_leave_no_cracks_and_no_overlaps(rasterizer):
    # A jittered grid mesh covering the viewport; many vertices sit exactly on pixel centres or pixel
    # edges so that edges pass through pixel centres. Every pixel must be covered exactly once.
    gen = torch.Generator().manual_seed(3)
    n, res = 5, 16
    coords = torch.linspace(-1.3, 1.3, n + 1, dtype=F64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    xy = torch.stack([gx, gy], -1).reshape(-1, 2)
    inner = ((gx.abs() < 1.3) & (gy.abs() < 1.3)).reshape(-1)
    jitter = (torch.rand(xy.shape, generator=gen, dtype=F64) - 0.5) * 0.3
    xy[inner] += jitter[inner]
    snapped = torch.round((xy + 1) * res / 2 * 2) / 2  # half-pixel grid: centres and boundaries
    xy[inner] = (snapped / (res / 2) - 1)[inner]
    faces = []
    for i in range(n):
        for j in range(n):
            a, b, c, d = i * (n + 1) + j, i * (n + 1) + j + 1, (i + 1) * (n + 1) + j, (i + 1) * (n + 1) + j + 1
            faces += [[a, b, d], [a, d, c]] if (i + j) % 2 else [[a, b, c], [b, d, c]]
    faces = torch.tensor(faces)
    pos = clip(xy)
    total = torch.zeros(res, res)
    for k in range(faces.shape[0]):
        total += (rasterizer.rasterize(pos, faces[k : k + 1], (res, res))[0][0, ..., 3] > 0).float()
    assert bool((total == 1).all()), f"coverage counts {total.unique().tolist()}"
    union, _ = rasterizer.rasterize(pos, faces, (res, res))
    assert bool((union[..., 3] > 0).all())


def test_fan_with_spokes_through_pixel_centres_covers_each_pixel_once(rasterizer):
    # Eight triangles around a vertex on a pixel centre, with horizontal, vertical and diagonal spokes
    # along rows, columns and diagonals of pixel centres (every tie case, including the shared vertex).
    res = 16
    c, px = centre(7, res), 2 / res
    spokes = [(4, 0), (4, 4), (0, 4), (-4, 4), (-4, 0), (-4, -4), (0, -4), (4, -4)]  # in pixels
    pos = clip([[c, c]] + [[c + dx * px, c + dy * px] for dx, dy in spokes])
    faces = torch.tensor([[0, 1 + k, 1 + (k + 1) % 8] for k in range(8)])
    total = torch.zeros(res, res)
    for k in range(8):
        total += (rasterizer.rasterize(pos, faces[k : k + 1], (res, res))[0][0, ..., 3] > 0).float()
    union = rasterizer.rasterize(pos, faces, (res, res))[0][0, ..., 3] > 0
    assert total.max() == 1, "a pixel centre was drawn by two triangles"
    assert torch.equal(total > 0, union)
    assert total[7, 7] == 1 and total[7, 9] == 1 and total[9, 7] == 1 and total[9, 9] == 1
    # The fan is the square of 9x9 pixel centres around the vertex; the tie rule gives its centres on
    # the smaller-x and the larger-y sides to the outside: 8x8 remain.
    assert int(union.sum()) == 64
    assert bool(union[3:11, 4:12].all())


def test_nearer_triangle_wins_depth_test(rasterizer):
    xy = [[-0.8, -0.8], [0.8, -0.8], [0.0, 0.8]]
    pos = torch.cat([clip(xy, z=[0.5] * 3), clip(xy, z=[-0.2] * 3)], dim=1)  # second triangle is nearer
    for faces, near_id in (([[0, 1, 2], [3, 4, 5]], 2), ([[3, 4, 5], [0, 1, 2]], 1)):
        faces = torch.tensor(faces)
        out, _ = rasterizer.rasterize(pos, faces, (16, 16))
        covered = out[..., 3] > 0
        assert bool(covered.any())
        assert bool((out[..., 3][covered] == near_id).all())
        assert torch.allclose(out[..., 2][covered], torch.full_like(out[..., 2][covered], -0.2))
    # Equal depth: the lower triangle index wins.
    pos = torch.cat([clip(xy), clip(xy)], dim=1)
    out, _ = rasterizer.rasterize(pos, torch.tensor([[3, 4, 5], [0, 1, 2]]), (16, 16))
    assert bool((out[..., 3][out[..., 3] > 0] == 1).all())


def test_triangle_id_and_barycentrics_match_hand_computation(rasterizer):
    pos = clip([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5]], z=[0.1, 0.2, 0.3])
    faces = torch.tensor([[0, 1, 2]])
    out, db = rasterizer.rasterize(pos, faces, (8, 8))
    # Pixel row 2, column 3: centre (x, y) = (-0.125, -0.375) = 0.5*v0 + 0.375*v1 + 0.125*v2.
    u, v, zw, tri = out[0, 2, 3].tolist()
    assert (u, v, tri) == pytest.approx((0.5, 0.375, 1.0), abs=1e-12)
    assert zw == pytest.approx(0.5 * 0.1 + 0.375 * 0.2 + 0.125 * 0.3, abs=1e-12)
    # Orthographic: v = x + 0.5 and 1 - u - v = y + 0.5, so du/dX = du/dY = -2/8, dv/dX = 2/8, dv/dY = 0.
    assert db[0, 2, 3].tolist() == pytest.approx([-0.25, -0.25, 0.25, 0.0], abs=1e-12)
    assert out[0, 0, 7].abs().sum() == 0 and db[0, 0, 7].abs().sum() == 0  # empty pixel: zeros


def test_perspective_correct_interpolation_matches_ray_plane_intersection(rasterizer):
    # A plane quad seen at a grazing angle: interpolated world positions must equal the ray hits.
    verts = torch.tensor([[-1.0, 0.0, -1.0], [1.0, 0.0, -1.0], [1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]], dtype=F64)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    mvp = mvp_from_c2w(look_at(torch.tensor([[0.3, 0.8, 2.0]], dtype=F64)), perspective(1.0, 1.0, 0.1, 10.0))
    out, _ = rasterizer.rasterize(transform_pos(mvp, verts), faces, (24, 24))
    gb_pos, _ = rasterizer.interpolate(verts, out, faces)
    rows, cols = (out[0, ..., 3] > 0).nonzero(as_tuple=True)
    assert rows.numel() > 100
    inv = torch.linalg.inv(mvp[0])
    ndc = torch.stack([(2 * cols + 1).to(F64) / 24 - 1, (2 * rows + 1).to(F64) / 24 - 1], -1)
    near = torch.cat([ndc, -torch.ones_like(ndc[:, :1]), torch.ones_like(ndc[:, :1])], -1) @ inv.T
    far = torch.cat([ndc, torch.ones_like(ndc[:, :1]), torch.ones_like(ndc[:, :1])], -1) @ inv.T
    near, far = near[:, :3] / near[:, 3:], far[:, :3] / far[:, 3:]
    hit = near + (far - near) * (-near[:, 1:2] / (far[:, 1:2] - near[:, 1:2]))  # plane y = 0
    got = gb_pos[0, rows, cols]
    assert (got - hit).abs().max() < 1e-9
    # Screen-space (affine) barycentrics s_k = b_k w_k / sum(b w) would be visibly wrong here.
    u, v = out[0, rows, cols, 0], out[0, rows, cols, 1]
    b = torch.stack([u, v, 1 - u - v], -1)
    tri_verts = faces[out[0, rows, cols, 3].long() - 1]
    w = transform_pos(mvp, verts)[0, :, 3][tri_verts]
    s = b * w / (b * w).sum(-1, keepdim=True)
    affine = (s[..., None] * verts[tri_verts]).sum(1)
    assert (affine - hit).abs().max() > 0.05


def test_near_and_far_planes_clip_pixels_and_w_nonpositive_culls(rasterizer):
    # z/w goes from -0.5 (left) to 1.5 (right): pixels beyond the far plane (z/w > 1) are dropped.
    pos = clip([[-1.5, -1.5], [1.5, -1.5], [1.5, 1.5], [-1.5, 1.5]], z=[-0.5, 1.5, 1.5, -0.5])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    out, _ = rasterizer.rasterize(pos, faces, (8, 16))
    covered = out[0, ..., 3] > 0
    xs = torch.tensor([centre(j, 16) for j in range(16)], dtype=F64)
    expect = ((-0.5 + (xs + 1.5) / 3 * 2.0) <= 1.0)[None].expand(8, 16)
    assert torch.equal(covered, expect)
    # A vertex behind the eye plane (w <= 0) culls the whole triangle.
    pos = clip([[-0.5, -0.5], [0.5, -0.5], [0.0, 0.5]], w=[1.0, 1.0, -0.5])
    out, _ = rasterizer.rasterize(pos, torch.tensor([[0, 1, 2]]), (8, 8))
    assert out.abs().sum() == 0


def test_batches_chunks_and_dtypes_are_consistent():
    pos, faces, _ = tilted_quad_scene()
    shifted = pos.clone()
    shifted[..., 0] += 0.13 * shifted[..., 3]
    batch = torch.cat([pos, shifted])
    ref = TorchRasterizer()
    out, db = ref.rasterize(batch, faces, (20, 24))
    one, _ = ref.rasterize(shifted, faces, (20, 24))
    assert torch.equal(out[1:], one)
    chunked, db_c = TorchRasterizer(pair_chunk=7).rasterize(batch, faces, (20, 24))
    assert torch.equal(out, chunked) and torch.equal(db, db_c)
    out32, db32 = ref.rasterize(batch.float(), faces, (20, 24))
    assert out32.dtype == torch.float32 and db32.dtype == torch.float32
    assert (out32[..., 3] != out[..., 3]).float().mean() < 0.01
    empty, _ = ref.rasterize(batch, faces[:0], (4, 4))
    assert empty.abs().sum() == 0


# ----------------------------------------------------------------------------------------------- gradients
def test_rasterize_interpolate_gradients_match_finite_differences(rasterizer):
    # Loss through u, v and rast_db (via interpolate's pixel derivatives); float64, central differences
    # with eps = 1e-6 in clip space. nvdiffrast's backward adds 1e-6 to the barycentric denominator,
    # which this backend mirrors, so agreement is to ~1e-6 relative; tolerance 1e-5.
    pos0, faces, _ = tilted_quad_scene()
    gen = torch.Generator().manual_seed(0)
    attr = torch.rand(4, 3, generator=gen, dtype=F64)
    w_out, w_da = torch.rand(1, 24, 24, 3, generator=gen, dtype=F64), torch.rand(1, 24, 24, 6, generator=gen, dtype=F64)

    def loss(pos):
        out, db = rasterizer.rasterize(pos, faces, (24, 24))
        col, da = rasterizer.interpolate(attr, out, faces, rast_db=db, diff_attrs="all")
        return (col * w_out).sum() + 10 * (da * w_da).sum()

    pos = pos0.clone().requires_grad_()
    loss(pos).backward()
    fd = torch.zeros_like(pos0)
    for idx in torch.cartesian_prod(torch.arange(4), torch.tensor([0, 1, 3])).tolist():
        e = torch.zeros_like(pos0)
        e[0, idx[0], idx[1]] = 1e-6
        fd[0, idx[0], idx[1]] = (loss(pos0 + e) - loss(pos0 - e)) / 2e-6
    assert pos.grad[..., 2].abs().max() == 0  # z only moves z/w, which carries no gradient (as nvdiffrast)
    assert (pos.grad - fd).norm() / fd.norm() < 1e-5


def test_antialias_gradient_matches_finite_differences_at_silhouettes(rasterizer):
    # d(sum(w * antialias(color)))/d(pos_clip) vs central differences with eps = 1e-3 (clip space,
    # ~0.01 pixel here). The geometry is chosen so that no pixel centre changes triangle within eps
    # (asserted). nvdiffrast's backward adds 1e-3 pixel to the edge's y extent, mirrored here, so the
    # analytic gradient differs from the true derivative by ~1e-4 relative; tolerance 2e-3.
    pos0, faces, _ = tilted_quad_scene()
    gen = torch.Generator().manual_seed(1)
    attr = torch.rand(4, 3, generator=gen, dtype=F64)
    weights = torch.rand(1, 24, 24, 3, generator=gen, dtype=F64)
    ids0 = rasterizer.rasterize(pos0, faces, (24, 24))[0][..., 3]

    def loss(pos):
        out, _ = rasterizer.rasterize(pos, faces, (24, 24))
        col, _ = rasterizer.interpolate(attr, out, faces)
        return (rasterizer.antialias(col, out, pos, faces) * weights).sum(), out[..., 3]

    pos = pos0.clone().requires_grad_()
    loss(pos)[0].backward()
    assert pos.grad.abs().sum() > 0
    eps = 1e-3
    fd = torch.zeros_like(pos0)
    for i in range(4):
        for k in (0, 1, 3):
            e = torch.zeros_like(pos0)
            e[0, i, k] = eps
            (lp, ids_p), (lm, ids_m) = loss(pos0 + e), loss(pos0 - e)
            assert torch.equal(ids_p, ids0) and torch.equal(ids_m, ids0), "a pixel centre was crossed"
            fd[0, i, k] = (lp - lm) / (2 * eps)
    assert (pos.grad - fd).norm() / fd.norm() < 2e-3

    # The silhouette term alone: a constant colour has no interior gradient, only the edge's.
    def silhouette_loss(pos):
        out, _ = rasterizer.rasterize(pos, faces, (24, 24))
        ones = (out[..., 3:] > 0).to(F64).expand(-1, -1, -1, 3)
        return (rasterizer.antialias(ones, out, pos, faces) * weights).sum()

    pos = pos0.clone().requires_grad_()
    silhouette_loss(pos).backward()
    e = torch.zeros_like(pos0)
    e[0, 1, 0] = eps
    fd_x = (silhouette_loss(pos0 + e) - silhouette_loss(pos0 - e)) / (2 * eps)
    assert abs(fd_x) > 1.0
    assert float(pos.grad[0, 1, 0]) == pytest.approx(float(fd_x), rel=2e-3)


def test_antialias_blends_by_covered_fraction_and_ignores_interior_edges(rasterizer):
    # A quad covering x < x_edge (vertical silhouette edge) with colour 1 on background 0: after
    # antialiasing each row sums to the covered length in pixels. The quad's diagonal is an interior
    # edge: a second channel holding the triangle id must not be blended across it.
    h, w = 6, 10
    for x_edge, roll in ((-0.31, 0), (0.05, 1), (0.12, 2), (0.43, 1)):
        pos = clip([[-2.0, -2.0], [x_edge, -2.0], [x_edge, 2.0], [-2.0, 2.0]])
        faces = torch.tensor([[0, 1, 2], [0, 2, 3]]).roll(roll, dims=1)  # the diagonal as edge 1, 0, 2
        out, _ = rasterizer.rasterize(pos, faces, (h, w))
        color = torch.cat([(out[..., 3:] > 0).to(F64), out[..., 3:]], dim=-1)
        assert set(out[..., 3].unique().tolist()) == {0.0, 1.0, 2.0}
        aa = rasterizer.antialias(color, out, pos, faces)
        length = (x_edge + 1) * w / 2
        assert torch.allclose(aa[0, :, :, 0].sum(1), torch.full((h,), length, dtype=F64), atol=1e-12)
        changed = (aa != color)[0].any(-1)
        assert bool(changed.any())
        cols = changed.nonzero()[:, 1]
        assert bool(((cols + 0.5 - length).abs() < 1.0).all())  # only the two pixels at the silhouette


def test_antialias_resolves_occlusion_edges_with_the_nearer_triangle(rasterizer):
    # A near quad (colour 1) with a vertical edge in front of a far full-screen quad (colour 0): the
    # occluding edge is blended from the near triangle, so rows again sum to the near coverage.
    h, w = 6, 10
    x_edge = 0.13
    near = clip([[-2.0, -2.0], [x_edge, -2.0], [x_edge, 2.0], [-2.0, 2.0]], z=[-0.5] * 4)
    far = clip([[-2.0, -2.0], [2.0, -2.0], [2.0, 2.0], [-2.0, 2.0]], z=[0.5] * 4)
    for order in ((0, 1), (1, 0)):
        quads = [torch.tensor([[0, 1, 2], [0, 2, 3]]), torch.tensor([[4, 5, 6], [4, 6, 7]])]
        faces = torch.cat([quads[i] for i in order])
        pos = torch.cat([near, far], dim=1)
        out, _ = rasterizer.rasterize(pos, faces, (h, w))
        color = (out[..., 2:3] < 0).to(F64)  # 1 where the near quad is visible
        aa = rasterizer.antialias(color, out, pos, faces)
        length = (x_edge + 1) * w / 2
        assert torch.allclose(aa[0, :, :, 0].sum(1), torch.full((h,), length, dtype=F64), atol=1e-12)
        assert not torch.equal(aa, color)


def test_edge_opposite_vertices():
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 4, 5]])
    opp = edge_opposite_vertices(faces)
    # Triangle 0: edge (1,2) boundary, edge (2,0) shared with triangle 1 (opposite 3), edge (0,1) boundary.
    assert opp.tolist() == [[-1, 3, -1], [-1, -1, 1], [-1, -1, -1]]


def test_interpolate_gradients_wrt_attributes_and_barycentrics(rasterizer):
    pos, faces, _ = tilted_quad_scene()
    out, db = rasterizer.rasterize(pos, faces, (6, 6))
    gen = torch.Generator().manual_seed(2)
    attr = torch.rand(1, 4, 2, generator=gen, dtype=F64, requires_grad=True)
    uv = out[..., :2].detach().clone().requires_grad_()
    rest = out[..., 2:].detach()
    db_in = db.detach().clone().requires_grad_()

    def f(a, uv_, db_):
        col, da = rasterizer.interpolate(a, torch.cat([uv_, rest], -1), faces, rast_db=db_, diff_attrs=[1, 0])
        return col, da

    assert torch.autograd.gradcheck(f, (attr, uv, db_in), eps=1e-6, atol=1e-8)


def test_interpolated_pixel_derivatives_match_neighbour_differences(rasterizer):
    # Orthographic: attributes are affine in screen space and derivatives equal neighbour differences
    # exactly. Perspective (mild): central differences agree to second order; tolerance 1% of the range.
    h = w = 16
    plane = torch.tensor([[-1.5, -1.5, 0.0], [1.5, -1.5, 0.0], [1.5, 1.5, 0.0], [-1.5, 1.5, 0.0]], dtype=F64)
    x, y = plane[:, 0], plane[:, 1]
    attr = torch.stack([x + 2 * y, 3 * x - y + 1], -1)  # affine on the plane: smooth across the diagonal
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    ortho = clip(plane[:, :2])
    mvp = mvp_from_c2w(look_at(torch.tensor([[0.3, 0.2, 2.5]], dtype=F64)), perspective(1.0, 1.0, 0.1, 10.0))
    persp = transform_pos(mvp, plane)
    for pos, tol in ((ortho, 1e-12), (persp, 1e-2)):
        out, db = rasterizer.rasterize(pos, faces, (h, w))
        assert bool((out[..., 3] > 0).all())
        val, da = rasterizer.interpolate(attr, out, faces, rast_db=db, diff_attrs="all")
        fd_x = (val[0, 1:-1, 2:] - val[0, 1:-1, :-2]) / 2
        fd_y = (val[0, 2:, 1:-1] - val[0, :-2, 1:-1]) / 2
        da = da[0, 1:-1, 1:-1].reshape(h - 2, w - 2, 2, 2)  # (attr, X/Y)
        scale = val.abs().max()
        assert (da[..., 0] - fd_x).abs().max() <= tol * scale
        assert (da[..., 1] - fd_y).abs().max() <= tol * scale
        assert da.abs().max() > 0.05


# ------------------------------------------------------------------------------------------------- texture
def texel_centres(h: int, w: int, dtype=F64) -> torch.Tensor:
    """uv [1,h,w,2] of the texel centres of an h x w texture."""
    rows, cols = (torch.arange(h, dtype=dtype) + 0.5) / h, (torch.arange(w, dtype=dtype) + 0.5) / w
    v, u = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([u, v], -1)[None]


def test_texture_at_texel_centres_returns_texels(rasterizer):
    gen = torch.Generator().manual_seed(4)
    tex = torch.rand(1, 6, 10, 3, generator=gen, dtype=F64)
    uv = texel_centres(6, 10)
    for mode in ("nearest", "linear"):
        for boundary in ("wrap", "clamp", "zero"):
            out = rasterizer.texture(tex, uv, filter_mode=mode, boundary_mode=boundary)
            assert torch.allclose(out, tex, atol=1e-12)
    tex8 = torch.rand(1, 8, 8, 2, generator=gen, dtype=F64)
    uv_da = torch.tensor([0.5 / 8, 0.0, 0.0, 0.5 / 8], dtype=F64).expand(1, 8, 8, 4)  # magnified: level 0
    assert torch.allclose(rasterizer.texture(tex8, texel_centres(8, 8), uv_da), tex8, atol=1e-12)


def test_texture_wrap_vs_clamp(rasterizer):
    tex = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64)[None, :, :, None].expand(1, 2, 4, 1)
    uv = torch.tensor([[[[0.0, 0.25], [1.0, 0.25], [1.125 + 1.0, 0.75], [-0.875, 0.75]]]], dtype=F64)
    wrap = rasterizer.texture(tex, uv, filter_mode="linear", boundary_mode="wrap")[0, 0, :, 0]
    clamp = rasterizer.texture(tex, uv, filter_mode="linear", boundary_mode="clamp")[0, 0, :, 0]
    # u = 0 and u = 1 sit between the last and first texels when wrapping; u = 2.125 == u = 0.125 = texel 0.
    assert wrap.tolist() == pytest.approx([2.5, 2.5, 1.0, 1.0])
    assert clamp.tolist() == pytest.approx([1.0, 4.0, 4.0, 1.0])
    nearest = rasterizer.texture(tex, uv, filter_mode="nearest", boundary_mode="wrap")[0, 0, :, 0]
    assert nearest.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_texture_minification_picks_mip_level(rasterizer):
    # Checkerboard: level 0 holds 0/1 texels, every coarser level is 0.5 everywhere.
    n = 16
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    tex = ((i + j) % 2).to(F64)[None, :, :, None]
    uv = texel_centres(n, n)

    def sample(footprint_texels):
        uv_da = torch.tensor([footprint_texels / n, 0.0, 0.0, footprint_texels / n], dtype=F64).expand(1, n, n, 4)
        return rasterizer.texture(tex, uv, uv_da, filter_mode="linear-mipmap-linear")

    assert torch.allclose(sample(1.0), tex)  # level 0
    assert torch.allclose(sample(2.0), torch.full_like(tex, 0.5))  # level 1
    assert torch.allclose(sample(math.sqrt(2.0)), 0.5 * tex + 0.25)  # level 0.5: halfway
    assert torch.allclose(sample(1e3), torch.full_like(tex, 0.5))  # clamped to the 1x1 level
    uv_da = torch.tensor([2.0 / n, 0.0, 0.0, 2.0 / n], dtype=F64).expand(1, n, n, 4)
    assert torch.allclose(rasterizer.texture(tex, uv, uv_da, max_mip_level=0), tex)  # no mipmaps
    assert torch.allclose(rasterizer.texture(tex, uv, uv_da * 8, max_mip_level=1), torch.full_like(tex, 0.5))
    # The level is log2 of the footprint's major axis in texels (anisotropic: the longer one).
    da = torch.tensor([[[[4.0 / n, 0.0, 0.0, 1.0 / n]]]], dtype=F64)
    assert float(mip_level(da, n, n)) == pytest.approx(2.0)
    assert float(mip_level(torch.tensor([[[[0.0, 3.0 / n, 4.0 / n, 0.0]]]], dtype=F64), n, n)) == pytest.approx(2.0)
    # Non-square (8 rows, 32 columns): u is scaled by the width, v by the height.
    assert float(mip_level(torch.tensor([[[[2.0 / 32, 0.0, 0.0, 0.0]]]], dtype=F64), 8, 32)) == pytest.approx(1.0)
    assert float(mip_level(torch.tensor([[[[0.0, 0.0, 0.0, 4.0 / 8]]]], dtype=F64), 8, 32)) == pytest.approx(2.0)
    wide = torch.rand(1, 8, 32, 1, generator=torch.Generator().manual_seed(6), dtype=F64)
    uv_da = torch.tensor([2.0 / 32, 0.0, 0.0, 1.0 / 8], dtype=F64).expand(1, 8, 32, 4)  # 2 texels along u
    level1 = wide.reshape(1, 4, 2, 16, 2, 1).mean((2, 4))  # 2x2 box
    assert torch.allclose(
        rasterizer.texture(wide, texel_centres(8, 32), uv_da),
        rasterizer.texture(level1, texel_centres(8, 32), filter_mode="linear", boundary_mode="wrap"),
    )


def test_texture_gradients(rasterizer):
    gen = torch.Generator().manual_seed(5)
    tex = torch.rand(2, 4, 5, 1, generator=gen, dtype=F64, requires_grad=True)  # one texture per image
    uv = (torch.rand(2, 2, 3, 2, generator=gen, dtype=F64) * 1.6 - 0.3).requires_grad_()
    for boundary in ("wrap", "clamp"):

        def linear(t, u, boundary=boundary):
            return rasterizer.texture(t, u, filter_mode="linear", boundary_mode=boundary)

        assert torch.autograd.gradcheck(linear, (tex, uv), eps=1e-6, atol=1e-7)
    tex8 = torch.rand(1, 8, 8, 1, generator=gen, dtype=F64, requires_grad=True)  # shared by both images
    uv_da = (torch.rand(2, 2, 3, 4, generator=gen, dtype=F64) * 0.6).requires_grad_()

    def trilinear(t, u, d):
        return rasterizer.texture(t, u, d, filter_mode="linear-mipmap-linear")

    assert torch.autograd.gradcheck(trilinear, (tex8, uv, uv_da), eps=1e-6, atol=1e-7)
    # Nearest: gradients reach the texture only.
    out = rasterizer.texture(tex, uv, filter_mode="nearest")
    out.sum().backward()
    assert tex.grad.sum() == pytest.approx(2 * 2 * 3)
    assert uv.grad is None


# ------------------------------------------------------------------------------------------ camera, factory
def test_camera_puts_the_top_of_the_object_in_the_top_rows(rasterizer):
    c2w = look_at(torch.tensor([0.0, 0.0, 4.0]), torch.zeros(3), torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(c2w[:3, 2], torch.tensor([0.0, 0.0, 1.0]))  # looks down -z
    mvp = mvp_from_c2w(c2w[None], perspective(math.radians(40), 1.0, 0.1, 100.0))
    # A thin triangle pointing up (apex at y = +1) and a point to the right (x = +1).
    verts = torch.tensor([[-0.3, -1.0, 0.0], [0.3, -1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    pos = transform_pos(mvp, verts)
    assert pos.shape == (1, 4, 4)
    ndc = pos[0, :, :2] / pos[0, :, 3:]
    assert ndc[2, 1] < 0 < ndc[0, 1]  # apex (world top) has the smaller NDC y -> smaller row index
    assert ndc[3, 0] > 0  # world +x is on the right
    out, _ = rasterizer.rasterize(pos, torch.tensor([[0, 1, 2]]), (32, 32))
    rows = (out[0, ..., 3] > 0).nonzero()[:, 0]
    widths = (out[0, ..., 3] > 0).sum(1)
    top, bottom = int(rows.min()), int(rows.max())
    assert top < 16 < bottom
    assert widths[top] < widths[bottom]  # the narrow apex is drawn in the top rows


def test_make_rasterizer_backends_and_errors(monkeypatch):
    assert make_rasterizer("torch").name == "torch"
    assert make_rasterizer("auto", "cpu").name == "torch"
    with pytest.raises(ValueError, match="valid names: auto, torch, nvdiffrast"):
        make_rasterizer("opengl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert make_rasterizer("auto").name == "torch"
    with pytest.raises(ValueError, match=r"render.backend='nvdiffrast' needs CUDA but this process sees no GPU"):
        make_rasterizer("nvdiffrast")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nvdr_backend, "is_available", lambda: False)
    with pytest.raises(ImportError, match="pip install diffrp-nvdiffrast"):
        make_rasterizer("nvdiffrast", "cuda")
    assert make_rasterizer("auto", "cuda").name == "torch"  # falls back when nvdiffrast is missing


def test_plugin_name_follows_nvdiffrast():
    assert nvdr_backend.plugin_name("0.3.3", "2.11.0+cu128") == "nvdiffrast_plugin_0_3_3_torch2_11_0_cu128"


def test_strided_order_is_a_permutation_with_far_neighbours():
    """`strided_order`: every index once, the inverse undoes it, neighbours at least ``stride`` apart, for lengths
    with and without common factors with the stride; bad arguments are refused."""
    for n in (1, 2, 3, 10, 4096, 4097, 12288, 100_003):
        order, inverse = nvdr_backend.strided_order(n, 4096)
        assert torch.equal(order.sort().values, torch.arange(n)), n
        assert torch.equal(order[inverse], torch.arange(n)) and torch.equal(inverse[order], torch.arange(n)), n
        if n > 2 * 4096:  # consecutive entries differ by k or n - k, both at least the stride
            assert int((order[1:] - order[:-1]).abs().min()) >= 4096, n
    x = torch.randn(1000, 3)
    order, inverse = nvdr_backend.strided_order(1000, 64)
    assert torch.equal(x.index_select(0, order).index_select(0, inverse), x)
    for n, stride in ((0, 8), (10, 0)):
        with pytest.raises(ValueError, match="strided_order"):
            nvdr_backend.strided_order(n, stride)
    with pytest.raises(ValueError, match="cube_stride"):
        nvdr_backend.NvdiffrastRasterizer("cuda", cube_stride=-1)
