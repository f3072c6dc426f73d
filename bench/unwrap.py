"""The pass switch's host work on this machine: `python bench/unwrap.py [--grid 128 | --mesh OBJ] [--out FILE]`.

Builds a DMTet surface like the one pass 1 ends with (the built-in scene's SDF on a tet grid, the grid's vertices
offset at random as training leaves them), or loads a fitted one (``--mesh``: an exported ``mesh.obj``, its UV seams
welded back into one surface), decimates it to ``--faces`` triangles (`recon.export.uv_bake.simplify`) and UV-unwraps
it with xatlas (`unwrap`) for each (piece size, chart rounds, packing grid) in ``--settings``, timing each step and
reporting the charts and the share of the atlas they use. Also reports the CPUs this process may use and how
many the machine reports (``os.cpu_count``): xatlas charts the pieces on worker threads, so the unwrap should
shrink with cores. Runs on the CPU; no GPU needed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_SETTINGS = ("3000:1", "1500:0", "750:0", "1500:0:1024")


def surface(grid: int, seed: int = 0):
    """A DMTet surface of the built-in scene at ``grid``, its vertices offset as a trained grid's are."""
    from recon.data.synthetic_scene import scene_sdf
    from recon.geometry.dmtet import DMTetGeometry

    torch.manual_seed(seed)
    geometry = DMTetGeometry(tet_grid=grid)
    with torch.no_grad():
        geometry.sdf.copy_(scene_sdf(geometry.verts))
        geometry.deform.normal_(0, 0.15)
        return geometry.extract_mesh()


def fitted_surface(path: Path):
    """The surface of an exported OBJ, its vertices split at UV seams merged again (equal positions, as
    `recon.eval.evaluate.load_export` welds them)."""
    import trimesh

    from recon.geometry.mesh import Mesh

    tm = trimesh.load(path, force="mesh", process=False)
    verts, faces = torch.as_tensor(tm.vertices, dtype=torch.float32), torch.as_tensor(tm.faces, dtype=torch.int64)
    if faces.shape[0] == 0:
        raise ValueError(f"{path}: no faces to unwrap; give an exported mesh.obj.")
    welded, inverse = torch.unique(verts, dim=0, return_inverse=True)
    return Mesh(verts=welded, faces=inverse[faces])


def parse_setting(text: str) -> tuple[int, int, int]:
    """``PIECE:ROUNDS[:PACK]`` -> (unwrap_chunk_faces, unwrap_chart_iterations, unwrap_pack_resolution; 0 when not
    given: the atlas size)."""
    try:
        values = [int(v) for v in text.split(":")]
        if len(values) not in (2, 3):
            raise ValueError
    except ValueError:
        raise ValueError(f"a setting is PIECE_FACES:CHART_ROUNDS[:PACK_GRID], e.g. 1500:0 or 1500:0:1024; "
                         f"got {text!r}") from None
    return values[0], values[1], values[2] if len(values) == 3 else 0


def run(grid: int, faces: int, resolution: int, settings: list[tuple[int, int, int]], mesh_path: Path | None = None) -> dict:
    import xatlas

    from recon.export.uv_bake import simplify, unwrap

    t = time.perf_counter()
    full = surface(grid) if mesh_path is None else fitted_surface(mesh_path)
    extract = time.perf_counter() - t
    t = time.perf_counter()
    mesh = simplify(full, faces)
    decimate = time.perf_counter() - t
    rows = []
    for piece, rounds, pack in settings:
        t = time.perf_counter()
        out = unwrap(mesh, resolution=resolution, chunk_faces=piece, chart_iterations=rounds, pack_resolution=pack)
        seconds = time.perf_counter() - t
        charts, used = atlas_stats(out, resolution)
        rows.append({"piece_faces": piece, "chart_rounds": rounds, "pack_resolution": pack or resolution,
                     "unwrap_seconds": seconds, "charts": charts, "atlas_used": used})
        print(f"pieces of {piece:5} faces, {rounds} rounds, packed for {pack or resolution}: unwrap {seconds:6.2f} s, "
              f"{charts} charts, {used:.3f} of the atlas", flush=True)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"grid": None if mesh_path is not None else grid, "mesh": None if mesh_path is None else str(mesh_path),
            "extracted_faces": int(full.faces.shape[0]), "faces": int(mesh.faces.shape[0]),
            "resolution": resolution, "extract_seconds": extract, "simplify_seconds": decimate,
            "cpus_usable": affinity, "cpus_reported": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "xatlas": getattr(xatlas, "__version__", None), "rows": rows}


def atlas_stats(mesh, resolution: int) -> tuple[int, float]:
    """Charts (connected groups of UV triangles) and the share of a resolution² atlas their triangles cover."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    uv_faces = mesh.uv_faces.numpy()
    n = int(mesh.uv.shape[0])
    rows = np.repeat(uv_faces[:, 0], 2)
    cols = uv_faces[:, 1:].reshape(-1)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    charts, _ = connected_components(graph, directed=False)
    tri = mesh.uv.numpy()[uv_faces] * resolution
    area = 0.5 * np.abs((tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1])
                        - (tri[:, 2, 0] - tri[:, 0, 0]) * (tri[:, 1, 1] - tri[:, 0, 1]))
    return int(charts), float(area.sum() / resolution**2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=128, help="tet grid (nerf800: 128)")
    ap.add_argument("--mesh", type=Path, default=None,
                    help="unwrap this exported mesh.obj (a fitted surface) instead of the synthetic one")
    ap.add_argument("--faces", type=int, default=100_000, help="decimation target (model.bake.max_faces)")
    ap.add_argument("--resolution", type=int, default=2048, help="atlas size (model.bake.texture_res)")
    ap.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), metavar="PIECE:ROUNDS[:PACK]",
                    help="model.bake.unwrap_chunk_faces:unwrap_chart_iterations[:unwrap_pack_resolution]")
    ap.add_argument("--out", type=Path, default=None, help="also write the result here as JSON")
    args = ap.parse_args(argv)
    try:
        settings = [parse_setting(s) for s in args.settings]
    except ValueError as e:
        ap.error(str(e))
    if args.mesh is not None and not args.mesh.is_file():
        ap.error(f"--mesh {args.mesh}: no such file; give the mesh.obj of a run directory")
    result = run(args.grid, args.faces, args.resolution, settings, args.mesh)
    print(f"surface: {result['extracted_faces']} faces, decimated to {result['faces']} in "
          f"{result['simplify_seconds']:.2f} s; CPUs usable {result['cpus_usable']}, reported {result['cpus_reported']}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
