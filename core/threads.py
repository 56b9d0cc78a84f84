"""The daemon's long-lived threads survive their own exceptions: supervised() runs a thread's loop, and when an
exception escapes it, logs it (with its traceback the first time, one line after that), waits a short backoff
that doubles while the loop keeps failing (1 s up to 30 s), and runs the loop again. Restarts are counted per
thread name for `gpuwatch status` (thread_restarts) and the metrics (gpuwatch_thread_restarts_total)."""
from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
HEALTHY_S = 60.0  # a loop that ran this long before failing starts again from the shortest backoff

_restarts: dict[str, int] = {}
_lock = threading.Lock()


def restarts() -> dict[str, int]:
    """Thread name -> times its loop failed and was started again, over the process's life."""
    with _lock:
        return dict(_restarts)


def supervised(name: str, loop: Callable[[], None], stop: threading.Event,
               backoff: float = BACKOFF_S) -> Callable[[], None]:
    """A thread target that runs `loop` until it returns or `stop` is set, restarting it after an exception."""

    def run() -> None:
        delay = backoff
        while not stop.is_set():
            started = time.monotonic()
            try:
                loop()
                return
            except Exception as exc:
                if stop.is_set():
                    return
                if time.monotonic() - started >= HEALTHY_S:
                    delay = backoff
                with _lock:
                    count = _restarts[name] = _restarts.get(name, 0) + 1
                if count == 1:
                    log.exception("thread %s failed: restarting it in %g s", name, delay)
                else:
                    log.error("thread %s failed again (restart %d): %s: %s; restarting it in %g s", name, count,
                              type(exc).__name__, exc, delay)
            if stop.wait(delay):
                return
            delay = min(delay * 2, MAX_BACKOFF_S)

    return run


def start(name: str, loop: Callable[[], None], stop: threading.Event, backoff: float = BACKOFF_S) -> threading.Thread:
    """A daemon thread named `name` running `loop` supervised, started."""
    thread = threading.Thread(target=supervised(name, loop, stop, backoff), name=name, daemon=True)
    thread.start()
    return thread


OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_BACKOFF_S = 0.1  # out of file descriptors: a server's accept waits this long instead of spinning


def accept_or_wait(accept: Callable[[], T], report: Callable[[OSError], None]) -> T:
    """A server thread's accept: when the process is out of file descriptors, `report` it and wait a little
    before the error goes up (the server loop tries again), so a flood cannot spin the thread."""
    try:
        return accept()
    except OSError as exc:
        if exc.errno in OUT_OF_DESCRIPTORS:
            report(exc)
            time.sleep(ACCEPT_BACKOFF_S)
        raise
