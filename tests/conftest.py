"""Shared test setup: the `gpu` marker skips without CUDA; `in_triton_interpreter` runs code under Triton's
interpreter in a child process; `graphs_on` turns recon's CUDA graphs on for a test and on again after it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import recon


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def graphs_on():
    """recon.cuda_graphs on during the test (a test may switch them off) and on again after it."""
    from recon import cuda_graphs

    cuda_graphs.set_enabled(True)
    yield
    cuda_graphs.set_enabled(True)


@pytest.fixture
def in_triton_interpreter():
    """``run(code)`` or ``run(args=[...])``: Python in a child process whose Triton interprets the kernels on the
    CPU (TRITON_INTERPRET=1; Triton picks interpreter or compiler when first imported, so not in this process), from
    the repository root. Returns its stdout; fails the test with its output when it exits non-zero."""
    def run(code: str | None = None, args: list[str] | None = None, timeout: int = 600) -> str:
        root = Path(recon.__file__).resolve().parents[1]
        env = {**os.environ, "TRITON_INTERPRET": "1",
               "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-W", "ignore", "-c", code] if code is not None else [sys.executable, *args]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
        return proc.stdout

    return run
