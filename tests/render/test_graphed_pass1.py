"""Pass 1's graphed material and shading (`GraphedNeuralPBR`) on the CPU: the albedo-smoothness draws made outside
the material reproduce its own, the eager path is `render_pbr`, and the path that CUDA replays as a graph (run here
without one) gives `render_pbr`'s images, covered rows and gradients for the same rows and draws. The graphs
themselves: tests/render/test_graphed_shading_gpu.py."""
import math

import pytest
import torch
import trimesh

from recon import cuda_graphs
from recon.geometry.mesh import Mesh
from recon.light import EnvironmentLight
from recon.materials.pbr import NeuralPBRMaterial
from recon.render import make_rasterizer
from recon.render.camera import look_at, perspective
from recon.render.graphed import GraphedNeuralPBR
from recon.render.shading import render_pbr

LIGHT = dict(base_res=16, min_res=4, prefilter_samples=4, lut_resolution=32, lut_samples=32)
ENCODING = dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, max_resolution=32)


def _scene(res: int = 32):
    tm = trimesh.creation.icosphere(subdivisions=2, radius=0.7)
    verts = torch.tensor(tm.vertices, dtype=torch.float32).requires_grad_(True)
    proj = perspective(math.radians(40), 1.0, 0.1, 10.0)
    eyes = [(0.0, 0.4, 2.6), (1.9, 0.9, -1.4)]
    c2w = torch.stack([look_at(torch.tensor(e), torch.zeros(3), torch.tensor([0.0, 1.0, 0.0])) for e in eyes]).float()
    return verts, torch.tensor(tm.faces), proj @ torch.linalg.inv(c2w), c2w[:, :3, 3], (res, res)


def _models(fraction: float = 0.25):
    torch.manual_seed(2)
    material = NeuralPBRMaterial(torch.tensor([[-1.0] * 3, [1.0] * 3]), smoothness_fraction=fraction, n_neurons=16,
                                 backend="torch", encoding=ENCODING)
    light = EnvironmentLight(init="random", **LIGHT)
    light.build_mips()
    return material, light


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_smoothness_draws_are_the_materials_own(fraction):
    material, _ = _models(fraction)
    points = torch.rand(203, 3) * 1.6 - 0.8
    own = material(points, smoothness=True, generator=_gen(5))
    given = material(points, smoothness=True, draws=material.smoothness_draws(203, _gen(5)))
    for k in own:
        torch.testing.assert_close(given[k], own[k], rtol=0, atol=0)
    start, offset = material.smoothness_draws(203, _gen(5))
    assert (start is None) == (fraction == 1.0) and offset.shape == ((203, 3) if fraction == 1.0 else (50, 3))
    assert (own["kd_grad"] != 0).sum() <= offset.shape[0]  # only the jittered points carry the term


def test_graphed_neural_pbr_off_cuda_is_render_pbr():
    verts, faces, mvp, cam, res = _scene()
    material, light = _models()
    mesh = Mesh(verts, faces).with_normals()
    renderer = GraphedNeuralPBR(eager_steps=1)
    marks = []
    out = renderer.render(make_rasterizer("torch"), mesh, mvp, cam, res, material, light, generator=_gen(3),
                          mark=lambda: marks.append(1))

    def reference(gb, mask):
        return material(gb["covered_pos"], smoothness=True, generator=_gen(3))

    ref = render_pbr(make_rasterizer("torch"), mesh, mvp, cam, res, reference, light, material_images=False)
    torch.testing.assert_close(out["rgb"], ref["rgb"])
    torch.testing.assert_close(out["covered"]["kd_grad"], ref["covered"]["kd_grad"])
    assert "covered_valid" not in out and len(marks) == 3
    assert renderer.capacity is None and renderer.measured == 0  # nothing to measure without graphs


def _grads(out: dict, params: list) -> list:
    ks, kd_grad = out["covered"]["ks"], out["covered"]["kd_grad"]
    loss = ((out["rgb"] * torch.linspace(0.2, 1, 3)).sum() + (out["alpha"] - 0.5).abs().sum()
            + (ks * torch.tensor([3.0, 1, 2])).sum() + 7 * kd_grad.sum())
    grads = torch.autograd.grad(loss, params)
    return [out["rgb"], out["alpha"], ks, kd_grad, *grads]


