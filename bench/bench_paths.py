"""Where the benchmark and validation scripts put a daemon's socket: a directory of its own under /tmp, mode
0755, since the daemon refuses a socket directory that other users can write (as /tmp itself)."""
from __future__ import annotations

from pathlib import Path


def private_socket(name: str) -> str:
    directory = Path("/tmp") / name
    directory.mkdir(mode=0o755, exist_ok=True)
    directory.chmod(0o755)
    return str(directory / "gw.sock")
