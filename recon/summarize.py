"""One table of a Hydra sweep: ``python -m recon.summarize MULTIRUN_DIR [--csv PATH] [--json]``.

Finds every job under MULTIRUN_DIR (a directory holding ``.hydra/config.yaml``), and prints one row per job:
the config keys whose values differ between the jobs (the swept overrides first, then any other key of the
composed configs that differs, e.g. what an ``experiment=`` choice changes), the test metrics of the export
(``metrics.json``: PSNR, SSIM, silhouette IoU, chamfer-L1 over the GT bounding-box diagonal), the fit time and
peak GPU memory (``timing.json``) and a status: ``finished`` (metrics written), ``exported`` (mesh and timing
but no metrics: evaluation off) or ``no metrics`` (the job failed, or is still running). The table is also
written as CSV, atomically (default ``MULTIRUN_DIR/summary.csv``), with unrounded numbers.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from recon.export.obj import atomic_write_bytes

# (column, table header, format) of the measured columns, after the config keys
METRICS = [
    ("psnr", "PSNR", "{:.2f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("iou", "IoU", "{:.4f}"),
    ("chamfer_l1", "chamfer", "{:.5f}"),
    ("fit_seconds", "fit s", "{:.1f}"),
    ("peak_gpu_memory_gib", "GPU GiB", "{:.2f}"),
    ("status", "status", "{}"),
]


class NoJobsError(FileNotFoundError):
    """The directory holds no Hydra job."""


def find_jobs(multirun_dir: Path) -> list[Path]:
    """Job directories under ``multirun_dir`` (each has ``.hydra/config.yaml``), in Hydra's job order."""
    if not multirun_dir.is_dir():
        raise NoJobsError(f"{multirun_dir} is not a directory: pass a sweep directory (multirun/<name>/<date>).")
    jobs = [p.parent.parent for p in multirun_dir.rglob(".hydra/config.yaml")]
    if not jobs:
        raise NoJobsError(
            f"{multirun_dir} holds no Hydra jobs (no */.hydra/config.yaml below it). Pass the directory a "
            "`python train.py -m ...` sweep wrote, e.g. multirun/<name>/<date> (see hydra.sweep.dir)."
        )
    return sorted(jobs, key=lambda job: (_job_num(job), _natural(job.relative_to(multirun_dir).as_posix())))


def _job_num(job: Path) -> float:
    hydra_yaml = job / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        num = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.num", default=None)
        if isinstance(num, int):
            return num
    return float("inf")


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _flatten(node, prefix: str = "") -> dict[str, str]:
    """Dotted key -> value as compact JSON (lists stay one value; interpolations stay as written)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node if isinstance(node, str) else json.dumps(node)}


def _overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    items = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
    pairs = (str(item).split("=", 1) for item in items or [] if "=" in str(item))
    return {key.lstrip("+~"): value for key, value in pairs}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or being written by a job still running
        return {}


def _number(x) -> float | None:
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str) and x in ("inf", "-inf", "nan"):  # how metrics.json spells non-finite values
        return float(x)
    return None


def _measured(job: Path) -> dict:
    metrics, timing = _read_json(job / "metrics.json"), _read_json(job / "timing.json")
    peak = timing.get("peak_gpu_memory_bytes")
    status = "finished" if metrics else "exported" if timing and (job / "mesh.obj").is_file() else "no metrics"
    return {
        "psnr": _number(metrics.get("psnr")), "ssim": _number(metrics.get("ssim")), "iou": _number(metrics.get("iou")),
        "chamfer_l1": _number((metrics.get("geometry") or {}).get("chamfer_l1")),
        "fit_seconds": _number(timing.get("fit_seconds")),
        "peak_gpu_memory_gib": peak / 2**30 if isinstance(peak, (int, float)) else None,
        "status": status,
    }


def summarize(multirun_dir: str | Path) -> tuple[list[str], list[dict]]:
    """Columns and rows of the sweep in ``multirun_dir`` (see the module docstring); row values are str or float."""
    root = Path(multirun_dir)
    jobs = find_jobs(root)
    overrides = [_overrides(job) for job in jobs]
    configs = [_flatten(OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "config.yaml"), resolve=False))
               for job in jobs]

    def differs(values: list[dict], key: str) -> bool:
        return len({v.get(key) for v in values}) > 1

    swept = [k for k in dict.fromkeys(k for o in overrides for k in o) if differs(overrides, k)]
    changed = [k for k in dict.fromkeys(k for c in configs for k in c) if k not in swept and differs(configs, k)]
    rows = []
    for job, o, c in zip(jobs, overrides, configs):
        row = {"job": job.relative_to(root).as_posix()}
        row.update({k: o.get(k, c.get(k, "")) for k in swept})
        row.update({k: c.get(k, "") for k in changed})
        row.update(_measured(job))
        rows.append(row)
    return ["job", *swept, *changed, *(m[0] for m in METRICS)], rows


def format_table(columns: list[str], rows: list[dict]) -> str:
    """Aligned text table: config keys as given, metrics rounded, '-' where a job has no value."""
    fmt = {name: f for name, _, f in METRICS}
    header = [next((h for n, h, _ in METRICS if n == c), c) for c in columns]
    cells = [[("-" if r[c] is None else fmt.get(c, "{}").format(r[c])) for c in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *cells)]
    numeric = {name for name, _, _ in METRICS if name != "status"}
    lines = []
    for line in [header, *cells]:
        lines.append("  ".join(x.rjust(w) if c in numeric else x.ljust(w) for x, w, c in zip(line, widths, columns)).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_csv(columns: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: ("" if r[c] is None else r[c]) for c in columns} for r in rows)
    return buf.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recon.summarize", description=__doc__.split("\n")[0])
    p.add_argument("multirun_dir", help="a sweep directory: multirun/<name>/<date> (hydra.sweep.dir)")
    p.add_argument("--csv", default=None, help="CSV output (default: MULTIRUN_DIR/summary.csv)")
    p.add_argument("--json", action="store_true", help="print {columns, rows} as JSON instead of the table")
    a = p.parse_args(argv)
    try:
        columns, rows = summarize(a.multirun_dir)
    except (NoJobsError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.csv) if a.csv else Path(a.multirun_dir) / "summary.csv"
    atomic_write_bytes(out, to_csv(columns, rows).encode())
    if a.json:
        finite = [{k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
        print(json.dumps({"columns": columns, "rows": finite, "csv": str(out)}, indent=2))  # inf as "inf", as metrics.json
        return 0
    print(format_table(columns, rows))
    print(f"\n{len(rows)} jobs; table written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
