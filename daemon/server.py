"""The daemon's side of the control socket (gpuwatch.core.protocol): peers authenticated by SO_PEERCRED."""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.protocol import MAX_REQUEST, Connection, ControlError, Peer, answers, send_message

log = logging.getLogger(__name__)

Handler = Callable[[Peer, dict[str, Any]], Any]
StreamHandler = Callable[[Peer, dict[str, Any], threading.Event], Iterator[dict[str, Any]]]
# Raises ControlError to refuse (the connection stays a plain control connection); once it returns, the
# connection was its own and is closed.
TakeoverHandler = Callable[[Peer, dict[str, Any], Connection], None]


@dataclass
class Command:
    """One of: `handler` answers once, `stream` yields events, `takeover` owns the connection."""
    handler: Handler | None = None
    root_only: bool = False
    stream: StreamHandler | None = None
    takeover: TakeoverHandler | None = None


HANGUP_POLL_S = 0.5


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
            if answers(path):
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

    def _watch_hangup(self, sock: socket.socket) -> threading.Event:
        """An event set when the server closes or the client hangs up: a stream with nothing to send still
        ends with its client."""
        ended = threading.Event()

        def watch() -> None:
            try:
                while not ended.is_set() and not self._closing.is_set():
                    readable, _, _ = select.select([sock], [], [], HANGUP_POLL_S)
                    if readable and not sock.recv(1, socket.MSG_PEEK):
                        break
                    if readable:
                        ended.wait(HANGUP_POLL_S)  # it sent more: nothing to read in a stream; look again later
            except OSError:
                pass
            ended.set()

        threading.Thread(target=watch, name="gpuwatch-stream-hangup", daemon=True).start()
        return ended

    def _serve(self, sock: socket.socket, rfile, wfile) -> None:
        peer = peer_of(sock)
        while not self._closing.is_set():
            line = rfile.readline(MAX_REQUEST + 1)
            if not line:
                return
            if len(line) > MAX_REQUEST:
                send_message(wfile, {"ok": False, "error": f"request larger than {MAX_REQUEST} bytes"})
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
                if command.takeover is not None:
                    command.takeover(peer, request, Connection(sock, rfile, wfile, self._closing))
                    return
                if command.stream is not None:
                    ended = self._watch_hangup(sock)
                    try:
                        for item in command.stream(peer, request, ended):
                            send_message(wfile, {"ok": True, "event": item})
                    finally:
                        ended.set()
                    return
                assert command.handler is not None
                send_message(wfile, {"ok": True, "result": command.handler(peer, request)})
            except (BrokenPipeError, ConnectionResetError):
                return
            except json.JSONDecodeError as exc:
                send_message(wfile, {"ok": False, "error": f"malformed JSON: {exc.msg}"})
            except UnicodeDecodeError:
                send_message(wfile, {"ok": False, "error": "malformed JSON: not UTF-8 text"})
            except ControlError as exc:
                send_message(wfile, {"ok": False, "error": str(exc)})
            except Exception as exc:
                log.exception("control request failed")
                send_message(wfile, {"ok": False, "error": f"internal error: {exc}"})


