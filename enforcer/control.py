"""The daemon's local control socket: JSON lines over a Unix socket, peers authenticated by SO_PEERCRED."""
from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)
DEFAULT_SOCKET = "/run/gpuwatch/gpuwatch.sock"
MAX_REQUEST = 64 * 1024


def socket_path() -> str:
    return os.environ.get("GPUWATCH_SOCKET", DEFAULT_SOCKET)


class ControlError(Exception):
    """A request the daemon refuses, with the reason sent back to the client."""


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
        _send(self.wfile, message)


Handler = Callable[[Peer, dict[str, Any]], Any]
StreamHandler = Callable[[Peer, dict[str, Any], threading.Event], Iterator[dict[str, Any]]]
# Raises ControlError to refuse (the connection stays a plain control connection); once it returns, the
# connection was its own and is closed.
TakeoverHandler = Callable[[Peer, dict[str, Any], Connection], None]


@dataclass
class Command:
    handler: Handler | StreamHandler | TakeoverHandler
    root_only: bool = False
    stream: bool = False
    takeover: bool = False


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return Peer(pid, uid, gid)


class ControlServer:
    def __init__(self, path: str, commands: dict[str, Command]) -> None:
        self.path = path
        self.commands = commands
        self._closing = threading.Event()
        server = self

        class _Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                server._serve(self.request, self.rfile, self.wfile)

        if not Path(path).parent.exists():
            Path(path).parent.mkdir(parents=True)
            os.chmod(Path(path).parent, 0o755)
        if os.path.exists(path):
            if _answers(path):
                raise ControlError(f"another gpuwatch daemon is running on {path}: stop it first")
            os.unlink(path)
        self._server = socketserver.ThreadingUnixStreamServer(path, _Handler)
        self._server.daemon_threads = True
        os.chmod(path, 0o666)  # anyone may connect and read; changes are checked per peer
        self._thread = threading.Thread(target=self._server.serve_forever, name="gpuwatch-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _serve(self, sock: socket.socket, rfile, wfile) -> None:
        peer = peer_of(sock)
        while not self._closing.is_set():
            line = rfile.readline(MAX_REQUEST + 1)
            if not line:
                return
            if len(line) > MAX_REQUEST:
                _send(wfile, {"ok": False, "error": f"request larger than {MAX_REQUEST} bytes"})
                return
            try:
                request = json.loads(line)
                if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                    raise ControlError('a request is a JSON object with a string "cmd"')
                command = self.commands.get(request["cmd"])
                if command is None:
                    raise ControlError(f"unknown command {request['cmd']!r}; known: {', '.join(sorted(self.commands))}")
                if command.root_only and not peer.is_root:
                    raise ControlError(f"{request['cmd']} needs root; uid {peer.uid} may only read")
                if command.takeover:
                    command.handler(peer, request, Connection(sock, rfile, wfile, self._closing))
                    return
                if command.stream:
                    for item in command.handler(peer, request, self._closing):
                        _send(wfile, {"ok": True, "event": item})
                    return
                _send(wfile, {"ok": True, "result": command.handler(peer, request)})
            except (BrokenPipeError, ConnectionResetError):
                return
            except json.JSONDecodeError as exc:
                _send(wfile, {"ok": False, "error": f"malformed JSON: {exc.msg}"})
            except UnicodeDecodeError:
                _send(wfile, {"ok": False, "error": "malformed JSON: not UTF-8 text"})
            except ControlError as exc:
                _send(wfile, {"ok": False, "error": str(exc)})
            except Exception as exc:
                log.exception("control request failed")
                _send(wfile, {"ok": False, "error": f"internal error: {exc}"})


def _send(wfile, message: dict[str, Any]) -> None:
    wfile.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
    wfile.flush()


def _answers(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(path)
            return True
    except OSError:
        return False


class DaemonUnavailable(Exception):
    pass


class Client:
    def __init__(self, path: str | None = None, timeout: float = 10.0) -> None:
        self.path = path or socket_path()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
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

    def __exit__(self, *exc) -> None:
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
