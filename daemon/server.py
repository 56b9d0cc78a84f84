"""The daemon's side of the control socket (gpuwatch.core.protocol): peers authenticated by SO_PEERCRED.

What any local user can send is bounded: connections are capped (in all, from the file-descriptor limit, and
per user), with slots only root may take, so that root's requests are served under any flood; a connection
that sends nothing for GPUWATCH_IDLE_TIMEOUT_S (default 30 s) is closed, and a stream whose client stops reading
that long ends; a bad request gets one line back and is logged in one line, at most once a minute per user."""
from __future__ import annotations

import json
import logging
import os
import resource
import select
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import threads
from ..core.protocol import MAX_REQUEST, Connection, ControlError, Peer, answers, send_message

log = logging.getLogger(__name__)

Handler = Callable[[Peer, dict[str, Any]], Any]
StreamHandler = Callable[[Peer, dict[str, Any], threading.Event], Generator[dict[str, Any], None, None]]
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
IDLE_TIMEOUT_S = 30.0   # a connection that sends nothing this long is closed (GPUWATCH_IDLE_TIMEOUT_S)
PER_UID = 64            # connections one user other than root may hold (interposers that attached aside)
ROOT_RESERVE = 16       # of the cap, connections only root may take
FD_RESERVE = 384        # file descriptors the cap leaves to the rest of the daemon (BPF, libraries, metrics, /proc)
MAX_CONNECTIONS = 4096
LOG_EVERY_S = 60.0      # a user's bad requests are logged at most once this often



def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return Peer(pid, uid, gid)


