"""UV unwrapping with xatlas and baking of 3D material fields into 2D textures."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from recon.geometry.mesh import Mesh


def simplify(mesh: Mesh, max_faces: int) -> Mesh:
    """Quadric-error decimation (fast-simplification, the library behind trimesh's) down to ``max_faces`` triangles.

    DMTet meshes are uniformly dense; UV unwrapping time grows quickly with the triangle count, so the
    export decimates first. Meshes already small enough are returned unchanged. Normals are recomputed.
    fast-simplification is called directly: importing trimesh at the pass switch cost 1.3 s on a GPU server (the
    decimation of 180k faces itself 0.1-0.2 s).
    """
    if max_faces <= 0 or mesh.faces.shape[0] <= max_faces:
        return mesh
    from fast_simplification import simplify as decimate

    points = mesh.verts.detach().cpu().numpy().astype(np.float64)
    triangles = mesh.faces.detach().cpu().numpy().astype(np.int64)
    verts, faces = decimate(points, triangles, target_count=int(max_faces))
    verts = torch.as_tensor(np.asarray(verts), dtype=mesh.verts.dtype, device=mesh.verts.device)
    faces = torch.as_tensor(np.asarray(faces), dtype=torch.int64, device=mesh.verts.device)
    return Mesh(verts=verts, faces=faces).with_normals()


def spatial_chunks(points: np.ndarray, max_size: int) -> list[np.ndarray]:
    """Split point indices into compact groups of at most ``max_size``: recursive median cuts along the longest side
    of each group's bounding box (a k-d tree's leaves), so every group is a roughly cubical patch of similar size."""
    groups, done = [np.arange(len(points))], []
    while groups:
        idx = groups.pop()
        if len(idx) <= max_size:
            done.append(idx)
            continue
        p = points[idx]
        axis = int(np.argmax(p.max(0) - p.min(0)))
        order = idx[np.argsort(p[:, axis], kind="stable")]
        groups += [order[: len(order) // 2], order[len(order) // 2:]]
    return done[::-1]


SMALL_COMPONENT_FACES = 64  # `surface_components`: pieces of the surface below this many faces count as small


def surface_components(faces: np.ndarray) -> tuple[int, int]:
    """The surface's connected pieces (faces joined by shared vertices) and how many faces lie in pieces of fewer
    than SMALL_COMPONENT_FACES faces: every piece is at least one chart, so fragments multiply an unwrap's charts."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(faces) == 0:
        return 0, 0
    used, local = np.unique(faces, return_inverse=True)
    local = local.reshape(-1, 3)
    edges = np.concatenate([local[:, [0, 1]], local[:, [1, 2]]])
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(len(used),) * 2)
    count, labels = connected_components(graph, directed=False)
    faces_per_piece = np.bincount(labels[local[:, 0]], minlength=count)
    return int(count), int(faces_per_piece[faces_per_piece < SMALL_COMPONENT_FACES].sum())


