"""Fixtures for tests of the interposer (libgpuwatch.so): the built library, scripted programs that preload
it, its shared page read from outside as the daemon reads it, a fake daemon speaking its protocol, and a fake
interposer speaking the daemon's (FakeInterposer, for tests of the daemon's side). conftest.py registers this
module as a plugin: its fixtures reach every test module; import the classes and constants a module uses."""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import select
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, Prog, launch, wait_for

MiB = 1 << 20
PAGE_SIZE = 64 * 1024
MEMFD_LINK = "/memfd:gpuwatch-interposer (deleted)"
STATES = ("running", "paused", "swapping_out", "swapped", "swapping_in")
HEADER = struct.Struct("<IIiIIIII10Q")  # docs/interposer.md, "Shared page"
HEADER_FIELDS = ("magic", "version", "pid", "max_devices", "gate", "state", "priority", "flags",
                 "lease_deadline_ns", "swap_out_bytes_total", "swap_in_bytes_total", "swap_out_ns_total",
                 "swap_in_ns_total", "swaps_out", "swaps_in", "gate_wait_ns_total", "gate_waits", "quota_refusals")
DEVICE = struct.Struct("<5Q")
DEVICE_FIELDS = ("quota", "used", "swappable", "unswappable", "swapped")
SLOT = struct.Struct("<II3Q")
FLAG_ATTACHED, FLAG_SWAP, FLAG_BOUNDED = 1, 2, 4
MAGIC = 0x31535747
STATE_CODES = {"running": 0, "paused": 1, "swapping_out": 2, "swapped": 3, "swapping_in": 4}
PINNED_BYTES_OFFSET = 136  # u64: pinned host memory the library holds (docs/interposer.md, "Shared page")


@pytest.fixture(scope="session")
def interposer(tmp_path_factory) -> Path:
    """The checkout's library, built for this session; $GPUWATCH_INTERPOSER names another (an installed one)."""
    if override := os.environ.get("GPUWATCH_INTERPOSER"):
        return Path(override)
    out = tmp_path_factory.mktemp("interposer")
    subprocess.run(["make", "-s", "-C", str(ROOT / "interposer"), f"OUT={out}"], check=True)
    os.environ.setdefault(BUILT_LIBRARY, str(out / "libgpuwatch.so"))  # what map_interposer() loads
    return out / "libgpuwatch.so"


BUILT_LIBRARY = "GPUWATCH_TEST_LIBRARY"  # a built libgpuwatch.so, for this process and the programs it starts
_mapped: list[ctypes.CDLL] = []


def map_interposer() -> None:
    """The daemon attaches only a process that maps libgpuwatch.so (enforcer/interposed.py, verify_peer): this
    process maps it, as FakeInterposer attaches from it. Loaded with dlopen, local, and never called: its
    constructor only reads the GPUWATCH_* environment; its page and control thread start with a CUDA driver
    loaded through it, which nothing here does."""
    if _mapped:
        return
    path = os.environ.get("GPUWATCH_INTERPOSER") or os.environ.get(BUILT_LIBRARY)
    if not path and (ROOT / "interposer" / "libgpuwatch.so").is_file():  # built by ./install.sh
        path = str(ROOT / "interposer" / "libgpuwatch.so")
    if not path:
        out = tempfile.mkdtemp(prefix="gpuwatch-test-lib-")
        subprocess.run(["make", "-s", "-C", str(ROOT / "interposer"), f"OUT={out}"], check=True)
        path = os.environ[BUILT_LIBRARY] = f"{out}/libgpuwatch.so"
    _mapped.append(ctypes.CDLL(path))


