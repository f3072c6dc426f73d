"""Mesh rendering on top of a Rasterizer: G-buffers, material evaluation on covered pixels, antialiasing."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from recon.geometry.mesh import Mesh
from recon.render.camera import transform_pos


def rasterize_gbuffers(rasterizer, mesh: Mesh, mvp: Tensor, resolution: tuple[int, int]) -> dict:
    """Rasterize ``mesh`` from cameras ``mvp`` [B,4,4] and interpolate the G-buffers.

    Returns a dict: ``pos_clip`` [B,Nv,4], ``rast``/``rast_db`` [B,H,W,4], ``mask`` [B,H,W] bool,
    ``gb_pos`` [B,H,W,3] world space; with UVs on the mesh also ``gb_uv`` [B,H,W,2] and ``gb_uv_da`` [B,H,W,4].
    """
    pos_clip = transform_pos(mvp, mesh.verts)
    rast, rast_db = rasterizer.rasterize(pos_clip, mesh.faces, resolution)
    gb_pos, _ = rasterizer.interpolate(mesh.verts, rast, mesh.faces)
    out = {"pos_clip": pos_clip, "rast": rast, "rast_db": rast_db, "mask": rast[..., 3] > 0, "gb_pos": gb_pos}
    if mesh.uv is not None:
        uv_faces = mesh.uv_faces if mesh.uv_faces is not None else mesh.faces
        out["gb_uv"], out["gb_uv_da"] = rasterizer.interpolate(mesh.uv, rast, uv_faces, rast_db=rast_db, diff_attrs="all")
    return out


def shade_covered(mask: Tensor, points: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Evaluate ``fn`` only on covered pixels (material networks are the expensive part).

    mask [B,H,W] bool; points [B,H,W,D]; fn maps [N,D] -> [N,C]. Returns [B,H,W,C], zero where uncovered.
    """
    values = fn(points[mask])
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
