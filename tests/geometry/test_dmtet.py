"""Marching tets gives closed, outward-facing surfaces with exact gradients; DMTetGeometry wraps it."""

import math

import pytest
import torch
import trimesh

from recon.geometry.dmtet import DMTetGeometry, marching_tets, sdf_sign_loss
from recon.geometry.mesh import Mesh, face_normals, normal_consistency_loss
from recon.geometry.tet_grid import make_tet_grid, tet_grid_edges


def _sphere_sdf(verts, radius):
    return verts.norm(dim=1) - radius


def _torus_sdf(verts, major, minor):
    ring = torch.sqrt(verts[:, 0] ** 2 + verts[:, 1] ** 2) - major
    return torch.sqrt(ring**2 + verts[:, 2] ** 2) - minor


def _trimesh(verts, faces):
    return trimesh.Trimesh(verts.detach().double().numpy(), faces.numpy(), process=False)


def _signed_volume(verts, faces):
    v = verts[faces].double()
    return torch.linalg.det(v).sum().item() / 6.0


def test_sphere_closed_accurate_and_outward():
    radius = 0.7
    grid_verts, tets = make_tet_grid(32, scale=2.1)
    verts, faces = marching_tets(grid_verts, _sphere_sdf(grid_verts, radius), tets)
    assert faces.dtype == torch.int64 and faces.shape[1] == 3 and verts.shape[1] == 3

    tm = _trimesh(verts, faces)
    assert tm.is_watertight and tm.is_winding_consistent and tm.euler_number == 2
    assert (verts.norm(dim=1) / radius - 1).abs().max() < 0.01

    center = verts[faces].mean(dim=1)
    outward = (face_normals(verts, faces) * center).sum(dim=1) > 0
    assert outward.float().mean() > 0.99
    assert _signed_volume(verts, faces) == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.02)


def test_torus_has_genus_one():
    grid_verts, tets = make_tet_grid(32, scale=2.1)
    verts, faces = marching_tets(grid_verts, _torus_sdf(grid_verts, 0.6, 0.25), tets)
    tm = _trimesh(verts, faces)
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.euler_number == 0  # V - E + F = 2 - 2 genus
    assert len(tm.split(only_watertight=False)) == 1
    assert _signed_volume(verts, faces) == pytest.approx(2 * math.pi**2 * 0.6 * 0.25**2, rel=0.03)


def test_random_blobs_are_closed_and_positive_volume():
    """Any sdf that is positive on the grid boundary gives closed, consistently outward surfaces."""
    torch.manual_seed(0)
    res = 10
    grid_verts, tets = make_tet_grid(res, scale=1.0)
    sdf = torch.randn(grid_verts.shape[0])
    sdf[(grid_verts.abs() > 0.49).any(dim=1)] = 1.0
    verts, faces = marching_tets(grid_verts, sdf, tets)
    tm = _trimesh(verts, faces)
    assert faces.shape[0] > 100
    assert tm.is_watertight and tm.is_winding_consistent
    for part in tm.split(only_watertight=False):  # every component encloses a positive volume
        assert part.volume > 0


def test_no_sign_change_gives_empty_mesh():
    grid_verts, tets = make_tet_grid(4)
    for sdf in (torch.ones(grid_verts.shape[0]), -torch.ones(grid_verts.shape[0])):
        verts, faces = marching_tets(grid_verts, sdf, tets)
        assert verts.shape == (0, 3) and faces.shape == (0, 3) and faces.dtype == torch.int64


def _random_sdf(grid_verts, seed=0):
    """Sphere sdf plus noise, kept away from 0 so a finite-difference step never flips a sign."""
    g = torch.Generator().manual_seed(seed)
    sdf = _sphere_sdf(grid_verts, 0.5) + 0.1 * torch.randn(grid_verts.shape[0], generator=g, dtype=grid_verts.dtype)
    return torch.where(sdf.abs() < 0.02, torch.sign(sdf) * 0.02 + sdf, sdf)


