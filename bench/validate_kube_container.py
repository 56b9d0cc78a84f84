"""Issue 15 on a GPU machine: a pod's container, made from the daemon's own Allocate answer and run with runc, holds a
CUDA program to its `gpuwatch.io/memory`, context included. No cluster: a fake kubelet and a fake PodResources
server (tests/kube_fixtures.py) stand for the kubelet, as in tests/test_kube_runc.py; the driver, NVML, the GPU and
the program are real. As root, from the repository root:

    bash bench/pack-runc.sh                  # here, once: runc and libseccomp into .runc (Debian's)
    # on the GPU machine, carry [".bcc", ".runc"]:
    source .bcc/env.sh && source bench/gw-env.sh && make -s -C interposer && python3 bench/validate_kube_container.py

The container's root is the host's own /usr and /opt's folders bound read-only and a copy of /etc (the host's
Python and PyTorch, and the driver's libraries, as the NVIDIA runtime would mount them), the GPU's device nodes
bound in. Inside, PyTorch asks cudaMemGetInfo and allocates 256 MiB blocks, each filled and checked, until it is
refused. Twice: with Allocate's environment, and with the environment cleared (`env -i`, the mounted
/etc/ld.so.preload injecting the interposer). Checks: inside, the total is the quota and the refusal is CUDA's
out-of-memory; NVML shows the container's process holding no more than its quota (its context included); the
host's `gpuwatch ps` names its namespace, pod and container, with the quota. Writes $OUT/kube_container.json."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]
from kube_fixtures import (CONTAINERD_BUNDLES, FakeKubelet, FakePodResources, containerd_annotations,  # noqa: E402
                           remove, remove_cgroup, short_dir, wait_for)

from gpuwatch.kube.api import deviceplugin_pb2 as dp  # noqa: E402
from gpuwatch.kube.devices import GPU_RESOURCE, MEMORY_RESOURCE  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"))
GiB, MiB = 1 << 30, 1 << 20
QUOTA_GIB = int(os.environ.get("GW_KUBE_QUOTA_GIB", "4"))
NAMES, UID = ("ml", "trainer-0", "main"), "0b6a7f2e-91c4-4d38-a1e2-5f6b7c8d9e0f"
CONTAINER_ID = "7d6c5b4a3f" + "3" * 54
PACKED = ROOT / ".runc" / "runc.gz"  # bench/pack-runc.sh
GPUWATCH = [sys.executable, "-P", "-m", "gpuwatch.client.cli"]
INSIDE = """
import json, torch
free, total = torch.cuda.mem_get_info()
blocks, error = [], None
try:
    while len(blocks) < 4 * 1024:
        b = torch.full(((256 << 20) // 4,), float(len(blocks)), device="cuda")
        blocks.append(b)
except torch.OutOfMemoryError as exc:
    error = str(exc).splitlines()[0]
# checked in host memory: at the limit the device has no room for a comparison's temporaries
b = None
n, last = len(blocks), blocks.pop().cpu() if blocks else None
intact = n > 0 and bool((last == float(n - 1)).all()) and \
    all(bool((b.cpu() == float(i)).all()) for i, b in enumerate(blocks))
print("RESULT " + json.dumps({"total": total, "free_at_start": free, "blocks": n, "error": error,
                              "intact": intact}), flush=True)
input()  # held until the host has looked
"""


def unpacked_runc() -> list[str]:
    if not PACKED.exists():
        return ["runc"]
    target = Path("/tmp/gw-runc/runc")
    target.parent.mkdir(exist_ok=True)
    with gzip.open(PACKED) as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    target.chmod(0o755)
    return [str(target)]


RUNC = unpacked_runc()


def runc(*args: str, **kw: Any) -> subprocess.CompletedProcess:
    env = {**os.environ, "LD_LIBRARY_PATH": str(ROOT / ".runc")}
    return subprocess.run([*RUNC, *args], capture_output=True, text=True, timeout=60, env=env, **kw)


def gpu0() -> str:
    import pynvml
    pynvml.nvmlInit()
    uuid_ = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(0))
    return uuid_.decode() if isinstance(uuid_, bytes) else uuid_


def nvml_bytes(pid: int) -> int | None:
    import pynvml
    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(0)):
        if p.pid == pid:
            return int(p.usedGpuMemory)
    return None


def config(bundle: Path, answer: dp.ContainerAllocateResponse, args: list[str], cgroup: str) -> None:
    """The OCI config containerd's CRI would write: the host's system read-only as the root's content, the GPU's
    device nodes, Allocate's environment and mounts, the CRI's annotations, the pod's cgroup."""
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True)
    binds = [{"destination": "/proc", "type": "proc", "source": "proc"},
             {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
             {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "ro"]},
             {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}]
    # /etc: a copy, so that the mounted /etc/ld.so.preload finds its mount point (a host without that file
    # has none, and a read-only bind of /etc cannot take one)
    subprocess.run(["cp", "-a", "/etc", str(rootfs / "etc")], check=False, stderr=subprocess.DEVNULL)
    for top in ("usr", "bin", "sbin", "lib", "lib64"):
        host = Path("/") / top
        if host.is_symlink():
            (rootfs / top).symlink_to(os.readlink(host))
        elif host.is_dir():
            binds.append({"destination": f"/{top}", "type": "bind", "source": str(host),
                          "options": ["rbind", "rprivate", "ro"]})
    # /opt: a tmpfs with the host's folders bound into it one by one, so that Allocate's /opt/gpuwatch/lib
    # can be made there (a read-only /opt without a gpuwatch folder cannot take it: runc's mkdir fails)
    binds.append({"destination": "/opt", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]})
    binds += [{"destination": str(d), "type": "bind", "source": str(d), "options": ["rbind", "rprivate", "ro"]}
              for d in sorted(Path("/opt").iterdir()) if d.is_dir() and d.name != "gpuwatch"]
    for node in sorted(Path("/dev").glob("nvidia*")):
        if node.is_char_device():
            binds.append({"destination": str(node), "type": "bind", "source": str(node), "options": ["bind", "rw"]})
    binds += [{"destination": m.container_path, "type": "bind", "source": m.host_path,
               "options": ["rbind", "rprivate", "ro" if m.read_only else "rw"]} for m in answer.mounts]
    env = [f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}", "PYTHONUNBUFFERED=1",
           f"LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH', '')}"]
    env += [f"{k}={v}" for k, v in sorted(answer.envs.items())]
    spec = {"ociVersion": "1.0.2",
            "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args, "env": env, "cwd": "/"},
            "root": {"path": "rootfs", "readonly": True}, "hostname": "pod", "mounts": binds,
            "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
                      "cgroupsPath": cgroup, "resources": {"devices": [{"allow": True, "access": "rwm"}]}},
            "annotations": containerd_annotations(*NAMES[:2], NAMES[2], UID)}
    (bundle / "config.json").write_text(json.dumps(spec))


