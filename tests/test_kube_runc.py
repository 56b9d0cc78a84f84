"""A real container: the device plugin's Allocate answer (over gRPC, as the kubelet gets it) turned into an OCI
runtime config the way containerd's CRI applies a device plugin's environment and mounts (bind mounts, rbind,
read-only where asked), run with `runc` on a Debian root filesystem made with `mmdebstrap`. Inside, the interposer
is where LD_PRELOAD says, the dynamic loader maps it into the container's programs, the daemon's socket is there,
and both mounts are read-only; with the mounted /etc/ld.so.preload a program whose environment was cleared still
gets the interposer.

With a real daemon (`[kubernetes] enabled`, a fake kubelet and a fake PodResources server that lists the
container), the container is made the way containerd makes a pod's container: its bundle where containerd keeps it
(under the daemon's `host_root`, its config.json carrying the CRI's annotations), its cgroup at a kubepods path, and
Allocate's answer from the daemon's own device plugin. Inside, the test-double driver and its client `cudaprog`
(bind-mounted, as the NVIDIA runtime mounts the driver) run under the injected interposer and get the quota the daemon
resolved from the kubelet: an allocation past it fails with CUDA_ERROR_OUT_OF_MEMORY, with Allocate's environment and
with the environment cleared (`env -i`, the mounted /etc/ld.so.preload then injecting the interposer).

The root filesystem (Debian bookworm, the `essential` variant: a shell and coreutils) is built once and kept as a
tar in /var/cache/gpuwatch-test-rootfs; each test unpacks its own copy."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from interposer_fixtures import IProg, driver_used
from kube_fixtures import (CONTAINERD_BUNDLES, FakeKubelet, FakePodResources, containerd_annotations, kube_daemon,
                           remove, remove_cgroup, short_dir, wait_for)

from conftest import Daemon
from gpuwatch.core.procfs import cgroup2_root
from gpuwatch.kube.allocate import Injection
from gpuwatch.kube.api import deviceplugin_pb2 as dp
from gpuwatch.kube.deviceplugin import DevicePlugins
from gpuwatch.kube.devices import GPU_RESOURCE, MEMORY_RESOURCE, GiB, GpuInfo

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


def bundle(directory: Path, tar: Path, answer: dp.ContainerAllocateResponse, args: list[str],
           env: dict[str, str] | None = None, mounts: list[dict] | None = None, cgroups_path: str | None = None,
           annotations: dict[str, str] | None = None) -> Path:
    """An OCI bundle: the root filesystem unpacked, read-only; the answer's environment and mounts applied, then
    `env` and `mounts` of the test's own; the container's cgroup at `cgroups_path` (runc's cgroupfs form, in every
    hierarchy: None, runc's default), and the runtime's `annotations` in its config.json."""
    rootfs = directory / "rootfs"
    rootfs.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(rootfs), "-xf", str(tar)], check=True)
    environment = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    environment += [f"{k}={v}" for k, v in sorted(answer.envs.items())]
    environment += [f"{k}={v}" for k, v in (env or {}).items()]
    binds = [{"destination": "/proc", "type": "proc", "source": "proc"},
             {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
             {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "ro"]},
             {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}]
    binds += [{"destination": m.container_path, "type": "bind", "source": m.host_path,
               "options": ["rbind", "rprivate", "ro" if m.read_only else "rw"]} for m in answer.mounts]
    binds += mounts or []
    linux: dict = {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
                   "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"]}
    if cgroups_path is not None:
        linux["cgroupsPath"] = cgroups_path
    config = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args, "env": environment,
                    "cwd": "/", "noNewPrivileges": True},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "pod",
        "mounts": binds,
        "linux": linux,
        "annotations": annotations or {},
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
    out = run_container(bundle(tmp_path / "bundle", rootfs_tar, answer, ["/bin/sh", "-c", INSIDE])).splitlines()
    assert out == ["LD_PRELOAD=/opt/gpuwatch/lib/libgpuwatch.so", "GPUWATCH_SOCKET=/run/gpuwatch/gpuwatch.sock",
                   f"NVIDIA_VISIBLE_DEVICES={GPU}", "lib: libgpuwatch.so", "preload file exists", "socket exists",
                   "interposer mapped", "library directory read-only", "socket directory read-only"], out


def test_the_mounted_ld_so_preload_keeps_the_interposer_in_a_cleared_environment(rootfs_tar, allocated, tmp_path):
    lib, run, plugin_dir = allocated
    answer = allocate(plugin_dir, lib, run, preload_file=True)
    assert (lib / "ld.so.preload").read_text() == "/opt/gpuwatch/lib/libgpuwatch.so\n"
    args = ["/bin/sh", "-c", INSIDE + "cat /etc/ld.so.preload\n"]
    out = run_container(bundle(tmp_path / "bundle", rootfs_tar, answer, args))
    lines = out.splitlines()
    assert "mapped with a cleared environment" in lines and "interposer mapped" in lines, out
    assert lines[-1] == "/opt/gpuwatch/lib/libgpuwatch.so", out
    assert "lib: ld.so.preload" in lines, out


# A pod's container as the daemon resolves it (test_kube_daemon.py's pod): the test-double driver's GPU, which the
# fake NVML shows too; its kubelet-assigned gpuwatch.io/memory is 1 GiB.
MiB = 1 << 20
POD_GPU = "GPU-66616b65-6375-6461-2d64-657630303030"  # the test-double driver's cuDeviceGetUuid: "fakecuda-dev0000"
UID = "0b6a7f2e-91c4-4d38-a1e2-5f6b7c8d9e0f"
CONTAINER_ID = "6c5b4a3f2e" + "2" * 54
NAMES = ("ml", "trainer-0", "main")  # namespace, pod, container
OUT_OF_MEMORY = 2  # CUDA_ERROR_OUT_OF_MEMORY
INSIDE_DRIVER, INSIDE_STATE = "/opt/fakecuda/libcuda.so.1", "/var/lib/fakecuda/state"
# The test double's own settings (a real driver needs none): one device, and the state file its processes share.
DRIVER_ENV = {"FAKECUDA_DEVICES": "1", "FAKECUDA_MEM_BYTES": str(8 * GiB), "FAKECUDA_SHARED_STATE": INSIDE_STATE}


class Container(IProg):
    """A container's process, run by `runc run` in the foreground and scripted like cudaprog: with no terminal its
    stdin and stdout are runc's own (the test's pipes). `pid` is the host's pid of the container's process."""

    timeout = 30.0

    def __init__(self, directory: Path, name: str, state: Path) -> None:
        self.runc, self.name, self.log = ["runc", "--root", str(state)], name, state / f"{name}.stderr"
        state.mkdir(exist_ok=True)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([*self.runc, "run", "--bundle", str(directory), name], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        self.page_ = None
        self.pid = 0

    def started(self) -> Container:
        """Once runc runs the container's process: its pid on the host."""
        self.pid = int(wait_for(self._running, 30, f"container {self.name} to run"))  # type: ignore[arg-type]
        return self

    def _running(self) -> int | None:
        r = subprocess.run([*self.runc, "state", self.name], capture_output=True, text=True, timeout=30)
        assert self.proc.poll() is None, f"runc exited ({self.proc.returncode}): {self.log.read_text()}"
        if r.returncode != 0:
            return None  # not created yet
        state = json.loads(r.stdout)
        assert state["status"] in ("created", "running"), state
        return state["pid"] if state["status"] == "running" else None

    def close(self) -> None:
        """Its stdin closed, cudaprog exits and runc with it (deleting the container); one that does not is
        deleted by force."""
        if self.page_ is not None:
            self.page_.close()
            self.page_ = None
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            subprocess.run([*self.runc, "delete", "--force", self.name], capture_output=True, timeout=30)
            self.proc.wait(timeout=10)
        self.proc.stdout.close()
        subprocess.run([*self.runc, "delete", "--force", self.name], capture_output=True, timeout=30)


