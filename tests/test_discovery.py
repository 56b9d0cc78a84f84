"""Which path a watched library is reached by when its launch probes come and go (sample mode): a copy found
under a process's root is gone with that process."""
from __future__ import annotations

import errno
import threading
from typing import Any

import pytest

from gpuwatch.probes import libraries
from gpuwatch.probes.attach import Attachment, Target
from gpuwatch.probes.discovery import AttachedLibrary, LibraryWatch
from gpuwatch.probes.libraries import Library
from gpuwatch.probes.symbols import Group

GONE = Library("/proc/4242/root/opt/cuda/libcuda.so.1", dev=7, ino=99)
OTHER = Library("/proc/4343/root/opt/cuda/libcuda.so.1", dev=7, ino=99)
HOST = Library("/usr/lib/x86_64-linux-gnu/libcuda.so.1", dev=7, ino=11)


class Attacher:
    """Attaches wherever the path is not `missing`; records what it attached."""

    def __init__(self, missing: set[str]) -> None:
        self.missing, self.attached, self.detached = missing, [], 0

    def attach(self, path: str, targets: list[Target]) -> Attachment:
        if path in self.missing:
            raise OSError(errno.ENOENT, "No such file or directory", path)
        self.attached.append(path)
        return Attachment(fds=[len(self.attached)])

    def detach(self, attachment: Attachment) -> None:
        self.detached += 1


def watch(attacher: Attacher, *libs: Library) -> LibraryWatch:
    w = LibraryWatch(threading.RLock(), work_always=False)
    w.load(object(), attacher)  # type: ignore[arg-type]
    target = Target("cuLaunchKernel", 0, "launch", False)
    for lib in libs:
        entry = AttachedLibrary(lib, {Group.WORK: [target], Group.MEMORY: [], Group.CONTEXT: []})
        entry.attached[Group.MEMORY] = Attachment()
        w.libs[lib.key] = entry
    return w


@pytest.mark.parametrize("elsewhere", [[OTHER], []])
def test_work_probes_reach_a_copy_through_another_process_or_drop_it(monkeypatch: Any, elsewhere: list) -> None:
    monkeypatch.setattr(libraries, "all_process_libraries", lambda: elsewhere)
    attacher = Attacher(missing={GONE.path})
    w = watch(attacher, GONE, HOST)
    w.set_work_probes(True)
    assert HOST.path in attacher.attached  # the other library is not left without its launch probes
    if elsewhere:
        assert attacher.attached == [OTHER.path, HOST.path] and w.libs[GONE.key].library == OTHER
        assert Group.WORK in w.libs[GONE.key].attached
    else:
        assert GONE.key not in w.libs and attacher.detached == 1  # until a process loads it again
    assert w.work_attached


def test_another_failure_is_logged_and_the_rest_still_attach(monkeypatch: Any, caplog: Any) -> None:
    class Refusing(Attacher):
        def attach(self, path: str, targets: list[Target]) -> Attachment:
            if path == GONE.path:
                raise OSError(errno.EPERM, "Operation not permitted", path)
            return super().attach(path, targets)
    attacher = Refusing(missing=set())
    w = watch(attacher, GONE, HOST)
    w.set_work_probes(True)
    assert attacher.attached == [HOST.path] and GONE.key in w.libs
    assert "cannot attach the launch probes" in caplog.text
