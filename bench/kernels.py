"""Where a training step's GPU time goes, kernel by kernel: `python bench/kernels.py PRESET [--steps N] [--override K=V]`.

Builds the preset's config as `bench/run.py` does, runs warm-up steps of pass 1, then ``--steps`` steps under
``torch.profiler`` (CPU and CUDA activity), switches to pass 2 on a bake of the (briefly trained) pass-1 surface and
does the same. Prints, per pass, the wall time per step, the host (CPU) time per step, the GPU kernel time per step
and the kernels with the most GPU time, and writes the tables to ``--out`` as JSON. A step whose host time exceeds
its kernel time is bound by the host (Python and kernel launches), not by the GPU.

``--by-source`` also records Python stacks and sums the GPU time per function of recon's code that launched it (the
innermost function under ``recon/``, shown with the line it is defined on; backward kernels under the autograd node
that ran them, e.g. ``backward: MulBackward0``), which names the call behind a generic kernel such as
``vectorized_gather_kernel``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import run as bench  # noqa: E402 (bench/run.py, next to this file)


def _kernel_table(prof, steps: int, top: int) -> tuple[list[dict], float]:
    rows, total = [], 0.0
    for evt in prof.key_averages():
        gpu_us = getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0))
        if gpu_us <= 0 or evt.device_type != torch.autograd.DeviceType.CUDA or evt.key.startswith("stage:"):
            continue  # kernels and copies only (not StageScopes' ranges as the GPU's timeline records them)
        total += gpu_us
        rows.append({"name": evt.key[:90], "ms_per_step": gpu_us / 1e3 / steps, "calls_per_step": evt.count / steps})
    rows.sort(key=lambda r: -r["ms_per_step"])
    return rows[:top], total / 1e3 / steps


_FRAME = re.compile(r"(?:^|/)((?:recon|bench)/[^()]*\.py)\((\d+)\): (\S+)")


class StageScopes:
    """Stands in for `bench/run.py`'s StageTimer in a profiled step: each ``mark()`` ends the current stage's
    ``record_function`` range and opens the next one's (``stage:light``, ``stage:mesh``, ... in STAGES order), so
    that ops without a Python stack in the profile (torch 2.11 on CUDA records none) still show their stage."""

    def __init__(self):
        self._count = 0
        self._scope = None

    def mark(self) -> None:
        if self._scope is not None:
            self._scope.__exit__(None, None, None)
            self._scope = None
        k = self._count % (len(bench.STAGES) + 1)  # a step marks its start and the end of each stage
        if k < len(bench.STAGES):
            self._scope = torch.profiler.record_function(f"stage:{bench.STAGES[k]}")
            self._scope.__enter__()
        self._count += 1


def launch_site(evt) -> str:
    """Where a profiled op was called from: ``recon/path.py:LINE function`` for the innermost function of recon's code
    (or bench's) on its recorded stack or among its ancestors (LINE: the calling line on a recorded stack, the
    function's first line for a function event), ``backward: NODE`` for an op the autograd engine ran, ``stage: NAME``
    for one inside a `StageScopes` range with neither, else ``(elsewhere)``."""
    node = evt
    while node is not None:
        name = node.name
        # the op's recorded stack, innermost frame first (torch up to 2.12), or a Python function event (2.13 on)
        for frame in [*(getattr(node, "stack", None) or ()), name]:
            found = _FRAME.search(frame)
            if found:
                return f"{found.group(1)}:{found.group(2)} {found.group(3)}"
        if "Backward" in name and not name.startswith("autograd::"):
            return f"backward: {name}"
        if name.startswith("stage:"):  # no recon frame below the stage's range
            return f"stage: {name[6:]}"
        node = node.cpu_parent
    return "(elsewhere)"


def source_table(events, steps: int, top: int, time_us=None) -> list[dict]:
    """Time per launch site (`launch_site`) and op over the ops in ``events`` (``prof.events()`` of a profile taken
    with ``with_stack=True``), largest first; ``time_us(evt)`` is an op's own time, by default its own GPU time."""
    if time_us is None:
        def time_us(evt):
            return getattr(evt, "self_device_time_total", 0.0)
    sums: dict[tuple[str, str], list[float]] = {}
    for evt in events:
        if evt.device_type != torch.autograd.DeviceType.CPU or _FRAME.search(evt.name):
            continue
        t = time_us(evt)
        if t > 0:
            entry = sums.setdefault((launch_site(evt), evt.name[:60]), [0.0, 0])
            entry[0] += t
            entry[1] += 1
    rows = [{"site": site, "op": op, "ms_per_step": t / 1e3 / steps, "calls_per_step": n / steps}
            for (site, op), (t, n) in sums.items()]
    rows.sort(key=lambda r: -r["ms_per_step"])
    return rows[:top]


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def sync_table(events, steps: int) -> list[dict]:
    """Where the host waited for the GPU: each synchronizing runtime call (a blocking copy included) under the
    innermost op that made it and the `StageScopes` stage around it, with the host time spent waiting."""
    sums: dict[tuple[str, str], list[float]] = {}
    for evt in events:
        if evt.device_type != torch.autograd.DeviceType.CPU or evt.name not in SYNC_CALLS:
            continue
        op, stage, node = None, "(none)", evt.cpu_parent
        while node is not None:
            if node.name.startswith("stage:"):
                stage = node.name[6:]
                break
            if op is None and not node.name.startswith("cuda"):
                op = node.name[:60]
            node = node.cpu_parent
        entry = sums.setdefault((stage, f"{op or '(direct)'} -> {evt.name}"), [0.0, 0])
        entry[0] += evt.cpu_time_total
        entry[1] += 1
    rows = [{"stage": stage, "call": call, "wait_ms_per_step": t / 1e3 / steps, "calls_per_step": n / steps}
            for (stage, call), (t, n) in sums.items()]
    order = {name: i for i, name in enumerate(bench.STAGES)}
    rows.sort(key=lambda r: (order.get(r["stage"], len(order)), -r["wait_ms_per_step"]))
    return rows


def stage_table(averages, steps: int) -> list[dict]:
    """Per `StageScopes` range: its host time (inclusive: Python, dispatch, launches and any wait for the GPU), the
    GPU time of the kernels launched inside it from the main thread (the backward engine's own thread is not) and,
    where the profiler records the range on the GPU too, the GPU span from its first kernel's start to its last
    kernel's end (idle gaps included)."""
    rows: dict[str, dict] = {}
    for evt in averages:
        if not evt.key.startswith("stage:"):
            continue
        row = rows.setdefault(evt.key[6:], {"stage": evt.key[6:], "host_ms_per_step": 0.0, "gpu_ms_per_step": 0.0,
                                            "gpu_span_ms_per_step": None})
        if evt.device_type == torch.autograd.DeviceType.CPU:
            row["host_ms_per_step"] = evt.cpu_time_total / 1e3 / steps
            row["gpu_ms_per_step"] = getattr(evt, "device_time_total", getattr(evt, "cuda_time_total", 0.0)) / 1e3 / steps
        else:  # the range as recorded on the GPU's timeline
            row["gpu_span_ms_per_step"] = getattr(evt, "device_time_total", 0.0) / 1e3 / steps
    order = {name: i for i, name in enumerate(bench.STAGES)}
    return sorted(rows.values(), key=lambda r: order.get(r["stage"], len(order)))


def profile_pass(system, datamodule, opt, sched, device, steps: int, warmup: int, top: int,
                 by_source: bool = False) -> dict:
    from torch.profiler import ProfilerActivity, profile

    timer = StageScopes() if by_source else bench.StageTimer(device)
    batches = bench._batches(datamodule, device)
    for _ in range(warmup):
        bench.training_step_stages(system, next(batches), opt, sched, timer)
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=by_source) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            bench.training_step_stages(system, next(batches), opt, sched, timer)
        torch.cuda.synchronize(device)
        wall = (time.perf_counter() - t0) * 1e3 / steps
    kernels, gpu_ms = _kernel_table(prof, steps, top)
    host = sorted((e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU),
                  key=lambda e: -e.self_cpu_time_total)[:top]
    host_ops = [{"name": e.key[:90], "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                 "calls_per_step": e.count / steps} for e in host]
    launches = sum(e.count for e in prof.key_averages() if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    result = {"wall_ms_per_step": wall, "gpu_kernel_ms_per_step": gpu_ms, "launches_per_step": launches / steps,
              "kernels": kernels, "host_ops": host_ops}
    if by_source:
        result["sources"] = source_table(prof.events(), steps, top)
        result["stages"] = stage_table(prof.key_averages(), steps)
        result["syncs"] = sync_table(prof.events(), steps)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--by-source", action="store_true",
                    help="also sum the GPU time per line of recon's code that launched it (records Python stacks)")
    ap.add_argument("--out", type=Path, default=None, help="write the tables here as JSON")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("bench/kernels.py profiles CUDA kernels: run it on a machine with a GPU.")
    cfg = bench.compose_config(args.preset, args.override)
    device = torch.device("cuda")
    datamodule, system, opt, sched = bench.build_for_profile(cfg, device)
    system.train()
    result = {"preset": args.preset, "overrides": args.override, "device": torch.cuda.get_device_name(device)}
    result["pass1"] = profile_pass(system, datamodule, opt, sched, device, args.steps, args.warmup, args.top,
                                   args.by_source)
    if int(cfg.model.pass2_steps) > 0:
        system.begin_pass2()
        conf = system.configure_optimizers()
        result["pass2"] = profile_pass(system, datamodule, conf["optimizer"], conf["lr_scheduler"]["scheduler"], device,
                                       args.steps, args.warmup, args.top, args.by_source)
    for name in ("pass1", "pass2"):
        if name not in result:
            continue
        r = result[name]
        print(f"\n{args.preset} {name}: wall {r['wall_ms_per_step']:.1f} ms/step, GPU kernels "
              f"{r['gpu_kernel_ms_per_step']:.1f} ms/step, {r['launches_per_step']:.0f} launches/step")
        for k in r["kernels"]:
            print(f"  {k['ms_per_step']:7.2f} ms  {k['calls_per_step']:6.1f}x  {k['name']}")
        print("  host, self time:")
        for k in r["host_ops"][:12]:
            print(f"  {k['self_ms_per_step']:7.2f} ms  {k['calls_per_step']:6.1f}x  {k['name']}")
        if "stages" in r:
            print("  per stage: host ms (inclusive), GPU kernel ms launched from the main thread, GPU span ms")
            for k in r["stages"]:
                span = "-" if k["gpu_span_ms_per_step"] is None else f"{k['gpu_span_ms_per_step']:.2f}"
                print(f"  {k['host_ms_per_step']:7.2f} {k['gpu_ms_per_step']:7.2f} {span:>7}  {k['stage']}")
        if "syncs" in r:
            print("  host waits for the GPU: ms per step, calls per step, stage, op -> call")
            for k in r["syncs"]:
                print(f"  {k['wait_ms_per_step']:7.2f} ms  {k['calls_per_step']:6.1f}x  {k['stage']}  {k['call']}")
        if "sources" in r:
            print("  GPU time by launch site:")
            for k in r["sources"]:
                print(f"  {k['ms_per_step']:7.2f} ms  {k['calls_per_step']:6.1f}x  {k['site']}  [{k['op']}]")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