def test_gradients_match_finite_differences():
    grid_verts, tets = make_tet_grid(4, scale=2.0)
    grid_verts = grid_verts.double()
    sdf = _random_sdf(grid_verts)
    verts0, faces0 = marching_tets(grid_verts, sdf, tets)
    assert verts0.dtype == torch.float64 and faces0.shape[0] > 0
    w = torch.randn(verts0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def objective(s):
        v, f = marching_tets(grid_verts, s, tets)
        assert torch.equal(f, faces0)  # topology fixed under the perturbation
        return (v * w).sum()

    s = sdf.clone().requires_grad_()
    (grad,) = torch.autograd.grad(objective(s), s)
    eps = 1e-6
    fd = torch.zeros_like(sdf)
    for i in range(sdf.shape[0]):
        d = torch.zeros_like(sdf)
        d[i] = eps
        fd[i] = (objective(sdf + d) - objective(sdf - d)) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
    assert grad.abs().sum() > 0

    # every output coordinate, w.r.t. vertex positions and sdf, through torch's checker
    # (fast mode: random projections, a few dozen evaluations instead of one per input)
    inputs = (grid_verts.clone().requires_grad_(), sdf.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda v, s: marching_tets(v, s, tets)[0], inputs, fast_mode=True)


def test_gradient_reaches_deform():
    geo = DMTetGeometry(tet_grid=8, init_radius=0.5)
    mesh = geo()
    ((mesh.verts * torch.randn_like(mesh.verts)).sum() + mesh.normals.sum()).backward()
    assert geo.deform.grad is not None and geo.deform.grad.abs().sum() > 0
    assert geo.sdf.grad is not None and geo.sdf.grad.abs().sum() > 0
    # only vertices next to the surface receive gradient
    inside = geo.sdf.detach() < 0
    near = torch.zeros_like(inside)
    edges = geo.edges[:, inside[geo.edges[0]] != inside[geo.edges[1]]]
    near[edges.reshape(-1)] = True
    assert (geo.deform.grad[~near] == 0).all()


def test_geometry_matches_marching_tets_on_the_full_grid():
    """The lattice prefilter of forward() is exact: same vertices and faces as marching all tets."""
    torch.manual_seed(0)
    geo = DMTetGeometry(tet_grid=12, sdf_init="random")
    with torch.no_grad():
        geo.deform.normal_()
    mesh = geo()
    verts, faces = marching_tets(geo.deformed_verts(), geo.sdf, geo.tets)
    assert torch.equal(mesh.faces, faces)
    torch.testing.assert_close(mesh.verts, verts)


def test_geometry_forward_sphere():
    geo = DMTetGeometry(tet_grid=32, scale=2.1, init_radius=0.6)
    assert geo.cell_size == pytest.approx(2.1 / 32)
    assert geo.verts.shape == (33**3, 3) and geo.tets.shape == (6 * 32**3, 4)
    assert geo.has_surface
    mesh = geo()
    assert isinstance(mesh, Mesh) and mesh.normals is not None
    tm = _trimesh(mesh.verts, mesh.faces)
    assert tm.is_watertight
    assert (mesh.verts.norm(dim=1) / 0.63 - 1).abs().max() < 0.01  # 0.6 of the half edge 1.05
    assert ((mesh.normals * mesh.verts).sum(dim=1) > 0).all()
    extracted = geo.extract_mesh()
    assert not extracted.verts.requires_grad and torch.equal(extracted.faces, mesh.faces)


def test_random_init_is_mostly_inside():
    torch.manual_seed(0)
    geo = DMTetGeometry(tet_grid=16, sdf_init="random")
    inside = (geo.sdf < 0).float().mean().item()
    assert 0.85 < inside < 0.95 and geo.sdf.min() >= -0.9 and geo.sdf.max() <= 0.1
    with pytest.raises(ValueError, match="sdf_init"):
        DMTetGeometry(tet_grid=4, sdf_init="cube")


def test_empty_surface():
    geo = DMTetGeometry(tet_grid=4)
    with torch.no_grad():
        geo.sdf.fill_(1.0)
    assert not geo.has_surface
    mesh = geo()
    assert mesh.verts.shape == (0, 3) and mesh.faces.shape == (0, 3)
    loss = mesh.verts.sum() + geo.sdf_regularizer()
    loss.backward()  # still differentiable: zero gradient, no error
    assert (geo.sdf.grad == 0).all()


def test_sdf_regularizer():
    geo = DMTetGeometry(tet_grid=6)
    with torch.no_grad():
        geo.sdf.fill_(0.5)
    assert geo.sdf_regularizer().item() == 0.0

    # one vertex flipped inside: 14 sign-changing edges around an interior grid vertex
    center = (3 * 7 + 3) * 7 + 3
    with torch.no_grad():
        geo.sdf[center] = -0.5
    loss = geo.sdf_regularizer()
    assert loss.item() > 0
    expected = 2 * torch.nn.functional.softplus(torch.tensor(0.5))  # BCE of logit -0.5 vs 1, and 0.5 vs 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert geo.sdf.grad[center] < 0  # descent raises the lone inside value towards its neighbours

    opt = torch.optim.SGD(geo.parameters(), lr=0.5)
    changes = []
    for _ in range(20):
        opt.zero_grad()
        geo.sdf_regularizer().backward()
        opt.step()
        inside = geo.sdf.detach() < 0
        changes.append(int((inside[geo.edges[0]] != inside[geo.edges[1]]).sum()))
    assert changes[-1] == 0 and not geo.has_surface


def test_sdf_sign_loss_symmetric_under_sign_flip():
    torch.manual_seed(0)
    edges = tet_grid_edges(4)
    sdf = torch.randn(5**3)
    torch.testing.assert_close(sdf_sign_loss(sdf, edges), sdf_sign_loss(-sdf, edges))


def test_to_dtype_and_state_dict_round_trip():
    geo = DMTetGeometry(tet_grid=6, init_radius=0.5)
    tets = geo.tets.clone()
    geo64 = geo.to(torch.float64)
    assert geo64.verts.dtype == torch.float64 and geo64.sdf.dtype == torch.float64
    assert geo64.deform.dtype == torch.float64 and geo64.tets.dtype == torch.int64
    assert torch.equal(geo64.tets, tets)
    mesh = geo64()
    assert mesh.verts.dtype == torch.float64 and mesh.normals.dtype == torch.float64
    geo64 = geo64.to("cpu").float()
    assert geo64.verts.dtype == torch.float32 and geo64.edges.shape == tet_grid_edges(6).shape

    # checkpoints hold the learnt fields only; the grid is rebuilt from the arguments
    assert set(geo.state_dict()) == {"sdf", "deform"}
    with torch.no_grad():
        geo.sdf.add_(0.01)
        geo.deform.normal_()
    other = DMTetGeometry(tet_grid=6, init_radius=0.5)
    other.load_state_dict(geo.state_dict())
    assert torch.equal(other().faces, geo().faces)


@pytest.mark.gpu
def test_cuda_round_trip():
    geo = DMTetGeometry(tet_grid=16).to("cuda")
    assert all(b.is_cuda for b in geo.buffers())
    mesh = geo()
    assert mesh.verts.is_cuda and mesh.faces.is_cuda
    cpu = geo.to("cpu")
    assert torch.equal(cpu().faces, mesh.faces.cpu())


def test_normal_consistency_of_dmtet_surface_smooth_vs_noisy():
    """The surface smoothness term on marching-tets meshes: ~0 for a sphere sdf, large once the sdf is noisy at the
    scale of a cell, and its gradient reaches the sdf and the deformation, finite."""
    torch.manual_seed(0)
    geo = DMTetGeometry(tet_grid=12, init_radius=0.6)
    mesh = geo()
    smooth = normal_consistency_loss(mesh.verts, mesh.faces)
    with torch.no_grad():
        geo.sdf.add_(0.3 * geo.cell_size * torch.randn_like(geo.sdf))
    mesh = geo()
    noisy = normal_consistency_loss(mesh.verts, mesh.faces)
    assert smooth.item() < 0.02 and noisy.item() > 5 * smooth.item()
    noisy.backward()
    assert torch.isfinite(geo.sdf.grad).all() and torch.isfinite(geo.deform.grad).all()
    assert geo.sdf.grad.abs().sum() > 0 and geo.deform.grad.abs().sum() > 0

    opt = torch.optim.Adam(geo.parameters(), lr=0.01)  # descent on the term alone smooths the surface
    for _ in range(10):
        opt.zero_grad()
        mesh = geo()
        loss = normal_consistency_loss(mesh.verts, mesh.faces)
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * noisy.item()


def test_sdf_regularizer_reuses_the_extraction_of_the_same_sdf():
    """After forward() the regularizer takes marching tets' edges (the sign-changing ones) instead of filtering all
    grid edges: same value and gradient. After an optimiser step (the sdf changed in place) it filters again."""
    torch.manual_seed(0)
    geo = DMTetGeometry(tet_grid=12, sdf_init="random")
    opt = torch.optim.SGD(geo.parameters(), lr=0.3)
    for _ in range(3):
        full = sdf_sign_loss(geo.sdf, geo.edges)  # the reference: every grid edge, filtered
        (g_full,) = torch.autograd.grad(full, geo.sdf)
        mesh = geo()
        assert geo._crossing[0].shape[0] == mesh.verts.shape[0] > 0
        loss = geo.sdf_regularizer()
        (g,) = torch.autograd.grad(loss, geo.sdf, retain_graph=True)
        torch.testing.assert_close(loss, full, rtol=1e-5, atol=0)
        torch.testing.assert_close(g, g_full, rtol=1e-5, atol=1e-12)
        opt.zero_grad()
        (mesh.verts.square().sum() + loss).backward()
        opt.step()
        assert geo._crossing[1] != geo._sdf_state()  # stale now
        torch.testing.assert_close(geo.sdf_regularizer(), sdf_sign_loss(geo.sdf, geo.edges))


def _lattice_and_generic_steps(device: str, grid: int = 24, steps: int = 4) -> None:
    """The same sdf updates through the lattice kernels and through `marching_tets_topology`: equal meshes,
    gradients and regulariser, step after step."""
    torch.manual_seed(0)
    lattice = DMTetGeometry(tet_grid=grid, sdf_init="random", lattice_kernel=True).to(device)
    generic = DMTetGeometry(tet_grid=grid, sdf_init="random", lattice_kernel=False).to(device)
    generic.load_state_dict(lattice.state_dict())
    g = torch.Generator(device=device).manual_seed(1)
    for step in range(steps):
        results = []
        for geo in (lattice, generic):
            mesh = geo()
            w = torch.randn(mesh.verts.shape, generator=torch.Generator(device=device).manual_seed(step), device=device)
            # not the normals: on a noisy sdf, slivers make their gradient ill-conditioned, and CUDA's scatter-adds
            # (in any order) move it by up to 0.4 between two runs of the same path
            loss = (mesh.verts * w).sum() + geo.sdf_regularizer()
            geo.zero_grad(set_to_none=True)
            loss.backward()
            results.append((mesh.verts.detach(), mesh.faces, mesh.normals.detach(), geo.sdf.grad, geo.deform.grad,
                            loss.detach()))
        assert torch.equal(results[0][1], results[1][1])  # the same faces, in the same order
        for k, (a, b) in enumerate(zip(*results)):
            # the vertex normals are sums scattered in any order on CUDA: equal to float rounding (1e-5 measured)
            tol = 1e-4 if k == 2 else 1e-6
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        with torch.no_grad():
            d = 0.05 * torch.randn(lattice.sdf.shape, generator=g, device=device)
            lattice.sdf.add_(d)
            generic.sdf.add_(d)
    assert lattice._lattice_tables is not None and generic._lattice_tables is None  # each took its path
    assert "tets" not in lattice._grid and "tets" in generic._grid  # the lattice needs no tet table


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lattice_kernels_equal_the_generic_extraction_on_cuda():
    _lattice_and_generic_steps("cuda", grid=48)


def test_surface_cells_are_the_cells_with_corners_on_both_sides():
    geo = DMTetGeometry(tet_grid=9)
    n, res = 10, 9
    for seed, p in ((0, 0.5), (1, 0.05), (2, 0.97)):
        inside = torch.rand(n**3, generator=torch.Generator().manual_seed(seed)) < p
        occ = inside.view(n, n, n)
        corners = torch.stack([occ[i : i + res, j : j + res, k : k + res] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
        expected = (corners.any(0) & ~corners.all(0)).reshape(-1)
        assert torch.equal(geo._surface_cells(inside), expected)


def test_surface_carries_its_unit_face_normals():
    from recon.export.uv_bake import unwrap
    from recon.geometry.fixed_mesh import FixedTopologyMesh
    from recon.geometry.mesh import unit_face_normals, vertex_normals

    geo = DMTetGeometry(tet_grid=12)
    mesh = geo()
    assert torch.equal(mesh.face_normals, unit_face_normals(mesh.verts, mesh.faces))
    assert torch.equal(mesh.normals, vertex_normals(mesh.verts, mesh.faces))
    fixed = FixedTopologyMesh(unwrap(mesh.detach(), resolution=64))()
    assert torch.equal(fixed.face_normals, unit_face_normals(fixed.verts, fixed.faces))
    torch.testing.assert_close(fixed.face_normals.norm(dim=-1), torch.ones(fixed.faces.shape[0]))
