"""Mesh container, normals, tangents and Laplacian."""

import math

import numpy as np
import pytest
import torch
import trimesh

from recon.geometry.mesh import (
    Mesh,
    compute_tangents,
    face_adjacency,
    face_normals,
    laplacian_loss,
    laplacian_uniform,
    normal_consistency_loss,
    normals_and_tangents,
    tangent_handedness,
    vertex_normals,
)


@pytest.fixture
def sphere() -> Mesh:
    tm = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    return Mesh.from_trimesh(tm)


def _grid_mesh(n: int = 4, dtype=torch.float32) -> Mesh:
    """Flat n x n quad grid in z=0, uv = xy, faces counter-clockwise seen from +z."""
    xs = torch.linspace(0.0, 1.0, n + 1, dtype=dtype)
    x, y = torch.meshgrid(xs, xs, indexing="ij")
    verts = torch.stack([x, y, torch.zeros_like(x)], dim=-1).reshape(-1, 3)
    idx = torch.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
    faces = torch.cat([torch.stack([a, b, c], -1).reshape(-1, 3), torch.stack([a, c, d], -1).reshape(-1, 3)])
    return Mesh(verts=verts, faces=faces, uv=verts[:, :2].clone(), uv_faces=faces.clone())


def test_sphere_normals_point_outward(sphere):
    normals = vertex_normals(sphere.verts, sphere.faces)
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(sphere.num_verts))
    radial = sphere.verts / sphere.verts.norm(dim=1, keepdim=True)
    cos = (normals * radial).sum(dim=1).clamp(max=1.0)
    assert torch.rad2deg(torch.acos(cos)).max() < 2.0


def test_normals_are_area_weighted():
    # a vertex shared by a big face in z=0 and a tiny face in x=0: the big one dominates
    verts = torch.tensor([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 0.1], [0, 0.1, 0]])
    faces = torch.tensor([[0, 1, 2], [0, 3, 4]])
    n = vertex_normals(verts, faces)[0]
    expected = torch.tensor([-0.01, 0, 100])  # sum of (v1 - v0) x (v2 - v0): twice the area each
    torch.testing.assert_close(n, expected / expected.norm())


