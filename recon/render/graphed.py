"""Training renders with everything after the rasterization that has fixed shapes replayed as CUDA graphs.

Pass 2 (`GraphedPBR`): the mesh's topology, the textures, the light and the image size never change; only the number
of covered pixels does. It shades a fixed number of rows instead (``capacity``: the covered pixels, then padding rows
that reach no image and no loss, `recon.render.shading.covered_rows`), so every shape is fixed and the G-buffer
interpolation, material lookups, shading and antialiasing, forward and backward, run as two graph launches
(`recon.cuda_graphs`) where the host issued about a hundred operations and their autograd nodes. The rasterization
stays outside: nvdiffrast's rasterizer waits for the GPU to size its buffers, which a graph cannot hold.

Pass 1 (`GraphedNeuralPBR`): DMTet's mesh changes size every step, so the G-buffer interpolation, the gathers of the
covered rows' inputs (`recon.render.shading.row_inputs`) and the antialiasing run eagerly; the hash-grid material
(its albedo-smoothness draws made outside), the shading and the colour image's scatter (`shade_rows`) are the graph.
The hash grid skips the padding rows (`HashGridEncoding`'s row_mask): in pass 1 the covered pixels shrink from the
first batches' count as the surface settles, so padding takes a good share of the rows.

The capacity follows the data: the first ``eager_steps`` renders run eagerly and measure the covered pixels of each
batch; the capacity is their maximum plus ``margin``, rounded up. Each graphed render copies its covered-pixel count
to the host without waiting, and the next render checks it: a batch that covered more pixels than the capacity logs
a warning and raises the capacity (captured again) for the following steps. That batch's left-out pixels were not
shaded (they rendered as uncovered in colour, covered in alpha), one step's error.

Values and gradients equal `render_pbr`'s up to float rounding (tests/render/test_graphed_shading*.py). Where the graphs do
not apply (off CUDA, ``model.render.cuda_graphs=false``, no gradients) `render` is `render_pbr`. Plain torch.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from recon import cuda_graphs
from recon.gather import masked_rows
from recon.geometry.mesh import Mesh
from recon.render.camera import transform_pos
from recon.render.shading import (
    covered_rows,
    interpolate_gbuffers,
    render_pbr,
    row_inputs,
    shade_gbuffers,
    shade_rows,
    shading_attributes,
    with_coverage,
)

log = logging.getLogger(__name__)
MESH_FIELDS = ("verts", "faces", "normals", "uv", "uv_faces", "tangents", "handedness", "face_normals")


def texture_material(textures: nn.Module, rasterizer, params: dict[str, Tensor] | None = None
                     ) -> Callable[[dict, Tensor], dict]:
    """`render_pbr`'s material from a UV texture module called as ``textures(rasterizer, uv, uv_da)``
    (`TexturePBRMaterial`), looked up at the rows the render shades (``gb["covered_index"]``). params: tensors
    standing in for the module's parameters (`torch.func.functional_call`), e.g. a captured function's arguments."""
    def material(gb: dict, mask: Tensor) -> dict:
        sel = gb["covered_index"]
        args = (rasterizer, masked_rows(gb["gb_uv"], sel, mask.dim()), masked_rows(gb["gb_uv_da"], sel, mask.dim()))
        return textures(*args) if params is None else functional_call(textures, params, args)

    return material


class _RowCapacity:
    """The rows a graphed render shades per step and their growth (see the module docstring).

    eager_steps: renders measured eagerly before the first capture. margin: capacity above the largest covered
    count seen (0.15: 15 % more rows). granularity: the capacity is a multiple of this many rows.
    """

    NAME = "shade"  # the graphs' name in the cache, followed by the capacity
    STATS = "graph_shading"  # prefix of `stats`' keys

    def __init__(self, eager_steps: int = 10, margin: float = 0.15, granularity: int = 16384):
        if eager_steps < 1 or margin < 0 or granularity < 1:
            raise ValueError(f"{type(self).__name__}(eager_steps={eager_steps}, margin={margin}, granularity="
                             f"{granularity}): eager_steps and granularity must be >= 1 and margin >= 0 (the config's "
                             "model.render.graph_margin).")
        self.eager_steps, self.margin, self.granularity = int(eager_steps), float(margin), int(granularity)
        self.capacity: int | None = None
        self.largest = 0  # most covered pixels of one render seen so far
        self.measured = 0  # renders measured (eager, or checked after a replay)
        self.overflows = 0  # graphed renders that covered more pixels than the capacity
        self._graphs = cuda_graphs.GraphCache()
        self._count: Tensor | None = None  # pinned host copy of the last replay's covered count
        self._count_ready: torch.cuda.Event | None = None

    def __deepcopy__(self, memo) -> _RowCapacity:
        return type(self)(**self.__getstate__())  # the settings, not the measurements or the graphs

    def __getstate__(self) -> dict:
        return {"eager_steps": self.eager_steps, "margin": self.margin, "granularity": self.granularity}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def stats(self) -> dict:
        """The graph's rows per step, the most covered pixels of one batch seen, and the batches over the capacity
        (timing.json's ``<STATS>_rows``, ``<STATS>_covered_max``, ``<STATS>_overflows``)."""
        return {f"{self.STATS}_rows": self.capacity, f"{self.STATS}_covered_max": self.largest,
                f"{self.STATS}_overflows": self.overflows}

    @property
    def graph_name(self) -> str:
        return f"{self.NAME} {self.capacity}"

    def _eager(self, graphs: bool) -> bool:
        """Whether this render runs eagerly: no graphs apply, the capture failed, or the capacity is still measured."""
        return not graphs or self._graphs.failed(self.graph_name) or (
            self.capacity is None and self.measured < self.eager_steps)

    def _capacity_for(self, count: int) -> int:
        return max(self.granularity, math.ceil(count * (1 + self.margin) / self.granularity) * self.granularity)

    def _observe(self, count: int) -> None:
        self.largest = max(self.largest, int(count))
        self.measured += 1

    def _check_previous(self) -> None:
        """Reads the last replay's covered count once it has reached the host; raises the capacity if it overflowed.
        Then sets the capacity if there is none yet."""
        if self._count_ready is not None and self._count_ready.query():
            count = int(self._count.item())  # a pinned host tensor: no device sync
            self._count_ready = None
            self._observe(count)
            if self.capacity is not None and count > self.capacity:
                self.overflows += 1
                grown = self._capacity_for(count)
                log.warning("a training batch covered %d pixels, more than the %d rows its CUDA graph shades; the "
                            "pixels beyond were left unshaded for that step. Capturing again with %d rows.",
                            count, self.capacity, grown)
                self._graphs.drop(self.graph_name)
                self.capacity = grown
        if self.capacity is None:
            self.capacity = self._capacity_for(self.largest)
            log.info("%s through CUDA graphs, %d rows per step (largest batch seen: %d covered pixels)",
                     self.NAME, self.capacity, self.largest)

    def release(self) -> None:
        """Drop the captured graphs (their memory is freed once nothing else holds it)."""
        self._graphs = cuda_graphs.GraphCache()

    def _send_count(self, count: Tensor) -> None:
        """Start copying this render's covered count to the host (read by the next render, `_check_previous`)."""
        if not count.is_cuda:
            return
        if self._count is None:
            self._count = torch.empty((), dtype=count.dtype, pin_memory=True)
        self._count.copy_(count, non_blocking=True)
        self._count_ready = torch.cuda.Event()
        self._count_ready.record()


class GraphedPBR(_RowCapacity):
    """`render_pbr` for training on a fixed mesh with a UV texture material, graphed after the rasterization
    (pass 2). Arguments: `_RowCapacity`'s."""

    NAME = "pass-2 shading"

    def render(self, rasterizer, mesh: Mesh, mvp: Tensor, cam_pos: Tensor, resolution: tuple[int, int],
               textures: nn.Module, light, perturb: bool = True, fused: bool = False,
               mark: Callable[[], None] | None = None) -> dict:
        """A training render (`render_pbr` with ``material_images=False``, the material `texture_material`).

        Returns ``rgb``, ``alpha``, ``covered`` (``ks``) and ``covered_index`` (with a capacity also
        ``covered_valid``) as `render_pbr` does; the graphed path returns only those (and ``pos_clip``)."""
        material = texture_material(textures, rasterizer)
        params = dict(textures.named_parameters())
        light_tensors = (*light.specular, light.diffuse, light.lut)
        fields = [(k, getattr(mesh, k)) for k in MESH_FIELDS if getattr(mesh, k) is not None]
        graphs = cuda_graphs.applies((mesh.verts, cam_pos, *params.values(), *light_tensors))
        if self._eager(graphs):
            out = render_pbr(rasterizer, mesh, mvp, cam_pos, resolution, material, light, perturb=perturb, mark=mark,
                             fused=fused, material_images=False)
            if graphs:  # measuring the covered pixels (or the capture failed): a host int here
                self._observe(out["covered_index"].shape[0])
            return out
        pos_clip = transform_pos(mvp, mesh.verts)
        rast, rast_db = rasterizer.rasterize(pos_clip, mesh.faces, resolution)
        if mark is not None:
            mark()
        self._check_previous()  # the rasterizer has waited for the GPU: the last count is on the host
        capacity, n_fields, n_params = self.capacity, len(fields), len(params)
        names = [k for k, _ in fields]

        def shade(rast: Tensor, rast_db: Tensor, pos_clip: Tensor, cam_pos: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
            m = Mesh(**dict(zip(names, rest[:n_fields])))
            p = dict(zip(params, rest[n_fields:n_fields + n_params]))
            *spec, diffuse, lut = rest[n_fields + n_params:]
            with light.using(spec, diffuse, lut):
                gb = interpolate_gbuffers(rasterizer, m, pos_clip, rast, rast_db, shading_attributes(m, perturb))
                out = shade_gbuffers(rasterizer, m, gb, cam_pos, texture_material(textures, rasterizer, p), light,
                                     perturb=perturb, fused=fused, material_images=False, capacity=capacity)
            return (out["rgb"], out["alpha"], out["covered"]["ks"], out["covered_index"], out["covered_valid"],
                    out["covered_count"])

        args = (rast, rast_db, pos_clip, cam_pos, *(t for _, t in fields), *params.values(), *light_tensors)
        rgb, alpha, ks, index, valid, count = self._graphs.call(self.graph_name, shade, *args)
        self._send_count(count)
        if mark is not None:  # the material and shading stages both ran inside the graph: one mark for each
            mark()
            mark()
        return {"rgb": rgb, "alpha": alpha, "covered": {"ks": ks}, "covered_index": index, "covered_valid": valid,
                "pos_clip": pos_clip}


class GraphedNeuralPBR(_RowCapacity):
    """`render_pbr` for a pass-1 training step (DMTet's mesh, the hash-grid `NeuralPBRMaterial` with its
    albedo-smoothness term), with the material and shading graphed (see the module docstring). Arguments:
    `_RowCapacity`'s (more eager steps than pass 2 by default, since the surface grows in pass 1's first steps) and
    skip_padding: the hash grid leaves the padding rows out (``model.render.graph_skip_padding``)."""

    NAME = "pass-1 shading"
    STATS = "pass1_graph_shading"

    def __init__(self, eager_steps: int = 100, margin: float = 0.15, granularity: int = 16384,
                 skip_padding: bool = True):
        super().__init__(eager_steps, margin, granularity)
        self.skip_padding = bool(skip_padding)  # the hash grid leaves the padding rows out (its row_mask)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "skip_padding": self.skip_padding}

    def render(self, rasterizer, mesh: Mesh, mvp: Tensor, cam_pos: Tensor, resolution: tuple[int, int],
               material: nn.Module, light, perturb: bool = True, fused: bool = False,
               generator: torch.Generator | None = None, mark: Callable[[], None] | None = None) -> dict:
        """A training render (`render_pbr` with ``material_images=False``) with the material ``material(points,
        smoothness=True, generator=generator)``. Returns ``rgb``, ``alpha``, ``covered`` (``ks``, ``kd_grad``) and
        ``covered_index`` (graphed: also ``covered_valid``, ``pos_clip``)."""
        params = dict(material.named_parameters())
        light_tensors = (*light.specular, light.diffuse, light.lut)
        graphs = cuda_graphs.applies((mesh.verts, cam_pos, *params.values(), *light_tensors))
        if self._eager(graphs) or (mesh.tangents is not None and perturb):  # DMTet's meshes have no UV frame
            def eager_material(gb: dict, mask: Tensor) -> dict:
                return material(gb["covered_pos"], smoothness=True, generator=generator)

            out = render_pbr(rasterizer, mesh, mvp, cam_pos, resolution, eager_material, light, perturb=perturb,
                             mark=mark, fused=fused, material_images=False)
            if graphs:  # measuring the covered pixels: a host int here
                self._observe(out["covered_index"].shape[0])
            return out
        pos_clip = transform_pos(mvp, mesh.verts)
        rast, rast_db = rasterizer.rasterize(pos_clip, mesh.faces, resolution)
        self._check_previous()  # the rasterizer has waited for the GPU: the last count is on the host
        gb = interpolate_gbuffers(rasterizer, mesh, pos_clip, rast, rast_db, shading_attributes(mesh, perturb))
        mask = gb["mask"]
        rows = covered_rows(mask, self.capacity)
        inputs = row_inputs(mesh, gb, rows, perturb)
        count = mask.sum()
        start, offset = material.smoothness_draws(self.capacity, generator, mesh.verts.device, inputs["pos"].dtype)
        if mark is not None:
            mark()
        names, sampled, skip = list(params), start is not None, self.skip_padding

        def shade(pos: Tensor, smooth: Tensor, n_geom: Tensor, sel: Tensor, place: Tensor, valid: Tensor,
                  mask: Tensor, cam_pos: Tensor, offset: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
            start = rest[0] if sampled else None
            p = dict(zip(names, rest[int(sampled):int(sampled) + len(names)]))
            *spec, diffuse, lut = rest[int(sampled) + len(names):]

            def neural(gb: dict, mask: Tensor) -> dict:
                return functional_call(material, p, (gb["covered_pos"],),
                                       {"smoothness": True, "draws": (start, offset),
                                        "row_mask": valid[:, 0] if skip else None})

            with light.using(spec, diffuse, lut):
                out = shade_rows(rasterizer, {"mask": mask, "covered_pos": pos, "covered_index": sel},
                                 (sel, place, valid), {"pos": pos, "smooth": smooth, "n_geom": n_geom, "tangent": None,
                                                       "hand": 1.0}, cam_pos, neural, light, perturb=perturb,
                                 fused=fused, material_images=False)
            return out["color"], out["covered"]["ks"], out["covered"]["kd_grad"]

        args = (inputs["pos"], inputs["smooth"], inputs["n_geom"], *rows, mask, cam_pos, offset,
                *(() if start is None else (start,)), *params.values(), *light_tensors)
        color, ks, kd_grad = self._graphs.call(self.graph_name, shade, *args)
        self._send_count(count)
        if mark is not None:
            mark()
        gb["rgb"], gb["alpha"] = with_coverage(rasterizer, color, gb, mesh.faces)
        if mark is not None:
            mark()
        return {"rgb": gb["rgb"], "alpha": gb["alpha"], "covered": {"ks": ks, "kd_grad": kd_grad},
                "covered_index": rows[0], "covered_valid": rows[2], "pos_clip": pos_clip}
