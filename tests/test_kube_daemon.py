"""The daemon gives a Kubernetes container the quota the kubelet assigned it: a real daemon with `[kubernetes]
enabled`, a fake kubelet (Registration) and a fake PodResources server on unix sockets, the fake NVML, and test
programs (the test-double driver, one plain and one under the interposer) exec'd inside cgroup v2 directories named
as the kubelet and containerd name a pod's containers. The quota counts each process's CUDA context: NVML's bytes
for the process less what the probes saw it allocate (set here with the fake NVML's `proc` lines)."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from interposer_fixtures import IProg
from kube_fixtures import FakeKubelet, FakePodResources, remove, short_dir, wait_for

from conftest import GPUWATCH, ROOT, Daemon, Prog, environment
from gpuwatch.core.procfs import cgroup2_root
from gpuwatch.kube.devices import GPU_RESOURCE, MEMORY_RESOURCE

MiB, GiB = 1 << 20, 1 << 30
GPU = "GPU-66616b65-6375-6461-2d64-657630303030"  # the test-double driver's cuDeviceGetUuid: "fakecuda-dev0000"
UID = "0b6a7f2e-91c4-4d38-a1e2-5f6b7c8d9e0f"
MAIN, WORKER = "4f3c2b1a9e" + "0" * 54, "5a4d3c2b1f" + "1" * 54
CONTAINERS = {MAIN: "main", WORKER: "worker"}
OUT_OF_MEMORY = 2  # CUDA_ERROR_OUT_OF_MEMORY


@dataclass
class Node:
    daemon: Daemon
    nvml_state: Path
    leaves: dict[str, Path]   # container ID -> its cgroup directory
    cgroups: dict[str, str]   # container ID -> its cgroup path as /proc/PID/cgroup shows it

    def set_nvml(self, procs: dict[int, int]) -> None:
        """The fake NVML's GPU and, per process, the bytes it shows that process hold."""
        lines = [f"gpu 0 {GPU} {8 * GiB} 0 Fake GPU"] + [f"proc {pid} 0 {used}" for pid, used in procs.items()]
        tmp = self.nvml_state.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.rename(self.nvml_state)

    def quota_groups(self) -> list[dict]:
        return json.loads(self.daemon.cli("quota", "list", "--json").stdout)


def runtime_record(root: Path, container_id: str, name: str) -> None:
    """containerd's config.json of a pod's container (kube/runtime.py reads it under the host's root)."""
    where = root / f"run/containerd/io.containerd.runtime.v2.task/k8s.io/{container_id}/config.json"
    where.parent.mkdir(parents=True)
    where.write_text(json.dumps({"ociVersion": "1.1.0", "annotations": {
        "io.kubernetes.cri.sandbox-namespace": "ml", "io.kubernetes.cri.sandbox-name": "trainer-0",
        "io.kubernetes.cri.container-name": name, "io.kubernetes.cri.sandbox-uid": UID,
        "io.kubernetes.cri.container-type": "container"}}))