class Page:
    """The interposer's shared page, mapped from /proc/PID/fd/FD as the daemon maps it."""

    def __init__(self, pid: int, fd: int | None = None) -> None:
        if fd is None:
            fd = int(wait_for(lambda: find_memfd(pid), 5, f"the shared page of {pid}"))
        self.path = f"/proc/{pid}/fd/{fd}"
        handle = os.open(self.path, os.O_RDWR)
        try:
            self.map = mmap.mmap(handle, PAGE_SIZE)
        finally:
            os.close(handle)

    def header(self) -> dict[str, int]:
        return dict(zip(HEADER_FIELDS, HEADER.unpack_from(self.map, 0)))

    def __getitem__(self, field: str) -> int:
        return self.header()[field]

    @property
    def pinned_bytes(self) -> int:
        return struct.unpack_from("<Q", self.map, PINNED_BYTES_OFFSET)[0]

    def device(self, d: int = 0) -> dict[str, int]:
        return dict(zip(DEVICE_FIELDS, DEVICE.unpack_from(self.map, 256 + 64 * d)))

    def slots(self) -> list[tuple[int, int, int, int, int]]:
        """(active, tid, launches, graph_launches, copies) of every slot in use."""
        rows = (SLOT.unpack_from(self.map, 4096 + 64 * s) for s in range(960))
        return [r for r in rows if r[1] or any(r[2:])]

    def counts(self) -> tuple[int, int, int]:
        """The process's (launches, graph_launches, copies): sums over the slots."""
        slots = self.slots()
        return sum(s[2] for s in slots), sum(s[3] for s in slots), sum(s[4] for s in slots)

    def set_lease(self, deadline_ns: int) -> None:
        struct.pack_into("<Q", self.map, 32, deadline_ns)

    def close(self) -> None:
        self.map.close()


def find_memfd(pid: int) -> int | None:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == MEMFD_LINK:
                return int(fd)
        except OSError:
            pass
    return None


def driver_used(state: Path, dev: int = 0) -> int:
    """Device bytes the test-double driver holds, from its FAKECUDA_SHARED_STATE file (the driver's view,
    not the process's: it sees through the interposer's quota view)."""
    return struct.unpack_from("<Q", state.read_bytes(), 8 * dev)[0]


class IProg(Prog):
    """A cudaprog with the interposer preloaded; a reply that does not come in `timeout` seconds fails the
    test (a call stuck at a closed gate) instead of hanging it."""

    timeout = 15.0

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        super().__init__(argv, env)
        self.page_: Page | None = None

    def send(self, line: str) -> str:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], self.timeout)[0]:
            self.proc.kill()
            raise AssertionError(f"no reply to {line!r} in {self.timeout}s")
        reply = self.proc.stdout.readline().strip()
        assert reply, f"no reply to {line!r} (exit code {self.proc.wait()})"
        return reply

    def err(self, line: str) -> int:
        reply = self.send(line).split()
        assert reply[0] == "err", f"{line!r} -> {' '.join(reply)!r}"
        return int(reply[1])

    @property
    def page(self) -> Page:
        if self.page_ is None:
            self.page_ = Page(self.pid)
        return self.page_

    def counts(self) -> tuple[int, int]:
        """The test-double driver's (launches, work submitted)."""
        launches, work, _ = map(int, self.ok("counts"))
        return launches, work

    def spinning(self, name: str) -> int:
        """Iterations a spinner thread has finished."""
        return int(self.ok(f"spinstat {name}")[0])


@pytest.fixture
def iprogs(fakecuda: Path, interposer: Path) -> Iterator[Callable[..., IProg]]:
    """Starts cudaprog (or cudaprog-linked) with the interposer preloaded and no daemon unless `env` names
    one; loads the driver (`library`, default the test double) and makes device `ctx`'s context current."""
    started: list[IProg] = []

    def start(env: dict[str, str] | None = None, linked: bool = False, library: Path | None = None,
              ctx: int | None = 0, preload: bool = True) -> IProg:
        lib = library or fakecuda / "libcuda.so.1"
        full = {"GPUWATCH_SOCKET": "", "GPUWATCH_REAL_LIBCUDA": str(lib), **(env or {})}
        if preload:
            full["LD_PRELOAD"] = str(interposer)
        return launch(IProg([str(fakecuda / ("cudaprog-linked" if linked else "cudaprog"))], full), lib, ctx,
                      started)

    yield start
    for p in started:
        p.close()


