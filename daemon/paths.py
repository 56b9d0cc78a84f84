"""The directories the daemon keeps its socket and its state file in: checked at start, before anything runs.

The state file (enforcer/ledger.py) says whom the daemon continues and which quotas it sets, and the socket's
directory is where it is replaced: a directory another user can write would let that user plant or swap them.
So such a directory is refused, in one line that names it and the fix."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from ..probes import PreflightError


class UnsafeDirectory(PreflightError):
    """A socket or state directory that others could write, in one line."""


def check_directory(directory: Path, what: str) -> None:
    """Creates `directory` (mode 0755) if it is missing; raises UnsafeDirectory unless it is a directory owned
    by root (or the daemon's user) that group and others cannot write."""
    if not directory.exists() and not directory.is_symlink():
        try:
            directory.mkdir(mode=0o755, parents=True)
            os.chmod(directory, 0o755)  # whatever the umask
        except FileExistsError:
            pass  # made meanwhile: checked below like any other
        except OSError as exc:
            raise UnsafeDirectory(f"cannot create the {what} directory {directory}: {exc.strerror}") from None
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise UnsafeDirectory(f"the {what} directory {directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"the {what} directory {directory} is not a directory")
    fix = "use a directory only root can write (the default is /run/gpuwatch)"
    if st.st_uid not in (0, os.geteuid()):
        raise UnsafeDirectory(f"the {what} directory {directory} is owned by uid {st.st_uid}, not root: another user "
                              f"could plant or replace the daemon's state there; {fix}, or chown root {directory}")
    if st.st_mode & 0o022:
        raise UnsafeDirectory(f"the {what} directory {directory} is writable by others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}): another user could plant or replace the daemon's "
                              f"state there; {fix}, or chmod go-w {directory}")


def check_state_directories(socket_path: str, state_file: Path | None) -> None:
    """The socket's directory and, where it is elsewhere, the state file's."""
    socket_dir = Path(socket_path).parent
    check_directory(socket_dir, "socket")
    if state_file is not None and state_file.parent != socket_dir:
        check_directory(state_file.parent, "state")
