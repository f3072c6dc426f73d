"""Shading a fixed number of rows (`covered_rows` with a capacity, what pass 2's CUDA graph shades) equals shading the
covered pixels exactly; `GraphedPBR` runs `render_pbr` where graphs do not apply (CPU). The graphs themselves:
tests/render/test_graphed_shading_gpu.py."""
import math

import pytest
import torch
import trimesh

from recon import cuda_graphs
from recon.export.uv_bake import unwrap
from recon.geometry.mesh import Mesh
from recon.light import EnvironmentLight
from recon.materials.pbr import TexturePBRMaterial
from recon.render import make_rasterizer
from recon.render.camera import look_at, perspective
from recon.render.graphed import GraphedPBR, texture_material
from recon.render.shading import covered_rows, render_pbr

LIGHT = dict(base_res=16, min_res=4, prefilter_samples=4, lut_resolution=32, lut_samples=32)


def _textured_scene(res: int = 40):
    tm = trimesh.creation.icosphere(subdivisions=2, radius=0.7)
    mesh = unwrap(Mesh(torch.tensor(tm.vertices, dtype=torch.float32), torch.tensor(tm.faces)))
    proj = perspective(math.radians(40), 1.0, 0.1, 10.0)
    eyes = [(0.0, 0.4, 2.6), (1.9, 0.9, -1.4)]
    c2w = torch.stack([look_at(torch.tensor(e), torch.zeros(3), torch.tensor([0.0, 1.0, 0.0])) for e in eyes]).float()
    return mesh, proj @ torch.linalg.inv(c2w), c2w[:, :3, 3], (res, res)


def _light() -> EnvironmentLight:
    torch.manual_seed(1)
    light = EnvironmentLight(init="random", **LIGHT)
    light.build_mips()
    return light


def test_covered_rows_with_a_capacity_pad_after_the_covered_pixels():
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[0, 1, 2] = mask[1, 0, 0] = mask[1, 2, 3] = True
    gather, place, valid = covered_rows(mask)
    assert valid is None and gather.tolist() == place.tolist() == [6, 12, 23]
    gather, place, valid = covered_rows(mask, 5)
    # padding rows repeat the covered rows (their zero gradients then spread like the covered rows')
    assert place.tolist() == [6, 12, 23, 24, 24] and gather.tolist() == [6, 12, 23, 6, 12]
    assert valid[:, 0].tolist() == [True, True, True, False, False]
    gather, place, valid = covered_rows(mask, 2)  # too small: the first covered pixels, in order
    assert place.tolist() == [6, 12] and gather.tolist() == [6, 12] and valid.all()
    gather, place, valid = covered_rows(torch.zeros_like(mask), 2)  # nothing covered: the last pixel
    assert place.tolist() == [24, 24] and gather.tolist() == [23, 23] and not valid.any()


def _render(capacity, res=40):
    mesh, mvp, cam, res = _textured_scene(res)
    r = make_rasterizer("torch")
    light = _light()
    tex = TexturePBRMaterial(torch.rand(16, 16, 9, generator=torch.Generator().manual_seed(0)))
    verts = mesh.verts.clone().requires_grad_(True)
    m = Mesh(verts, mesh.faces, uv=mesh.uv, uv_faces=mesh.uv_faces).with_normals().with_tangents()
    out = render_pbr(r, m, mvp, cam, res, texture_material(tex, r), light, material_images=False, capacity=capacity)
    ks = out["covered"]["ks"]
    loss = (out["rgb"] * torch.linspace(0.2, 1, 3)).sum() + out["alpha"].sum() + (ks * torch.tensor([3.0, 1, 2])).sum()
    loss.backward()
    return out, (out["rgb"].detach(), out["alpha"].detach(), tex.texture.grad, verts.grad, light.base.grad)


def test_shading_a_fixed_number_of_rows_equals_shading_the_covered_pixels():
    exact, ref = _render(None)
    n = exact["covered_index"].shape[0]
    padded, got = _render(n + 500)
    assert padded["covered_index"].shape[0] == n + 500 and int(padded["covered_count"]) == n
    assert padded["covered_valid"][:n].all() and not padded["covered_valid"][n:].any()
    assert (padded["covered"]["ks"][n:] == 0).all()  # padding rows reach no loss of covered rows
    torch.testing.assert_close(padded["covered"]["ks"][:n], exact["covered"]["ks"])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_capacity_below_the_covered_pixels_leaves_the_rest_unshaded():
    exact, _ = _render(None)
    n = exact["covered_index"].shape[0]
    short, _ = _render(n - 100)
    assert int(short["covered_count"]) == n and short["covered_index"].shape[0] == n - 100
    rgb_e, rgb_s = exact["rgb"].detach().reshape(-1, 3), short["rgb"].detach().reshape(-1, 3)
    left_out = exact["covered_index"][n - 100:]
    assert (rgb_s[left_out].abs().sum(-1) < rgb_e[left_out].abs().sum(-1)).float().mean() > 0.9
    torch.testing.assert_close(short["alpha"], exact["alpha"])  # coverage comes from the rasterizer, unchanged


