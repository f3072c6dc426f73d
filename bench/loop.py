"""Per-step wall time of the real training loop (Lightning, callbacks, logging and all), and its host syncs:
`python bench/loop.py PRESET [--pass1-steps N] [--pass2-steps M] [--sync-trace] [--override K=V ...]
[--compare K=V ... --rounds R]`.

`bench/run.py`'s per-stage profile times hand-driven steps; this runs `recon.fit.run_fit` itself (no validation, no
export) with a callback that timestamps every step and reports the median, mean and 90th percentile of the step
time per pass, the first ``--skip`` steps of each pass left out (compilation, the bake). Steps are not synchronised:
the wall time between consecutive step starts is what a fit spends per step in steady state.

``--compare KEY=VALUE`` (repeatable) measures a second variant, the same run with those overrides added, in
``--rounds`` interleaved rounds (A, B, A, B, ...): the two runs of a round share the machine's state, so the
per-round differences of the medians show whether a change of a millisecond or two is real (two runs of the same
code differ by 1-3 ms); the result gives each variant's medians per round and the differences' mean, min and max.

``--sync-trace`` runs one step of each pass under ``torch.cuda.set_sync_debug_mode("warn")`` and lists every
operation that made the host wait for the GPU, with the recon source line that called it (CUDA only). A step
whose host time exceeds its kernel time gains from each sync removed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import lightning as L  # noqa: E402
import run as bench  # noqa: E402 (bench/run.py, next to this file)


def step_statistics(times: dict[int, float], first: int, last: int, skip: int) -> dict | None:
    """Median / mean / p90 of the per-step wall times (ms) of steps ``first + skip`` .. ``last - 1``; ``times`` maps a
    step to the time it started (the step after ``last - 1`` must be there). None when no step qualifies."""
    ms = [(times[s + 1] - times[s]) * 1e3 for s in range(first + skip, last) if s in times and s + 1 in times]
    if not ms:
        return None
    return {"median_ms": float(np.median(ms)), "mean_ms": float(np.mean(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "steps": len(ms)}


def recon_frame(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame of recon's own code in a stack (where a sync was called from), as ``path:line code``."""
    package = ROOT / "recon"
    for frame in reversed(stack):
        path = Path(frame.filename).resolve()
        if package in path.parents:
            return f"{path.relative_to(ROOT)}:{frame.lineno} {frame.line}"
    return "(outside recon)"


class LoopTimer(L.Callback):
    """Timestamps every training step; with ``trace_steps`` traces the host syncs of those steps (CUDA)."""

    def __init__(self, trace_steps: tuple[int, ...] = ()):
        self.times: dict[int, float] = {}
        self.trace_steps = set(trace_steps)
        self.syncs: dict[int, list[str]] = {}
        self._tracing = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        self.times[step] = time.perf_counter()
        self._stop_trace()
        if step in self.trace_steps and torch.cuda.is_available():
            found = self.syncs.setdefault(step, [])

            def show(message, category, filename, lineno, file=None, line=None):
                if "synchronizing" in str(message):
                    found.append(recon_frame(traceback.extract_stack()))

            self._tracing = (warnings.showwarning, warnings.catch_warnings())
            self._tracing[1].__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")

    def _stop_trace(self) -> None:
        if self._tracing is not None:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._tracing[0]
            self._tracing[1].__exit__(None, None, None)
            self._tracing = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop_trace()
        self.times[trainer.global_step] = time.perf_counter()


