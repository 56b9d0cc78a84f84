"""A host that cannot run the probes gets one line naming what to install."""
from __future__ import annotations

import platform
import sys

import pytest

from gpuwatch.probes import preflight
from gpuwatch.probes.preflight import PreflightError


def fake_root(tmp_path, *present: str):
    for rel in present:
        path = tmp_path / rel.format(release=platform.release())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return tmp_path


UPROBE, BTF, HEADERS = "sys/bus/event_source/devices/uprobe", "sys/kernel/btf/vmlinux", "lib/modules/{release}/build"


@pytest.mark.parametrize("present, message", [
    ((BTF, HEADERS), "has no uprobe support: use a kernel built with CONFIG_UPROBE_EVENTS=y"),
    ((UPROBE, HEADERS), "has no BTF (/sys/kernel/btf/vmlinux): use a kernel built with CONFIG_DEBUG_INFO_BTF=y"),
    ((UPROBE, BTF), "run ./install.sh, or apt-get install linux-headers-"),
])
def test_missing_kernel_feature_is_named(tmp_path, present, message):
    with pytest.raises(PreflightError) as err:
        preflight.check_kernel(fake_root(tmp_path, *present))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_complete_kernel_passes(tmp_path):
    preflight.check_kernel(fake_root(tmp_path, UPROBE, BTF, HEADERS))
    preflight.check_kernel()  # this machine


def test_missing_bcc_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bcc", None)  # makes `import bcc` raise ImportError
    with pytest.raises(PreflightError,
                       match=r"bcc is not importable: run ./install.sh, or apt-get install python3-bpfcc"):
        preflight.import_bcc()
