"""The one vocabulary every part of gpuwatch speaks: priorities, states, actions, defaults, sizes and the
checks on values that people and programs hand in. The C side keeps copies (interposer/shm.h,
interposer/control.c); tests/test_architecture.py holds them to this module."""
from __future__ import annotations

import os
import re
from decimal import Decimal
from enum import IntEnum

# ------------------------------------------------------------------------------------------------ defaults

DEFAULT_SOCKET = "/run/gpuwatch/gpuwatch.sock"
DEFAULT_CONFIG = "/etc/gpuwatch/gpuwatch.toml"
STATE_FILE_NAME = "stopped.json"  # the ledger of stopped processes and quotas set by hand, beside the socket


def socket_path(config: str = DEFAULT_CONFIG) -> str:
    """The control socket a client talks to: $GPUWATCH_SOCKET, else the configuration file's `[daemon] socket`
    (the one the daemon serves), else the default."""
    return os.environ.get("GPUWATCH_SOCKET") or configured_socket(config) or DEFAULT_SOCKET


def configured_socket(config: str = DEFAULT_CONFIG) -> str | None:
    """`[daemon] socket` of the configuration file; None where the file is missing, unreadable, not TOML or
    has no such key (the client reads this one key, never the daemon's configuration module)."""
    import tomllib  # only when asked: clients that are given their socket never read the file
    try:
        with open(config, "rb") as f:
            data = tomllib.loads(f.read(1 << 20).decode())
    except (OSError, ValueError):  # ValueError: not UTF-8, not TOML
        return None
    section = data.get("daemon")
    socket = section.get("socket") if isinstance(section, dict) else None
    return socket if isinstance(socket, str) and socket.startswith("/") else None


# ------------------------------------------------------------------------------------------------ priorities


class Priority(IntEnum):
    """Higher wins. The interposer's page stores the value (interposer/shm.h)."""
    LOW = 0
    NORMAL = 1
    HIGH = 2

    @classmethod
    def parse(cls, text: str) -> Priority:
        try:
            return cls[text.upper()]
        except (KeyError, AttributeError):
            raise ValueError(f"priority must be one of {', '.join(PRIORITY_NAMES)}, not {text!r}") from None

    @property
    def label(self) -> str:
        return self.name.lower()


PRIORITY_NAMES = ("high", "normal", "low")          # as people read them, highest first
PRIORITIES_BY_VALUE = ("low", "normal", "high")     # index = Priority value = the page's number

# ------------------------------------------------------------------------------------------------ states

# The interposer's states, in the page's numbering (interposer/shm.h enum gw_state) ...
INTERPOSER_STATES = ("running", "paused", "swapping_out", "swapped", "swapping_in")
# ... then "stopped": a process the daemon stopped with SIGSTOP because it does not run under the interposer, and
# "checkpointed": one whose device memory the driver's checkpoint API holds in host memory (its calls wait). A
# process the driver's lock holds is "paused", as an interposed one at its gate.
STOPPED = "stopped"
CHECKPOINTED = "checkpointed"
RUNNING = "running"
PAUSED = "paused"
STATES = (*INTERPOSER_STATES, STOPPED, CHECKPOINTED)
UNKNOWN = "unknown"  # a page value this version does not know

# Why a process does not run: `ps` says it in words (with pids), metrics by kind, a bounded label set.
PAUSED_BY_HAND = "paused by hand"
QUOTA_STOP = "quota"
WAITING_FOR_DEVICE_MEMORY = "waiting for device memory"
WAITING_FOR_HOST_MEMORY = "waiting for host memory"
REASON_KINDS = {"paused by hand": "paused_by_hand", "quota": "quota",
                "waiting for device memory": "waiting_for_device_memory",
                "waiting for host memory": "waiting_for_host_memory", "preempted by": "preempted",
                "slice of": "slice", "exclusive use by": "exclusive"}


def reason_kind(reason: str) -> str:
    """The metric label of a reason: its words without the pid."""
    return next((kind for prefix, kind in REASON_KINDS.items() if reason.startswith(prefix)), "other")


# ------------------------------------------------------------------------------------------------ actions

ACTIONS = ("pause", "kill")  # what happens at a quota to a process not under the interposer
COPY_DIRECTIONS = ("h2d", "d2h", "d2d", "any")

# ------------------------------------------------------------------------------------------------ sizes

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
U64_MAX = (1 << 64) - 1
MAX_SIZE = (1 << 63) - 1  # the largest size anywhere (quotas, limits): fits signed 64-bit counters in BPF
UNITS = {"": 1, "b": 1,
         "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
         "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
         "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
         "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.I)


class SizeError(ValueError):
    pass


def parse_size(text: str) -> int:
    """Sizes as people write them: 512MiB, 20GiB, 1.5GiB, 4096 (bytes), 8GB (decimal), 2G (binary).
    Whole bytes, above zero (a fraction of a byte is dropped)."""
    m = _SIZE.fullmatch(text.strip())
    if not m or m.group(2).lower() not in UNITS:
        raise SizeError(f"{text!r} is not a size (like 512MiB, 20GiB, 1.5GiB, 8GB or 4096 bytes)")
    size = int(Decimal(m.group(1)) * UNITS[m.group(2).lower()])
    if size <= 0:
        raise SizeError(f"{text!r} is not above zero bytes")
    if size > MAX_SIZE:
        raise SizeError(f"{text!r} is more than 16 EiB" if size >> 64 else
                        f"{text!r} is more than 8 EiB, the largest size")
    return size


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)


# ------------------------------------------------------------------------------------------------ checks
# Each returns None for a good value, else the problem in words (the caller names the key or option).


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def power_of_two_problem(n: int) -> str | None:
    return None if is_power_of_two(n) else f"must be a power of two, not {n}"


def positive_problem(n: float) -> str | None:
    return None if 0 < n < float("inf") else f"must be above 0, not {n}"


def size_problem(n: object) -> str | None:
    """A number of bytes from 0 (none) to MAX_SIZE."""
    return None if type(n) is int and 0 <= n <= MAX_SIZE else f"must be a number of bytes from 0 to {MAX_SIZE}"


def pid_problem(pid: object) -> str | None:
    return None if type(pid) is int and pid > 0 else "must be a positive integer"
