"""Row gathers as a training step makes them, by method: `python bench/gather.py [--rows N] [--select M]`.

A step gathers the covered pixels' rows out of full-image G-buffers ([B*H*W, C] -> [M, C], M about a third) and the
surface's rows out of the tet grid. Times forward and backward (scatter-add of the gradient) of each method for row
widths of 4 to 32 bytes, float32 and int64, and prints milliseconds per call (``--out``: also as JSON). CUDA only.
Result on an H200 with torch 2.11: `results/gather-cuda-nvidia-h200.json`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _time(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def methods() -> dict:
    from recon.gather import take_rows

    return {
        "index_select": lambda x, i: x.index_select(0, i),
        "advanced index": lambda x, i: x[i],
        "gather, full index": lambda x, i: torch.gather(x, 0, i[:, None].expand(-1, x.shape[1]).contiguous()),
        "take_rows": take_rows,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8 * 800 * 800)
    ap.add_argument("--select", type=int, default=1_800_000)
    ap.add_argument("--out", type=Path, default=None, help="also write the rows here as JSON")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("bench/gather.py times CUDA kernels: run it on a machine with a GPU.")
    g = torch.Generator(device="cuda").manual_seed(0)
    index = torch.randperm(args.rows, device="cuda", generator=g)[: args.select].sort().values
    rows = []
    for dtype, widths in ((torch.float32, (1, 2, 3, 4, 8)), (torch.int64, (2, 4))):
        for c in widths:
            x = torch.randn(args.rows, c, device="cuda", generator=g)
            x = x.to(dtype) if dtype != torch.float32 else x.requires_grad_(True)
            for name, fn in methods().items():
                fwd = _time(lambda: fn(x, index))
                bwd = None
                if x.requires_grad:
                    out = fn(x, index)
                    grad = torch.ones_like(out)
                    bwd = _time(lambda: torch.autograd.grad(out, x, grad, retain_graph=True))
                rows.append({"dtype": str(dtype).split(".")[-1], "channels": c, "bytes": c * x.element_size(),
                             "method": name, "forward_ms": fwd, "backward_ms": bwd})
                print(f"{rows[-1]['dtype']:8} {c:2} ch {rows[-1]['bytes']:3} B  {name:20} fwd {fwd:7.3f} ms"
                      + ("" if bwd is None else f"  bwd {bwd:7.3f} ms"))
    if args.out is not None:
        args.out.write_text(json.dumps({"rows_in": args.rows, "rows_selected": args.select, "torch": torch.__version__,
                                        "device": torch.cuda.get_device_name(), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
