"""Optional accelerated modules (Triton kernels): imported on first use, None where they cannot load."""
from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def optional_module(name: str) -> ModuleType | None:
    """``importlib.import_module(name)``, or None when it fails (triton not installed, or a build that fails to
    load); tried once per process."""
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def triton_importable() -> bool:
    """Whether ``triton`` imports in this process (its kernels, recon's and Inductor's, can run on CUDA)."""
    return optional_module("triton") is not None
