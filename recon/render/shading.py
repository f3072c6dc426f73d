"""Mesh rendering on top of a Rasterizer: G-buffers, material evaluation on covered pixels, antialiasing."""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import Tensor

from recon.compiled import fused
from recon.gather import mask_index, masked_rows, scatter_rows, take_rows
from recon.geometry.mesh import Mesh
from recon.geometry.mesh import normalized as _normalize  # noqa: I001 (the name the shading code uses)
from recon.optional import triton_importable
from recon.render.camera import transform_pos


def rasterize_gbuffers(rasterizer, mesh: Mesh, mvp: Tensor, resolution: tuple[int, int],
                       extra: Sequence[Tensor] = ()) -> dict:
    """Rasterize ``mesh`` from cameras ``mvp`` [B,4,4] and interpolate the G-buffers.

    Returns a dict: ``pos_clip`` [B,Nv,4], ``rast``/``rast_db`` [B,H,W,4], ``mask`` [B,H,W] bool,
    ``gb_pos`` [B,H,W,3] world space; with UVs on the mesh also ``gb_uv`` [B,H,W,2] and ``gb_uv_da`` [B,H,W,4].
    extra: more per-vertex attributes [Nv,C_i], interpolated in the same call as the positions: ``gb_attrs``
    [B,H,W,3+sum C_i] holds the positions and then them (``gb_pos`` is its first three channels).
    """
    pos_clip = transform_pos(mvp, mesh.verts)
    rast, rast_db = rasterizer.rasterize(pos_clip, mesh.faces, resolution)
    return interpolate_gbuffers(rasterizer, mesh, pos_clip, rast, rast_db, extra)


def interpolate_gbuffers(rasterizer, mesh: Mesh, pos_clip: Tensor, rast: Tensor, rast_db: Tensor,
                         extra: Sequence[Tensor] = ()) -> dict:
    """`rasterize_gbuffers` after the rasterization: its G-buffers from the rasterizer's outputs."""
    image, _ = rasterizer.interpolate(torch.cat([mesh.verts, *extra], -1) if extra else mesh.verts, rast, mesh.faces)
    out = {"pos_clip": pos_clip, "rast": rast, "rast_db": rast_db, "mask": rast[..., 3] > 0,
           "gb_pos": image[..., :3] if extra else image}
    if extra:
        out["gb_attrs"] = image
    if mesh.uv is not None:
        uv_faces = mesh.uv_faces if mesh.uv_faces is not None else mesh.faces
        out["gb_uv"], out["gb_uv_da"] = rasterizer.interpolate(mesh.uv, rast, uv_faces, rast_db=rast_db, diff_attrs="all")
    return out


