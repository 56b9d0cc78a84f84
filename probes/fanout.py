"""Events from the ring buffer to every subscriber (trace streams, the quota enforcer): a full subscriber
loses its own events, never anyone else's."""
from __future__ import annotations

import queue
import threading

from .model import Event


class EventFanout:
    def __init__(self) -> None:
        self._subscribers: list[queue.Queue[Event]] = []
        self._lock = threading.Lock()

    def subscribe(self, maxsize: int = 65536) -> queue.Queue[Event]:
        q: queue.Queue[Event] = queue.Queue(maxsize=maxsize)
        with self._lock:
            self._subscribers = [*self._subscribers, q]
        return q

    def unsubscribe(self, q: queue.Queue[Event]) -> None:
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s is not q]

    @property
    def wanted(self) -> bool:
        return bool(self._subscribers)

    def publish(self, event: Event) -> None:
        for sub in self._subscribers:
            try:
                sub.put_nowait(event)
            except queue.Full:
                pass
