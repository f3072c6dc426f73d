"""The light's cube-map lookups by pixel order: `python bench/cube_lookup.py [--pixels N] [--out FILE]`.

Split-sum shading looks the diffuse irradiance cube (6 x 16² texels) up along every covered pixel's normal and the
prefiltered specular chain (6 x 512² down to 16²) along its reflected view direction, at a per-pixel mip level. In
the backward pass each lookup adds its four (eight across two levels) weighted gradients into the cube by atomic
adds. Covered pixels come in scanline order, so neighbouring threads hit the same few texels of the small cubes,
and same-address atomic adds wait for each other. This times the lookups forward and backward (gradients to the
cubes, the directions and the level, as in training) with the pixels in scanline order and reordered so that
neighbouring threads look far apart: ``strided`` (threads t and t + 1 read pixels about ``--stride`` apart: what
``model.render.cube_stride`` does in training) and ``random``; the reordered variants include the gathers that
reorder the inputs and restore the outputs' order. The directions are those of a unit sphere seen by ``--views``
orthographic cameras (a covered disk per view, in scanline order), ``--pixels`` of them (by default about nerf800's
covered pixels per step). Checks that every order gives the same values and per-pixel gradients, and measures each
order's gradient to the cube texels against the exact one (from forward passes, `texel_gradient_errors`): at the 4
corner texels of each face, where a bilinear footprint wraps onto three faces, and elsewhere (which must agree).

CUDA: nvdiffrast's cube-mode texture (recon's CUDA path), and with ``--kernels nvdiffrast triton`` also recon's
Triton lookup (`recon/render/cube_triton.py`, ``model.render.cube_kernel=triton``; ``triton:N`` adds the
diffuse cube's gradients into N copies, `cube_triton.MAX_COPIES`); ``--orders scanline`` times the pixels' order alone.
``--device cpu`` runs recon's PyTorch lookup, a check of this script rather than a measurement.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ORDERS = ("scanline", "strided", "random")


def sphere_directions(pixels: int, views: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normals and reflected view directions [N,3] of the covered pixels of a unit sphere seen by ``views``
    orthographic cameras around it, each covering about pixels / views pixels in scanline order (one view after the
    other)."""
    per_view = pixels / views
    side = int(math.ceil(math.sqrt(per_view * 4 / math.pi))) + 2  # the disk of radius side/2 covers per_view pixels
    c = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side * 2 - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    inside = x * x + y * y < 1
    normals, reflected = [], []
    for k in range(views):
        theta, phi = 2 * math.pi * k / views, 0.35 * math.sin(2 * math.pi * k / views)  # around, a little above/below
        d = torch.tensor([math.cos(phi) * math.cos(theta), math.sin(phi), math.cos(phi) * math.sin(theta)], device=device)
        right = torch.nn.functional.normalize(torch.linalg.cross(d, torch.tensor([0.0, 1.0, 0.0], device=device)), dim=0)
        up = torch.linalg.cross(right, d)
        xs, ys = x[inside], -y[inside]
        n = xs[:, None] * right + ys[:, None] * up - torch.sqrt((1 - xs * xs - ys * ys).clamp_min(0))[:, None] * d
        view = -d.expand_as(n)  # towards the camera
        normals.append(n)
        reflected.append(2 * (n * view).sum(-1, keepdim=True) * n - view)
    return torch.cat(normals)[:pixels], torch.cat(reflected)[:pixels]


def ordering(name: str, n: int, device: torch.device, stride: int = 4096) -> torch.Tensor | None:
    """The order the lookups run in: None for scanline, else a permutation of range(n)."""
    if name == "scanline":
        return None
    if name == "strided":  # recon's model.render.cube_stride: thread t reads pixel (t * k) % n, k about `stride`
        from recon.render.nvdiffrast import strided_order

        return strided_order(n, stride, device)[0]
    if name == "random":
        return torch.randperm(n, device=device, generator=torch.Generator(device=device).manual_seed(0))
    raise ValueError(f"unknown order {name!r}; choose from {ORDERS}")


