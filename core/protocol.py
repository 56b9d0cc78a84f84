"""The control protocol between the daemon and its clients: JSON lines over a Unix socket.

A request is one JSON object with a string "cmd" and its arguments; the answer is {"ok": true, "result": ...}
or {"ok": false, "error": "..."}; a stream answers {"ok": true, "event": ...} until it ends. The server side
is gpuwatch.daemon.server; this module is all a client needs."""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from .vocabulary import socket_path

MAX_REQUEST = 64 * 1024


class ControlError(Exception):
    """A request the daemon refuses, with the reason sent back to the client."""


class DaemonUnavailable(Exception):
    pass


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    @property
    def is_root(self) -> bool:
        return self.uid == 0


@dataclass(frozen=True)
class Connection:
    """A client connection a handler takes over: it answers the request itself and keeps the connection."""
    sock: socket.socket
    rfile: BinaryIO
    wfile: BinaryIO
    closing: threading.Event  # set when the server closes

    def send(self, message: dict[str, Any]) -> None:
        send_message(self.wfile, message)

    def send_line(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\n")
        self.wfile.flush()


def send_message(wfile: BinaryIO, message: dict[str, Any]) -> None:
    wfile.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
    wfile.flush()


def answers(path: str) -> bool:
    """Whether something accepts connections on the socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(path)
            return True
    except OSError:
        return False


class Client:
    def __init__(self, path: str | None = None, timeout: float = 10.0) -> None:
        self.path = path or socket_path()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self._sock.connect(self.path)
                    break
                except BlockingIOError:  # its backlog is full for a moment (a burst of connections): wait a little
                    if time.monotonic() > deadline:
                        self._sock.close()
                        raise DaemonUnavailable(f"the gpuwatch daemon on {self.path} accepts no connection: it is "
                                                "flooded with them; try again later") from None
                    time.sleep(0.02)
        except (FileNotFoundError, ConnectionRefusedError):
            self._sock.close()
            raise DaemonUnavailable(f"no gpuwatch daemon is listening on {self.path}: start one with "
                                    "`sudo gpuwatch run`") from None
        except PermissionError:
            self._sock.close()
            raise DaemonUnavailable(f"permission denied on {self.path}: is the daemon's socket readable?") from None
        self._rfile = self._sock.makefile("rb")

    def close(self) -> None:
        self._rfile.close()
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, cmd: str, **args: Any) -> None:
        self._sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")

    def _receive(self) -> dict[str, Any] | None:
        line = self._rfile.readline()
        return json.loads(line) if line else None

    def call(self, cmd: str, **args: Any) -> Any:
        self._send(cmd, **args)
        reply = self._receive()
        if reply is None:
            raise ControlError("the daemon closed the connection")
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "unknown error"))
        return reply.get("result")

    def stream(self, cmd: str, **args: Any) -> Iterator[dict[str, Any]]:
        self._sock.settimeout(None)
        self._send(cmd, **args)
        while (reply := self._receive()) is not None:
            if not reply.get("ok"):
                raise ControlError(reply.get("error", "unknown error"))
            yield reply["event"]
