"""Smoke test of the fake NVML: builds it into a temp dir and drives it through pynvml the way gpuwatch
does (gpuwatch.probes.nvml.Nvml) in one long-lived process, changing the state file between queries.
Run with the gpuwatch venv's python; exits non-zero on any mismatch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GiB = 1 << 30
A = "GPU-0a1b2c3d-4e5f-6789-abcd-ef0123456789"
B = "GPU-99999999-8888-7777-6666-555555555555"

# The client: one Nvml for its whole life; each stdin line asks for a JSON answer on stdout.
CLIENT = r"""
import json, sys
from dataclasses import asdict
import pynvml
from gpuwatch.probes.nvml import Nvml

nv = Nvml.open()
assert nv is not None, "Nvml.open() failed"

def extras():
    def each(f):
        out = []
        for h in nv._handles:
            try:
                out.append(f(h))
            except pynvml.NVMLError as e:
                out.append(type(e).__name__)
        return out
    v2 = lambda h: (lambda m: [m.version, m.total, m.reserved, m.free, m.used])(
        pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2))
    procs = lambda f: lambda h: sorted([p.pid, p.usedGpuMemory, p.gpuInstanceId, p.computeInstanceId] for p in f(h))
    return {"driver": pynvml.nvmlSystemGetDriverVersion(), "index": each(pynvml.nvmlDeviceGetIndex),
            "memory_v2": each(v2), "compute_v2": each(procs(pynvml.nvmlDeviceGetComputeRunningProcesses_v2)),
            "graphics_v2": each(pynvml.nvmlDeviceGetGraphicsRunningProcesses_v2),
            "graphics_v3": each(pynvml.nvmlDeviceGetGraphicsRunningProcesses_v3),
            "error": pynvml.nvmlErrorString(pynvml.NVML_ERROR_INVALID_ARGUMENT)}

for line in sys.stdin:
    if line.strip() == "extras":
        answer = extras()
    else:
        answer = {"gpus": [asdict(g) for g in nv.gpus()],
                  "procs": sorted([pid, gpu, used] for (pid, gpu), used in nv.process_bytes().items())}
    print(json.dumps(answer), flush=True)
"""


class Client:
    def __init__(self, lib: Path, state: Path) -> None:
        env = dict(os.environ, LD_LIBRARY_PATH=str(lib), FAKENVML_STATE=str(state))
        self.proc = subprocess.Popen([sys.executable, "-c", CLIENT], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ask(self, what: str = "query") -> dict:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"FAIL: client exited ({self.proc.wait()}) before answering {what!r}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def write_state(path: Path, gpus: list[tuple], procs: list[tuple]) -> dict:
    """gpus: (index, uuid, total, util, name); procs: (pid, gpu, used). Returns what the client should see."""
    text = "# fakenvml smoke test\n\n" + "".join(f"gpu {i} {u} {t} {ut} {n}\n" for i, u, t, ut, n in gpus)
    text += "".join(f"  proc {p} {g} {b}   # pid {p}\n" for p, g, b in procs)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers see the old or the new state, never half a file
    return {"gpus": [{"index": i, "uuid": u, "name": n, "memory_total": t, "utilization": ut,
                      "memory_used": GiB + sum(b for _, g, b in procs if g == i)} for i, u, t, ut, n in gpus],
            "procs": sorted([p, g, b] for p, g, b in procs)}


failures: list[str] = []


def check(what: str, got: object, want: object) -> None:
    if got != want:
        failures.append(f"{what}:\n  got  {got}\n  want {want}")
    print(f"{'ok  ' if got == want else 'FAIL'} {what}")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        lib, state = Path(tmp) / "lib", Path(tmp) / "state"
        build = subprocess.run(["make", "-C", str(HERE), f"OUT={lib}"], capture_output=True, text=True)
        if build.returncode or "warning" in build.stdout + build.stderr:
            raise SystemExit(f"FAIL: build\n{build.stdout}{build.stderr}")

        gpus = [(0, A, 80 * GiB, 37, "NVIDIA H100 80GB HBM3"), (1, B, 24 * GiB, 5, "Fake L4 #comment is not name")]
        want = write_state(state, gpus, [(1001, 0, 3 * GiB), (1002, 0, 512 << 20), (1003, 1, 7 << 20)])
        want["gpus"][1]["name"] = "Fake L4"
        client = Client(lib, state)
        check("two GPUs, three processes", client.ask(), want)
        check("other entry points", client.ask("extras"), {
            "driver": "550.54.15", "index": [0, 1],
            "memory_v2": [[0x02000028, 80 * GiB, 0, 80 * GiB - (GiB + 3 * GiB + (512 << 20)),
                           GiB + 3 * GiB + (512 << 20)],
                          [0x02000028, 24 * GiB, 0, 23 * GiB - (7 << 20), GiB + (7 << 20)]],
            "compute_v2": [[[1001, 3 * GiB, 0xFFFFFFFF, 0xFFFFFFFF], [1002, 512 << 20, 0xFFFFFFFF, 0xFFFFFFFF]],
                           [[1003, 7 << 20, 0xFFFFFFFF, 0xFFFFFFFF]]],
            "graphics_v2": [[], []], "graphics_v3": [[], []], "error": "Invalid Argument"})

        gpus = [(0, A, 80 * GiB, 99, "NVIDIA H100 80GB HBM3"), (1, B, 24 * GiB, 0, "Fake L4")]
        want = write_state(state, gpus, [(1002, 0, 2 * GiB), (1003, 1, 9 << 20), (1004, 1, 1)])
        check("changed state seen without re-init", client.ask(), want)

        many = [(5000 + k, 0, (k + 1) << 20) for k in range(70)]
        want = write_state(state, gpus, many)
        check("70 processes on one GPU", client.ask(), want)

        want = write_state(state, gpus[:1], [(1002, 0, 2 * GiB), (1003, 1, 9 << 20)])
        want["gpus"].append({"index": 1, "uuid": None, "name": None, "memory_total": None, "memory_used": None,
                             "utilization": None})
        want["procs"] = [[1002, 0, 2 * GiB]]
        check("GPU 1 gone: its handle is refused", client.ask(), want)
        check("GPU 1 gone: error class", client.ask("extras")["index"], [0, "NVMLError_InvalidArgument"])
        client.close()

        state.unlink()
        empty = Client(lib, state)
        check("no state file: init succeeds with no GPUs", empty.ask(), {"gpus": [], "procs": []})
        empty.close()

    print("\n".join(failures) or "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
