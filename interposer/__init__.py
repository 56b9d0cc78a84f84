"""gpuwatch.interposer: the preload library that enforces quotas and swaps memory (C, built by install.sh),
and the Python side of its contract (docs/interposer.md)."""
from __future__ import annotations

import os
from pathlib import Path

LIBRARY_NAME = "libgpuwatch.so"
INSTALLED_LIBRARY = Path("/opt/gpuwatch/lib") / LIBRARY_NAME


def library_path() -> Path:
    """$GPUWATCH_INTERPOSER, else the library beside this package (a built checkout), else the installed one.
    The path may not exist: callers check."""
    if override := os.environ.get("GPUWATCH_INTERPOSER"):
        return Path(override)
    beside = Path(__file__).resolve().with_name(LIBRARY_NAME)
    return beside if beside.exists() else INSTALLED_LIBRARY
