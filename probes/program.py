"""The BPF program as bcc compiles it: every probe file joined into one, and the flags it needs."""
from __future__ import annotations

import re
from pathlib import Path

from .symbols import BPF_SOURCES, generated_programs

BPF_DIR = Path(__file__).with_name("bpf")
EXIT_FORMAT = Path("/sys/kernel/tracing/events/sched/sched_process_exit/format")
LOCAL_INCLUDE = re.compile(r'^#include "([^"]+)"[ \t]*\n', re.M)  # our headers; <...> ones stay for bcc


def _headers_in_order() -> list[str]:
    """Every header the probe files include, directly or through another header, each after the
    headers it includes: the order bcc must see them in once they are one text."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"probes/bpf: {name} includes itself")
        visiting.add(name)
        for included in LOCAL_INCLUDE.findall((BPF_DIR / name).read_text()):
            visit(included)
        visiting.discard(name)
        order.append(name)

    for source in BPF_SOURCES:
        for included in LOCAL_INCLUDE.findall((BPF_DIR / source).read_text()):
            visit(included)
    return order


def bpf_source() -> str:
    """All probe files as one program: bcc rewrites map calls only in the main file, not in headers, so
    the headers come first, in dependency order, and every file loses its #include "..." lines."""
    parts = [f"/* ---- probes/bpf/{name} */\n" + LOCAL_INCLUDE.sub("", (BPF_DIR / name).read_text())
             for name in [*_headers_in_order(), *BPF_SOURCES]]
    return "\n".join(parts) + generated_programs()


def print_program() -> str:
    """The whole program text bcc compiles, generated dispatcher and wrappers included (`run --ebpf`)."""
    return bpf_source()


def cflags(ring_buffer_pages: int) -> list[str]:
    flags = ["-Wno-unused-function", f"-DGW_RING_PAGES={ring_buffer_pages}"]
    if EXIT_FORMAT.exists() and "group_dead" in EXIT_FORMAT.read_text():
        flags.append("-DGW_HAVE_GROUP_DEAD")
    return flags
