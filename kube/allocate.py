"""What Allocate hands the kubelet for a container: the interposer and the daemon's socket mounted in, the
environment that preloads the one and names the other, and the GPU (NVIDIA_VISIBLE_DEVICES, or a CDI device).

Nothing here is trusted later: the daemon resolves a container's quota from its cgroup and the kubelet's
PodResources (kube/resolver.py), never from this environment, which the container can change."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core.vocabulary import DEFAULT_SOCKET
from .api import deviceplugin_pb2 as pb
from .settings import KubernetesSection

LIBRARY = "libgpuwatch.so"
CONTAINER_LIB_DIR = "/opt/gpuwatch/lib"                   # where a container sees the host's interposer directory
CONTAINER_SOCKET_DIR = os.path.dirname(DEFAULT_SOCKET)   # the interposer's default: works with a cleared environment
PRELOAD_FILE = "ld.so.preload"                           # written in the interposer directory, mounted on /etc/
CDI_KIND = "nvidia.com/gpu"                              # NVIDIA's CDI spec, generated with UUID device names


@dataclass(frozen=True)
class Injection:
    """How containers get gpuwatch: the host paths and switches, from [kubernetes] and the daemon's socket."""
    interposer_host_dir: str
    socket_path: str
    preload_file: bool = False
    cdi: bool = False

    @classmethod
    def from_settings(cls, settings: KubernetesSection, socket_path: str) -> Injection:
        return cls(settings.interposer_host_dir, socket_path, settings.preload_file, settings.cdi)

    @property
    def library(self) -> str:
        """The interposer's path inside a container."""
        return f"{CONTAINER_LIB_DIR}/{LIBRARY}"

    def prepare(self) -> None:
        """Writes the ld.so.preload that containers get (when asked for), atomically: the library's path inside
        a container, one line. OSError when the directory cannot be written."""
        if not self.preload_file:
            return
        target = Path(self.interposer_host_dir) / PRELOAD_FILE
        text = self.library + "\n"
        try:
            if target.read_text() == text:
                return
        except OSError:
            pass
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".ld.so.preload.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise

    def response(self, gpus: list[str]) -> pb.ContainerAllocateResponse:
        """One container's answer; `gpus`: its GPUs' UUIDs, the one holding most of its devices first."""
        socket_dir, socket_name = os.path.split(self.socket_path)
        envs = {"LD_PRELOAD": self.library, "GPUWATCH_SOCKET": f"{CONTAINER_SOCKET_DIR}/{socket_name}"}
        mounts = [pb.Mount(container_path=CONTAINER_LIB_DIR, host_path=self.interposer_host_dir, read_only=True),
                  # read-only: connecting to a unix socket needs no write access to the mount
                  pb.Mount(container_path=CONTAINER_SOCKET_DIR, host_path=socket_dir, read_only=True)]
        if self.preload_file:
            mounts.append(pb.Mount(container_path="/etc/ld.so.preload",
                                   host_path=f"{self.interposer_host_dir}/{PRELOAD_FILE}", read_only=True))
        response = pb.ContainerAllocateResponse(envs=envs, mounts=mounts)
        if self.cdi:
            response.cdi_devices.extend(pb.CDIDevice(name=f"{CDI_KIND}={uuid}") for uuid in gpus)
        else:
            response.envs["NVIDIA_VISIBLE_DEVICES"] = ",".join(gpus)
        return response
