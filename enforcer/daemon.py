"""`gpuwatch run`: hosts the tracer and answers local queries until SIGTERM or SIGINT."""
from __future__ import annotations

import logging
import queue
import signal
import threading
from collections.abc import Iterator
from typing import Any

from ..exporters.metrics import MetricsServer
from ..probes import Tracer
from ..probes.model import Enforcement
from .config import InterposerSection
from .control import Command, ControlError, ControlServer, Peer
from .interposed import InterposedRegistry
from .pause import Pauser, pid_argument

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, tracer: Tracer, socket_path: str, metrics_listen: tuple[str, int] | None = None,
                 interposer: InterposerSection = InterposerSection()) -> None:
        self.tracer = tracer
        self.socket_path = socket_path
        self.metrics_listen = metrics_listen
        self._stopping = threading.Event()
        self.interposed = InterposedRegistry(interposer.lease_ms, interposer.request_timeout_ms / 1000)
        self.pauser = Pauser(self.interposed)
        tracer.set_enforcement(self.enforcement)
        self.commands = {
            "ps": Command(self._ps),
            "status": Command(self._status),
            "trace": Command(self._trace, stream=True),
            "interposer_attach": Command(self.interposed.attach, takeover=True),
            "pause": Command(self._pause, root_only=True),
            "resume": Command(self._resume, root_only=True),
        }

    def request_stop(self, *_: Any) -> None:
        self._stopping.set()

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        server = ControlServer(self.socket_path, self.commands)
        metrics: MetricsServer | None = None
        try:
            self.tracer.start()
            self.interposed.start()
            server.start()
            if self.metrics_listen:
                host, port = self.metrics_listen
                metrics = MetricsServer(host, port, self.tracer.snapshot)
            health = self.tracer.health()
            log.info("running: %d libraries, %d probes, launches=%s, socket %s, metrics %s", len(health.libraries),
                     health.probes_attached, health.launch_mode, self.socket_path,
                     f"on {self.metrics_listen[0]}:{metrics.port}" if metrics else "off")
            while not self._stopping.wait(0.2):
                pass
        finally:
            server.close()
            self.interposed.close()
            self.pauser.continue_all()
            if metrics:
                metrics.close()
            self.tracer.stop()
            log.info("stopped: probes detached")

    def enforcement(self) -> dict[int, Enforcement]:
        """What the enforcer adds to the snapshot: interposed processes, and those it stopped."""
        return {**self.pauser.enforcement(), **self.interposed.enforcement()}

    def _pause(self, _peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
        pid, swap, nbytes = pid_argument(request), request.get("swap", False), request.get("bytes", 0)
        if type(swap) is not bool:
            raise ControlError("pause: swap must be true or false")
        if type(nbytes) is not int or nbytes < 0:
            raise ControlError("pause: bytes must be a number of bytes (0: all)")
        return self.pauser.pause(pid, swap, nbytes)

    def _resume(self, _peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
        return self.pauser.resume(pid_argument(request))

    def _ps(self, _peer: Peer, _request: dict[str, Any]) -> list[dict[str, Any]]:
        return [p.to_json() for p in self.tracer.snapshot().processes]

    def _status(self, _peer: Peer, _request: dict[str, Any]) -> dict[str, Any]:
        snap = self.tracer.snapshot()
        return {"health": snap.to_json()["health"], "gpus": snap.to_json()["gpus"], "processes": len(snap.processes),
                "interposed": len(self.interposed.pids())}

    def _trace(self, _peer: Peer, request: dict[str, Any], closing: threading.Event) -> Iterator[dict[str, Any]]:
        pid, comm = request.get("pid"), request.get("comm")
        if pid is not None and not isinstance(pid, int):
            raise ControlError("trace: pid must be an integer")
        if comm is not None and not isinstance(comm, str):
            raise ControlError("trace: comm must be a string")
        events = self.tracer.subscribe()
        try:
            while not closing.is_set() and not self._stopping.is_set():
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if (pid is None or event.pid == pid) and (comm is None or event.comm == comm):
                    yield event.to_json()
        finally:
            self.tracer.unsubscribe(events)