def shade_covered(mask: Tensor, points: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Evaluate ``fn`` only on covered pixels (material networks are the expensive part).

    mask [B,H,W] bool; points [B,H,W,D]; fn maps [N,D] -> [N,C]. Returns [B,H,W,C], zero where uncovered.
    """
    values = fn(masked_rows(points, mask_index(mask), mask.dim()))
    out = values.new_zeros(*mask.shape, values.shape[-1])
    return out.index_put((mask,), values)


def render_albedo(
    rasterizer,
    mesh: Mesh,
    mvp: Tensor,
    resolution: tuple[int, int],
    albedo_fn: Callable[[Tensor], Tensor] | None = None,
    texture: Tensor | None = None,
    antialias: bool = True,
) -> dict:
    """Unlit render: colour = albedo, from a 3D field ``albedo_fn`` ([N,3] world points -> [N,3]) or a UV ``texture``.

    texture: [1,Ht,Wt,3] linear RGB (needs mesh.uv). Returns ``rgb`` [B,H,W,3] premultiplied by coverage
    (background 0), ``alpha`` [B,H,W,1] in [0,1] and the G-buffers of :func:`rasterize_gbuffers`.
    """
    gb = rasterize_gbuffers(rasterizer, mesh, mvp, resolution)
    mask = gb["mask"]
    if albedo_fn is not None:
        color = shade_covered(mask, gb["gb_pos"], albedo_fn)
    elif texture is not None:
        if "gb_uv" not in gb:
            raise ValueError("render_albedo(texture=...) needs a mesh with UV coordinates (mesh.uv).")
        color = rasterizer.texture(texture, gb["gb_uv"], gb["gb_uv_da"], filter_mode="linear-mipmap-linear")
        color = color * mask[..., None]
    else:
        raise ValueError("render_albedo needs albedo_fn or texture.")
    gb["rgb"], gb["alpha"] = with_coverage(rasterizer, color, gb, mesh.faces, antialias)
    return gb


def with_coverage(rasterizer, color: Tensor, gb: dict, faces: Tensor, antialias: bool = True) -> tuple[Tensor, Tensor]:
    """Attach coverage to a shaded image and antialias both along silhouettes.

    color: [B,H,W,C], zero where uncovered; gb: the G-buffers of :func:`rasterize_gbuffers`.
    Returns colour premultiplied by coverage [B,H,W,C] and alpha [B,H,W,1] in [0,1].
    """
    rgba = torch.cat([color, gb["mask"][..., None].to(color.dtype)], -1)
    if antialias:  # the analytic silhouette gradients come from here
        rgba = rasterizer.antialias(rgba.contiguous(), gb["rast"], gb["pos_clip"], faces)
    return rgba[..., :-1], rgba[..., -1:].clamp(0, 1)


# ------------------------------------------------------------------------------------------ PBR shading
NORMAL_THRESHOLD = 0.1  # nvdiffrec's: below this cos(view, shading normal) the geometric normal takes over


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1, keepdim=True)


def reference_tangent(n: Tensor) -> Tensor:
    """A unit tangent [...,3] of unit normals n [...,3] that needs no UVs: the direction of cross(+y, n).

    Used by the neural material (pass 1), whose normal perturbation lives in this frame; it is smooth everywhere
    except at n = +-y (a point on any closed surface, where +x is taken instead).
    """
    up = torch.zeros_like(n)
    up[..., 1] = 1.0
    t = torch.linalg.cross(up, n, dim=-1)
    fallback = torch.zeros_like(n)
    fallback[..., 0] = 1.0
    return _normalize(torch.where(_dot(t, t) > 1e-12, t, fallback))


def perturb_normal(nrm_ts: Tensor, normal: Tensor, tangent: Tensor, handedness: Tensor | float = 1.0) -> Tensor:
    """World-space shading normal from a tangent-space one (nvdiffrec's ``_perturb_normal``, OpenGL convention).

    nrm_ts: [...,3] (x along the tangent, y along the bitangent = handedness * cross(normal, tangent), z along
    the normal; z clamped >= 0); normal, tangent: [...,3] unit. handedness: +-1, [...,1] or scalar. Returns unit [...,3].
    """
    t = _normalize(tangent - _dot(tangent, normal) * normal)
    b = torch.linalg.cross(normal, t, dim=-1) * handedness
    return _normalize(t * nrm_ts[..., 0:1] + b * nrm_ts[..., 1:2] + normal * nrm_ts[..., 2:3].clamp_min(0))


def to_tangent_space(world: Tensor, normal: Tensor, tangent: Tensor, handedness: Tensor | float = 1.0) -> Tensor:
    """Inverse of `perturb_normal` for unit vectors: world [...,3] -> tangent-space [...,3] of frame (t, b, n)."""
    t = _normalize(tangent - _dot(tangent, normal) * normal)
    b = torch.linalg.cross(normal, t, dim=-1) * handedness
    return torch.cat([_dot(world, t), _dot(world, b), _dot(world, normal)], -1)


def bend_normal(view: Tensor, shading: Tensor, geometric: Tensor, two_sided: bool = True) -> Tensor:
    """nvdiffrec's ``_bend_normal``: flip back-facing normals (two-sided), and fade towards the geometric normal
    where the shading normal turns away from the viewer. All [...,3] unit."""
    if two_sided:
        front = _dot(geometric, view) > 0
        shading = torch.where(front, shading, -shading)
        geometric = torch.where(front, geometric, -geometric)
    t = (_dot(view, shading) / NORMAL_THRESHOLD).clamp(0, 1)
    return torch.lerp(geometric, shading, t)


@fused
def shading_normal(nrm_ts: Tensor | None, smooth: Tensor, geometric: Tensor, pos: Tensor, view_pos: Tensor,
                   tangent: Tensor | None = None, handedness: Tensor | float = 1.0) -> Tensor:
    """The normal a pixel is shaded with: the interpolated normal ``smooth`` [N,3] (any length), perturbed by the
    tangent-space ``nrm_ts`` [N,3] (None: unperturbed) in the frame of ``tangent`` (None: `reference_tangent`),
    then bent towards the unit ``geometric`` normal where it faces away from the camera at ``view_pos`` [N,3]."""
    n = _normalize(smooth)
    if nrm_ts is not None:
        n = perturb_normal(nrm_ts, n, reference_tangent(n) if tangent is None else tangent, handedness)
    return bend_normal(_normalize(view_pos - pos), n, geometric)


def fused_shading_runs(t: Tensor) -> bool:
    """Whether `render_pbr(fused=True)` can shade tensors like ``t`` with the Triton kernels: float32 on CUDA with
    triton installed, or on any device in a process whose Triton interprets (TRITON_INTERPRET=1, for tests)."""
    if t.dtype != torch.float32 or not triton_importable():
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def render_pbr(
    rasterizer,
    mesh: Mesh,
    mvp: Tensor,
    cam_pos: Tensor,
    resolution: tuple[int, int],
    material: Callable[[dict, Tensor], dict],
    light,
    antialias: bool = True,
    depth: bool = False,
    perturb: bool = True,
    mark: Callable[[], None] | None = None,
    fused: bool = False,
    material_images: bool = True,
    capacity: int | None = None,
) -> dict:
    """Split-sum PBR render of ``mesh`` under an `EnvironmentLight` (its mips built).

    mesh: needs ``normals``; with ``tangents`` (and ``uv``) the normal perturbation uses the UV tangent frame,
    else `reference_tangent`. mvp: [B,4,4]; cam_pos: [B,3] world space. material(gb, mask) returns ``kd``,
    ``ks``, ``nrm`` (and optionally ``kd_grad`` [N,1]) for the N covered pixels, each [N,3] (in the order of
    ``gb["covered_index"]``, `recon.gather.mask_index` of the mask, which equals ``x[mask]``), or as images
    [B,H,W,C] (a texture lookup); ``gb["covered_pos"]`` [N,3] holds the covered pixels' positions (the covered rows
    of ``gb["gb_pos"]``). Returns the G-buffers plus ``rgb`` [B,H,W,3] linear HDR premultiplied by
    coverage, ``alpha`` [B,H,W,1], the material images ``kd``/``ks``/``normal`` [B,H,W,3] (zero where
    uncovered), ``kd_grad`` [B,H,W,1] when the material gives it, ``covered``: ``ks`` [N,3] and ``kd_grad`` [N,1] at
    the covered pixels (what the images hold there, for losses that need no image) and, with ``depth``, ``depth``
    [B,H,W,1] (distance along the camera's view axis, scene units; 0 where uncovered).
    mark: called after each stage (G-buffers, material, shading and antialiasing), for profilers.
    fused: the per-pixel shading arithmetic as Triton kernels (`recon.render.shading_triton`) where they run (float32
    CUDA tensors; Triton's interpreter in tests), with the same values and gradients.
    material_images: False leaves out the ``kd``/``ks``/``normal``/``kd_grad`` images (a training step's losses take
    ``covered`` instead), which saves their scatters.
    capacity: shade a fixed number of rows instead of exactly the covered pixels (see `shade_gbuffers`): every
    shape then stays the same from call to call, as a CUDA graph needs.
    """
    gb = rasterize_gbuffers(rasterizer, mesh, mvp, resolution, shading_attributes(mesh, perturb))
    return shade_gbuffers(rasterizer, mesh, gb, cam_pos, material, light, antialias=antialias, depth=depth,
                          perturb=perturb, mark=mark, fused=fused, material_images=material_images, capacity=capacity)


def shading_attributes(mesh: Mesh, perturb: bool = True) -> list[Tensor]:
    """The per-vertex attributes `shade_gbuffers` needs interpolated besides the positions (``extra`` of
    `rasterize_gbuffers`): the normals and, for a UV tangent frame, the tangents and their handedness."""
    extra = [mesh.normals]
    if mesh.tangents is not None and perturb:
        extra += [mesh.tangents] + ([] if mesh.handedness is None else [mesh.handedness])
    return extra


def covered_rows(mask: Tensor, capacity: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Which pixels a render shades: (``gather`` [N], ``place`` [N], ``valid`` [N,1] or None).

    Without a capacity, N is the number of covered pixels, ``gather`` = ``place`` = `mask_index` of ``mask``, and
    ``valid`` is None. With one, N = capacity: the covered pixels' positions in order (`torch.nonzero_static`, no
    host sync), then padding rows placed at ``mask.numel()`` (one row past the image, dropped after scattering);
    ``valid`` is 1 for covered rows and 0 for padding. Padding row i gathers covered row i mod (covered pixels) (the
    last pixel when none is covered): its values are a covered pixel's and its zero gradients scatter as the covered
    rows' do, not all into one pixel, one texel and one face (atomic adds on one address run one after another).
    Covered pixels beyond the capacity are left out (the caller checks ``mask.sum()`` against it).
    """
    if capacity is None:
        index = mask_index(mask)
        return index, index, None
    n = mask.numel()
    place = torch.nonzero_static(mask.reshape(-1), size=int(capacity), fill_value=n).squeeze(1)
    valid = (place < n)[:, None]
    rows = torch.arange(int(capacity), device=mask.device)
    source = torch.where(valid[:, 0], rows, rows % valid.sum().clamp_min(1))
    return place.index_select(0, source).clamp_max(n - 1), place, valid


def shade_gbuffers(
    rasterizer,
    mesh: Mesh,
    gb: dict,
    cam_pos: Tensor,
    material: Callable[[dict, Tensor], dict],
    light,
    antialias: bool = True,
    depth: bool = False,
    perturb: bool = True,
    mark: Callable[[], None] | None = None,
    fused: bool = False,
    material_images: bool = True,
    capacity: int | None = None,
) -> dict:
    """`render_pbr` after the rasterization: ``gb`` is `rasterize_gbuffers`'s output for ``mesh`` with ``extra`` =
    `shading_attributes` (the same ``perturb``). Shades the covered pixels and fills ``gb`` as `render_pbr` returns it.

    capacity: shade exactly that many rows (`covered_rows`): the covered pixels and padding rows, whose values
    reach no image and whose rows of ``covered`` are zero. ``gb["covered_index"]`` then holds a pixel for every row
    (padding rows: a covered pixel again, `covered_rows`) and ``gb["covered_valid"]`` [N,1] marks the covered ones; ``gb["covered_count"]``
    is ``mask.sum()``, more than the capacity when pixels were left out.
    """
    rows = covered_rows(gb["mask"], capacity)  # covered pixels, gathered with index_select (recon.gather)
    gb["covered_index"] = rows[0]
    if rows[2] is not None:
        gb["covered_valid"], gb["covered_count"] = rows[2], gb["mask"].sum()
    inputs = row_inputs(mesh, gb, rows, perturb)
    gb["covered_pos"] = inputs["pos"]  # the covered rows of gb_pos, for a material evaluated there
    if mark is not None:
        mark()
    shaded = shade_rows(rasterizer, gb, rows, inputs, cam_pos, material, light, perturb=perturb, mark=mark,
                        fused=fused, material_images=material_images)
    # one image per quantity: slices of a joint image would each take a full-image zero fill and copy in backward
    gb["rgb"], gb["alpha"] = with_coverage(rasterizer, shaded.pop("color"), gb, mesh.faces, antialias)
    gb.update(shaded)
    if depth:
        gb["depth"], _ = rasterizer.interpolate(gb["pos_clip"][..., 3:4].contiguous(), gb["rast"], mesh.faces)
    if mark is not None:
        mark()
    return gb


def row_inputs(mesh: Mesh, gb: dict, rows: tuple[Tensor, Tensor, Tensor | None], perturb: bool = True) -> dict:
    """The shading inputs of the rows `covered_rows` gave (``rows``) from the G-buffers ``gb`` of ``mesh``: ``pos``
    and the interpolated normal ``smooth`` [N,3], the geometric normal ``n_geom`` [N,3] of each row's triangle, and
    with a UV tangent frame (``perturb``) ``tangent`` [N,3] and ``hand`` (+-1 [N,1], or 1.0); else None and 1.0.
    Everything that depends on the mesh's size is gathered here, so that `shade_rows` sees fixed shapes."""
    from recon.geometry.mesh import unit_face_normals

    sel, _, valid = rows
    mask, rast = gb["mask"], gb["rast"]
    extra = shading_attributes(mesh, perturb)
    attrs = masked_rows(gb["gb_attrs"], sel, mask.dim()).split([3] + [a.shape[-1] for a in extra], -1)
    tri = masked_rows(rast[..., 3], sel, mask.dim()).long() - 1
    if valid is not None:
        tri = tri.clamp_min(0)  # without covered pixels, padding rows gather an uncovered one (triangle id 0)
    unit_faces = mesh.face_normals if mesh.face_normals is not None else unit_face_normals(mesh.verts, mesh.faces)
    out = {"pos": attrs[0], "smooth": attrs[1], "n_geom": take_rows(unit_faces, tri), "tangent": None, "hand": 1.0}
    if mesh.tangents is not None and perturb:
        out["tangent"] = attrs[2]
        if mesh.handedness is not None:
            out["hand"] = torch.where(attrs[3] < 0, -1.0, 1.0)
    return out


def shade_rows(
    rasterizer,
    gb: dict,
    rows: tuple[Tensor, Tensor, Tensor | None],
    inputs: dict,
    cam_pos: Tensor,
    material: Callable[[dict, Tensor], dict],
    light,
    perturb: bool = True,
    mark: Callable[[], None] | None = None,
    fused: bool = False,
    material_images: bool = True,
) -> dict:
    """Material and shading of the rows ``rows`` (`covered_rows`) with their `row_inputs` ``inputs``: everything
    of `shade_gbuffers` between the G-buffers and the antialiasing, with shapes that depend on the rows and the image
    alone (pass 1 replays it as a CUDA graph, `recon.render.graphed`). ``gb`` needs ``mask`` and what ``material``
    reads (``covered_pos``, ``covered_index``, UV G-buffers).

    Returns ``color`` [B,H,W,3] (zero where uncovered), ``covered`` (``ks``, and ``kd_grad`` when the material gives
    it, zero on padding rows) and with ``material_images`` the images ``kd``/``ks``/``normal`` (and ``kd_grad``)."""
    sel, place, valid = rows
    mask = gb["mask"]
    n_pix = mask.shape

    def covered(t: Tensor) -> Tensor:
        return masked_rows(t, sel, mask.dim())

    pos = inputs["pos"]
    view_pos = take_rows(cam_pos, sel // (n_pix[1] * n_pix[2]))
    mat = material(gb, mask)
    mat = {k: (covered(v) if v.dim() == 4 else v) for k, v in mat.items()}
    if mark is not None:
        mark()
    nrm_ts = mat["nrm"] if perturb else None
    tangent, hand = inputs["tangent"], inputs["hand"]
    if fused and fused_shading_runs(pos):
        from recon.render.shading_triton import shading_inputs, split_sum_combine

        n_shade, diff_col, spec_col, n_dot_v, reflvec, mip = shading_inputs(
            nrm_ts, inputs["smooth"], inputs["n_geom"], pos, view_pos, tangent, hand, mat["kd"], mat["ks"],
            light.mip_levels)
        irradiance, fg, spec = light.lookups(n_shade, mat["ks"][..., 1:2], n_dot_v, reflvec, mip, rasterizer)
        color = split_sum_combine(irradiance, diff_col, spec, spec_col, fg, mat["ks"])
    else:
        n_shade = shading_normal(nrm_ts, inputs["smooth"], inputs["n_geom"], pos, view_pos, tangent, hand)
        color = light.shade(pos, n_shade, mat["kd"], mat["ks"], view_pos, rasterizer=rasterizer)

    def image(v: Tensor) -> Tensor:  # covered rows -> [B,H,W,C], zero where uncovered
        if valid is None:
            return scatter_rows(v, place, mask.numel()).reshape(*n_pix, -1)
        # padding rows land in one extra row, dropped here
        return scatter_rows(v, place, mask.numel() + 1)[: mask.numel()].reshape(*n_pix, -1)

    def only_valid(v: Tensor) -> Tensor:
        return v if valid is None else v * valid

    out = {"color": image(color), "covered": {"ks": only_valid(mat["ks"])}}
    if material_images:
        out["kd"], out["ks"], out["normal"] = image(mat["kd"]), image(mat["ks"]), image(n_shade)
    if "kd_grad" in mat:
        if material_images:
            out["kd_grad"] = image(mat["kd_grad"])
        out["covered"]["kd_grad"] = only_valid(mat["kd_grad"])
    return out