def lookup(rasterizer, levels: list[torch.Tensor], dirs: torch.Tensor, level: torch.Tensor | None,
           order: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``rasterizer.cube_texture(levels, dirs, level)``, the lookups run in the order ``order = (perm, inverse)``
    and the result put back in the pixels' order (as `NvdiffrastRasterizer.cube_texture` does with a cube_stride)."""
    if order is None:
        return rasterizer.cube_texture(levels, dirs, level)
    perm, inverse = order
    out = rasterizer.cube_texture(levels, dirs.index_select(0, perm), None if level is None else level.index_select(0, perm))
    return out.index_select(0, inverse)


def texel_gradient_errors(rasterizer, levels: list[torch.Tensor], dirs: torch.Tensor, level: torch.Tensor | None,
                          upstream: torch.Tensor, grads: list[torch.Tensor], gen: torch.Generator,
                          others: int = 24) -> dict[str, float]:
    """How far the backward pass's gradients to the cube texels are from the exact ones, largest relative error of
    the texels at the cube's corners (the 4 corner texels of each face, where a bilinear footprint wraps onto three
    faces) and of ``others`` texels drawn elsewhere, on the finest and the coarsest level.

    The lookup is linear in the texels, so the exact gradient of ``(upstream * out).sum()`` to texel T is
    ``(upstream * lookup(indicator of T)).sum(0)``: a forward pass, with no atomic additions in it."""
    errors = {"corner": 0.0, "other": 0.0}
    for li in sorted({0, len(levels) - 1}):
        res = levels[li].shape[1]
        corners = [(f, y, x) for f in range(6) for y in (0, res - 1) for x in (0, res - 1)]
        drawn = torch.randint(0, res, (others, 3), generator=gen, device=levels[li].device).tolist()
        rest = [(f % 6, y, x) for f, y, x in drawn if (y, x) not in {(0, 0), (0, res - 1), (res - 1, 0), (res - 1, res - 1)}]
        for kind, texels in (("corner", corners), ("other", rest)):
            for f, y, x in texels:
                indicator = [torch.zeros_like(lv, requires_grad=False) for lv in levels]
                indicator[li][f, y, x] = 1.0
                with torch.no_grad():
                    exact = (upstream * rasterizer.cube_texture(indicator, dirs, level)).sum(0)
                got = grads[li][f, y, x]
                err = float(((got - exact).abs().max() / exact.abs().max().clamp_min(1e-12)))
                errors[kind] = max(errors[kind], err)
    return errors


def _timer(device: torch.device):
    if device.type == "cuda":
        def timed(fn, reps):
            fn()
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / reps
    else:
        def timed(fn, reps):
            fn()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t0) * 1e3 / reps
    return timed


