"""The interposer's shared page (docs/interposer.md, version 1): typed reads and the daemon's two writes.

The page belongs to an untrusted process. It is reached only through the process's own file descriptor,
which must be the library's memfd; every offset is fixed, every count read from it is capped before use,
and its size is sealed (F_SEAL_SHRINK) before it is mapped, so the process cannot make the daemon fault by
truncating it. Where the memfd does not allow sealing, the page is read and written with pread/pwrite."""
from __future__ import annotations

import ctypes
import fcntl
import functools
import mmap
import os
import stat
import struct
import threading
from dataclasses import dataclass

from ..core.vocabulary import INTERPOSER_STATES, PRIORITIES_BY_VALUE

MAGIC = 0x31535747  # "GWS1"
VERSION = 1
MEMFD_NAME = "gpuwatch-interposer"
MEMFD_LINK = f"/memfd:{MEMFD_NAME} (deleted)"
PAGE_SIZE = 64 * 1024

LEASE_OFFSET = 32
DEVICES_OFFSET, DEVICE_SIZE = 256, 64
SLOTS_OFFSET, SLOT_SIZE, SLOT_COUNT = 4096, 64, 960
MAX_DEVICES = (SLOTS_OFFSET - DEVICES_OFFSET) // DEVICE_SIZE  # what fits before the slots, whatever the page says
U64_MAX = (1 << 64) - 1

STATES = INTERPOSER_STATES         # by the page's number (shm.h enum gw_state)
PRIORITIES = PRIORITIES_BY_VALUE   # by the page's number

# magic, version, pid, max_devices, gate, state, priority, flags; the ten u64 from lease_deadline_ns; waiting,
# room_seq, wanted_bytes, room_verdict, 4 bytes of padding, pinned_bytes (offset 136)
_HEADER = struct.Struct("<IIiIIIII10QIIQI4xQ")
PINNED_BYTES_OFFSET = 136
GATE_CLOSED, GATE_BOUNDED = 1, 2
_DEVICE = struct.Struct("<5Q")  # quota, used, swappable, unswappable, swapped (3 reserved follow)


class PageError(Exception):
    """The page cannot be used, with the reason in one line."""


@dataclass(frozen=True)
class Header:
    pid: int
    max_devices: int
    gate_closed: bool
    queue_bounded: bool
    state: str  # one of STATES, or "unknown"
    priority: str  # one of PRIORITIES, or "unknown"
    flags: int
    lease_deadline_ns: int
    swap_out_bytes_total: int
    swap_in_bytes_total: int
    swap_out_ns_total: int
    swap_in_ns_total: int
    swaps_out: int
    swaps_in: int
    gate_wait_ns_total: int
    gate_waits: int
    quota_refusals: int
    waiting: int  # threads blocked at the gate or waiting for room now: the process wants to run
    room_seq: int
    wanted_bytes: int  # device memory its allocations wait for: the device was full
    room_verdict: int = 0  # the library's last answer to a wait for room: 0 retry, 1 denied
    pinned_bytes: int = 0  # pinned host memory the library holds (swap-out buffers, kept until drop_host)


@dataclass(frozen=True)
class DeviceRecord:
    ordinal: int  # the process's CUDA device ordinal
    quota: int  # 0: none
    used: int
    swappable: int
    unswappable: int
    swapped: int  # bytes now in host memory

    @property
    def in_use(self) -> bool:
        return bool(self.used or self.swappable or self.unswappable or self.swapped)


@dataclass(frozen=True)
class LaunchCounts:
    launches: int
    graph_launches: int
    copies: int


@dataclass(frozen=True)
class PageReading:
    header: Header
    devices: list[DeviceRecord]  # every record up to max_devices, used or not
    counts: LaunchCounts  # sums over the thread slots


def _name(values: tuple[str, ...], index: int) -> str:
    return values[index] if index < len(values) else "unknown"


def parse_header(raw: bytes) -> Header:
    (magic, version, pid, max_devices, gate, state, priority, flags, lease, *totals) = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise PageError(f"bad magic 0x{magic:08x} (want 0x{MAGIC:08x})")
    if version != VERSION:
        raise PageError(f"page version {version} is not supported (want {VERSION})")
    if not 1 <= max_devices <= MAX_DEVICES:
        raise PageError(f"max_devices {max_devices} is out of range 1..{MAX_DEVICES}")
    return Header(pid, max_devices, bool(gate & GATE_CLOSED), bool(gate & GATE_BOUNDED), _name(STATES, state),
                  _name(PRIORITIES, priority), flags, lease, *totals)


def parse_devices(raw: bytes, max_devices: int) -> list[DeviceRecord]:
    count = min(max_devices, MAX_DEVICES)
    return [DeviceRecord(d, *_DEVICE.unpack_from(raw, DEVICES_OFFSET + d * DEVICE_SIZE)) for d in range(count)]


def sum_slots(raw: bytes) -> LaunchCounts:
    """Each slot: u32 active, u32 tid, u64 launches, u64 graph_launches, u64 copies, 4 reserved u64."""
    words = memoryview(raw[SLOTS_OFFSET:SLOTS_OFFSET + SLOT_COUNT * SLOT_SIZE]).cast("Q")  # x86-64: little-endian
    per_slot = SLOT_SIZE // 8
    return LaunchCounts(sum(words[1::per_slot]), sum(words[2::per_slot]), sum(words[3::per_slot]))