def feasible(work: Path) -> str | None:
    """Why runc cannot run a container here (None: it can)."""
    if shutil.which(RUNC[0]) is None and not Path(RUNC[0]).exists():
        return "no runc: `bash bench/pack-runc.sh` here, then carry .runc"
    bundle, cgroup = work / "probe", f"/gpuwatch-probe-{uuid.uuid4().hex[:8]}"
    (work / "lib").mkdir(parents=True, exist_ok=True)
    (work / "lib" / "ld.so.preload").write_text("")
    mounts = [dp.Mount(container_path=path, host_path=str(work / "lib" / name), read_only=True)  # Allocate's
              for path, name in (("/opt/gpuwatch/lib", ""), ("/run/gpuwatch", ""), ("/etc/ld.so.preload",
                                                                                     "ld.so.preload"))]
    config(bundle, dp.ContainerAllocateResponse(mounts=mounts), ["/usr/bin/test", "-f", "/etc/ld.so.preload"],
           cgroup)
    try:
        r = runc("--root", str(work / "state"), "run", "--bundle", str(bundle), "gw-probe", stdin=subprocess.DEVNULL)
    finally:
        runc("--root", str(work / "state"), "delete", "--force", "gw-probe")
        remove_cgroup(cgroup)
    return None if r.returncode == 0 else f"runc could not run a container here: {r.stderr.strip()[-400:]}"


