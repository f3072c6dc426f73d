"""Metrics of an exported reconstruction.

``python -m recon.eval RUN_DIR [--data PATH] [--gt-mesh PATH] [--light HDR] [--mesh mesh.glb] [--json]``
"""
import argparse
import json
import sys

from recon.eval.evaluate import evaluate_run, format_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recon.eval", description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--data", default=None, help="scene directory (default: the one the run was fitted to)")
    p.add_argument("--gt-mesh", default=None, help="ground-truth mesh for geometry metrics (default: DATA/gt_mesh.ply)")
    p.add_argument("--split", default="test")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "nvdiffrast"])
    p.add_argument("--light", default=None, help="relight under this lat-long .hdr probe instead of RUN_DIR/probe.hdr")
    p.add_argument("--samples", type=int, default=100_000, help="surface samples per mesh for chamfer/F-score")
    p.add_argument("--mesh", default="mesh.obj", choices=["mesh.obj", "mesh.glb"],
                   help="which export to load: the OBJ with its maps (metrics.json) or the GLB (metrics.mesh.glb.json)")
    p.add_argument("--json", action="store_true", help="print the metrics (metrics.json's content) as JSON")
    a = p.parse_args(argv)
    try:
        m = evaluate_run(a.run_dir, a.data, a.gt_mesh, a.split, a.backend, n_samples=a.samples, light=a.light, mesh_file=a.mesh)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(m, indent=2) if a.json else format_table(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
