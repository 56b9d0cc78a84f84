"""Container and pod identity from /proc/PID/cgroup, for every layout a cluster produces."""
from __future__ import annotations

import os

import pytest

from gpuwatch.core.procfs import container_of, read

CID = "4f3c2b1a" * 8
POD = "0b6a7f2e-91c4-4d38-a1e2-5f6b7c8d9e0f"


@pytest.mark.parametrize("cgroup, expected", [
    ("0::/user.slice/user-0.slice/session-1.scope\n", ("", "")),
    (f"0::/system.slice/docker-{CID}.scope\n", (CID, "")),
    (f"12:memory:/docker/{CID}\n11:cpu:/docker/{CID}\n", (CID, "")),
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}.slice/"
     f"cri-containerd-{CID}.scope\n", (CID, POD)),
    (f"0::/kubepods/besteffort/pod{POD}/{CID}\n", (CID, POD)),
    (f"0::/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/crio-{CID}.scope\n", (CID, POD)),
])
def test_container_and_pod_from_cgroup(cgroup, expected):
    assert container_of(cgroup) == expected


@pytest.mark.root
def test_this_process_reads_and_a_gone_one_is_none():
    me = read(os.getpid())
    assert me is not None and me.uid == os.getuid() and me.user == "root"
    assert read(2**22 + 12345) is None