def scenario(name: str, preload_file: bool, gpu: str) -> dict[str, Any]:
    sockets, work = short_dir("gwk-v-"), Path(tempfile.mkdtemp(prefix="gwk-v-"))
    work.chmod(0o755)
    lib, run, host, top = work / "lib", work / "run", work / "host", f"/gpuwatch-validate-{uuid.uuid4().hex[:8]}"
    for d in (lib, run):
        d.mkdir()
        d.chmod(0o755)
    shutil.copy2(ROOT / "interposer" / "libgpuwatch.so", lib / "libgpuwatch.so")
    kubelet, pods = FakeKubelet(sockets), FakePodResources(sockets / "pr.sock")
    memory = [f"{gpu}-gib-{i}" for i in range(QUOTA_GIB)]
    pods.pods = [(NAMES[0], NAMES[1], [(NAMES[2], {MEMORY_RESOURCE: memory, GPU_RESOURCE: [f"{gpu}-share-0"]})])]
    conf = work / "gpuwatch.toml"
    conf.write_text(f"[kubernetes]\nenabled = true\nplugin_dir = \"{sockets}\"\n"
                    f"pod_resources_socket = \"{sockets / 'pr.sock'}\"\ninterposer_host_dir = \"{lib}\"\n"
                    f"host_root = \"{host}\"\npreload_file = {str(preload_file).lower()}\napi_priorities = false\n")
    sock = str(run / "gpuwatch.sock")
    log = (OUT / f"kube-{name}-daemon.log").open("w")
    daemon = subprocess.Popen([*GPUWATCH, "--socket", sock, "run", "--config", str(conf), "--no-metrics"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    out: dict[str, Any] = {"scenario": name, "quota_bytes": QUOTA_GIB * GiB}
    container = None
    try:
        wait_for(lambda: os.path.exists(sock), 60, "the daemon's socket")
        endpoints = {r.resource_name: r.endpoint for r in kubelet.registered(2, timeout=60)}
        ask = dp.AllocateRequest(container_requests=[dp.ContainerAllocateRequest(devices_ids=memory)])
        answer = kubelet.plugin(endpoints[MEMORY_RESOURCE]).Allocate(ask, timeout=10).container_responses[0]
        out["allocate"] = {"envs": dict(answer.envs), "mounts": [m.container_path for m in answer.mounts]}
        args = ["/usr/bin/env", "-i", f"PATH={os.environ.get('PATH', '')}",
                f"LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH', '')}", "PYTHONUNBUFFERED=1"] \
            if preload_file else []
        args += [sys.executable, "-c", INSIDE]
        bundle = host / CONTAINERD_BUNDLES / CONTAINER_ID
        config(bundle, answer, args, f"{top}/kubepods/burstable/pod{UID}/{CONTAINER_ID}")
        env = {**os.environ, "LD_LIBRARY_PATH": str(ROOT / ".runc")}
        container = subprocess.Popen([*RUNC, "--root", str(work / "state"), "run", "--bundle", str(bundle),
                                      CONTAINER_ID], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=(OUT / f"kube-{name}-container.stderr").open("w"), text=True, env=env)
        assert container.stdout is not None and container.stdin is not None
        line = ""
        deadline = time.time() + 180
        while time.time() < deadline and not line.startswith("RESULT "):
            line = container.stdout.readline()
            if not line:
                break
        out["inside"] = json.loads(line.split(" ", 1)[1]) if line.startswith("RESULT ") else None
        state = json.loads(runc("--root", str(work / "state"), "state", CONTAINER_ID).stdout or "{}")
        pid = state.get("pid")
        out["pid"], out["nvml_bytes"] = pid, pid and nvml_bytes(pid)
        rows = json.loads(subprocess.run([*GPUWATCH, "--socket", sock, "ps", "--json"], capture_output=True,
                                         text=True, timeout=30).stdout or "[]")
        row = next((r for r in rows if r["pid"] == pid), {})
        out["ps"] = {k: row.get(k) for k in ("namespace", "pod", "container", "interposed", "quota_bytes",
                                             "gpu_uuid", "device_bytes", "nvml_bytes")}
        try:
            container.stdin.write("\n")
            container.stdin.flush()
        except BrokenPipeError:
            pass  # it ended on its own: its stderr says why
        container.wait(30)
    finally:
        if container is not None and container.poll() is None:
            container.kill()
        runc("--root", str(work / "state"), "delete", "--force", CONTAINER_ID)
        daemon.terminate()
        daemon.wait(30)
        kubelet.stop()
        pods.stop()
        remove_cgroup(top)
        remove(sockets)
        remove(work)
    inside, ps = out.get("inside") or {}, out.get("ps") or {}
    quota = QUOTA_GIB * GiB
    out["checks"] = {
        # the total a pod sees is what it may allocate: its quota less its context, as the daemon sent it
        "total_inside_is_the_limit_sent": inside.get("total") in limits_sent(name) and inside["total"] < quota,
        "refused_with_cuda_out_of_memory": bool(inside.get("error")) and "out of memory" in inside["error"].lower(),
        "blocks_intact": inside.get("intact") is True and inside.get("blocks", 0) > 0,
        "nvml_within_quota_context_included": out.get("nvml_bytes") is not None and out["nvml_bytes"] <= quota,
        "ps_names_the_pod": (ps.get("namespace"), ps.get("pod"), ps.get("container")) == NAMES,
        "ps_quota_and_gpu": (ps.get("interposed"), ps.get("quota_bytes"), ps.get("gpu_uuid")) == (True, quota, gpu),
    }
    out["verdict"] = "pass" if all(out["checks"].values()) else "FAIL"
    return out


def limits_sent(name: str) -> set[int]:
    """The limits the daemon sent the container's interposer (its quota less its context), from its log."""
    text = (OUT / f"kube-{name}-daemon.log").read_text()
    return {int(m) for m in re.findall(r"allocations limited to (\d+) bytes per GPU", text)}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gwk-probe-"))
    try:
        why = feasible(work)
    finally:
        remove(work)
    if why is not None:
        print(why)
        (OUT / "kube_container.json").write_text(json.dumps({"skipped": why}) + "\n")
        return 2
    gpu = gpu0()
    results = []
    for name, cleared in (("environment", False), ("cleared", True)):
        results.append(scenario(name, cleared, gpu))
        (OUT / "kube_container.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0 if all(r["verdict"] == "pass" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
