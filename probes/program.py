"""The BPF program as bcc compiles it: every probe file joined into one, and the flags it needs."""
from __future__ import annotations

import re
from pathlib import Path

from .symbols import BPF_SOURCES, generated_programs

BPF_DIR = Path(__file__).with_name("bpf")
EXIT_FORMAT = Path("/sys/kernel/tracing/events/sched/sched_process_exit/format")


def bpf_source() -> str:
    """All probe files as one program: bcc rewrites map calls only in the main file, not in headers."""
    include = re.compile(r'^#include "gpuwatch.h"$', re.M)
    parts = [(BPF_DIR / "gpuwatch.h").read_text()]
    parts += [include.sub("", (BPF_DIR / name).read_text()) for name in BPF_SOURCES]
    return "\n".join(parts) + generated_programs()


def cflags(ring_buffer_pages: int) -> list[str]:
    flags = ["-Wno-unused-function", f"-DGW_RING_PAGES={ring_buffer_pages}"]
    if EXIT_FORMAT.exists() and "group_dead" in EXIT_FORMAT.read_text():
        flags.append("-DGW_HAVE_GROUP_DEAD")
    return flags