@dataclass
class PodNode:
    """A node with the real daemon, and one pod container to run: where its bundle goes (containerd's directory
    under the daemon's host root), its cgroups (below `top`), the test double's shared state file."""
    daemon: Daemon
    kubelet: FakeKubelet
    work: Path
    host: Path
    top: str
    driver_state: Path
    fakecuda: Path
    containers: list[Container]

    def allocate(self) -> dp.ContainerAllocateResponse:
        """The daemon's own device plugin, asked as the kubelet asks it once registered: the memory device that
        PodResources lists for the container."""
        endpoints = {r.resource_name: r.endpoint for r in self.kubelet.registered(2)}
        ask = dp.AllocateRequest(container_requests=[dp.ContainerAllocateRequest(devices_ids=[f"{POD_GPU}-gib-0"])])
        return self.kubelet.plugin(endpoints[MEMORY_RESOURCE]).Allocate(ask, timeout=5).container_responses[0]

    def run(self, tar: Path, answer: dp.ContainerAllocateResponse, args: list[str], cgroup: str) -> Container:
        """The container started as containerd starts a pod's container: its bundle and config.json (with the CRI's
        annotations) in containerd's directory, named by its ID, in the cgroup `cgroup` (below `top`); the driver
        bind-mounted read-only as the NVIDIA runtime mounts it, and the driver's shared state file read-write."""
        directory = self.host / CONTAINERD_BUNDLES / CONTAINER_ID
        mounts = [{"destination": "/opt/fakecuda", "type": "bind", "source": str(self.fakecuda),
                   "options": ["rbind", "rprivate", "ro"]},
                  {"destination": INSIDE_STATE, "type": "bind", "source": str(self.driver_state),
                   "options": ["bind", "rprivate", "rw"]}]
        bundle(directory, tar, answer, args, DRIVER_ENV, mounts, self.top + cgroup,
               containerd_annotations(*NAMES[:2], NAMES[2], UID))
        container = Container(directory, CONTAINER_ID, self.work / "runc")
        self.containers.append(container)
        return container.started()

    def quota_groups(self) -> list[dict]:
        """`quota list --json`, without the groups' numbers (the daemon's own)."""
        groups = json.loads(self.daemon.cli("quota", "list", "--json").stdout)
        return [{k: v for k, v in g.items() if k != "group"} for g in groups]