def run(pixels: int, views: int, reps: int, device: torch.device, base_res: int = 512, diffuse_res: int = 16,
        stride: int = 4096, kernels: tuple[str, ...] = ("nvdiffrast",), orders: tuple[str, ...] = ORDERS) -> dict:
    from recon.render import make_rasterizer

    if device.type != "cuda":
        kernels = ("torch",)
    rasterizers = {k: make_rasterizer("torch", device) if k == "torch"
                   else make_rasterizer("nvdiffrast", device, cube_kernel=k.split(":")[0]) for k in kernels}
    g = torch.Generator(device=device).manual_seed(0)
    normals, reflected = sphere_directions(pixels, views, device)
    n = normals.shape[0]
    specular = []
    res = base_res
    while res >= diffuse_res:
        specular.append(torch.rand(6, res, res, 3, device=device, generator=g).requires_grad_(True))
        res //= 2
    diffuse = torch.rand(6, diffuse_res, diffuse_res, 3, device=device, generator=g).requires_grad_(True)
    # per-pixel roughness -> mip level, smooth across each view like a material's
    level = ((torch.arange(n, device=device) % 997) / 997.0 * (len(specular) - 1)).requires_grad_(True)
    cases = {"diffuse": ([diffuse], normals, None), "specular": (specular, reflected, level)}
    timed = _timer(device)
    rows, reference = [], {}
    for case, (levels, dirs, lvl) in cases.items():
        dirs = dirs.clone().requires_grad_(True)
        upstream = torch.rand(n, 3, device=device, generator=g)
        inputs = [*levels, dirs] + ([lvl] if lvl is not None else [])
        for kernel, order in [(k, o) for k in kernels for o in orders]:
            rasterizer = rasterizers[kernel]
            if kernel.startswith("triton"):  # triton:N adds the diffuse cube's gradients into at most N copies
                from recon.render import cube_triton

                cube_triton.MAX_COPIES = int(kernel.split(":")[1]) if ":" in kernel else 1
            perm = ordering(order, n, device, stride)
            perm = None if perm is None else (perm, torch.argsort(perm))  # the inverse once, outside the timings

            def forward():
                return lookup(rasterizer, levels, dirs, lvl, perm)

            def both():
                return torch.autograd.grad(forward(), inputs, upstream, allow_unused=True)  # the CPU lookup: no dirs grad

            out = forward().detach()
            grads = both()
            if order == orders[0]:
                reference[case, kernel] = (out, grads)
            ref_out, ref_grads = reference[case, kernel]
            torch.testing.assert_close(out, ref_out, rtol=0, atol=0)  # the same per-pixel arithmetic
            for got, want in zip(grads[len(levels):], ref_grads[len(levels):]):  # per pixel, no atomics
                assert (got is None) == (want is None)
                if want is not None:
                    torch.testing.assert_close(got, want, rtol=0, atol=0)
            fixed_level = None if lvl is None else lvl.detach()
            errors = texel_gradient_errors(rasterizer, levels, dirs.detach(), fixed_level, upstream, grads[:len(levels)], g)
            if errors["other"] > 1e-3:
                raise AssertionError(f"{case}, {order} order: the cube's gradient away from the cube corners is off "
                                     f"by {errors['other']:.2e} (relative) from the exact one")
            def cube_only():  # the gradient to the cube (and level) alone: how much the directions' costs
                out = lookup(rasterizer, levels, dirs.detach(), lvl, perm)
                return torch.autograd.grad(out, [x for x in inputs if x is not dirs], upstream, allow_unused=True)

            fwd = timed(forward, reps)
            total = timed(both, reps)
            cube_total = timed(cube_only, reps)
            rows.append({"lookup": case, "kernel": kernel, "order": order, "forward_ms": fwd, "forward_backward_ms": total,
                         "forward_backward_no_dir_grad_ms": cube_total,
                         "corner_gradient_error": errors["corner"], "other_gradient_error": errors["other"]})
            print(f"{case:9} {kernel:10} {order:9} forward {fwd:8.3f} ms   forward+backward {total:8.3f} ms   "
                  f"without the directions' gradient {cube_total:8.3f} ms   gradient error: corner texels "
                  f"{errors['corner']:.1e}, others {errors['other']:.1e}", flush=True)
    return {"pixels": n, "views": views, "base_res": base_res, "diffuse_res": diffuse_res, "stride": stride,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pixels", type=int, default=1_320_000, help="covered pixels per step (nerf800: about 1.32M)")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--base-res", type=int, default=512)
    ap.add_argument("--stride", type=int, default=4096)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kernels", nargs="+", default=["nvdiffrast"],
                    help="CUDA: the cube-map kernels to time (model.render.cube_kernel): nvdiffrast, triton, or "
                         "triton:N with the small chains' gradients added into at most N copies (cube_triton.MAX_COPIES)")
    ap.add_argument("--orders", nargs="+", default=list(ORDERS), choices=list(ORDERS))
    ap.add_argument("--out", type=Path, default=None, help="also write the rows here as JSON")
    args = ap.parse_args(argv)
    for k in args.kernels:
        if k != "nvdiffrast" and not (k == "triton" or (k.startswith("triton:") and k[7:].isdigit() and int(k[7:]) > 0)):
            ap.error(f"--kernels: {k!r} is not nvdiffrast, triton or triton:N (N >= 1)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU machine, or --device cpu to check the script")
    result = run(args.pixels, args.views, args.reps, device, args.base_res, stride=args.stride,
                 kernels=tuple(args.kernels), orders=tuple(args.orders))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