def test_normals_safe_for_degenerate_faces():
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 2, 2], [5, 5, 5]], requires_grad=True)
    faces = torch.tensor([[0, 1, 2], [3, 3, 1], [3, 3, 3]])  # zero-area faces; vertex 4 isolated
    n = vertex_normals(verts, faces)
    assert torch.isfinite(n).all()
    torch.testing.assert_close(n.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(n[4], torch.tensor([0.0, 0.0, 1.0]))
    (n * torch.randn_like(n)).sum().backward()
    assert torch.isfinite(verts.grad).all()


def test_normals_gradcheck():
    tm = trimesh.creation.icosphere(subdivisions=1)
    verts = torch.tensor(tm.vertices, dtype=torch.float64, requires_grad=True)
    faces = torch.tensor(tm.faces, dtype=torch.int64)
    assert torch.autograd.gradcheck(lambda v: vertex_normals(v, faces), (verts,))


def test_with_normals_to_detach_aabb(sphere):
    mesh = Mesh(verts=sphere.verts.clone().requires_grad_(), faces=sphere.faces).with_normals()
    assert mesh.normals.requires_grad
    det = mesh.detach()
    assert not det.verts.requires_grad and not det.normals.requires_grad and det.uv is None
    m64 = mesh.to("cpu", dtype=torch.float64)
    assert m64.verts.dtype == torch.float64 and m64.normals.dtype == torch.float64
    assert m64.faces.dtype == torch.int64
    torch.testing.assert_close(mesh.aabb(), torch.tensor([[-1.0] * 3, [1.0] * 3]), atol=1e-6, rtol=0)


def test_trimesh_round_trip(sphere):
    tm = sphere.with_normals().to_trimesh()
    assert len(tm.vertices) == sphere.num_verts  # process=False: nothing merged or reordered
    back = Mesh.from_trimesh(tm)
    assert torch.equal(back.verts, sphere.verts) and torch.equal(back.faces, sphere.faces)
    assert tm.is_watertight and tm.volume > 0  # outward winding survives


def test_trimesh_round_trip_keeps_uv_with_own_index_buffer():
    # two triangles sharing positions 0 and 2 but with different uvs there (a seam)
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uv = torch.tensor([[0.0, 0], [0.5, 0], [0.5, 0.5], [0.6, 0.6], [0.9, 0.6], [0.6, 0.9]])
    uv_faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    mesh = Mesh(verts=verts, faces=faces, uv=uv, uv_faces=uv_faces)
    tm = mesh.to_trimesh()
    assert isinstance(tm.visual, trimesh.visual.TextureVisuals)
    back = Mesh.from_trimesh(tm)
    assert back.num_verts == 6  # seam vertices split
    torch.testing.assert_close(back.verts[back.faces], verts[faces])
    torch.testing.assert_close(back.uv[back.uv_faces], uv[uv_faces])


def test_tangents_orthogonal_to_normals(sphere):
    # spherical uv: u = longitude, v = latitude; away from the poles and the seam
    v = sphere.verts
    lon, lat = torch.atan2(v[:, 1], v[:, 0]), torch.acos(v[:, 2].clamp(-1, 1))
    uv = torch.stack([lon / (2 * math.pi) + 0.5, lat / math.pi], dim=1)
    mesh = Mesh(verts=v, faces=sphere.faces, uv=uv).with_tangents()
    dots = (mesh.tangents * mesh.normals).sum(dim=1)
    assert dots.abs().max() < 1e-5
    torch.testing.assert_close(mesh.tangents.norm(dim=1), torch.ones(mesh.num_verts))
    # on the equator, facing +x, the direction of increasing longitude is +y
    i = torch.argmax(v[:, 0])
    assert mesh.tangents[i, 1] > 0.95


def test_tangents_follow_u_on_a_plane():
    mesh = _grid_mesh().with_tangents()
    torch.testing.assert_close(mesh.normals, torch.tensor([0.0, 0, 1]).expand_as(mesh.verts))
    torch.testing.assert_close(mesh.tangents, torch.tensor([1.0, 0, 0]).expand_as(mesh.verts))
    # uv indexed separately gives the same result
    t = compute_tangents(mesh.verts, mesh.faces, mesh.uv, None, mesh.normals)
    torch.testing.assert_close(t, mesh.tangents)


def test_laplacian_uniform(sphere):
    lap = laplacian_uniform(sphere.num_verts, sphere.faces)
    assert lap.is_sparse and lap.shape == (sphere.num_verts,) * 2
    dense = lap.to_dense()
    torch.testing.assert_close(dense.sum(dim=1), torch.zeros(sphere.num_verts), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.diagonal(dense), torch.ones(sphere.num_verts))
    # convex sphere: a vertex lies outside the mean of its neighbours
    delta = lap @ sphere.verts
    assert ((delta * sphere.verts).sum(dim=1) > 0).all()


def test_laplacian_loss_matches_nvdiffrec_and_is_relative(sphere):
    torch.manual_seed(0)
    verts = sphere.verts + 0.01 * torch.randn_like(sphere.verts)
    faces = sphere.faces
    # nvdiffrec's laplace_regularizer_const, for a closed mesh the same quantity
    term = torch.zeros_like(verts)
    norm = torch.zeros_like(verts[:, :1])
    for i, j, k in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        vi, vj, vk = verts[faces[:, i]], verts[faces[:, j]], verts[faces[:, k]]
        term.index_add_(0, faces[:, i], (vj - vi) + (vk - vi))
        norm.index_add_(0, faces[:, i], torch.full_like(vi[:, :1], 2.0))
    expected = (term / norm.clamp(min=1.0)).pow(2).mean()
    torch.testing.assert_close(laplacian_loss(verts, faces), expected)

    assert laplacian_loss(verts, faces, ref_verts=verts).item() == 0.0
    moved = (verts + torch.tensor([0.3, -0.2, 0.1])).requires_grad_()  # translation: no shape change
    loss = laplacian_loss(moved, faces, ref_verts=verts)
    assert loss.item() < 1e-12
    loss.backward()
    assert torch.isfinite(moved.grad).all()
    assert np.isclose(laplacian_loss(2 * verts, faces, ref_verts=verts).item(), laplacian_loss(verts, faces).item())


def test_face_adjacency_pairs_every_interior_edge_once(sphere):
    pairs = face_adjacency(sphere.faces)
    assert pairs.shape == (sphere.num_faces * 3 // 2, 2)  # closed manifold: each edge has two faces
    shared = (sphere.faces[pairs[:, 0], :, None] == sphere.faces[pairs[:, 1], None, :]).sum(dim=(1, 2))
    assert (shared == 2).all()
    flat = _grid_mesh(3)
    assert face_adjacency(flat.faces).shape[0] == (3 * flat.num_faces - 4 * 3) // 2  # 12 boundary edges
    assert face_adjacency(torch.zeros(0, 3, dtype=torch.int64)).shape == (0, 2)


def test_normal_consistency_plane_fold_and_sphere(sphere):
    flat = _grid_mesh(4)
    assert normal_consistency_loss(flat.verts, flat.faces).item() == pytest.approx(0.0, abs=1e-7)
    # two unit right triangles folded by 60 degrees along their shared edge: 1 - cos(60)
    angle = math.pi / 3
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, -math.cos(angle), math.sin(angle)]])
    faces = torch.tensor([[0, 1, 2], [0, 3, 1]])
    assert normal_consistency_loss(verts, faces).item() == pytest.approx(1 - math.cos(angle), rel=1e-5)
    # a finer sphere is smoother
    fine = Mesh.from_trimesh(trimesh.creation.icosphere(subdivisions=4))
    coarse_loss, fine_loss = normal_consistency_loss(sphere.verts, sphere.faces), normal_consistency_loss(fine.verts, fine.faces)
    assert 0 < fine_loss < coarse_loss / 3 < 0.01