@pytest.fixture
def pod_node(rootfs_tar: Path, fakecuda: Path, interposer: Path, sole_daemon_slot: None
             ) -> Iterator[Callable[[bool], PodNode]]:
    """start(preload_file): the daemon, the fake kubelet and PodResources listing the container with its memory."""
    if cgroup2_root() is None:
        pytest.skip("needs a cgroup v2 hierarchy: the daemon's container quotas are cgroup v2 quotas")
    nodes: list[PodNode] = []
    kubelets: list[tuple[FakeKubelet, FakePodResources, Path, Path]] = []

    def start(preload_file: bool) -> PodNode:
        sockets, work = short_dir("gwk-rd-"), Path(tempfile.mkdtemp(prefix="gwk-runc-"))
        work.chmod(0o755)
        lib = work / "lib"  # as the DaemonSet's init container fills it
        lib.mkdir()
        shutil.copy2(interposer, lib / "libgpuwatch.so")
        kubelet, pod_resources = FakeKubelet(sockets), FakePodResources(sockets / "pr.sock")
        pod_resources.pods = [(NAMES[0], NAMES[1], [
            (NAMES[2], {MEMORY_RESOURCE: [f"{POD_GPU}-gib-0"], GPU_RESOURCE: [f"{POD_GPU}-share-0"]})])]
        kubelets.append((kubelet, pod_resources, sockets, work))
        daemon = kube_daemon(work, sockets, work / "host", lib, [(POD_GPU, 8 * GiB)], preload_file)
        state = work / "fakecuda-state"
        state.touch()
        nodes.append(PodNode(daemon, kubelet, work, work / "host", f"/gpuwatch-test-{uuid.uuid4().hex[:8]}", state,
                             fakecuda, []))
        return nodes[-1]

    yield start
    for node in nodes:
        for container in node.containers:
            container.close()
            print(container.log.read_text()[-2000:])  # shown with a failure
        node.daemon.stop()
        print(node.daemon.log.read_text()[-4000:])
        remove_cgroup(node.top)
    for kubelet, pod_resources, sockets, work in kubelets:
        kubelet.stop()
        pod_resources.stop()
        remove(sockets)
        remove(work)