def unwrap(mesh: Mesh, padding: int = 2, resolution: int = 1024, chunk_faces: int = 1500, chart_iterations: int = 0,
           stats: dict | None = None, pack_resolution: int = 0) -> Mesh:
    """UV-unwrap ``mesh`` with xatlas: returns a copy with ``uv`` [Nuv,2] in [0,1] and ``uv_faces`` [Nf,3].

    Positions and faces are kept (texture seams live in the separate UV index buffer, as in OBJ). resolution: the
    atlas side the charts are packed for (``padding`` texels between charts at that size).

    xatlas's chart growing costs far more than linear time in the triangle count (a 100k-triangle DMTet surface:
    27 s whole, 6 s as 16 pieces, on two cores). So meshes larger than ``chunk_faces`` are cut into compact
    spatial pieces (`spatial_chunks` of the face centroids) that xatlas charts independently, on its worker threads,
    and packs into one atlas; the pieces' borders become chart borders. ``chunk_faces=0`` charts the mesh whole.
    chart_iterations: xatlas's ``ChartOptions.max_iterations``, its rounds of re-seeding and growing the charts. 0
    grows them once: on a 100k-face surface with pieces of 1500 faces, 2.3 s on two cores against 5.5 s for xatlas's
    default 1 with pieces of 3000, the same share of the atlas used, a fifth more charts; on a GPU fit (nerf800) the
    same test PSNR and chamfer.
    pack_resolution: the grid xatlas packs the charts on, when smaller than ``resolution`` (0: ``resolution``), with
    the padding scaled to match (at least 1). Packing runs on one thread and its cost grows with the grid, while the
    layout is resampled to the texture anyway. The price is texel density: charts are placed on whole texels of the
    coarser grid, so the surface covers less of the texture. On a fitted nerf800 surface (100k faces, 17k charts,
    two CPU cores; `bench/unwrap.py --mesh`), packed for 1024 instead of 2048: 2.2-2.4 s against 3.2 s, and the
    surface covers 0.344 of the texture against 0.378 (xatlas's own utilization, padding included: 0.82 against
    0.79); the gap between charts is 1.30 texels of the 2048 texture against 1.39 (xatlas's atlas outgrows the
    requested size: 1570 and 2943 texels). Two nerf800 fits with it gave 40.00 and 39.86 dB test PSNR.
    stats: a dict that receives ``charts`` (xatlas's chart count), ``atlas_used`` (the share of the atlas the charts
    cover, xatlas's utilization), ``generate_seconds`` (xatlas's charting and packing alone), ``components`` and
    ``small_component_faces`` (`surface_components`).
    """
    import xatlas

    if mesh.faces.shape[0] == 0:
        raise ValueError("cannot UV-unwrap a mesh with no faces.")
    verts = mesh.verts.detach().cpu().numpy().astype(np.float32)
    faces = mesh.faces.detach().cpu().numpy().astype(np.int64)
    pieces = [np.arange(len(faces))]
    if 0 < chunk_faces < len(faces):
        pieces = spatial_chunks(verts[faces].mean(1), int(chunk_faces))
    atlas = xatlas.Atlas()
    for piece in pieces:
        used, local = np.unique(faces[piece], return_inverse=True)
        atlas.add_mesh(verts[used], local.reshape(-1, 3).astype(np.uint32))
    if chart_iterations < 0:
        raise ValueError(f"model.bake.unwrap_chart_iterations must be >= 0, got {chart_iterations}")
    chart_options = xatlas.ChartOptions()
    chart_options.max_iterations = int(chart_iterations)
    if pack_resolution < 0:
        raise ValueError(f"model.bake.unwrap_pack_resolution must be >= 0 (0: the texture's), got {pack_resolution}")
    pack = min(int(pack_resolution), int(resolution)) if pack_resolution else int(resolution)
    pack_options = xatlas.PackOptions()
    pack_options.padding = max(1, round(padding * pack / resolution)) if padding > 0 else 0
    pack_options.resolution = pack
    pack_options.bilinear = True
    t0 = time.perf_counter()
    atlas.generate(chart_options, pack_options)
    if stats is not None:
        stats.update(charts=int(atlas.chart_count), atlas_used=float(atlas.utilization),
                     generate_seconds=time.perf_counter() - t0)
        stats["components"], stats["small_component_faces"] = surface_components(faces)
    uvs, uv_faces, offset = [], np.empty((len(faces), 3), dtype=np.int64), 0
    for i, piece in enumerate(pieces):
        _, indices, piece_uv = atlas[i]
        uv_faces[piece] = indices.astype(np.int64) + offset
        uvs.append(piece_uv.astype(np.float32))
        offset += len(piece_uv)
    device = mesh.verts.device
    return Mesh(
        verts=mesh.verts,
        faces=mesh.faces,
        normals=mesh.normals,
        uv=torch.from_numpy(np.concatenate(uvs)).to(device),
        uv_faces=torch.from_numpy(uv_faces).to(device),
    )


