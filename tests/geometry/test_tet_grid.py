"""The tet grid is a valid conforming tetrahedralization of the cube, in the documented layout."""

from collections import Counter

import pytest
import torch

from recon.geometry.tet_grid import make_tet_grid, tet_edges, tet_grid_edges, tet_volumes

# Faces of a tet (v0, v1, v2, v3), each wound counter-clockwise seen from outside a positive tet.
TET_FACES = ((1, 2, 3), (0, 3, 2), (0, 1, 3), (0, 2, 1))


def _canonical(face: tuple[int, int, int]) -> tuple[int, int, int]:
    """Rotate an oriented triangle so its smallest index comes first (keeps orientation)."""
    i = face.index(min(face))
    return face[i:] + face[:i]


@pytest.mark.parametrize("res", [1, 2, 5])
def test_shapes_bounds_and_layout(res):
    scale, center = 1.7, (0.3, -0.2, 1.0)
    verts, tets = make_tet_grid(res, scale=scale, center=center)
    assert verts.shape == ((res + 1) ** 3, 3) and verts.dtype == torch.float32
    assert tets.shape == (6 * res**3, 4) and tets.dtype == torch.int64
    c = torch.tensor(center)
    torch.testing.assert_close(verts.min(dim=0).values, c - scale / 2)
    torch.testing.assert_close(verts.max(dim=0).values, c + scale / 2)
    # vertex (i, j, k) sits at index (i (res+1) + j)(res+1) + k, i along x
    n, i, j, k = res + 1, res, 0, 1
    torch.testing.assert_close(verts[(i * n + j) * n + k], c + scale * (torch.tensor([i, j, k]) / res - 0.5))
    # cell (i, j, k) owns tets 6 cell .. 6 cell + 5, all with corners in that cell
    lower = verts[tets].min(dim=1).values.reshape(res, res, res, 6, 3)
    assert torch.allclose(lower, lower[..., :1, :])
    torch.testing.assert_close(lower[-1, 0, 0, 0], c + scale * (torch.tensor([res - 1, 0, 0]) / res - 0.5))


@pytest.mark.parametrize("res", [1, 3, 4])
def test_volumes_positive_and_fill_the_cube(res):
    scale = 2.1
    verts, tets = make_tet_grid(res, scale=scale, center=(0.5, 0.0, -1.0))
    vol = tet_volumes(verts.double(), tets)
    assert (vol > 0).all()
    torch.testing.assert_close(vol, torch.full_like(vol, (scale / res) ** 3 / 6))
    assert vol.sum().item() == pytest.approx(scale**3, rel=1e-6)  # float32 corners


@pytest.mark.parametrize("res", [1, 2, 3])
def test_conforming(res):
    """Interior triangles are shared by exactly 2 tets, with opposite orientations; boundary
    triangles (12 res^2 of them) by exactly 1 and lie on a cube face. Tets meet face to face."""
    verts, tets = make_tet_grid(res, scale=1.0)
    oriented = Counter(_canonical(tuple(t[i] for i in f)) for t in tets.tolist() for f in TET_FACES)
    unoriented = Counter(tuple(sorted(f)) for f in oriented.elements())

    assert max(oriented.values()) == 1  # two positive tets never see a shared face the same way
    assert set(unoriented.values()) <= {1, 2}
    boundary = [f for f, count in unoriented.items() if count == 1]
    assert len(boundary) == 12 * res**2
    for face in boundary:
        corners = verts[list(face)]
        on_plane = (corners == corners[:1]).all(dim=0) & (corners[0].abs() == 0.5)
        assert on_plane.any(), f"boundary face {face} is not on the cube surface"
    # Euler characteristic of the solid ball: V - E + F - T = 1
    n_edges = tet_edges(tets).shape[1]
    assert verts.shape[0] - n_edges + len(unoriented) - tets.shape[0] == 1


@pytest.mark.parametrize("res", [1, 2, 4])
def test_lattice_edges_match_tet_edges(res):
    _, tets = make_tet_grid(res)
    lattice = tet_grid_edges(res)
    assert (lattice[0] < lattice[1]).all()
    n = (res + 1) ** 3
    assert torch.equal(torch.sort(lattice[0] * n + lattice[1]).values, tet_edges(tets)[0] * n + tet_edges(tets)[1])
    assert lattice.shape[1] == 3 * res * (res + 1) ** 2 + 3 * res**2 * (res + 1) + res**3


def test_rejects_empty_grid():
    with pytest.raises(ValueError, match="res >= 1"):
        make_tet_grid(0)
