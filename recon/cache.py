"""recon's on-disk cache: ``$RECON_CACHE`` (default ``~/.cache/recon``).

It holds what is expensive to make and the same on every run: the built-in scene (`recon.data.synthetic_scene`),
structure-from-motion results (`recon.data.sfm`) and constant tables (`cached_tensor`, e.g. the split-sum BRDF
table, seconds of CPU time per process otherwise). Deleting it only costs the time to rebuild.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$RECON_CACHE``, or ``~/.cache/recon``."""
    return Path(os.environ.get("RECON_CACHE", Path.home() / ".cache" / "recon"))


def cached_tensor(name: str, build: Callable[[], Tensor]) -> Tensor:
    """A constant CPU tensor made once per cache: read from ``<cache>/tensors/<name>.pt``, else ``build()`` and
    written there atomically (a temporary file renamed into place, so a concurrent reader never sees half a file).

    ``name`` must identify everything the value depends on (its parameters and a version). A file that cannot be
    read is built again and replaced; a cache that cannot be written is skipped with a warning.
    """
    path = cache_dir() / "tensors" / f"{name}.pt"
    if path.is_file():
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(value, Tensor):
                return value
        except Exception as err:  # noqa: BLE001 (truncated, corrupt or foreign: rebuild it)
            log.warning("%s could not be read (%s); building it again.", path, err)
    value = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(value, f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:
        log.warning("could not write %s (%s): it will be built again next time.", path, err)
    return value
