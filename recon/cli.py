"""The ``recon`` command: ``recon fit SOURCE OUT_DIR [key=value ...] [--json]``, ``recon eval RUN_DIR ...``,
``recon summarize MULTIRUN_DIR ...`` and ``recon estimate [key=value ...]``.

``fit`` runs ``recon.reconstruct`` (progress lines on stderr; with ``--json`` the result on stdout) and exits 0, 1
or 2 for succeeded, failed or cancelled; Ctrl-C or SIGTERM cancels it after the current step, with a checkpoint.
``eval``, ``summarize`` and ``estimate`` are ``python -m recon.eval``, ``python -m recon.summarize`` and
``python -m recon.resources`` (``recon eval --help``, ...).
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

PASS_THROUGH = {  # subcommand -> (module with main(argv), what it does)
    "eval": ("recon.eval.__main__", "metrics of an exported run (python -m recon.eval)"),
    "summarize": ("recon.summarize", "one table of a Hydra sweep (python -m recon.summarize)"),
    "estimate": ("recon.resources", "estimated peak memory of a config (python -m recon.resources)"),
}


def _print_progress(fraction: float, stage: str, message: str) -> None:
    print(f"[{fraction:4.0%}] {stage}: {message}", file=sys.stderr, flush=True)


def _cancel_on_signals(event: threading.Event) -> dict:
    """Ctrl-C and SIGTERM set ``event`` (the fit stops after the current step with a checkpoint); a second Ctrl-C
    interrupts at once. Returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        print(f"\n{signal.Signals(signum).name}: cancelling after the current step ...", file=sys.stderr, flush=True)
        event.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def fit(args: argparse.Namespace) -> int:
    """``recon fit``: reconstruct, report, exit status by the result."""
    from recon.api import EXIT_STATUS, reconstruct

    overrides = list(args.overrides)
    if not any(o.lstrip("+~").startswith("callbacks.progress") for o in overrides):
        overrides.insert(0, "callbacks.progress.refresh_rate=0")  # progress lines instead of a progress bar
    cancel = threading.Event()
    previous = _cancel_on_signals(cancel)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the result only
            result = reconstruct(None if args.source == "builtin" else args.source, args.out_dir, overrides,
                                 on_progress=_print_progress, cancel=cancel)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.json:
        print(result.to_json())
    elif result.succeeded:
        metrics = result.metrics
        quality = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("psnr", "ssim", "iou") if isinstance(metrics.get(k), float))
        print(f"{result.paths.get('mesh.obj', result.out_dir)}{f' ({quality})' if quality else ''}")
    if not result.succeeded:
        print(f"error ({result.error_kind}): {result.message}", file=sys.stderr)
    return EXIT_STATUS[result.status]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="recon", description="Multi-view images to a textured, relightable mesh: fit, "
                                "evaluate, summarize sweeps, estimate memory. `recon COMMAND --help` for each.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{fit,eval,summarize,estimate}")
    f = sub.add_parser("fit", help="fit a textured mesh to SOURCE into OUT_DIR",
                       description="Fit a textured mesh (what train.py does); exit status 0 / 1 / 2: succeeded / "
                                   "failed / cancelled.")
    f.add_argument("source", help="a scene directory (any layout recon reads), or 'builtin' for the built-in scene")
    f.add_argument("out_dir", help="the run directory (exports, metrics.json, result.json)")
    f.add_argument("overrides", nargs="*", help="key=value config overrides, as for train.py (experiment=cpu ...)")
    f.add_argument("--json", action="store_true", help="print result.json's content on stdout")
    for name, (_, summary) in PASS_THROUGH.items():
        sub.add_parser(name, help=summary, add_help=False)  # its own parser reads the rest (and --help)
    if argv and argv[0] in PASS_THROUGH:
        import importlib

        return importlib.import_module(PASS_THROUGH[argv[0]][0]).main(argv[1:])
    return fit(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