@pytest.mark.parametrize("skip_padding", [True, False])
def test_the_graphed_path_equals_render_pbr_on_the_same_rows(skip_padding, monkeypatch):
    """The graphed path run eagerly (GraphCache.call without a capture) against `render_pbr` with the capacity and the
    draws it used: images, covered rows and the gradients to the vertices, the material and the light."""
    monkeypatch.setattr(cuda_graphs, "applies", lambda args: True)
    calls = []

    def call(self, name, fn, *args):  # the light's mip chain goes through here too
        calls.append(name)
        return tuple(fn(*args))

    monkeypatch.setattr(cuda_graphs.GraphCache, "call", call)
    verts, faces, mvp, cam, res = _scene()
    material, light = _models()
    r = make_rasterizer("torch")
    params = [verts, *material.parameters(), light.base]
    renderer = GraphedNeuralPBR(eager_steps=1, granularity=256, skip_padding=skip_padding)
    first = renderer.render(r, Mesh(verts, faces).with_normals(), mvp, cam, res, material, light, generator=_gen(1))
    assert renderer.measured == 1 and renderer.capacity is None and "covered_valid" not in first
    assert not [c for c in calls if c.startswith("pass-1")]
    light.build_mips()  # the light's tensors, taken again after the first step's graph (as each step does)
    encode, masks = material.field.encoder.forward, []
    material.field.encoder.forward = lambda x, row_mask=None: masks.append(row_mask) or encode(x, row_mask)
    out = renderer.render(r, Mesh(verts, faces).with_normals(), mvp, cam, res, material, light, generator=_gen(9))
    n, capacity = first["covered_index"].shape[0], renderer.capacity
    assert [c for c in calls if c.startswith("pass-1")] == [f"pass-1 shading {capacity}"]
    assert capacity == math.ceil(n * 1.15 / 256) * 256 > n
    got = _grads(out, params)
    del material.field.encoder.forward
    assert len(masks) == 1
    if skip_padding:  # the hash grid was told to skip the padding rows: the covered rows, then their jittered copies
        assert masks[0].shape[0] == capacity + capacity // 4 and n < int(masks[0].sum()) < n + n // 4 + 2
    else:
        assert masks[0] is None

    draws = material.smoothness_draws(capacity, _gen(9))
    light.build_mips()

    def reference(gb, mask):
        return material(gb["covered_pos"], smoothness=True, draws=draws)

    ref_out = render_pbr(r, Mesh(verts, faces).with_normals(), mvp, cam, res, reference, light, material_images=False,
                         capacity=capacity)
    ref = _grads(ref_out, params)
    assert out["covered_index"].shape[0] == capacity and int(out["covered_valid"].sum()) == n
    assert (out["covered"]["kd_grad"][n:] == 0).all() and (out["covered"]["kd_grad"] != 0).any()
    names = ("rgb", "alpha", "ks", "kd_grad", "verts grad", *(f"material grad {i}" for i in range(len(params) - 2)),
             "light grad")
    for name, a, b in zip(names, got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert float(got[4].abs().max()) > 0 and float(got[-1].abs().max()) > 0


def test_pass1_stats_have_their_own_names():
    renderer = GraphedNeuralPBR()
    assert renderer.eager_steps == 100
    renderer.capacity, renderer.largest = 1_441_792, 1_300_000
    assert renderer.stats() == {"pass1_graph_shading_rows": 1_441_792, "pass1_graph_shading_covered_max": 1_300_000,
                                "pass1_graph_shading_overflows": 0}


def test_pass1_renderer_copies_keep_its_settings():
    import copy
    import pickle

    renderer = GraphedNeuralPBR(eager_steps=3, margin=0.05, skip_padding=False)
    renderer.capacity = 5000
    for clone in (copy.deepcopy(renderer), pickle.loads(pickle.dumps(renderer))):
        assert isinstance(clone, GraphedNeuralPBR) and clone.capacity is None
        assert (clone.eager_steps, clone.margin, clone.skip_padding) == (3, 0.05, False)
