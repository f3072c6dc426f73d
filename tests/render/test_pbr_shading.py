"""Split-sum PBR rendering: normal-map frames, the full render, and the pass-1 -> texture bake that must reproduce it."""
import math

import pytest
import torch
import trimesh

from recon.export.uv_bake import bake_pbr_textures, bake_texture, unwrap
from recon.geometry.mesh import Mesh
from recon.light import EnvironmentLight
from recon.render import make_rasterizer
from recon.render.camera import look_at, perspective
from recon.render.shading import perturb_normal, reference_tangent, render_pbr, to_tangent_space

LIGHT = dict(base_res=16, min_res=4, lut_resolution=32, lut_samples=64, diffuse_res=4)


def _unit(v):
    return torch.nn.functional.normalize(v, dim=-1)


def test_tangent_space_round_trip_both_handedness():
    torch.manual_seed(0)
    n = _unit(torch.randn(200, 3))
    t = reference_tangent(n)
    assert (t * n).sum(-1).abs().max() < 1e-5 and torch.allclose(t.norm(dim=-1), torch.ones(200))
    ts = _unit(torch.randn(200, 3) * torch.tensor([1.0, 1.0, 0.0]) + torch.tensor([0.0, 0.0, 1.0]))
    for hand in (1.0, -1.0):
        world = perturb_normal(ts, n, t, hand)
        torch.testing.assert_close(to_tangent_space(world, n, t, hand), ts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(perturb_normal(torch.tensor([[0.0, 0.0, 1.0]]).expand(200, 3), n, t), n, atol=1e-6, rtol=0)


def _scene(res=48):
    tm = trimesh.creation.icosphere(subdivisions=3, radius=0.7)
    mesh = Mesh(torch.tensor(tm.vertices, dtype=torch.float32), torch.tensor(tm.faces)).with_normals()
    proj = perspective(math.radians(40), 1.0, 0.1, 10.0)
    eyes = [(0.0, 0.4, 2.6), (1.9, 0.9, -1.4)]
    c2w = torch.stack([look_at(torch.tensor(e), torch.zeros(3), torch.tensor([0.0, 1.0, 0.0])) for e in eyes]).float()
    return mesh, proj @ torch.linalg.inv(c2w), c2w[:, :3, 3], (res, res)


def _field(p):
    """A 9-channel material field with a strongly varying normal perturbation."""
    kd = torch.stack([(p[:, 0] + 1) / 2, (p[:, 1] + 1) / 2, torch.full_like(p[:, 0], 0.3)], -1)
    ks = torch.stack([torch.zeros_like(p[:, 0]), 0.3 + 0.4 * (p[:, 2] + 1) / 2, 0.5 * (p[:, 0] > 0).float()], -1)
    nrm = _unit(torch.stack([0.6 * torch.sin(4 * p[:, 1]), 0.6 * torch.cos(3 * p[:, 0]), torch.ones_like(p[:, 0])], -1))
    return torch.cat([kd, ks, nrm], -1)


def _light():
    torch.manual_seed(1)
    light = EnvironmentLight(init="random", **LIGHT)
    with torch.no_grad():
        light.base[2] *= 4  # a bright sky face: strong directional variation
    light.build_mips()
    return light


def test_render_pbr_outputs_and_gradients():
    mesh, mvp, cam, res = _scene(32)
    r = make_rasterizer("torch")
    verts = mesh.verts.clone().requires_grad_(True)
    mesh = Mesh(verts, mesh.faces).with_normals()
    light = _light()
    kd = torch.full((3,), 0.5, requires_grad=True)

    def material(gb, mask):
        n = int(mask.sum())
        return {"kd": kd.expand(n, 3), "ks": torch.tensor([0.0, 0.5, 0.0]).expand(n, 3),
                "nrm": torch.tensor([0.0, 0.0, 1.0]).expand(n, 3)}

    out = render_pbr(r, mesh, mvp, cam, res, material, light, depth=True)
    assert out["rgb"].shape == (2, 32, 32, 3) and out["alpha"].shape == (2, 32, 32, 1)
    covered = out["mask"]
    assert covered.float().mean() > 0.2 and (out["rgb"][covered] > 0).all()
    # shading normals face the camera on a convex object
    view = torch.nn.functional.normalize(cam[:, None, None] - out["gb_pos"], dim=-1)
    assert ((out["normal"] * view).sum(-1)[covered] > -1e-4).all()
    # depth: the distance along the view axis, between the sphere's near and far extent
    dist = cam.norm(dim=-1)[:, None, None].expand_as(out["depth"][..., 0])
    d = out["depth"][..., 0][covered]
    assert (d > dist[covered] - 0.75).all() and (d < dist[covered] + 0.01).all()
    (out["rgb"].sum() + out["alpha"].sum()).backward()
    assert kd.grad.abs().sum() > 0 and verts.grad.abs().sum() > 0 and light.base.grad.abs().sum() > 0


def test_baked_textures_reproduce_the_neural_field():
    """Pass-1 render (3D field, reference tangent frame) == render of the baked 9-channel texture on the UV mesh (its
    UV tangent frame): checks the bake's re-expression of the normal map and the tangent handedness."""
    mesh, mvp, cam, res = _scene(64)
    r = make_rasterizer("torch")
    light = _light()
    uv_mesh = unwrap(mesh).with_tangents()
    tex = bake_pbr_textures(r, uv_mesh, _field, 512)

    def field_material(gb, mask):
        v = _field(gb["gb_pos"][mask])
        return {"kd": v[:, 0:3], "ks": v[:, 3:6], "nrm": v[:, 6:9]}

    def texture_material(gb, mask):
        v = r.texture(tex[None], gb["gb_uv"], gb["gb_uv_da"], filter_mode="linear-mipmap-linear")
        return {"kd": v[..., 0:3], "ks": v[..., 3:6], "nrm": v[..., 6:9]}

    uv_mesh_no_frame = Mesh(uv_mesh.verts, uv_mesh.faces, uv_mesh.normals)  # field: reference_tangent frame
    ref = render_pbr(r, uv_mesh_no_frame, mvp, cam, res, field_material, light)
    baked = render_pbr(r, uv_mesh, mvp, cam, res, texture_material, light)
    m = ref["mask"]
    err = (ref["rgb"][m] - baked["rgb"][m]).abs()
    psnr = -10 * torch.log10(((ref["rgb"][m] - baked["rgb"][m]) ** 2).mean() / ref["rgb"][m].max() ** 2)
    assert psnr > 32, (psnr, err.max())
    # a bake that ignored the frame change (the raw field normals copied into the texture) is visibly wrong
    tex_raw_mat = bake_texture(r, uv_mesh, _field, 512)  # every channel copied as the field gives it

    def wrong_material(gb, mask):
        v = r.texture(tex_raw_mat[None], gb["gb_uv"], gb["gb_uv_da"], filter_mode="linear-mipmap-linear")
        return {"kd": v[..., 0:3], "ks": v[..., 3:6], "nrm": v[..., 6:9]}

    wrong = render_pbr(r, uv_mesh, mvp, cam, res, wrong_material, light)
    psnr_wrong = -10 * torch.log10(((ref["rgb"][m] - wrong["rgb"][m]) ** 2).mean() / ref["rgb"][m].max() ** 2)
    assert psnr_wrong < psnr - 6, (psnr, psnr_wrong)


def test_uv_handedness_flips_with_mirrored_uvs():
    tm = trimesh.creation.icosphere(subdivisions=2)
    mesh = unwrap(Mesh(torch.tensor(tm.vertices, dtype=torch.float32), torch.tensor(tm.faces)).with_normals())
    a = mesh.with_tangents()
    mirrored = Mesh(mesh.verts, mesh.faces, mesh.normals, uv=mesh.uv * torch.tensor([-1.0, 1.0]) + torch.tensor([1.0, 0.0]),
                    uv_faces=mesh.uv_faces).with_tangents()
    assert (mirrored.handedness == -a.handedness).float().mean() > 0.9
    with pytest.raises(ValueError, match="texture coordinates"):
        Mesh(mesh.verts, mesh.faces).with_tangents()


def test_texture_material_at_covered_pixels_equals_the_image_lookup():
    """Pass 2 looks the texture up at the covered pixels alone ([N,2] UVs): the render and its gradients (texture,
    vertices) equal those of the lookup over whole G-buffer images; no covered pixel gives empty channels."""
    from recon.gather import masked_rows
    from recon.materials.pbr import TexturePBRMaterial

    mesh, mvp, cam, res = _scene(40)
    r = make_rasterizer("torch")
    uv_mesh = unwrap(mesh)
    results = []
    for points in (False, True):
        light = _light()
        mat = TexturePBRMaterial(torch.rand(16, 16, 9, generator=torch.Generator().manual_seed(0)))
        verts = uv_mesh.verts.clone().requires_grad_(True)
        m = Mesh(verts, uv_mesh.faces, uv=uv_mesh.uv, uv_faces=uv_mesh.uv_faces).with_normals().with_tangents()

        def material(gb, mask):
            if not points:
                return mat(r, gb["gb_uv"], gb["gb_uv_da"])
            sel = gb["covered_index"]
            return mat(r, masked_rows(gb["gb_uv"], sel, mask.dim()), masked_rows(gb["gb_uv_da"], sel, mask.dim()))

        out = render_pbr(r, m, mvp, cam, res, material, light)
        (out["rgb"] * torch.linspace(0, 1, 3)).sum().backward()
        results.append((out["rgb"].detach(), mat.texture.grad, verts.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert results[0][1].abs().sum() > 0 and results[0][2].abs().sum() > 0
    empty = TexturePBRMaterial(torch.rand(8, 8, 9))(r, torch.zeros(0, 2), torch.zeros(0, 4))
    assert all(v.shape == (0, 3) for v in empty.values())