def test_graphed_pbr_off_cuda_is_render_pbr():
    mesh, mvp, cam, res = _textured_scene(32)
    r = make_rasterizer("torch")
    light = _light()
    tex = TexturePBRMaterial(torch.rand(16, 16, 9, generator=torch.Generator().manual_seed(0)))
    m = Mesh(mesh.verts, mesh.faces, uv=mesh.uv, uv_faces=mesh.uv_faces).with_normals().with_tangents()
    renderer = GraphedPBR(eager_steps=1)
    marks = []
    out = renderer.render(r, m, mvp, cam, res, tex, light, mark=lambda: marks.append(1))
    ref = render_pbr(r, m, mvp, cam, res, texture_material(tex, r), light, material_images=False)
    torch.testing.assert_close(out["rgb"], ref["rgb"])
    assert "covered_valid" not in out and len(marks) == 3
    assert renderer.capacity is None and renderer.measured == 0  # nothing to measure without graphs


def test_graphed_pbr_settings_and_copies():
    with pytest.raises(ValueError, match="eager_steps"):
        GraphedPBR(eager_steps=0)
    with pytest.raises(ValueError, match="model.render.graph_margin"):
        GraphedPBR(margin=-0.1)
    renderer = GraphedPBR(eager_steps=3, margin=0.25, granularity=1000)
    assert renderer._capacity_for(10_000) == 13_000 and renderer._capacity_for(1) == 1000
    renderer.capacity, renderer.largest = 5000, 4000
    import copy
    import pickle

    for clone in (copy.deepcopy(renderer), pickle.loads(pickle.dumps(renderer))):
        assert clone.capacity is None and clone.largest == 0 and clone.margin == 0.25 and clone.eager_steps == 3


def test_light_using_swaps_and_restores_its_tensors():
    light = _light()
    spec, diffuse, lut = light.specular, light.diffuse, light.lut
    other = [s * 2 for s in spec]
    with light.using(other, diffuse * 2, lut.clone()):
        assert light.specular[1] is other[1] and light.lut is not lut
    assert light.specular is spec and light.diffuse is diffuse and light.lut is lut


def test_graph_cache_failed_and_drop():
    cache = cuda_graphs.GraphCache()
    assert not cache.failed("x")
    cache.drop("x")  # unknown names are fine
    assert cache.captures("x") == 0


def test_graphed_pbr_stats_name_the_rows_and_overflows():
    renderer = GraphedPBR()
    renderer.capacity, renderer.largest, renderer.overflows = 1_048_576, 900_000, 1
    assert renderer.stats() == {"graph_shading_rows": 1_048_576, "graph_shading_covered_max": 900_000,
                                "graph_shading_overflows": 1}


class _Event:
    def __init__(self, done: bool):
        self.done = done

    def query(self) -> bool:
        return self.done


def test_a_count_over_the_capacity_raises_it_once_it_reaches_the_host(caplog):
    renderer = GraphedPBR(margin=0.1, granularity=1000)
    renderer.capacity, renderer._count = 4000, torch.tensor(5000)
    renderer._count_ready = _Event(False)  # still on its way: nothing read yet
    renderer._check_previous()
    assert renderer.capacity == 4000 and renderer.overflows == 0 and renderer.largest == 0
    renderer._count_ready = _Event(True)
    with caplog.at_level("WARNING", logger="recon.render.graphed"):
        renderer._check_previous()
    assert renderer.overflows == 1 and renderer.largest == 5000 and renderer.capacity == 6000  # 5000 * 1.1, rounded up
    assert "covered 5000 pixels, more than the 4000 rows" in caplog.text
    renderer._check_previous()  # read once
    assert renderer.overflows == 1
    renderer._count, renderer._count_ready = torch.tensor(5500), _Event(True)
    renderer._check_previous()  # within the capacity: measured only
    assert renderer.overflows == 1 and renderer.capacity == 6000 and renderer.largest == 5500