def connection_cap() -> int:
    """Connections served at once: half of what the file-descriptor limit leaves after FD_RESERVE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return MAX_CONNECTIONS
    return max(ROOT_RESERVE + 8, min(MAX_CONNECTIONS, (soft - FD_RESERVE) // 2))


def idle_timeout() -> float:
    text = os.environ.get("GPUWATCH_IDLE_TIMEOUT_S", "")
    try:
        value = float(text) if text else IDLE_TIMEOUT_S
    except ValueError:
        value = IDLE_TIMEOUT_S
    return value if value > 0 else IDLE_TIMEOUT_S


class Throttle:
    """At most one log line per key every `every` seconds; the next line tells how many were left out."""

    def __init__(self, every: float = LOG_EVERY_S) -> None:
        self.every = every
        self._last: dict[Any, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def allow(self, key: Any) -> int | None:
        """None: stay quiet; else the number of lines left out since the last one."""
        now = time.monotonic()
        with self._lock:
            last, skipped = self._last.get(key, (-self.every, 0))
            if now - last < self.every:
                self._last[key] = (last, skipped + 1)
                return None
            if len(self._last) > 4096:
                self._last = {k: v for k, v in self._last.items() if now - v[0] < self.every}
            self._last[key] = (now, 0)
            return skipped


def left_out(skipped: int) -> str:
    return f" ({skipped} more like it left out of the log)" if skipped else ""


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # a burst of connects waits in the backlog instead of failing with EAGAIN

    def __init__(self, path: str, handler: type[socketserver.BaseRequestHandler], owner: ControlServer) -> None:
        self.owner = owner
        super().__init__(path, handler)

    def get_request(self) -> tuple[Any, Any]:
        return threads.accept_or_wait(super().get_request, self._cannot_accept)

    def _cannot_accept(self, exc: OSError) -> None:
        if (skipped := self.owner.throttle.allow("accept")) is not None:
            log.error("control socket: cannot accept a connection: %s%s", exc.strerror, left_out(skipped))

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.owner.admit(request)

    def shutdown_request(self, request: Any) -> None:
        self.owner.release(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if (skipped := self.owner.throttle.allow("handler")) is not None:
            log.exception("control connection failed%s", left_out(skipped))


class ControlServer:
    def __init__(self, path: str, commands: dict[str, Command]) -> None:
        self.path = path
        self.commands = commands
        self.cap, self.per_uid, self.idle_timeout = connection_cap(), PER_UID, idle_timeout()
        self.throttle = Throttle()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._peers: dict[Any, Peer] = {}  # admitted connections
        self._by_uid: dict[int, int] = {}   # their users (taken-over connections aside)
        self._taken_over: set[Any] = set()   # connections an interposer's attach took over
        server = self

        class _Handler(socketserver.StreamRequestHandler):
            timeout = self.idle_timeout

            def handle(self) -> None:
                server._serve(self.request, self.rfile, self.wfile)

        if not Path(path).parent.exists():
            Path(path).parent.mkdir(parents=True)
            os.chmod(Path(path).parent, 0o755)
        if os.path.exists(path):
            if answers(path):
                raise ControlError(f"another gpuwatch daemon is running on {path}: stop it first")
            os.unlink(path)
        self._server = _UnixServer(path, _Handler, self)
        os.chmod(path, 0o666)  # anyone may connect and read; changes are checked per peer
        self._thread = threading.Thread(target=threads.supervised("gpuwatch-control", self._server.serve_forever,
                                                                  self._closing),
                                        name="gpuwatch-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        if self._thread.ident is not None:  # shutdown() waits for serve_forever: only on a server that served
            self._server.shutdown()
        self._server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def connections(self) -> int:
        with self._lock:
            return len(self._peers)

    # admission: at accept, where the peer's credentials are known

    def admit(self, sock: socket.socket) -> bool:
        """Take a slot for a new connection, or answer it with why not (one line) and have it closed."""
        try:
            peer = peer_of(sock)
        except OSError:
            return False
        with self._lock:
            total, mine = len(self._peers), self._by_uid.get(peer.uid, 0)
            if peer.is_root:
                problem = None if total < self.cap else f"the daemon serves {total} connections, as many as it can"
            elif mine >= self.per_uid:
                problem = (f"uid {peer.uid} has {mine} connections open, the most one user may: close some "
                           f"(idle ones close after {self.idle_timeout:g} s)")
            elif total >= self.cap - ROOT_RESERVE:
                problem = f"the daemon serves {total} connections, the most it takes from users other than root"
            else:
                problem = None
            if problem is None:
                self._peers[sock] = peer
                self._by_uid[peer.uid] = mine + 1
                return True
        if (skipped := self.throttle.allow(("refused", peer.uid))) is not None:
            log.warning("control socket: refused a connection of uid %d (pid %d): %s%s", peer.uid, peer.pid, problem,
                        left_out(skipped))
        try:
            sock.send(json.dumps({"ok": False, "error": f"{problem}; try again later"}).encode() + b"\n",
                      socket.MSG_DONTWAIT)
        except OSError:
            pass
        return False

    def release(self, sock: socket.socket) -> None:
        with self._lock:
            peer = self._peers.pop(sock, None)
            if peer is not None and sock not in self._taken_over:
                self._uncount(peer.uid)
            self._taken_over.discard(sock)

    def _uncount(self, uid: int) -> None:
        left = self._by_uid.get(uid, 0) - 1
        if left > 0:
            self._by_uid[uid] = left
        else:
            self._by_uid.pop(uid, None)

    def _take_over(self, sock: socket.socket, peer: Peer, taken: bool) -> None:
        """An interposer's connection is its process's for its life: it leaves its user's count (not the cap)."""
        with self._lock:
            if taken and sock not in self._taken_over:
                self._taken_over.add(sock)
                self._uncount(peer.uid)
            elif not taken and sock in self._taken_over:
                self._taken_over.discard(sock)
                self._by_uid[peer.uid] = self._by_uid.get(peer.uid, 0) + 1

    # serving

    def _watch_hangup(self, sock: socket.socket) -> threading.Event:
        """An event set when the server closes or the client hangs up: a stream with nothing to send still
        ends with its client."""
        ended = threading.Event()

        def watch() -> None:
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
            try:
                while not ended.is_set() and not self._closing.is_set():
                    ready = poller.poll(HANGUP_POLL_S * 1000)
                    if ready and (ready[0][1] & (select.POLLHUP | select.POLLERR)
                                  or not sock.recv(1, socket.MSG_PEEK)):
                        break
                    if ready:
                        ended.wait(HANGUP_POLL_S)  # it sent more: nothing to read in a stream; look again later
            except OSError:
                pass
            ended.set()

        threading.Thread(target=watch, name="gpuwatch-stream-hangup", daemon=True).start()
        return ended

    def _bad_request(self, wfile, peer: Peer, problem: str) -> None:
        """One line back, and one in the log at most once a minute per user."""
        if (skipped := self.throttle.allow(("bad", peer.uid))) is not None:
            log.warning("control socket: bad request from uid %d (pid %d): %s%s", peer.uid, peer.pid, problem,
                        left_out(skipped))
        send_message(wfile, {"ok": False, "error": problem})

    def _serve(self, sock: socket.socket, rfile, wfile) -> None:
        try:
            self._serve_requests(sock, rfile, wfile)
        except OSError:  # the client went, or stopped reading or sending for longer than the idle timeout
            pass

    def _serve_requests(self, sock: socket.socket, rfile, wfile) -> None:
        peer = self._peers.get(sock) or peer_of(sock)
        while not self._closing.is_set():
            try:
                line = rfile.readline(MAX_REQUEST + 1)
            except TimeoutError:
                send_message(wfile, {"ok": False, "error": f"nothing sent for {self.idle_timeout:g} s: connection "
                                                           "closed"})
                return
            if not line:
                return
            if len(line) > MAX_REQUEST:
                self._bad_request(wfile, peer, f"request larger than {MAX_REQUEST} bytes")
                return
            try:
                try:
                    request = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ControlError(f"malformed JSON: {exc.msg}") from None
                except UnicodeDecodeError:
                    raise ControlError("malformed JSON: not UTF-8 text") from None
                except RecursionError:
                    raise ControlError("malformed JSON: nested too deeply (a request is one flat JSON object)") \
                        from None
                if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                    raise ControlError('a request is a JSON object with a string "cmd"')
            except ControlError as exc:
                self._bad_request(wfile, peer, str(exc))
                continue
            try:
                command = self.commands.get(request["cmd"])
                if command is None:
                    raise ControlError(f"unknown command {request['cmd'][:40]!r}; known: "
                                       f"{', '.join(sorted(self.commands))}")
                if command.root_only and not peer.is_root:
                    raise ControlError(f"{request['cmd']} needs root; uid {peer.uid} may only read")
                if command.takeover is not None:
                    self._take_over(sock, peer, True)
                    sock.settimeout(None)  # the handler's own: it reads its process's answers for its life
                    try:
                        command.takeover(peer, request, Connection(sock, rfile, wfile, self._closing))
                    except BaseException:
                        sock.settimeout(self.idle_timeout)
                        self._take_over(sock, peer, False)
                        raise
                    return
                if command.stream is not None:
                    ended = self._watch_hangup(sock)
                    items = command.stream(peer, request, ended)
                    try:
                        for item in items:
                            send_message(wfile, {"ok": True, "event": item})
                    finally:
                        ended.set()
                        items.close()  # its own clean-up now, also when the client stopped reading
                    return
                assert command.handler is not None
                send_message(wfile, {"ok": True, "result": command.handler(peer, request)})
            except OSError:
                raise
            except ControlError as exc:
                send_message(wfile, {"ok": False, "error": str(exc)})
            except RecursionError:
                self._bad_request(wfile, peer, "request nested too deeply")
            except Exception as exc:
                if (skipped := self.throttle.allow(("internal", peer.uid))) is not None:
                    log.exception("control request %.40r from uid %d failed%s", request.get("cmd"), peer.uid,
                                  left_out(skipped))
                send_message(wfile, {"ok": False, "error": f"internal error: {str(exc)[:200]}"})
