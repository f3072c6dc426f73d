"""Pass 2's graphed shading on CUDA (nvdiffrast): the renders, losses and gradients of `GraphedPBR` equal the eager
`render_pbr`'s step after step, it captures once, and a batch covering more pixels than its capacity raises the
capacity (marked `gpu`)."""
import math

import pytest
import torch
import trimesh

from recon import cuda_graphs
from recon.export.uv_bake import unwrap
from recon.geometry.fixed_mesh import FixedTopologyMesh
from recon.geometry.mesh import Mesh
from recon.light import EnvironmentLight
from recon.materials.pbr import TexturePBRMaterial
from recon.render import make_rasterizer
from recon.render.camera import look_at, perspective
from recon.render.graphed import GraphedPBR

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("graphs_on")]


def _cameras(distances, res: int = 96):
    proj = perspective(math.radians(40), 1.0, 0.1, 10.0)
    eyes = [(d * math.sin(1.3 * i), 0.4, d * math.cos(1.3 * i)) for i, d in enumerate(distances)]
    c2w = torch.stack([look_at(torch.tensor(e), torch.zeros(3), torch.tensor([0.0, 1.0, 0.0])) for e in eyes]).float()
    return (proj @ torch.linalg.inv(c2w)).cuda(), c2w[:, :3, 3].contiguous().cuda(), (res, res)


def _model():
    tm = trimesh.creation.icosphere(subdivisions=3, radius=0.7)
    mesh = unwrap(Mesh(torch.tensor(tm.vertices, dtype=torch.float32), torch.tensor(tm.faces)))
    torch.manual_seed(0)
    surface = FixedTopologyMesh(mesh).cuda()
    textures = TexturePBRMaterial(torch.rand(64, 64, 9)).cuda()
    textures.clamp_()
    light = EnvironmentLight(base_res=64, min_res=8, diffuse_res=8, init="random").cuda()
    return surface, textures, light


def _loss(out: dict, surface: FixedTopologyMesh) -> torch.Tensor:
    """A pass-2-like loss of every output: images, the covered rows' occlusion term, the Laplacian."""
    alpha_rows = out["alpha"].detach().reshape(-1, 1).index_select(0, out["covered_index"])
    w = torch.linspace(0.2, 1.0, 3, device="cuda")
    return ((out["rgb"] - 0.3) ** 2 * w).mean() + (out["alpha"] - 0.5).abs().mean() + (
        out["covered"]["ks"][:, :1] * alpha_rows).sum() / out["alpha"].numel() + 10 * surface.laplacian_regularizer()


def _steps(renderer: GraphedPBR, cameras: list, steps: int, compare: bool = False) -> list:
    """Gradient steps of a pass-2-like loss (plain steps, so the parameters move). With ``compare``, each step first
    renders with every graph off (`render_pbr`, eager) and then with them on, from the same parameters, and
    returns both steps' images, loss and gradients; the parameters follow the graphed step."""
    surface, textures, light = _model()
    r = make_rasterizer("nvdiffrast", "cuda")
    params = [surface.offset, textures.texture, light.base]
    opt = torch.optim.SGD(params, lr=0.5)
    seen = []
    for step in range(steps):
        mvp, cam, res = cameras[step % len(cameras)]
        found = {}
        for graphs in ((False, True) if compare else (True,)):
            cuda_graphs.set_enabled(graphs)
            opt.zero_grad(set_to_none=True)
            light.build_mips()
            out = renderer.render(r, surface(), mvp, cam, res, textures, light, fused=True)
            loss = _loss(out, surface)
            loss.backward()
            found[graphs] = [t.detach().clone() for t in (out["rgb"], out["alpha"], loss, *(p.grad for p in params))]
        seen.append((found, surface.offset.detach().clone()))
        opt.step()
        textures.clamp_()
    return seen


