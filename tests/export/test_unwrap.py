"""UV unwrapping in spatial pieces: a valid atlas (every face mapped, no overlaps, one texel density)."""
import numpy as np
import pytest
import torch
import trimesh

from recon.export.uv_bake import spatial_chunks, unwrap, uv_gbuffer
from recon.geometry.mesh import Mesh
from recon.render import make_rasterizer


@pytest.fixture(scope="module")
def bumpy():
    tm = trimesh.creation.icosphere(subdivisions=4)  # 5120 faces
    v = tm.vertices * (1 + 0.15 * np.sin(4 * tm.vertices[:, :1]) * np.cos(3 * tm.vertices[:, 1:2]))
    return Mesh(torch.tensor(v, dtype=torch.float32), torch.tensor(tm.faces, dtype=torch.int64))


def test_spatial_chunks_partition_into_compact_groups():
    pts = np.random.default_rng(0).random((10_000, 3)) * [4.0, 1.0, 1.0]
    groups = spatial_chunks(pts, 1000)
    assert len(groups) == 16 and max(len(g) for g in groups) <= 1000
    assert np.array_equal(np.sort(np.concatenate(groups)), np.arange(10_000))
    extents = np.array([pts[g].max(0) - pts[g].min(0) for g in groups])
    assert extents.max(1).max() < 1.1  # cut along the long side first: no 4-long slabs


def _uv_area(uv, faces):
    a, b, c = (uv[faces[:, k]] for k in range(3))
    return 0.5 * ((b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0]).abs()


def _area(v, faces):
    a, b, c = (v[faces[:, k]] for k in range(3))
    return 0.5 * torch.linalg.cross(b - a, c - a).norm(dim=-1)


@pytest.mark.parametrize("chunk_faces, iterations, pack", [(0, 1, 0), (800, 1, 0), (800, 0, 0), (800, 0, 256)])
def test_unwrap_gives_a_valid_atlas(bumpy, chunk_faces, iterations, pack):
    mesh = unwrap(bumpy, resolution=512, chunk_faces=chunk_faces, chart_iterations=iterations, pack_resolution=pack)
    assert mesh.uv_faces.shape == bumpy.faces.shape and torch.equal(mesh.faces, bumpy.faces)
    assert mesh.uv.min() >= 0 and mesh.uv.max() <= 1
    uv_area = _uv_area(mesh.uv, mesh.uv_faces)
    assert (uv_area > 0).float().mean() > 0.99  # every face gets its own patch of texture
    # no two faces share texture: the covered fraction of the atlas equals the summed UV areas
    _, mask = uv_gbuffer(make_rasterizer("torch"), mesh, 1024)
    assert mask.float().mean().item() == pytest.approx(uv_area.sum().item(), rel=0.03)
    # one texel density everywhere: per piece of the sphere, UV area / surface area is the same
    ratio = uv_area / _area(bumpy.verts, bumpy.faces).clamp_min(1e-12)
    octant = ((bumpy.verts[bumpy.faces].mean(1) > 0).long() * torch.tensor([1, 2, 4])).sum(-1)
    per_octant = torch.stack([(ratio * (octant == k)).sum() / (octant == k).sum() for k in range(8)])
    assert (per_octant.max() / per_octant.min()).item() < 1.3


def test_unwrap_reports_its_atlas(bumpy):
    stats = {}
    mesh = unwrap(bumpy, resolution=512, chunk_faces=800, stats=stats)
    assert set(stats) == {"charts", "atlas_used", "generate_seconds", "components", "small_component_faces"}
    assert stats["components"] == 1 and stats["small_component_faces"] == 0  # one closed sphere
    assert 1 <= stats["charts"] <= bumpy.faces.shape[0] and stats["generate_seconds"] > 0
    # xatlas's utilization counts the texels its charts cover: about the summed UV areas
    assert stats["atlas_used"] == pytest.approx(_uv_area(mesh.uv, mesh.uv_faces).sum().item(), rel=0.15)


def test_pieces_keep_most_of_the_atlas_space(bumpy):
    whole = unwrap(bumpy, resolution=512, chunk_faces=0)
    pieces = unwrap(bumpy, resolution=512, chunk_faces=800)
    used = [_uv_area(m.uv, m.uv_faces).sum().item() for m in (whole, pieces)]
    assert used[1] > 0.8 * used[0]  # packing efficiency within 20 % of the whole-mesh unwrap


def test_negative_unwrap_settings_are_refused(bumpy):
    with pytest.raises(ValueError, match="unwrap_chart_iterations"):
        unwrap(bumpy, chart_iterations=-1)
    with pytest.raises(ValueError, match="unwrap_pack_resolution"):
        unwrap(bumpy, pack_resolution=-1)


def test_packing_on_a_coarser_grid_keeps_the_layout_dense(bumpy):
    """Packed for half the texture's side (padding halved), the same charts fill as much of the atlas (that they do
    not overlap at the texture's resolution is checked in the valid-atlas test, pack=256)."""
    full, coarse = {}, {}
    a = unwrap(bumpy, resolution=512, chunk_faces=800, stats=full)
    b = unwrap(bumpy, resolution=512, chunk_faces=800, stats=coarse, pack_resolution=256)
    assert coarse["charts"] == full["charts"]  # the same charts, only packed differently
    assert not torch.equal(a.uv, b.uv)
    assert coarse["atlas_used"] > 0.9 * full["atlas_used"]


def test_surface_components_count_pieces_and_fragments():
    import numpy as np
    import trimesh

    from recon.export.uv_bake import SMALL_COMPONENT_FACES, surface_components

    big = trimesh.creation.icosphere(subdivisions=2)  # 320 faces
    small = trimesh.creation.box()  # 12 faces
    faces = np.concatenate([big.faces, small.faces + len(big.vertices), small.faces + len(big.vertices) + 8,
                            big.faces + len(big.vertices) + 16])
    assert surface_components(faces) == (4, 24) and len(small.faces) < SMALL_COMPONENT_FACES < len(big.faces)
    assert surface_components(faces[:0]) == (0, 0)
    assert surface_components(faces[len(big.faces):]) == (3, 24)  # unused vertex numbers are no pieces