@functools.cache
def _memfd_device() -> int:
    """The device number every (non-hugetlb) memfd has: the kernel's internal shmem mount."""
    fd = os.memfd_create("gpuwatch-probe", os.MFD_CLOEXEC)
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


def open_memfd(pid: int, fd: int) -> int:
    """Process `pid`'s descriptor `fd`, opened read-write, once it is known to be the library's memfd.

    It is first opened with O_PATH (no open of whatever it is: a device's open can have effects) and
    checked through that descriptor, which the process cannot swap, then reopened from it."""
    if not 0 <= fd < 1 << 31:
        raise PageError(f"shm_fd {fd} is not a file descriptor number")
    try:
        path_fd = os.open(f"/proc/{pid}/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PageError(f"process {pid} has no file descriptor {fd}") from None
    except OSError as exc:
        raise PageError(f"cannot open descriptor {fd} of process {pid}: {exc.strerror}") from None
    try:
        st = os.fstat(path_fd)
        link = os.readlink(f"/proc/self/fd/{path_fd}")
        if link != MEMFD_LINK or not stat.S_ISREG(st.st_mode) or st.st_dev != _memfd_device():
            raise PageError(f"descriptor {fd} of process {pid} is not a memfd named {MEMFD_NAME} "
                            f"({link[:100]!r})")
        if st.st_size < PAGE_SIZE:
            raise PageError(f"the page is {st.st_size} bytes, not {PAGE_SIZE}")
        try:
            return os.open(f"/proc/self/fd/{path_fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise PageError(f"cannot open the page of process {pid}: {exc.strerror}") from None
    finally:
        os.close(path_fd)


def _seal_size(fd: int) -> bool:
    """Forbid shrinking; True when the file is (now) sealed against it."""
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        pass  # created without MFD_ALLOW_SEALING, or sealed already
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:
        return False


class SharedPage:
    """One process's page. Thread-safe; after close() every read raises PageError."""

    def __init__(self, fd: int) -> None:
        """Takes ownership of `fd`, an open memfd (see open_memfd)."""
        self._fd: int | None = fd
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()
        try:
            if _seal_size(fd):
                if os.fstat(fd).st_size < PAGE_SIZE:  # shrunk before the seal held
                    raise PageError(f"the page is smaller than {PAGE_SIZE} bytes")
                self._map = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.max_devices = self.header().max_devices
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, pid: int, fd: int, page_pids: set[int] | None = None) -> SharedPage:
        """Process `pid`'s page through its descriptor `fd`; the pid written in the page must be one of
        `page_pids` (default: `pid`)."""
        page = cls(open_memfd(pid, fd))
        try:
            header = page.header()
            if header.pid not in (page_pids or {pid}):
                raise PageError(f"the page says pid {header.pid}, but process {pid} sent it")
        except BaseException:
            page.close()
            raise
        return page

    @property
    def mapped(self) -> bool:
        return self._map is not None

    def _read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if self._map is not None:
                return self._map[offset:offset + size]
            if self._fd is None:
                raise PageError("the page is closed")
            data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise PageError("the page shrank")
        return data

    def _write_u64(self, offset: int, value: int) -> None:
        if not 0 <= value <= U64_MAX:
            raise ValueError(f"{value} does not fit in 64 bits")
        with self._lock:
            if self._map is not None:
                # one aligned 8-byte store: the library never sees half a value
                ctypes.c_uint64.from_buffer(self._map, offset).value = value
            elif self._fd is not None:
                os.pwrite(self._fd, value.to_bytes(8, "little"), offset)
            else:
                raise PageError("the page is closed")

    def identity(self) -> tuple[int, int]:
        """(device, inode) of the page's memfd: how the process's /proc/PID/maps names its mapping."""
        with self._lock:
            if self._fd is None:
                raise PageError("the page is closed")
            st = os.fstat(self._fd)
        return st.st_dev, st.st_ino

    def header(self) -> Header:
        return parse_header(self._read(0, _HEADER.size))

    def read(self) -> PageReading:
        raw = self._read(0, PAGE_SIZE)
        header = parse_header(raw)
        return PageReading(header, parse_devices(raw, header.max_devices), sum_slots(raw))

    def write_lease(self, deadline_ns: int) -> None:
        """CLOCK_MONOTONIC nanoseconds (time.monotonic_ns()); 0: no lease."""
        self._write_u64(LEASE_OFFSET, deadline_ns)

    def write_quota(self, ordinal: int, quota: int) -> None:
        if not 0 <= ordinal < min(self.max_devices, MAX_DEVICES):
            raise ValueError(f"device {ordinal} is not in the page (it has {self.max_devices})")
        self._write_u64(DEVICES_OFFSET + ordinal * DEVICE_SIZE, quota)

    def close(self) -> None:
        with self._lock:
            if self._map is not None:
                self._map.close()
                self._map = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


assert _HEADER.size == PINNED_BYTES_OFFSET + 8, "docs/interposer.md, Shared page"