@pytest.fixture
def node(fakecuda: Path, sole_daemon_slot: None) -> Iterator[Node]:
    root = cgroup2_root()
    if root is None or os.geteuid() != 0:
        pytest.skip("needs root and a cgroup v2 hierarchy to make a pod's cgroups")
    top = root / f"gpuwatch-test-{uuid.uuid4().hex[:8]}"
    pod = top / "kubepods.slice/kubepods-burstable.slice" / f"kubepods-burstable-pod{UID.replace('-', '_')}.slice"
    leaves = {cid: pod / f"cri-containerd-{cid}.scope" for cid in CONTAINERS}
    for leaf in leaves.values():
        leaf.mkdir(parents=True)
    sockets = short_dir("gwk-d-")
    work = Path(tempfile.mkdtemp(prefix="gwk-daemon-"))
    work.chmod(0o755)
    host = work / "host"
    for cid, name in CONTAINERS.items():
        runtime_record(host, cid, name)
    nvml = work / "fakenvml"
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "fakenvml"), f"OUT={nvml}"], check=True)
    kubelet, pod_resources = FakeKubelet(sockets), FakePodResources(sockets / "pr.sock")
    pod_resources.pods = [("ml", "trainer-0", [
        ("main", {MEMORY_RESOURCE: [f"{GPU}-gib-0"], GPU_RESOURCE: [f"{GPU}-share-0"]}),
        ("worker", {MEMORY_RESOURCE: [f"{GPU}-gib-1"], GPU_RESOURCE: [f"{GPU}-share-1"]})])]
    config = work / "gpuwatch.toml"
    config.write_text(f"[scheduler]\nenabled = false\ncontext_mib = 0\n\n[kubernetes]\nenabled = true\n"
                      f"plugin_dir = \"{sockets}\"\npod_resources_socket = \"{sockets / 'pr.sock'}\"\n"
                      f"interposer_host_dir = \"{work / 'lib'}\"\nhost_root = \"{host}\"\napi_priorities = false\n")
    state = nvml / "state"
    with environment({"LD_LIBRARY_PATH": str(nvml), "FAKENVML_STATE": str(state)}):
        cgroups = {cid: "/" + str(leaf.relative_to(root)) for cid, leaf in leaves.items()}
        n = Node(None, state, leaves, cgroups)  # type: ignore[arg-type]
        n.set_nvml({})
        n.daemon = Daemon(work, "--config", str(config), nvml=True)
    try:
        yield n
    finally:
        n.daemon.stop()
        print(n.daemon.log.read_text()[-4000:])  # shown with a failure
        kubelet.stop()
        pod_resources.stop()
        remove(sockets)
        for leaf in leaves.values():
            for pid in (leaf / "cgroup.procs").read_text().split():
                try:
                    (root / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
        for d in sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)) + [top]:
            wait_for(lambda: not d.exists() or _rmdir(d), 5, f"cgroup {d} to be removed")
        remove(work)


def _rmdir(d: Path) -> bool:
    try:
        d.rmdir()
        return True
    except OSError:
        return False


def in_container(leaf: Path, program: Path) -> list[str]:
    """The program exec'd once its shell is in the container's cgroup: the daemon sees it start there."""
    return ["sh", "-c", f'echo $$ > "{leaf}/cgroup.procs" && exec "{program}"']


def driver_env() -> dict[str, str]:
    return {"FAKECUDA_MEM_BYTES": str(8 * GiB), "FAKECUDA_DEVICES": "1"}


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def ready(p: Prog, reply_timeout: float = 0.5) -> str | None:
    """The pending reply of a program, if one came."""
    import select
    assert p.proc.stdout
    if not select.select([p.proc.stdout], [], [], reply_timeout)[0]:
        return None
    return p.proc.stdout.readline().strip()


