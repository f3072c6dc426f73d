"""recon.compiled: the fused functions give the eager values and gradients when traced by torch.compile; modes and
the fallback when compiling fails. On the CPU the trace runs through the 'aot_eager' backend (graph capture and
autograd, no code generation); tests/test_compiled_gpu.py checks Inductor's kernels on CUDA."""
import logging

import pytest
import torch

from recon import compiled
from recon.geometry.mesh import normals_and_tangents
from recon.light.env_light import _split_sum_combine, _split_sum_inputs
from recon.losses import image_losses
from recon.materials.mlp_texture import MLPTexture3D
from recon.render.shading import shading_normal


@pytest.fixture(autouse=True)
def _restore_mode():
    mode = compiled.get_mode()
    yield
    compiled.set_mode(mode)


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _bumpy_grid(k: int, r) -> dict:
    """A k x k vertex height field with jittered UVs, its right half mapped mirrored (handedness -1 there)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, k), torch.linspace(0, 1, k), indexing="ij")
    verts = torch.stack([x, y, 0.2 * r(k, k)], -1).reshape(-1, 3)
    i = torch.arange(k * k).reshape(k, k)[:-1, :-1].reshape(-1)
    faces = torch.cat([torch.stack([i, i + 1, i + k + 1], -1), torch.stack([i, i + k + 1, i + k], -1)])
    uv = torch.stack([x, y], -1).reshape(-1, 2) + 0.1 / k * (r(k * k, 2) - 0.5)
    uv = torch.cat([uv, torch.stack([1 - uv[:, 0], uv[:, 1]], -1)])  # the mirrored copy
    mirrored = verts[faces].mean(1)[:, 0] > 0.5
    return dict(verts=verts, faces=faces, uv=uv, uv_faces=faces + mirrored[:, None] * k * k)


def _cases(n=300, seed=0):
    """(name, function, inputs needing grad, other inputs) for every fused function."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.rand(*shape, generator=g)

    normals = dict(nrm_ts=r(n, 3) * 2 - 1, smooth=r(n, 3) - 0.5, geometric=_unit(r(n, 3) - 0.5), pos=r(n, 3) - 0.5,
                   view_pos=r(n, 3) * 4 + 2)
    split = dict(pos=r(n, 3) - 0.5, n=_unit(r(n, 3) - 0.5), kd=r(n, 3), arm=r(n, 3), view_pos=r(n, 3) * 4 + 2)
    combine = dict(irradiance=r(n, 3), diff_col=r(n, 3), spec=r(n, 3), spec_col=r(n, 3), fg=r(n, 2), arm=r(n, 3))
    img = r(2, 16, 12, 4)
    img[..., 3] = (img[..., 3] > 0.4).float()
    losses = dict(rgb=r(2, 16, 12, 3) * 2, alpha=r(2, 16, 12, 1), img=img, bg=r(2, 16, 12, 3))
    mesh = _bumpy_grid(max(3, int((n // 2) ** 0.5)), r)
    return [
        ("shading_normal", lambda a: shading_normal(a["nrm_ts"], a["smooth"], a["geometric"], a["pos"], a["view_pos"]),
         normals),
        ("split_sum_inputs", lambda a: _split_sum_inputs(a["pos"], a["n"], a["kd"], a["arm"], a["view_pos"], True, 6,
                                                         0.08, 0.5), split),
        ("split_sum_combine", lambda a: _split_sum_combine(**a), combine),
        ("image_losses", lambda a: image_losses(**a), losses),
        ("normals_and_tangents", lambda a: normals_and_tangents(**a), mesh),
    ]


def _run(fn, inputs):
    leaves = {k: v.clone().requires_grad_(v.dtype.is_floating_point and k != "img") for k, v in inputs.items()}
    out = fn(leaves)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
    total = sum((o * (i + 1)).sum() for i, o in enumerate(outs))  # every output reaches the gradient
    total.backward()
    return [o.detach() for o in outs], {k: v.grad for k, v in leaves.items() if v.grad is not None}


@pytest.mark.parametrize("case", range(5))
def test_traced_functions_match_eager_values_and_gradients(case):
    name, fn, inputs = _cases()[case]
    compiled.set_mode("off")
    ref_out, ref_grad = _run(fn, inputs)
    compiled.set_mode("on", backend="aot_eager")
    out, grad = _run(fn, inputs)
    assert len(out) == len(ref_out) and grad.keys() == ref_grad.keys() and grad, name
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k in grad:
        torch.testing.assert_close(grad[k], ref_grad[k], rtol=1e-5, atol=1e-6, msg=f"{name}: d/d{k}")


def test_traced_functions_run_compiled_and_take_new_sizes():
    """Mode 'on' really goes through torch.compile, and one compilation serves every point count."""
    compiled.set_mode("on", backend="aot_eager")
    for n in (300, 301, 1000):  # the covered-pixel count changes every step
        _run(_cases(n)[0][1], _cases(n)[0][2])
    assert shading_normal.compiled is not None and not shading_normal.failed
    compiled.set_mode("off")
    assert shading_normal.compiled is None  # a mode change drops compiled versions


def test_material_decode_matches_eager():
    torch.manual_seed(0)
    field = MLPTexture3D(torch.tensor([[-1.0] * 3, [1.0] * 3]), channels=9, backend="torch",
                         encoding={"n_levels": 4, "log2_hashmap_size": 10, "max_resolution": 64})
    pts = torch.rand(500, 3) * 2 - 1
    compiled.set_mode("off")
    ref = field.sample(pts)
    ref.sum().backward()
    ref_grad = field.net[0].weight.grad.clone()
    field.zero_grad()
    compiled.set_mode("on", backend="aot_eager")
    out = field.sample(pts)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(field.net[0].weight.grad, ref_grad)


def test_failed_compilation_falls_back_to_eager_with_a_warning(caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    _, fn, inputs = _cases()[3]
    compiled.set_mode("off")
    ref, _ = _run(fn, inputs)
    compiled.set_mode("on", backend=broken_backend)
    with caplog.at_level(logging.WARNING, logger="recon.compiled"):
        out, _ = _run(fn, inputs)
    assert image_losses.failed
    assert "torch.compile failed for image_losses" in caplog.text and "model.render.compile=off" in caplog.text
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)


def test_auto_mode_compiles_training_calls_only(monkeypatch):
    """Under no_grad (validation, the bake, evaluation) 'auto' runs eagerly rather than compile a second graph."""
    monkeypatch.setattr(compiled, "_compiles_on", lambda t: True)  # as for a CUDA tensor with Triton
    compiled.set_mode("auto")
    x = torch.ones(3)
    assert compiled._wants_compile((x,), {})
    with torch.no_grad():
        assert not compiled._wants_compile((x,), {})
    with torch.inference_mode():
        assert not compiled._wants_compile((x,), {})
    compiled.set_mode("on", backend="aot_eager")
    with torch.no_grad():
        assert compiled._wants_compile((x,), {})  # 'on' means every call


def test_auto_mode_leaves_cpu_tensors_eager_and_bad_modes_are_named():
    compiled.set_mode("auto")
    _run(_cases()[2][1], _cases()[2][2])
    assert _split_sum_combine.compiled is None
    with pytest.raises(ValueError, match="model.render.compile='fast'"):
        compiled.set_mode("fast")
    for spelled, mode in (("false", "off"), (False, "off"), ("True", "on"), ("OFF", "off")):  # YAML reads off as false
        compiled.set_mode(spelled)
        assert compiled.get_mode() == mode


def test_the_default_config_runs_eagerly():
    """At nvdiffrec's step counts compiling costs more start-up than it saves (see recon.compiled): off by default."""
    from recon.fit import compose_config
    assert compose_config(["experiment=nerf800"]).model.render.compile == "off"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", range(5))
def test_inductor_kernels_match_eager_on_cuda(case):
    """What a CUDA fit runs with model.render.compile=auto (Inductor's generated kernels) against the eager functions."""
    name, fn, inputs = _cases(n=20000)[case]
    inputs = {k: v.cuda() for k, v in inputs.items()}
    compiled.set_mode("off")
    ref_out, ref_grad = _run(fn, inputs)
    compiled.set_mode("auto")
    out, grad = _run(fn, inputs)
    fused_fn = {"shading_normal": shading_normal, "split_sum_inputs": _split_sum_inputs,
                "split_sum_combine": _split_sum_combine, "image_losses": image_losses,
                "normals_and_tangents": normals_and_tangents}[name]
    assert fused_fn.compiled is not None and not fused_fn.failed, name
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for k in grad:  # atomics sum in another order: errors relative to the gradient's scale (the mesh's reach ~1e3)
        atol = max(1e-5, 1e-5 * float(ref_grad[k].abs().max()))
        torch.testing.assert_close(grad[k], ref_grad[k], rtol=1e-4, atol=atol, msg=f"{name}: d/d{k}")


def test_shading_compiles_once_for_material_channels_at_any_offset():
    """Pass 1's roughness/metalness are a slice of the network's output, pass 2's of the texture's: the shading
    functions must not compile again for the other storage offset (dynamic shapes would tie it to a size of 3)."""
    from torch._dynamo.utils import counters

    from recon.light import EnvironmentLight

    light = EnvironmentLight(base_res=16, min_res=4, lut_resolution=16, lut_samples=16)
    light.build_mips()
    compiled.set_mode("on", backend="aot_eager")

    def shade(n: int, channels: torch.Tensor, arm: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(n)
        pos, nrm = torch.rand(n, 3, generator=g), _unit(torch.randn(n, 3, generator=g))
        light.shade(pos, nrm, channels[:, 0:3], arm, torch.tensor([[0.0, 0.0, 3.0]]).expand(n, 3))

    mat = torch.rand(500, 9)
    shade(500, mat, mat[:, 3:6])
    graphs = counters["stats"]["unique_graphs"]
    shade(700, torch.rand(700, 9), torch.rand(700, 6)[:, 3:])  # another count, arm at another offset
    assert counters["stats"]["unique_graphs"] == graphs
