"""Marching tets' topology on the lattice (`recon.geometry.marching_tets_triton`, two Triton kernels) against the
generic `marching_tets_topology`: the same edges and faces in the same order. In Triton's interpreter on the CPU (a
child process: Triton picks interpreter or compiler when first imported) and, marked `gpu`, compiled on CUDA."""
import importlib.util

import pytest
import torch

from recon.geometry.dmtet import marching_tets_topology
from recon.geometry.tet_grid import make_tet_grid

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the triton package is not installed")


def compare_lattice_topology(device: str, cases) -> list[tuple[int, int, int]]:
    """For each (res, occupancy name, seed): the lattice result must equal the generic one exactly; returns the
    (res, edges, faces) counts."""
    from recon.geometry.marching_tets_triton import lattice_topology

    counts = []
    for res, kind, seed in cases:
        verts, tets = make_tet_grid(res)
        g = torch.Generator().manual_seed(seed)
        inside = {
            "random": lambda: torch.rand(verts.shape[0], generator=g) < 0.5,
            "sphere": lambda: verts.norm(dim=1) < 0.7,
            "empty": lambda: torch.zeros(verts.shape[0], dtype=torch.bool),
            "full": lambda: torch.ones(verts.shape[0], dtype=torch.bool),
            "corner": lambda: (verts > 0.3).all(dim=1),  # touches the grid's upper faces
        }[kind]()
        inside, tets = inside.to(device), tets.to(device)
        edges, faces = marching_tets_topology(inside, tets)
        got_edges, got_faces = lattice_topology(inside, res)
        assert torch.equal(got_edges, edges), (res, kind, got_edges.shape, edges.shape)
        assert torch.equal(got_faces, faces), (res, kind, got_faces.shape, faces.shape)
        counts.append((res, edges.shape[0], faces.shape[0]))
    return counts


CASES = [(1, "random", 0), (2, "random", 1), (5, "random", 2), (7, "sphere", 0), (6, "corner", 0), (9, "empty", 0),
         (4, "full", 0), (13, "random", 3), (16, "sphere", 0)]


@needs_triton
def test_lattice_topology_equals_the_generic_one_in_triton_interpreter(in_triton_interpreter):
    import inspect
    code = ("import torch\nfrom recon.geometry.dmtet import marching_tets_topology\n"
            "from recon.geometry.tet_grid import make_tet_grid\n" + inspect.getsource(compare_lattice_topology)
            + f"print('counts', compare_lattice_topology('cpu', {CASES!r}))\n")
    out = in_triton_interpreter(code)
    counts = eval(out.split("counts")[1])
    assert len(counts) == len(CASES) and all(e > 0 and f > 0 for _, e, f in counts[:5]), counts


@needs_triton
def test_lattice_topology_names_a_wrong_occupancy_or_grid():
    from recon.geometry.marching_tets_triton import lattice_topology

    with pytest.raises(ValueError, match="64 occupancy values for a grid of 4 cells per side, which has 125"):
        lattice_topology(torch.zeros(64, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="needs a bool occupancy, got torch.uint8"):
        lattice_topology(torch.zeros(125, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="at most 660.*lattice_kernel=false"):
        lattice_topology(torch.zeros(8, dtype=torch.bool), 700)


def test_the_lattice_kernels_are_a_cuda_default():
    from recon.fit import compose_config
    from recon.geometry.dmtet import DMTetGeometry

    assert compose_config(["experiment=nerf800"]).model.geometry.lattice_kernel is True
    geo = DMTetGeometry(tet_grid=6)  # on the CPU the generic topology runs, and no lattice tables are built
    assert not geo._grid  # the tet table is built on first use
    assert geo().faces.shape[0] > 0 and geo._lattice_tables is None and geo._grid["tets"].shape == (6 * 6**3, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lattice_topology_equals_the_generic_one_on_cuda():
    counts = compare_lattice_topology("cuda", CASES + [(128, "random", 4), (128, "sphere", 0), (64, "corner", 0)])
    assert counts[-3][2] > 1_000_000