def uv_gbuffer(rasterizer, mesh: Mesh, resolution: int, attrs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-vertex attributes interpolated over every texel of ``mesh``'s UV atlas.

    Rasterizes the mesh in texture space (uv -> clip xy); texel row i holds v = (i + 0.5) / resolution,
    matching the texture() lookup convention. attrs: [Nv,C] per position vertex (default: the positions).
    Returns values [R,R,C] and mask [R,R] bool.
    """
    if mesh.uv is None or mesh.uv_faces is None:
        raise ValueError("uv_gbuffer needs a UV-unwrapped mesh (see unwrap()).")
    attrs = mesh.verts if attrs is None else attrs
    uv = mesh.uv
    pos_clip = torch.cat([uv * 2 - 1, torch.zeros_like(uv[:, :1]), torch.ones_like(uv[:, :1])], -1)[None]
    rast, _ = rasterizer.rasterize(pos_clip.contiguous(), mesh.uv_faces, (resolution, resolution))
    # the attribute of each UV vertex: uv_faces and faces index the same triangles
    per_uv = torch.zeros(uv.shape[0], attrs.shape[-1], device=uv.device, dtype=attrs.dtype)
    per_uv[mesh.uv_faces.reshape(-1)] = attrs[mesh.faces.reshape(-1)]
    values, _ = rasterizer.interpolate(per_uv, rast, mesh.uv_faces)
    return values[0], rast[0, ..., 3] > 0


def dilate(texture: Tensor, mask: Tensor) -> Tensor:
    """Fill uncovered texels with the nearest covered texel's value (no seams under bilinear/mip filtering).

    texture [H,W,C], mask [H,W] bool. Uses scipy's exact Euclidean distance transform.
    """
    from scipy.ndimage import distance_transform_edt

    m = mask.cpu().numpy()
    if m.all() or not m.any():
        return texture
    _, (ii, jj) = distance_transform_edt(~m, return_indices=True)
    idx = torch.from_numpy(ii * m.shape[1] + jj).to(texture.device).reshape(-1)
    return texture.reshape(-1, texture.shape[-1])[idx].reshape(texture.shape)


@torch.no_grad()
def bake_texture(
    rasterizer, mesh: Mesh, field: Callable[[Tensor], Tensor], resolution: int, chunk: int = 1 << 18
) -> Tensor:
    """Bake a 3D field ([N,3] world points -> [N,C]) into a dilated [R,R,C] texture of ``mesh``'s atlas."""
    gb_pos, mask = uv_gbuffer(rasterizer, mesh, resolution)
    pts = gb_pos[mask]
    values = torch.cat([field(pts[i : i + chunk]) for i in range(0, max(pts.shape[0], 1), chunk)]) if pts.shape[0] else None
    if values is None:
        raise ValueError("the UV atlas covers no texel; the mesh is degenerate.")
    tex = values.new_zeros(resolution, resolution, values.shape[-1])
    tex[mask] = values
    return dilate(tex, mask)


@torch.no_grad()
def bake_pbr_textures(rasterizer, mesh: Mesh, material: Callable[[Tensor], Tensor], resolution: int,
                      chunk: int = 1 << 18) -> Tensor:
    """Bake a 9-channel PBR field (see recon.materials.pbr) into a dilated [R,R,9] texture of ``mesh``'s atlas.

    material: world points [N,3] -> [N,9] (kd, ks, tangent-space normal in the `reference_tangent` frame).
    The normal channels are re-expressed in the exported mesh's own UV tangent frame, so the texture shades
    the same world-space normal the field did: rendering the textured mesh reproduces the field.
    """
    from recon.render.shading import perturb_normal, reference_tangent, to_tangent_space

    mesh = mesh if mesh.tangents is not None and mesh.handedness is not None else mesh.with_tangents()
    frame = torch.cat([mesh.verts, mesh.normals, mesh.tangents, mesh.handedness], -1)
    gb, mask = uv_gbuffer(rasterizer, mesh, resolution, frame)
    gb = gb[mask]
    if gb.shape[0] == 0:
        raise ValueError("the UV atlas covers no texel; the mesh is degenerate.")
    out = []
    for i in range(0, gb.shape[0], chunk):
        g = gb[i : i + chunk]
        pos, n = g[:, 0:3], torch.nn.functional.normalize(g[:, 3:6], dim=-1)
        t, w = g[:, 6:9], torch.where(g[:, 9:10] < 0, -1.0, 1.0)
        values = material(pos)
        world = perturb_normal(values[:, 6:9], n, reference_tangent(n))
        out.append(torch.cat([values[:, :6], to_tangent_space(world, n, t, w)], -1))
    values = torch.cat(out)
    tex = values.new_zeros(resolution, resolution, values.shape[-1])
    tex[mask] = values
    return dilate(tex, mask)