class FakeDaemon:
    """The daemon's side of docs/interposer.md, "Daemon protocol": one connection at a time."""

    def __init__(self, path: Path, lease_ms: int = 1000, room: bool = False) -> None:
        self.path = path
        self.lease_ms = lease_ms
        self.room = room
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.conn: socket.socket | None = None
        self.buf = b""
        self.next_id = 0
        self.attach: dict = {}
        self.pid = 0
        self.page: Page | None = None
        self.renewing = threading.Event()

    def accept(self, timeout: float = 5.0) -> dict:
        """Takes the next connection, reads its interposer_attach line, maps its page, answers ok."""
        self.server.settimeout(timeout)
        self.conn, _ = self.server.accept()
        self.conn.settimeout(timeout)
        self.buf = b""
        self.attach = json.loads(self.read_line())
        self.pid = struct.unpack("3i", self.conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        self.page = Page(self.pid, self.attach["shm_fd"])
        self.send({"ok": True, "result": {"lease_ms": self.lease_ms, "room": self.room}})
        return self.attach

    def read_line(self) -> str:
        assert self.conn
        while b"\n" not in self.buf:
            chunk = self.conn.recv(4096)
            assert chunk, "the interposer closed the connection"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def send(self, message: dict) -> None:
        assert self.conn
        self.conn.sendall(json.dumps(message).encode() + b"\n")

    def request(self, op: str, **args: object) -> dict:
        """Sends `<id> <op>[ <arg>]` (docs/interposer.md, "Daemon protocol"): `bytes=N` -> `N`, `on=True` ->
        `1`; returns the library's JSON answer, which must carry the id."""
        self.next_id += 1
        fields = [str(self.next_id), op, *(str(int(v)) if isinstance(v, bool) else str(v) for v in args.values())]
        reply = self.send_raw(" ".join(fields))
        assert reply.get("id") == self.next_id, reply
        return reply

    def send_raw(self, line: str) -> dict:
        """Sends `line` and a newline as they are (no id of ours) and returns the library's JSON answer."""
        assert self.conn
        self.conn.sendall(line.encode(errors="surrogateescape") + b"\n")
        return json.loads(self.read_line())

    def renew(self, period: float = 0.1, lease: float = 0.4) -> None:
        """Renews lease_deadline_ns from a thread until stop_renewing()."""
        self.renewing.set()

        def loop() -> None:
            while self.renewing.is_set() and self.page:
                self.page.set_lease(time.clock_gettime_ns(time.CLOCK_MONOTONIC) + int(lease * 1e9))
                time.sleep(period)

        threading.Thread(target=loop, daemon=True).start()

    def stop_renewing(self) -> None:
        self.renewing.clear()
        time.sleep(0.15)  # the renewing thread's last write is done

    def hang_up(self) -> None:
        """Closes the connection, as a daemon that dies does (the kernel closes its sockets)."""
        self.stop_renewing()
        if self.conn:
            self.conn.close()
            self.conn = None

    def close(self) -> None:
        self.hang_up()
        self.server.close()
        if self.page:
            self.page.close()
            self.page = None
        self.path.unlink(missing_ok=True)


@pytest.fixture
def fake_daemons(tmp_path: Path) -> Iterator[Callable[..., FakeDaemon]]:
    made: list[FakeDaemon] = []

    def make(lease_ms: int = 1000, path: Path | None = None, room: bool = False) -> FakeDaemon:
        d = FakeDaemon(path or tmp_path / "gw.sock", lease_ms, room)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


class FakeInterposer:
    """What libgpuwatch.so does towards the daemon, from this test process: a memfd page, the attach, and
    answers to requests (which it records) that move the page's state as the library would."""

    def __init__(self, socket_path: str, pid: int | None = None, magic: int = MAGIC, max_devices: int = 16,
                 priority: int = 1, sealable: bool = True, name: str = "gpuwatch-interposer", size: int = PAGE_SIZE,
                 answer: bool = True) -> None:
        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0)
        self.fd = os.memfd_create(name, flags)
        os.ftruncate(self.fd, size)
        self.page = mmap.mmap(self.fd, PAGE_SIZE if size >= PAGE_SIZE else size)
        if size >= PAGE_SIZE:
            struct.pack_into("<IIiIIII", self.page, 0, magic, 1, os.getpid() if pid is None else pid, max_devices, 0,
                             0, priority)
        self.socket_path, self.answer = socket_path, answer
        self.requests: list[dict[str, Any]] = []
        self.sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # the page
    def u32(self, offset: int, value: int | None = None) -> int:
        if value is not None:
            struct.pack_into("<I", self.page, offset, value)
        return struct.unpack_from("<I", self.page, offset)[0]

    def u64(self, offset: int, value: int | None = None) -> int:
        if value is not None:
            struct.pack_into("<Q", self.page, offset, value)
        return struct.unpack_from("<Q", self.page, offset)[0]

    def device(self, d: int, quota: int = 0, used: int = 0, swappable: int = 0, unswappable: int = 0,
               swapped: int = 0) -> None:
        struct.pack_into("<5Q", self.page, 256 + 64 * d, quota, used, swappable, unswappable, swapped)

    def slot(self, s: int, launches: int, graph_launches: int = 0, copies: int = 0) -> None:
        struct.pack_into("<IIQQQ", self.page, 4096 + 64 * s, 1, 1000 + s, launches, graph_launches, copies)

    def set_state(self, state: str) -> None:
        self.u32(20, STATE_CODES[state])

    @property
    def lease_deadline_ns(self) -> int:
        return self.u64(32)

    # the connection
    def attach(self, mem_limit: int | None = None, **fields: Any) -> dict[str, Any]:
        map_interposer()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.socket_path)
        self.rfile = self.sock.makefile("rb")
        request = {"cmd": "interposer_attach", "version": 1, "shm_fd": self.fd, "mem_limit": mem_limit,
                   "priority": "normal", "swap": True, **fields}
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        reply = json.loads(self.rfile.readline())
        if reply.get("ok"):
            self._thread = threading.Thread(target=self._serve, daemon=True)
            self._thread.start()
        return reply

    def _serve(self) -> None:
        # Requests are lines `<id> <op>[ <arg>]` (docs/interposer.md, "Daemon protocol"), read as strictly as
        # the library reads them into {"id", "op"} plus "bytes" (swap_out, quota) or "on" (bound). A line
        # that breaks the format is recorded with "malformed" and answered as the library would: ok false.
        args = {"swap_out": "bytes", "quota": "bytes", "bound": "on"}

        def number(field: str) -> int | None:
            ok = field.isascii() and field.isdigit() and (field == "0" or field[0] != "0") and int(field) < 1 << 64
            return int(field) if ok else None

        for line in self.rfile:
            fields = line.decode("ascii", "replace").removesuffix("\n").split(" ")
            request: dict[str, Any] = {"id": number(fields[0]) or 0, "op": fields[1] if len(fields) > 1 else ""}
            arg = number(fields[2]) if len(fields) == 3 else None
            if (len(line) > 81 or not line.endswith(b"\n") or not request["id"]
                    or len(fields) != 2 + (request["op"] in args)
                    or (request["op"] in args and (arg is None or (request["op"] == "bound" and arg > 1)))):
                request["malformed"] = line
            elif request["op"] in args:
                request[args[request["op"]]] = arg == 1 if request["op"] == "bound" else arg
            self.requests.append(request)
            if not self.answer:
                continue
            reply: dict[str, Any] = {"id": request["id"], "ok": True}
            if "malformed" in request:
                reply = {"id": request["id"], "ok": False, "error": "malformed request"}
            elif request["op"] == "pause":
                self.set_state("paused")
                reply["state"] = "paused"
            elif request["op"] == "swap_out":
                moved = request["bytes"] or 512 * MiB
                self.device(0, used=0, swappable=moved, swapped=moved)
                self.u64(40, self.u64(40) + moved)
                self.set_state("swapped")
                reply.update(state="swapped", bytes=moved)
            elif request["op"] == "resume":
                self.set_state("running")
                reply["state"] = "running"
            else:
                reply = {"id": request["id"], "ok": False, "error": f"unknown op {request['op']}"}
            self.sock.sendall(json.dumps(reply).encode() + b"\n")

    def disconnect(self) -> None:
        if self.sock is not None:
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.sock is not None:
            self.disconnect()
            self.sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.page.close()
        os.close(self.fd)