def measure(preset: str, pass1_steps: int, pass2_steps: int, skip: int, overrides: list[str],
            sync_trace: bool = False) -> dict:
    """Run the preset for ``pass1_steps + pass2_steps`` steps and return the per-pass step statistics (and syncs)."""
    trace = (pass1_steps - 2, pass1_steps + min(skip, max(pass2_steps - 2, 0))) if sync_trace else ()
    timer = LoopTimer(trace_steps=tuple(s for s in trace if s >= 0))
    with tempfile.TemporaryDirectory(prefix="recon-loop-") as out:
        from recon.fit import compose_config, run_fit

        cfg = compose_config([f"experiment={bench.experiment_name(preset)}",
                              f"model.pass1_steps={pass1_steps}", f"model.pass2_steps={pass2_steps}",
                              "trainer.val_check_interval=1000000", "~callbacks.mesh_export", "check_resources=false",
                              *overrides], out_dir=out)
        run_fit(cfg, out, [timer])
    on_gpu = torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
    result = {"preset": preset, "overrides": overrides, "device": bench.device_label(torch.device("cuda" if on_gpu else "cpu")),
              "pass1_steps": pass1_steps, "pass2_steps": pass2_steps, "skip": skip,
              "pass1": step_statistics(timer.times, 0, pass1_steps, skip),
              "pass2": step_statistics(timer.times, pass1_steps, pass1_steps + pass2_steps, skip)}
    if sync_trace:
        result["syncs"] = {f"step {s} (pass {1 if s < pass1_steps else 2})": v for s, v in sorted(timer.syncs.items())}
    return result


def compare(measure_run, rounds: int) -> dict:
    """Interleave ``rounds`` runs of variants A and B (``measure_run("A")`` / ``("B")`` return `measure` results):
    per-round medians of each pass and the differences B - A (mean, min, max) in ms."""
    runs = [{name: measure_run(name) for name in ("A", "B")} for _ in range(rounds)]
    out = {"rounds": runs, "difference_ms": {}}
    for p in ("pass1", "pass2"):
        diffs = [r["B"][p]["median_ms"] - r["A"][p]["median_ms"] for r in runs if r["A"][p] and r["B"][p]]
        if diffs:
            out["difference_ms"][p] = {"mean": float(np.mean(diffs)), "min": float(min(diffs)), "max": float(max(diffs))}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset")
    ap.add_argument("--pass1-steps", type=int, default=200)
    ap.add_argument("--pass2-steps", type=int, default=300)
    ap.add_argument("--skip", type=int, default=30, help="steps left out at the start of each pass")
    ap.add_argument("--sync-trace", action="store_true", help="list the host syncs of one step of each pass (CUDA)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                    help="overrides of a second variant, measured in interleaved rounds against the first")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of --compare (each runs both variants)")
    ap.add_argument("--out", type=Path, default=None, help="also write the result here as JSON")
    args = ap.parse_args(argv)
    if args.pass1_steps <= args.skip or args.pass2_steps < 0:
        ap.error(f"--pass1-steps ({args.pass1_steps}) must exceed --skip ({args.skip}); --pass2-steps must be >= 0.")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}.")
    if args.compare:
        variants = {"A": args.override, "B": [*args.override, *args.compare]}
        r = compare(lambda v: measure(args.preset, args.pass1_steps, args.pass2_steps, args.skip, variants[v]),
                    args.rounds)
        r = {"preset": args.preset, "variants": variants, **r}
        for i, rnd in enumerate(r["rounds"]):
            for v in ("A", "B"):
                med = [f"{rnd[v][p]['median_ms']:.2f}" if rnd[v][p] else "-" for p in ("pass1", "pass2")]
                print(f"round {i + 1} {v}: pass1 {med[0]} ms, pass2 {med[1]} ms (median per step)")
        for p, d in r["difference_ms"].items():
            print(f"{args.preset} {p}: B - A = {d['mean']:+.2f} ms per step (rounds from {d['min']:+.2f} to {d['max']:+.2f}); "
                  f"B adds {' '.join(args.compare)}")
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(r, indent=2))
        return r
    r = measure(args.preset, args.pass1_steps, args.pass2_steps, args.skip, args.override, args.sync_trace)
    for name in ("pass1", "pass2"):
        s = r[name]
        if s is not None:
            print(f"{args.preset} {name}: median {s['median_ms']:.2f} ms, mean {s['mean_ms']:.2f} ms, "
                  f"p90 {s['p90_ms']:.2f} ms per step over {s['steps']} steps")
    for step, found in r.get("syncs", {}).items():
        print(f"host syncs in {step}: {len(found)}")
        for where in found:
            print(f"  {where}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