def _close(a, b, what: str) -> None:
    """Equal up to float rounding: nvdiffrast's backward passes and the antialiasing add atomically in any order."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()) + 1e-6, msg=lambda m: f"{what}: {m}")


def test_graphed_shading_matches_eager_step_by_step():
    renderer = GraphedPBR(eager_steps=2)
    seen = _steps(renderer, [_cameras([2.4, 2.6, 2.2, 2.8])], 6, compare=True)
    assert renderer.capacity is not None and renderer.overflows == 0
    assert renderer._graphs.captures(renderer.graph_name) == 1  # steps 2-5 replayed one capture
    names = ("rgb", "alpha", "loss", "offset grad", "texture grad", "light grad")
    for step, (found, _) in enumerate(seen):
        for name, a, b in zip(names, found[True], found[False]):
            _close(a, b, f"step {step} {name}")
    assert (seen[-1][1] - seen[0][1]).abs().max() > 1e-6  # the steps moved the mesh: replays saw new values


def test_a_batch_beyond_the_capacity_raises_it():
    far, near = _cameras([4.0, 4.2]), _cameras([1.6, 1.7])
    renderer = GraphedPBR(eager_steps=1, margin=0.0, granularity=256)
    _steps(renderer, [far, far, near, near, near], 5)
    # step 0 measured (far), steps 1-4 graphed: step 2 (near) overflowed, seen at step 3, which captured again
    assert renderer.overflows == 1
    assert renderer.capacity >= renderer.largest and renderer._graphs.captures(renderer.graph_name) == 1


def _pass1_loss(out: dict) -> torch.Tensor:
    """A pass-1-like loss of every output: images, the covered rows' occlusion and albedo-smoothness terms."""
    alpha_rows = out["alpha"].detach().reshape(-1, 1).index_select(0, out["covered_index"])
    w = torch.linspace(0.2, 1.0, 3, device="cuda")
    covered, n = out["covered"], out["alpha"].numel()
    return ((out["rgb"] - 0.3) ** 2 * w).mean() + (out["alpha"] - 0.5).abs().mean() + (
        covered["ks"][:, :1] * alpha_rows).sum() / n + 3 * covered["kd_grad"].sum() / n


def test_pass1_graphed_shading_matches_eager_on_the_same_rows():
    """`GraphedNeuralPBR` against `render_pbr` run eagerly with the capacity and the albedo-smoothness draws the
    graphed render used, step after step while DMTet's mesh changes size: images, loss and the gradients to the sdf,
    the vertex offsets, the hash grid and MLP, and the light."""
    from recon.geometry.dmtet import DMTetGeometry
    from recon.materials.pbr import NeuralPBRMaterial
    from recon.render.graphed import GraphedNeuralPBR
    from recon.render.shading import render_pbr

    torch.manual_seed(0)
    geometry = DMTetGeometry(tet_grid=24, scale=2.0, init_radius=0.55).cuda()
    aabb = torch.tensor([[-1.0] * 3, [1.0] * 3])
    material = NeuralPBRMaterial(aabb, encoding=dict(n_levels=8, log2_hashmap_size=14, max_resolution=256)).cuda()
    light = EnvironmentLight(base_res=64, min_res=8, diffuse_res=8, init="random").cuda()
    r = make_rasterizer("nvdiffrast", "cuda")
    renderer = GraphedNeuralPBR(eager_steps=2)
    params = [geometry.sdf, geometry.deform, *material.parameters(), light.base]
    opt = torch.optim.SGD(params, lr=0.3)
    cams = _cameras([2.4, 2.6, 2.2, 2.8])
    faces, names = set(), ("rgb", "alpha", "loss", "sdf grad", "deform grad", "material grads", "light grad")
    for step in range(7):
        mvp, cam, res = cams
        seen = {}
        for graphs in (True, False):
            cuda_graphs.set_enabled(graphs)
            opt.zero_grad(set_to_none=True)
            light.build_mips()
            mesh = geometry()
            gen = torch.Generator(device="cuda").manual_seed(100 + step)
            if graphs:
                out = renderer.render(r, mesh, mvp, cam, res, material, light, fused=True, generator=gen)
                faces.add(mesh.faces.shape[0])
                if renderer.capacity is None:
                    break  # still measuring: an eager step
            else:
                draws = material.smoothness_draws(renderer.capacity, gen)

                def neural(gb, mask, draws=draws):
                    return material(gb["covered_pos"], smoothness=True, draws=draws)

                out = render_pbr(r, mesh, mvp, cam, res, neural, light, fused=True, material_images=False,
                                 capacity=renderer.capacity)
            loss = _pass1_loss(out)
            loss.backward()
            grads = torch.cat([p.grad.reshape(-1) for p in params[2:-1]])
            seen[graphs] = [t.detach().clone() for t in (out["rgb"], out["alpha"], loss, geometry.sdf.grad,
                                                          geometry.deform.grad, grads, light.base.grad)]
        if len(seen) == 2:
            for name, a, b in zip(names, seen[True], seen[False]):
                _close(a, b, f"step {step} {name}")
        opt.step()
        with torch.no_grad():
            geometry.sdf += 0.01  # the sphere shrinks: its mesh changes size from step to step
    cuda_graphs.set_enabled(True)
    assert renderer.capacity is not None and renderer.overflows == 0
    assert renderer._graphs.captures(renderer.graph_name) == 1  # steps 2-6 replayed one capture
    assert len(faces) > 1  # the mesh changed size while the graph replayed
