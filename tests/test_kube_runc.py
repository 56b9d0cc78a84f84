"""A real container: the device plugin's Allocate answer (over gRPC, as the kubelet gets it) turned into an OCI
runtime config the way containerd's CRI applies a device plugin's environment and mounts (bind mounts, rbind,
read-only where asked), run with `runc` on a Debian root filesystem made with `mmdebstrap`. Inside, the interposer
is where LD_PRELOAD says, the dynamic loader maps it into the container's programs, the daemon's socket is there,
and both mounts are read-only; with the mounted /etc/ld.so.preload a program whose environment was cleared still
gets the interposer.

The root filesystem (Debian bookworm, the `essential` variant: a shell and coreutils) is built once and kept as a
tar in /var/cache/gpuwatch-test-rootfs; each test unpacks its own copy."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kube_fixtures import FakeKubelet, remove, short_dir

from gpuwatch.kube.allocate import Injection
from gpuwatch.kube.api import deviceplugin_pb2 as dp
from gpuwatch.kube.deviceplugin import DevicePlugins
from gpuwatch.kube.devices import GiB, GpuInfo

CACHE = Path("/var/cache/gpuwatch-test-rootfs")
ROOTFS_TAR = CACHE / "bookworm-essential.tar"
MIRROR = "http://deb.debian.org/debian"
GPU = "GPU-aaaaaaaa-1111-2222-3333-444444444444"

pytestmark = pytest.mark.root


@pytest.fixture(scope="session")
def rootfs_tar() -> Path:
    if os.geteuid() != 0:
        pytest.skip("runc and mmdebstrap need root")
    for tool in ("runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian's package {tool}; ./install.sh --test installs it)")
    if not ROOTFS_TAR.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = ROOTFS_TAR.with_suffix(".partial")
        r = subprocess.run(["mmdebstrap", "--variant=essential", "--mode=root", "--format=tar", "bookworm",
                            str(partial), MIRROR], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            partial.unlink(missing_ok=True)
            last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            pytest.skip(f"mmdebstrap could not build a Debian root filesystem from {MIRROR} (no mirror reachable?): "
                        f"{last}")
        partial.rename(ROOTFS_TAR)
    return ROOTFS_TAR


@pytest.fixture
def allocated(interposer: Path, tmp_path) -> Iterator[tuple[Path, Path, Path]]:
    """The host's side: the interposer directory (as the init container fills it), the daemon's socket directory
    with a listening socket in it, and a fake kubelet's device-plugins directory."""
    lib, run = tmp_path / "gpuwatch-lib", tmp_path / "run-gpuwatch"
    lib.mkdir()
    run.mkdir()
    shutil.copy2(interposer, lib / "libgpuwatch.so")
    daemon = socket.socket(socket.AF_UNIX)
    daemon.bind(str(run / "gpuwatch.sock"))
    daemon.listen()
    plugin_dir = short_dir("gwk-runc-")
    try:
        yield lib, run, plugin_dir
    finally:
        daemon.close()
        remove(plugin_dir)


def allocate(plugin_dir: Path, lib: Path, run: Path, preload_file: bool) -> dp.ContainerAllocateResponse:
    """Allocate over gRPC, as the kubelet asks a registered plugin."""
    kubelet = FakeKubelet(plugin_dir)
    plugins = DevicePlugins(str(plugin_dir), Injection(str(lib), str(run / "gpuwatch.sock"), preload_file=preload_file),
                            [GpuInfo(GPU, 4 * GiB)], 10, poll_s=0.1)
    plugins.start()
    try:
        kubelet.registered(2)
        ask = dp.AllocateRequest(container_requests=[dp.ContainerAllocateRequest(devices_ids=[f"{GPU}-gib-0"])])
        return kubelet.plugin("gpuwatch-memory.sock").Allocate(ask, timeout=5).container_responses[0]
    finally:
        plugins.stop()
        kubelet.stop()


def bundle(directory: Path, tar: Path, answer: dp.ContainerAllocateResponse, script: str) -> Path:
    """An OCI bundle: the root filesystem unpacked, read-only; the answer's environment and mounts applied."""
    rootfs = directory / "rootfs"
    rootfs.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(rootfs), "-xf", str(tar)], check=True)
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    env += [f"{k}={v}" for k, v in sorted(answer.envs.items())]
    mounts = [{"destination": "/proc", "type": "proc", "source": "proc"},
              {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
              {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "ro"]},
              {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}]
    mounts += [{"destination": m.container_path, "type": "bind", "source": m.host_path,
                "options": ["rbind", "rprivate", "ro" if m.read_only else "rw"]} for m in answer.mounts]
    config = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": ["/bin/sh", "-c", script], "env": env,
                    "cwd": "/", "noNewPrivileges": True},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "pod",
        "mounts": mounts,
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
                  "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"]},
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def run_container(directory: Path) -> str:
    name = f"gwk-{os.getpid()}-{directory.name}"
    r = subprocess.run(["runc", "--root", str(directory / "state"), "run", "--bundle", str(directory), name],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"runc failed ({r.returncode}): {r.stderr}\n{r.stdout}"
    return r.stdout


INSIDE = """
echo "LD_PRELOAD=$LD_PRELOAD"
echo "GPUWATCH_SOCKET=$GPUWATCH_SOCKET"
echo "NVIDIA_VISIBLE_DEVICES=$NVIDIA_VISIBLE_DEVICES"
ls /opt/gpuwatch/lib | sed 's/^/lib: /'
[ -f "$LD_PRELOAD" ] && echo "preload file exists"
[ -S "$GPUWATCH_SOCKET" ] && echo "socket exists"
grep -q "$LD_PRELOAD" /proc/self/maps && echo "interposer mapped"
touch /opt/gpuwatch/lib/x 2>/dev/null || echo "library directory read-only"
touch /run/gpuwatch/x 2>/dev/null || echo "socket directory read-only"
env -i /usr/bin/grep -q libgpuwatch.so /proc/self/maps && echo "mapped with a cleared environment"
true
"""


def test_a_container_made_from_allocate_runs_under_the_interposer(rootfs_tar, allocated, tmp_path):
    lib, run, plugin_dir = allocated
    answer = allocate(plugin_dir, lib, run, preload_file=False)
    out = run_container(bundle(tmp_path / "bundle", rootfs_tar, answer, INSIDE)).splitlines()
    assert out == ["LD_PRELOAD=/opt/gpuwatch/lib/libgpuwatch.so", "GPUWATCH_SOCKET=/run/gpuwatch/gpuwatch.sock",
                   f"NVIDIA_VISIBLE_DEVICES={GPU}", "lib: libgpuwatch.so", "preload file exists", "socket exists",
                   "interposer mapped", "library directory read-only", "socket directory read-only"], out


def test_the_mounted_ld_so_preload_keeps_the_interposer_in_a_cleared_environment(rootfs_tar, allocated, tmp_path):
    lib, run, plugin_dir = allocated
    answer = allocate(plugin_dir, lib, run, preload_file=True)
    assert (lib / "ld.so.preload").read_text() == "/opt/gpuwatch/lib/libgpuwatch.so\n"
    out = run_container(bundle(tmp_path / "bundle", rootfs_tar, answer, INSIDE + "cat /etc/ld.so.preload\n"))
    lines = out.splitlines()
    assert "mapped with a cleared environment" in lines and "interposer mapped" in lines, out
    assert lines[-1] == "/opt/gpuwatch/lib/libgpuwatch.so", out
    assert "lib: ld.so.preload" in lines, out