def test_normal_consistency_gradient_matches_finite_differences():
    """The normaliser (total area-product weight) is a constant of the step: the gradient is that of the weighted sum
    of 1 - cos over that constant, checked here by central differences in float64."""
    torch.manual_seed(0)
    sphere = Mesh.from_trimesh(trimesh.creation.icosphere(subdivisions=1), dtype=torch.float64)
    faces = sphere.faces
    verts0 = sphere.verts * (1 + 0.05 * torch.randn(sphere.num_verts, 1, dtype=torch.float64))
    pairs = face_adjacency(faces)

    def total_weight(v):
        fn = face_normals(v, faces)
        return (fn[pairs[:, 0]].norm(dim=1) * fn[pairs[:, 1]].norm(dim=1)).sum()

    d0 = total_weight(verts0).detach()

    def fixed_normaliser(v):
        return normal_consistency_loss(v, faces, pairs) * total_weight(v).detach() / d0

    assert torch.autograd.gradcheck(fixed_normaliser, (verts0.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)
    # zero-area faces (coincident vertices) keep the value and the gradient finite
    verts = verts0.clone()
    verts[faces[0, 1]] = verts[faces[0, 0]]
    verts.requires_grad_(True)
    loss = normal_consistency_loss(verts, faces)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(verts.grad).all()


def test_normals_and_tangents_equal_the_three_functions():
    """The one-pass normals, tangents and handedness of pass 2 equal vertex_normals, compute_tangents and
    tangent_handedness, values and gradients: on a sphere with random UVs, faces mirrored in UV (handedness -1
    there) and an isolated vertex (the +z fallback)."""
    m = trimesh.creation.icosphere(subdivisions=2)
    faces = torch.as_tensor(m.faces, dtype=torch.int64)
    verts = torch.cat([torch.as_tensor(m.vertices, dtype=torch.float32), torch.zeros(1, 3)])
    uv = torch.rand(verts.shape[0], 2, generator=torch.Generator().manual_seed(0))
    uv_faces = faces.flip(1)
    weights = [torch.randn(verts.shape[0], 3, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]

    def run(fn):
        v = verts.clone().requires_grad_()
        n, t, s = fn(v)
        ((n * weights[0]).sum() + (t * weights[1]).sum()).backward()
        return n.detach(), t.detach(), s, v.grad

    def separate(v):
        n = vertex_normals(v, faces)
        t = compute_tangents(v, faces, uv, uv_faces, n)
        return n, t, tangent_handedness(v, faces, uv, uv_faces, n, t)

    one = run(lambda v: normals_and_tangents(v, faces, uv, uv_faces))  # eager on the CPU
    ref = run(separate)
    for a, b in zip(one[:3], ref[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (ref[2] == -1).any() and (ref[2] == 1).any()
    torch.testing.assert_close(one[2], ref[2])
    torch.testing.assert_close(one[3], ref[3], rtol=1e-5, atol=1e-5 * float(ref[3].abs().max()))
    torch.testing.assert_close(one[0][-1], torch.tensor([0.0, 0.0, 1.0]))
