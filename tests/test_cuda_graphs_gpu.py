"""recon.cuda_graphs on CUDA: the light's mip chain and pass 2's mesh replayed as CUDA graphs give the values and
gradients of the eager functions, step after step, capture once, and stay eager where they must (marked `gpu`)."""
import pytest
import torch

from recon import cuda_graphs
from recon.geometry.fixed_mesh import FixedTopologyMesh
from recon.geometry.mesh import Mesh
from recon.light import EnvironmentLight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("graphs_on")]


def _close(a, b, what: str) -> None:
    """Equal up to float rounding: the scatter-adds (vertex sums, gradients) add in a different order each run, and
    cancelling sums can lose a few digits of their largest term, so the absolute tolerance follows the largest value."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4 * float(b.abs().max()) + 1e-7, msg=lambda m: f"{what}: {m}")


def _sheet(n: int = 48) -> Mesh:
    """A wavy height field over the unit square, UVs = (x, y): well-conditioned normals, tangents and handedness."""
    t = torch.linspace(0, 1, n)
    y, x = torch.meshgrid(t, t, indexing="ij")
    verts = torch.stack([x, y, 0.1 * torch.sin(3 * x) * torch.cos(2 * y)], -1).reshape(-1, 3)
    i = torch.arange(n - 1)
    a = (i[:, None] * n + i[None, :]).reshape(-1)  # each cell's lower-left corner
    faces = torch.cat([torch.stack([a, a + 1, a + n + 1], 1), torch.stack([a, a + n + 1, a + n], 1)])
    return Mesh(verts=verts, faces=faces, uv=verts[:, :2].clone(), uv_faces=faces)


def _mesh_steps(surface: FixedTopologyMesh, graphs: bool, steps: int = 3) -> list:
    """A few optimiser steps on a loss of every differentiable output; the values and gradients of each step."""
    cuda_graphs.set_enabled(graphs)
    g = torch.Generator(device="cuda").manual_seed(1)
    weights = [torch.randn(surface.initial_verts.shape[0], 3, device="cuda", generator=g) for _ in range(3)]
    weights.append(torch.randn(surface.faces.shape[0], 3, device="cuda", generator=g))
    opt = torch.optim.Adam(surface.parameters(), lr=1e-3)
    seen = []
    for _ in range(steps):
        mesh = surface()
        lap = surface.laplacian_regularizer()
        outputs = (mesh.verts, mesh.normals, mesh.tangents, mesh.face_normals)
        loss = sum((t * w).sum() for t, w in zip(outputs, weights)) + 1e3 * lap
        opt.zero_grad(set_to_none=True)
        loss.backward()
        seen.append([t.detach().clone() for t in (mesh.verts, mesh.normals, mesh.tangents, mesh.handedness,
                                                  mesh.face_normals, lap, surface.offset.grad)])
        opt.step()
    return seen


def test_fixed_mesh_graphs_match_eager_over_steps():
    start = _sheet().to("cuda")
    eager, graphed = FixedTopologyMesh(start).cuda(), FixedTopologyMesh(start).cuda()
    with torch.no_grad():
        eager.offset.normal_(std=0.01, generator=torch.Generator(device="cuda").manual_seed(2))
        graphed.offset.copy_(eager.offset)
    expected = _mesh_steps(eager, graphs=False)
    found = _mesh_steps(graphed, graphs=True)
    assert eager._graphs.captures("mesh") == 0
    assert graphed._graphs.captures("mesh") == 1 and graphed._graphs.captures("laplacian") == 1
    names = ("verts", "normals", "tangents", "handedness", "face normals", "laplacian", "offset grad")
    for step, (step_found, step_expected) in enumerate(zip(found, expected)):
        for name, a, b in zip(names, step_found, step_expected):
            _close(a, b, f"step {step} {name}")
    assert not torch.equal(found[0][0], found[-1][0])  # the offset moved: later steps replayed on new values


def test_fixed_mesh_without_gradients_runs_eagerly_and_keeps_its_outputs():
    surface = FixedTopologyMesh(_sheet().to("cuda")).cuda()
    surface().verts.sum().backward()  # captured
    with torch.no_grad():
        first = surface().normals
        surface.offset.add_(0.05)
        second = surface().normals
    assert surface._graphs.captures("mesh") == 1
    assert not torch.equal(first, second)  # each call's own tensors, not a graph's buffer overwritten


def _light_steps(light: EnvironmentLight, graphs: bool, steps: int = 3) -> list:
    cuda_graphs.set_enabled(graphs)
    opt = torch.optim.Adam(light.parameters(), lr=1e-2)
    g = torch.Generator(device="cuda").manual_seed(3)
    light.build_mips()
    weights = [torch.randn_like(t, generator=g) for t in [*light.specular, light.diffuse]]
    seen = []
    for _ in range(steps):
        light.build_mips()
        loss = sum((t * w).sum() for t, w in zip([*light.specular, light.diffuse], weights))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        seen.append([t.detach().clone() for t in [*light.specular, light.diffuse, light.base.grad]])
        opt.step()
        light.clamp_(min=0.0)
    return seen


def test_light_mips_graphs_match_eager_over_steps():
    eager = EnvironmentLight(base_res=64, min_res=8, diffuse_res=8, init="random").cuda()
    graphed = EnvironmentLight(base_res=64, min_res=8, diffuse_res=8).cuda()
    graphed.load_state_dict(eager.state_dict())
    expected = _light_steps(eager, graphs=False)
    found = _light_steps(graphed, graphs=True)
    assert eager._graphs.captures("light mips") == 0 and graphed._graphs.captures("light mips") == 1
    for step, (step_found, step_expected) in enumerate(zip(found, expected)):
        for k, (a, b) in enumerate(zip(step_found, step_expected)):
            _close(a, b, f"step {step} output {k}")


def test_new_shapes_capture_again():
    light = EnvironmentLight(base_res=32, min_res=8, diffuse_res=8).cuda()
    light.build_mips()
    light.specular[-1].sum().backward()
    light.base = torch.nn.Parameter(torch.rand(6, 64, 64, 3, device="cuda"))
    light.build_mips()
    assert [t.shape[1] for t in light.specular] == [64, 32, 16, 8]
    assert light._graphs.captures("light mips") == 2