def test_a_plain_process_in_a_container_is_held_to_its_quota_with_its_context(node, fakecuda):
    p = Prog(in_container(node.leaves[MAIN], fakecuda / "cudaprog"), driver_env())
    try:
        p.ok(f"load {fakecuda / 'libcuda.so.1'}")
        wait_for(lambda: node.daemon.watching(fakecuda / "libcuda.so.1"), 10, "the daemon to watch the driver")
        p.ok("ctx 0")
        group = wait_for(lambda: next((g for g in node.quota_groups() if g["cgroup"] == node.cgroups[MAIN]), None),
                         10, "the container's cgroup quota")
        assert (group["bytes"], group["action"]) == (1 * GiB, "pause")
        p.ok("alloc a 512M")
        wait_for(lambda: p.pid in next(g for g in node.quota_groups() if g["cgroup"] == node.cgroups[MAIN])["members"],
                 10, "the process in its container's group")
        row = node.daemon.row(p.pid)
        assert (row["namespace"], row["pod"], row["container"], row["quota_bytes"]) == \
            ("ml", "trainer-0", "main", 1 * GiB)
        node.set_nvml({p.pid: 812 * MiB})  # 512 MiB allocated, a context of 300 MiB
        held = lambda: next(g for g in node.quota_groups() if g["cgroup"] == node.cgroups[MAIN])["held"]  # noqa: E731
        wait_for(lambda: held() == {"0": 812 * MiB}, 10, "the context counted in the container's quota")
        assert node.daemon.row(p.pid)["untracked_bytes"] == 300 * MiB
        p.proc.stdin.write("alloc b 300M\n")  # 512 + 300 + 300 MiB > 1 GiB: stopped before it runs
        p.proc.stdin.flush()
        wait_for(lambda: state(p.pid) == "T", 10, "the quota to stop the process")
        assert ready(p) is None
        node.set_nvml({p.pid: 612 * MiB})  # the context shrank to 100 MiB: 912 MiB fit
        assert (ready(p, 10) or "").startswith("ok"), "continued once its allocation fits with its context"
        wait_for(lambda: held() == {"0": 912 * MiB}, 10, "the allocation and the new context counted")
    finally:
        p.close()


def test_an_interposed_process_in_a_container_gets_its_quota_less_its_context(node, fakecuda, interposer):
    env = {**driver_env(), "LD_PRELOAD": str(interposer), "GPUWATCH_SOCKET": node.daemon.socket}
    p = IProg(in_container(node.leaves[WORKER], fakecuda / "cudaprog"), env)
    p.timeout = 30
    try:
        p.ok(f"load {fakecuda / 'libcuda.so.1'}")
        wait_for(lambda: node.daemon.watching(fakecuda / "libcuda.so.1"), 10, "the daemon to watch the driver")
        p.ok("ctx 0")
        wait_for(lambda: any(r["interposed"] for r in node.daemon.ps(p.pid)), 10, "the interposer to attach")
        wait_for(lambda: p.page.device(0)["quota"] == 1 * GiB, 10, "the container's quota in its interposer")
        p.ok("alloc a 512M")
        row = node.daemon.row(p.pid)
        assert (row["namespace"], row["pod"], row["container"]) == ("ml", "trainer-0", "worker")
        node.set_nvml({p.pid: 712 * MiB})  # 512 MiB allocated, a context of 200 MiB
        wait_for(lambda: p.page.device(0)["quota"] == 824 * MiB, 10, "the quota less the context in its interposer")
        assert node.daemon.row(p.pid)["quota_bytes"] == GiB  # `ps` shows the quota, the context within it
        assert p.err("alloc b 400M") == OUT_OF_MEMORY  # 512 + 200 + 400 MiB > 1 GiB
        p.ok("alloc c 300M")  # 512 + 200 + 300 MiB fit
        assert p.page.device(0)["used"] == 812 * MiB
    finally:
        p.close()


def test_without_kubernetes_the_labels_are_empty(daemon, progs):
    p = progs()
    p.ok("alloc a 1M")
    row = daemon.row(p.pid)
    assert (row["namespace"], row["pod"], row["container"]) == ("", "", "")


def test_kubernetes_without_a_usable_grpcio_is_one_line_naming_it(tmp_path):
    """The H200's PyTorch environment had grpcio 1.84.0, older than the generated stubs accept."""
    fake = tmp_path / "site" / "grpc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("The grpc package installed is at version 1.84.0, but the '
                                      'generated code depends on grpcio>=1.85.1.")\n')
    config = tmp_path / "gpuwatch.toml"
    config.write_text("[kubernetes]\nenabled = true\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "site"),
                                                                     os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([*GPUWATCH, "--socket", str(tmp_path / "gw.sock"), "run", "--config", str(config),
                        "--no-metrics"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "[kubernetes] needs grpcio" in r.stderr and "1.84.0" in r.stderr and "enabled = false" in r.stderr
