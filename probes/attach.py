"""Attaching handlers to offsets in a library: uprobe_multi links where the kernel has them (6.6+), one
perf-event uprobe per function otherwise. Both vanish with their file descriptors, so a killed daemon
leaves nothing registered."""
from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from .symbols import COOKIE, DISPATCH, perf_wrapper

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)
SYS_BPF = 321  # x86-64
BPF_LINK_CREATE = 28
BPF_TRACE_UPROBE_MULTI = 48
BPF_F_UPROBE_MULTI_RETURN = 1
KPROBE_PROG = 2
ENOTSUPP = 524  # the kernel's own "not supported", which Python's errno module does not name
UNSUPPORTED = {errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP, errno.ENOSYS, errno.E2BIG}


@dataclass(frozen=True)
class Target:
    symbol: str
    offset: int      # file offset of the function in the library
    handler: str     # BPF handler name
    is_return: bool


class Attachment:
    """What attach() made; detach() undoes it."""

    def __init__(self, fds: list[int] | None = None, perf_events: list[bytes] | None = None) -> None:
        self.fds = fds or []
        self.perf_events = perf_events or []

    def __len__(self) -> int:
        return len(self.fds) + len(self.perf_events)


@functools.cache
def _attach_uprobe() -> Any:
    """libbcc's bpf_attach_uprobe with all seven of its arguments (prog fd, entry 0 / return 1, event name,
    binary, offset, pid, reference-counter offset): a function object of our own, bcc's is left as it is."""
    from bcc import libbcc
    fn = ctypes.CDLL(libbcc.lib._name, use_errno=True).bpf_attach_uprobe
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_int,
                   ctypes.c_uint32]
    fn.restype = ctypes.c_int
    return fn


def _close_all(fds: list[int]) -> None:
    """Each close waits for an RCU grace period; closes made at once share one."""
    threads = [threading.Thread(target=os.close, args=(fd,)) for fd in fds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class Attacher:
    def __init__(self, bpf: Any, multi: bool = True) -> None:
        self._bpf = bpf
        self._dispatch_fd: int | None = None
        self.multi = multi
        if not multi:
            return
        try:
            self._dispatch_fd = bpf.load_func(DISPATCH.encode(), KPROBE_PROG, attach_type=BPF_TRACE_UPROBE_MULTI).fd
        except Exception as exc:
            log.info("uprobe_multi programs not supported (%s): one perf event per probe", exc)
            self.multi = False

    def attach(self, path: str, targets: list[Target]) -> Attachment:
        if self.multi:
            try:
                return self._attach_multi(path, targets)
            except OSError as exc:
                if exc.errno not in UNSUPPORTED:
                    raise
                log.info("uprobe_multi links not supported (%s): one perf event per probe", exc)
                self.multi = False
        return self._attach_perf(path, targets)

    def detach(self, attachment: Attachment) -> None:
        _close_all(attachment.fds)
        attachment.fds = []
        for ev_name in attachment.perf_events:
            try:
                self._bpf.detach_uprobe_event(ev_name)
            except Exception as exc:
                log.debug("detach %s: %s", ev_name, exc)
        attachment.perf_events = []

    def _attach_multi(self, path: str, targets: list[Target]) -> Attachment:
        fds: list[int] = []
        try:
            for is_return in (False, True):
                group = [t for t in targets if t.is_return == is_return]
                if group:
                    fds.append(self._link(path, group, is_return))
        except BaseException:
            _close_all(fds)
            raise
        return Attachment(fds=fds)

    def _link(self, path: str, targets: list[Target], is_return: bool) -> int:
        n = len(targets)
        c_path = ctypes.create_string_buffer(path.encode())
        offsets = (ctypes.c_uint64 * n)(*(t.offset for t in targets))
        cookies = (ctypes.c_uint64 * n)(*(COOKIE[t.handler] for t in targets))
        attr = (ctypes.c_uint8 * 64)()
        assert self._dispatch_fd is not None  # loaded in __init__ where multi links are used
        ctypes.c_uint32.from_buffer(attr, 0).value = self._dispatch_fd
        ctypes.c_uint32.from_buffer(attr, 8).value = BPF_TRACE_UPROBE_MULTI
        ctypes.c_uint64.from_buffer(attr, 16).value = ctypes.addressof(c_path)
        ctypes.c_uint64.from_buffer(attr, 24).value = ctypes.addressof(offsets)
        ctypes.c_uint64.from_buffer(attr, 40).value = ctypes.addressof(cookies)
        ctypes.c_uint32.from_buffer(attr, 48).value = n
        ctypes.c_uint32.from_buffer(attr, 52).value = BPF_F_UPROBE_MULTI_RETURN if is_return else 0
        fd = _libc.syscall(SYS_BPF, BPF_LINK_CREATE, attr, ctypes.sizeof(attr))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"uprobe_multi link on {path}: {os.strerror(err)}")
        return fd

    def _attach_perf(self, path: str, targets: list[Target]) -> Attachment:
        """One perf-event uprobe per function, made as bcc's attach_uprobe makes them but through
        _attach_uprobe: bcc 0.26's Python declares bpf_attach_uprobe without its last argument, the uprobe's
        reference-counter offset, which then takes whatever the register holds (the kernel logged
        `ref_ctr_offset mismatch ... 0x6`): the kernel would increment a counter at that offset of the traced
        library in every process, and every uprobe_multi attach on that library fails afterwards."""
        done = Attachment()
        raw = path.encode()
        try:
            for t in targets:
                fn = self._bpf.load_func(perf_wrapper(t.handler).encode(), KPROBE_PROG)
                ev_name = self._bpf._get_uprobe_evname(b"r" if t.is_return else b"p", raw, t.offset, -1)
                fd = _attach_uprobe()(fn.fd, 1 if t.is_return else 0, ev_name, raw, t.offset, -1, 0)
                if fd < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"uprobe on {path}:{t.symbol}: {os.strerror(err)}")
                self._bpf._add_uprobe_fd(ev_name, fd)
                done.perf_events.append(ev_name)
        except BaseException:
            self.detach(done)
            raise
        return done
