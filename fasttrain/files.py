"""Files written atomically: to a temporary file beside the target, then renamed over it.

An interrupted run (a crash, a kill, a full disk) therefore leaves the old file or the new one,
never half of one. Used for data caches, training checkpoints, results records and notebooks.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch


def atomic_write(path: Path | str, write: Callable[[str], None], mode: int | None = None) -> None:
    """Call `write(temporary_path)`, then rename the temporary file to `path` (removed if `write` fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if mode is not None:
            os.chmod(tmp, mode)  # mkstemp makes the file private
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomically(obj, path: Path | str, mode: int | None = None) -> None:
    """torch.save `obj` to `path` atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), mode)


def write_json_atomically(path: Path | str, data) -> None:
    """Write `data` as indented JSON to `path` atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    atomic_write(path, write)
