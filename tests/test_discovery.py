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


def test_what_is_watched_is_answered_while_an_attach_waits_for_the_kernel() -> None:
    """An attach waits for the memory map lock of every process that maps the library (seconds beside a
    process pinning GiB): paths() and probes(), which the tracer's health and every view read, do not wait."""
    entered, release = threading.Event(), threading.Event()

    class Slow(Attacher):
        def attach(self, path: str, targets: list[Target]) -> Attachment:
            entered.set()
            release.wait(30)
            return super().attach(path, targets)
    w = watch(Slow(missing=set()), HOST)
    attaching = threading.Thread(target=w.set_work_probes, args=(True,))
    attaching.start()
    try:
        assert entered.wait(5)
        answers: list[Any] = []
        reader = threading.Thread(target=lambda: answers.extend([w.paths(), w.probes()]))
        reader.start()
        reader.join(5)
        assert answers == [[HOST.path], 0], "paths() and probes() waited for the attach"
    finally:
        release.set()
        attaching.join(5)
    assert w.probes() == 1 and Group.WORK in w.libs[HOST.key].attached


def test_the_tracers_health_is_answered_while_an_attach_waits_for_the_kernel() -> None:
    from gpuwatch.probes.tracer import Tracer
    t = Tracer(use_nvml=False)  # not started: no program loaded, health() still reads the watch
    release = threading.Event()
    holder = threading.Thread(target=lambda: t.libraries._lock.acquire() and release.wait(30)
                              and t.libraries._lock.release())
    holder.start()
    try:
        answers: list[Any] = []
        reader = threading.Thread(target=lambda: answers.append(t.health().libraries))
        reader.start()
        reader.join(5)
        assert answers == [[]], "the tracer's health waited for the library watch's lock"
    finally:
        release.set()
        holder.join(5)
