"""Events from the ring buffer to every subscriber (trace streams, the quota enforcer): each subscriber has its
own bounded queue, and one that does not keep up loses its own events, counted in its `lost`, never anyone
else's. Publishing costs the event thread an append per subscriber: it never waits for one."""
from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable

from .model import Event

SUBSCRIBER_QUEUE = 65536  # events a subscriber may fall behind by before it loses its newest


class Subscription:
    """One subscriber's queue. `wants` (None: every event) filters on the event thread, so that events the
    subscriber would drop take no room; `lost` counts the events it wanted and lost because its queue was full."""

    def __init__(self, maxsize: int = SUBSCRIBER_QUEUE, wants: Callable[[Event], bool] | None = None) -> None:
        self.maxsize, self.wants = maxsize, wants
        self.lost = 0
        self._items: deque[Event] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._waiting = False

    def put(self, event: Event) -> None:
        """The event thread's side: never blocks."""
        if self.wants is not None and not self.wants(event):
            return
        if len(self._items) >= self.maxsize:
            self.lost += 1
            return
        self._items.append(event)
        if self._waiting:
            with self._ready:
                self._ready.notify()

    def get(self, timeout: float | None = None) -> Event:
        """The next event; queue.Empty after `timeout` seconds without one."""
        try:
            return self._items.popleft()
        except IndexError:
            pass
        with self._ready:
            self._waiting = True  # before looking again: a put after this notifies
            try:
                if not self._items:
                    self._ready.wait(timeout)
            finally:
                self._waiting = False
        try:
            return self._items.popleft()
        except IndexError:
            raise queue.Empty from None

    def qsize(self) -> int:
        return len(self._items)


class EventFanout:
    def __init__(self) -> None:
        self._subscribers: tuple[Subscription, ...] = ()
        self._lock = threading.Lock()

    def subscribe(self, maxsize: int = SUBSCRIBER_QUEUE, wants: Callable[[Event], bool] | None = None) -> Subscription:
        sub = Subscription(maxsize, wants)
        with self._lock:
            self._subscribers = (*self._subscribers, sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers = tuple(s for s in self._subscribers if s is not sub)

    @property
    def wanted(self) -> bool:
        return bool(self._subscribers)

    def publish(self, event: Event) -> None:
        for sub in self._subscribers:
            sub.put(event)
