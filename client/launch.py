"""`gpuwatch exec`: run a command with the interposer preloaded and its settings in the environment."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..core.vocabulary import PRIORITY_NAMES as PRIORITIES
from ..interposer import library_path

class LaunchError(Exception):
    """Nothing was started; `exit_code` says why (2: bad input, 127: no such command, 126: not runnable)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def interposer_library() -> Path:
    library = library_path()
    if not library.is_file():
        raise LaunchError(f"the interposer library {library} is not built: run ./install.sh in the gpuwatch checkout")
    if any(c in str(library) for c in " :\t\n"):
        raise LaunchError(f"the interposer library path {str(library)!r} cannot go in LD_PRELOAD (space or colon)")
    return library


def child_environment(environ: Mapping[str, str], library: Path, socket: str, mem_limit: int | None = None,
                      priority: str = "normal", swap: bool = True) -> dict[str, str]:
    """`environ` with the library first in LD_PRELOAD and exactly these GPUWATCH_* settings."""
    if priority not in PRIORITIES:
        raise LaunchError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}", 2)
    env = dict(environ)
    others = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p != str(library)]
    env["LD_PRELOAD"] = " ".join([str(library), *others])
    env.pop("GPUWATCH_MEM_LIMIT", None)  # an outer `gpuwatch exec` does not set this one's quota
    if mem_limit is not None:
        env["GPUWATCH_MEM_LIMIT"] = str(mem_limit)
    env["GPUWATCH_PRIORITY"] = priority
    env["GPUWATCH_SWAP"] = "1" if swap else "0"
    env["GPUWATCH_SOCKET"] = socket
    return env


def exec_command(command: list[str], env: dict[str, str]) -> None:
    """Replaces this process; returns only by raising LaunchError."""
    if not command:
        raise LaunchError("exec: no command given (gpuwatch exec [OPTIONS] -- COMMAND [ARGS...])", 2)
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        raise LaunchError(f"exec: {command[0]}: command not found", 127) from None
    except PermissionError:
        raise LaunchError(f"exec: {command[0]}: permission denied", 126) from None
    except OSError as exc:
        raise LaunchError(f"exec: {command[0]}: {exc.strerror}", 126) from None