def environment(pid: int) -> list[str]:
    return sorted(Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")[:-1])


def held_to_its_quota(node: PodNode, c: Container, cgroup: str) -> None:
    """cudaprog in the container, under the interposer, gets the container's 1 GiB from the daemon: an allocation
    below it runs, one past it fails with the driver's out-of-memory answer; the host's `ps` and `quota list` show
    the process in its pod's container and the container's cgroup quota."""
    assert c.send(f"load {INSIDE_DRIVER}") == "ok"
    # the probes on the driver the container mapped (the same file, seen through the container's root): what the
    # process allocates before they attach, they do not count
    wait_for(lambda: node.daemon.watching(node.fakecuda / "libcuda.so.1"), 10, "the daemon to watch the driver")
    assert c.send("ctx 0") == "ok"
    assert "/opt/gpuwatch/lib/libgpuwatch.so" in Path(f"/proc/{c.pid}/maps").read_text()
    wait_for(lambda: any(r["interposed"] for r in node.daemon.ps(c.pid)), 10, "the interposer to attach")
    wait_for(lambda: c.page.device(0)["quota"] == GiB, 10, "the container's quota in its interposer")
    assert c.send("info") == f"ok {GiB} {GiB}"  # cuMemGetInfo under the interposer: the quota is the total
    assert c.send("alloc a 768M") == "ok"
    assert c.send("alloc b 512M") == f"err {OUT_OF_MEMORY}"  # 768 + 512 MiB > 1 GiB
    assert c.send("info") == f"ok {256 * MiB} {GiB}"
    assert driver_used(node.driver_state) == 768 * MiB  # the refused allocation never reached the driver
    row = node.daemon.row(c.pid)
    assert (row["namespace"], row["pod"], row["container"], row["interposed"], row["quota_bytes"],
            row["gpu_uuid"]) == (*NAMES, True, GiB, POD_GPU), row
    # `quota list`: the container's cgroup quota, which holds its processes that are not interposed, and this
    # process's own backstop (its quota and 64 MiB: the probes stop it there should it escape its interposer),
    # holding what it allocated
    expected = [{"pid": None, "cgroup": node.top + cgroup, "bytes": GiB, "action": "pause", "members": [], "held": {}},
                {"pid": c.pid, "cgroup": None, "bytes": GiB + 64 * MiB, "action": "pause", "members": [c.pid],
                 "held": {"0": 768 * MiB}}]
    try:
        wait_for(lambda: node.quota_groups() == expected, 10, "the quotas")
    except AssertionError:
        raise AssertionError(f"quota list: {node.quota_groups()}, not {expected}") from None


def test_a_program_in_a_container_gets_the_quota_the_daemon_resolved(rootfs_tar, pod_node):
    node = pod_node(False)
    answer = node.allocate()
    cgroup = f"/kubepods/burstable/pod{UID}/{CONTAINER_ID}"  # the kubelet's cgroupfs driver
    c = node.run(rootfs_tar, answer, ["/opt/fakecuda/cudaprog"], cgroup)
    assert f"0::{node.top}{cgroup}" in Path(f"/proc/{c.pid}/cgroup").read_text().splitlines()
    held_to_its_quota(node, c, cgroup)
    # Allocate's environment, the test double's own settings, and the HOME that runc adds
    assert environment(c.pid) == sorted([
        "GPUWATCH_SOCKET=/run/gpuwatch/gpuwatch.sock", "HOME=/root", "LD_PRELOAD=/opt/gpuwatch/lib/libgpuwatch.so",
        f"NVIDIA_VISIBLE_DEVICES={POD_GPU}", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        *(f"{k}={v}" for k, v in DRIVER_ENV.items())])


def test_a_program_whose_environment_was_cleared_gets_its_quota_through_ld_so_preload(rootfs_tar, pod_node):
    node = pod_node(True)
    answer = node.allocate()
    assert "/etc/ld.so.preload" in {m.container_path for m in answer.mounts}
    cgroup = (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
              f"cri-containerd-{CONTAINER_ID}.scope")  # the kubelet's systemd driver's names
    cleared = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in DRIVER_ENV.items()), "/opt/fakecuda/cudaprog"]
    c = node.run(rootfs_tar, answer, cleared, cgroup)
    assert f"0::{node.top}{cgroup}" in Path(f"/proc/{c.pid}/cgroup").read_text().splitlines()
    held_to_its_quota(node, c, cgroup)
    # cudaprog answered, so env has exec'd it: nothing of Allocate's environment is left, no LD_PRELOAD, no socket
    assert environment(c.pid) == sorted(f"{k}={v}" for k, v in DRIVER_ENV.items())
