"""What the host must offer before probes can load; each failure is one line saying what to do."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

CAP_PERFMON, CAP_BPF, CAP_SYS_ADMIN = 38, 39, 21
TRACEFS = "/sys/kernel/tracing"


class PreflightError(RuntimeError):
    pass


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    if os.geteuid() == 0:
        return
    caps = _effective_caps()
    if not (caps >> CAP_SYS_ADMIN & 1 or (caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1)):
        raise PreflightError("gpuwatch run needs root (or CAP_BPF and CAP_PERFMON): run it with sudo")


def check_kernel(root: Path = Path("/")) -> None:
    release = platform.release()
    if not (root / "sys/bus/event_source/devices/uprobe").exists():
        raise PreflightError(f"kernel {release} has no uprobe support: use a kernel built with CONFIG_UPROBE_EVENTS=y")
    if not (root / "sys/kernel/btf/vmlinux").exists():
        raise PreflightError(f"kernel {release} has no BTF (/sys/kernel/btf/vmlinux): use a kernel built with "
                             "CONFIG_DEBUG_INFO_BTF=y")
    if not (root / f"lib/modules/{release}/build").exists() and not (root / "sys/kernel/kheaders.tar.xz").exists():
        raise PreflightError(f"no kernel headers for {release}: run ./install.sh, or apt-get install "
                             f"linux-headers-{release}")


def mount_tracefs() -> None:
    """bcc detaches uprobes through tracefs; mount it when it is not."""
    if os.path.ismount(TRACEFS):
        return
    result = subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], capture_output=True, text=True)
    if result.returncode != 0:
        raise PreflightError(f"tracefs is not mounted and mounting it failed ({result.stderr.strip()}): "
                             f"mount -t tracefs nodev {TRACEFS}")


def import_bcc():
    try:
        import bcc
    except ImportError:
        raise PreflightError("bcc is not importable: run ./install.sh, or apt-get install python3-bpfcc and use "
                             "the system python3") from None
    return bcc


def check_all():
    check_privileges()
    check_kernel()
    mount_tracefs()
    return import_bcc()
