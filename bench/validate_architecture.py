"""Re-validates the restructured daemon (issue 10) on a GPU machine, as root, bcc importable (docs/validation.md):
    source .bcc/env.sh && source bench/gw-env.sh && make -C interposer && python3 bench/validate_architecture.py
a: pause --swap/resume of a PyTorch process under `gpuwatch exec`; b: quota stop and pause/resume of a plain one; c: ps
bytes of a plain one against its torch.empty sizes, NVML and the metrics; d: SIGTERM continues what the daemon stopped,
uprobe_events empty. Daemon log in $OUT/daemon.log; prints a JSON summary; exits 1 if a check failed."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

SOCK_DIR = Path("/tmp/gw-arch")
SOCKET, STATE = str(SOCK_DIR / "gpuwatch.sock"), SOCK_DIR / "stopped.json"
GW = [sys.executable, "-P", "-m", "gpuwatch.client.cli", "--socket", SOCKET]
OUT = Path(os.environ.get("OUT", "/tmp"))
GiB, MiB = 1 << 30, 1 << 20
SWAP_BYTES = int(float(os.environ.get("GW_SWAP_GIB", "20")) * GiB)
C_SIZES, CHUNK = [3 * GiB, GiB + 2 * MiB, 100 * MiB], 1 << 25
METRICS, UPROBES = "127.0.0.1:9446", Path("/sys/kernel/tracing/uprobe_events")
ROW_KEYS = ("state", "interposed", "device_bytes", "nvml_bytes", "untracked_bytes", "swapped_bytes",
            "swappable_bytes", "quota_bytes", "quota_pauses")
T0 = time.time()
checks: dict[str, dict[str, Any]] = {}


def check(name: str, ok: Any, **data: Any) -> None:
    checks[name] = {"pass": bool(ok), **data}
    print(f"{time.time() - T0:7.2f} {'PASS' if ok else 'FAIL'} {name} {json.dumps(data, default=str)}", flush=True)


def child(mode: str) -> int:
    """A PyTorch process: `swap` (arange data, computing), `sizes` (C_SIZES) or `grow` (1 GiB per `alloc`)."""
    import torch
    cmds: list[str] = []
    threading.Thread(target=lambda: cmds.extend(line.strip() for line in sys.stdin), daemon=True).start()
    say = lambda **kv: print(json.dumps(kv), flush=True)  # noqa: E731
    keep, x, n, i, last = [], None, SWAP_BYTES // 8, 0, time.time()
    if mode == "swap":
        x = torch.arange(n, dtype=torch.int64, device="cuda")
        sums = lambda: [x.sum().item(), sum((x[j:j + CHUNK] % 65521).sum().item() for j in range(0, n, CHUNK))]  # noqa
        first, probe = sums(), x[::4099].sum()
        y, bad = torch.zeros(1 << 20, device="cuda"), torch.zeros((), dtype=torch.int64, device="cuda")
        say(ready=True, sums=first, expected=n * (n - 1) // 2, reserved=torch.cuda.memory_reserved())
    else:  # grow: a context, no allocation
        keep = [torch.empty(s, dtype=torch.uint8, device="cuda") for s in (C_SIZES if mode == "sizes" else [])]
        torch.cuda.synchronize()
        say(ready=True, reserved=torch.cuda.memory_reserved(), allocated=torch.cuda.memory_allocated())
    while (cmd := cmds.pop(0) if cmds else "") != "quit":
        if cmd == "alloc":
            keep.append(torch.empty(GiB, dtype=torch.uint8, device="cuda"))
            torch.cuda.synchronize()
            say(allocated=len(keep), reserved=torch.cuda.memory_reserved())
        elif cmd == "check":
            say(sums=sums(), bad=int(bad.item()), ticks=i)
        if x is None:
            time.sleep(0.05)
            continue
        y.add_(1)
        bad += x[::4099].sum() != probe  # the data is read in every iteration
        i += 1
        if time.time() - last > 0.2:
            torch.cuda.synchronize()
            last = time.time()
            say(tick=i)
    return 0


class Child:
    def __init__(self, mode: str, under: list[str], err: Any) -> None:
        self.lines, self.ready = [], {}  # type: ignore[var-annotated]
        self.proc = subprocess.Popen([*under, sys.executable, __file__, "--child", mode], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=err, text=True)
        self.pid = self.proc.pid
        out = self.proc.stdout
        threading.Thread(target=lambda: self.lines.extend(json.loads(ln) for ln in out if ln[:1] == "{"),  # type: ignore
                         daemon=True).start()

    def answer(self, key: str, after: int = 0, timeout: float = 300) -> dict[str, Any] | None:
        return until(lambda: next((d for d in self.lines[after:] if key in d), None), timeout)

    def send(self, cmd: str) -> int:
        mark = len(self.lines)
        print(cmd, file=self.proc.stdin, flush=True)
        return mark

    def tick(self) -> int:
        return max([d["tick"] for d in self.lines if "tick" in d] or [0])

    def state(self) -> str:
        return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    def seen(self) -> dict[str, Any]:
        """Its `ps --json` row (ROW_KEYS), /proc state, entry in stopped.json (who stopped it), nvidia-smi MiB."""
        rows = [r for r in json.loads(gw("ps", "--json")[1]) if r["pid"] == self.pid]
        stopped = json.loads(STATE.read_text()).get("stopped", []) if STATE.exists() else []
        smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        return {**({k: rows[0][k] for k in ROW_KEYS} if rows else {}), "proc_state": self.state(),
                "stopped_json": next((e["by"] for e in stopped if e["pid"] == self.pid), None),
                "nvidia_smi_mib": next((int(m) for p, m in (ln.split(",") for ln in smi.splitlines() if "," in ln)
                                        if int(p) == self.pid), None)}

    def alloc_or_stop(self) -> tuple[int, Any, float]:
        """Ask for 1 GiB: the mark of its answer, the answer or "T" when it was stopped instead, seconds."""
        mark, start = self.send("alloc"), time.time()
        got = until(lambda: self.answer("allocated", mark, 0) or (self.state() in "Tt" and "T"), 30)
        return mark, got, round(time.time() - start, 3)


def until(fn: Any, timeout: float, step: float = 0.05) -> Any:
    deadline = time.time() + timeout
    while not (value := fn()) and time.time() < deadline:
        time.sleep(step)
    return value


def gw(*args: str) -> tuple[int, str, float]:  # exit code, what it printed, seconds
    start = time.time()
    r = subprocess.run([*GW, *args], capture_output=True, text=True, timeout=600)
    return r.returncode, (r.stdout + r.stderr).strip(), round(time.time() - start, 3)


def case_c(c: Child) -> None:
    r = until(lambda: (x := c.seen()) and x.get("nvml_bytes") is not None and x, 10) or c.seen()
    want, smi = sum(C_SIZES), r["nvidia_smi_mib"]
    check("c_device_bytes_exact", r["device_bytes"] == want == c.ready["reserved"], device_bytes=r["device_bytes"],
          torch_empty_sizes=want, memory_reserved=c.ready["reserved"], memory_allocated=c.ready["allocated"])
    check("c_nvml_untracked", r["nvml_bytes"] and r["untracked_bytes"] == r["nvml_bytes"] - r["device_bytes"]
          and smi is not None and smi * MiB == r["nvml_bytes"], nvml_bytes=r["nvml_bytes"],
          untracked_bytes=r["untracked_bytes"], nvidia_smi_mib=smi)
    text = urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=10).read().decode()
    m = re.search(r'^gpuwatch_process_device_memory_bytes\{[^}]*pid="%d"[^}]*\} (\S+)$' % c.pid, text, re.M)
    check("c_metrics_equal_ps", m and float(m.group(1)) == r["device_bytes"], metric=m and m.group(1))


def case_a(a: Child) -> None:
    r0 = until(lambda: (x := a.seen()) and x.get("interposed") and x, 30)
    check("a_attached", r0, row=r0, ready=a.ready)
    rc, said, pause_s = gw("pause", str(a.pid), "--swap")
    time.sleep(0.5)
    r1, t1 = a.seen(), a.tick()
    time.sleep(2)
    t2 = a.tick()
    check("a_pause_swap", rc == 0 and r1.get("state") == "swapped" and r1["swapped_bytes"] >= SWAP_BYTES, cli=said,
          seconds=pause_s, row=r1)
    smi0, smi1 = r0["nvidia_smi_mib"], r1["nvidia_smi_mib"]
    check("a_nvml_drop", smi0 and smi1 is not None and (smi0 - smi1) * MiB >= SWAP_BYTES, nvidia_smi_mib_before=smi0,
          nvidia_smi_mib_swapped=smi1)
    (rc, said, resume_s), r2 = gw("resume", str(a.pid)), a.seen()
    moving = until(lambda: a.tick() > t2, 30)
    check("a_resume", rc == 0 and r2.get("state") == "running" and r2["swapped_bytes"] == 0, cli=said,
          seconds=resume_s, row=r2)
    check("a_loop_held_then_goes_on", t1 == t2 and moving, tick_after_pause=t1, tick_2s_later=t2, tick_now=a.tick())
    d = a.answer("sums", a.send("check"), 120) or {}
    check("a_checksum_identical", d.get("sums") == a.ready["sums"] and a.ready["sums"][0] == a.ready["expected"]
          and d.get("bad") == 0 and a.send("quit") >= 0 and a.proc.wait(60) == 0, before=a.ready["sums"],
          after=d.get("sums"), mismatched_reads=d.get("bad"), loop_iterations=d.get("ticks"), exit=a.proc.returncode)


def case_b(b: Child) -> None:
    rc, said, _ = gw("quota", "set", "--pid", str(b.pid), "4GiB")
    check("b_quota_set", rc == 0, cli=said)
    gib, got = 0, (0, None, 0.0)
    while gib < 6 and got[1] != "T":
        gib, got = gib + 1, b.alloc_or_stop()
    mark, r = got[0], b.seen()
    check("b_quota_stop", got[1] == "T" and gib == 5 and r.get("state") == "stopped" and r["device_bytes"] == 4 * GiB
          and "quota" in (r["stopped_json"] or []), stopped_at_gib=gib, seconds=got[2], row=r)
    start = time.time()
    rc, said, _ = gw("quota", "set", "--pid", str(b.pid), "0")
    d = b.answer("allocated", mark, 15) or {}
    cont_s, r = round(time.time() - start, 3), b.seen()
    check("b_quota_0_continues", rc == 0 and d.get("allocated") == 5 and r["proc_state"] not in "Tt"
          and r.get("state") == "running" and r["stopped_json"] is None, cli=said, seconds=cont_s, answer=d, row=r)
    (rc, said, pause_s), r = gw("pause", str(b.pid)), b.seen()
    check("b_pause_plain", rc == 0 and r["proc_state"] in "Tt" and r.get("state") == "stopped"
          and r["stopped_json"] == ["hand"], cli=said, seconds=pause_s, row=r)
    (rc, said, resume_s), r = gw("resume", str(b.pid)), b.seen()
    check("b_resume_plain", rc == 0 and r["proc_state"] not in "Tt" and r.get("state") == "running"
          and r["stopped_json"] is None, cli=said, seconds=resume_s, row=r)


def case_d(daemon: subprocess.Popen, b: Child, c: Child) -> None:
    gw("quota", "set", "--pid", str(b.pid), "5GiB")
    mark = b.alloc_or_stop()[0]  # its 6th GiB: stopped by its quota
    gw("pause", str(c.pid))
    before = {"b_quota": b.state(), "c_hand": c.state(), "stopped_json": STATE.read_text()}
    health = json.loads(gw("status", "--json")[1])["health"]
    start = time.time()
    daemon.terminate()  # SIGTERM
    rc = daemon.wait(60)
    stop_s, after = round(time.time() - start, 3), {"b_quota": b.state(), "c_hand": c.state()}
    d, uprobes = b.answer("allocated", mark, 15) or {}, UPROBES.read_text()
    check("d_sigterm_continues", rc == 0 and before["b_quota"] == before["c_hand"] == "T" and "T" not in after.values()
          and d.get("allocated") == 6 and not json.loads(STATE.read_text())["stopped"], exit_code=rc, seconds=stop_s,
          before=before, after=after, stopped_json_after=STATE.read_text(), b_answer=d)
    check("d_uprobe_events_empty", uprobes.strip() == "", uprobe_events=uprobes[:500],
          events_lost=health["events_lost"], libraries=health["libraries"], probes=health["probes_attached"])


def main() -> int:
    SOCK_DIR.mkdir(parents=True, exist_ok=True)
    STATE.unlink(missing_ok=True)
    check("uprobe_events_empty_before", UPROBES.read_text().strip() == "")
    daemon = subprocess.Popen([*GW, "run", "--listen", METRICS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    log = open(OUT / "daemon.log", "w", buffering=1)
    logger = threading.Thread(target=lambda: log.writelines(f"{time.time() - T0:7.2f} {line}"
                                                            for line in daemon.stdout), daemon=True)  # type: ignore
    logger.start()
    until(lambda: daemon.poll() is not None or gw("status")[0] == 0, 180, 0.2)
    check("daemon_up", daemon.poll() is None, seconds=round(time.time() - T0, 1))
    err = open(OUT / "children.log", "w")
    kids = {"a": Child("swap", [*GW, "exec", "--"], err), "b": Child("grow", [], err), "c": Child("sizes", [], err)}
    try:
        for kid in kids.values():
            kid.ready = kid.answer("ready", 0, 300) or {}
        check("children_ready", all(k.ready for k in kids.values()), pids={n: k.pid for n, k in kids.items()})
        for name, case in (("c", lambda: case_c(kids["c"])), ("a", lambda: case_a(kids["a"])),
                           ("b", lambda: case_b(kids["b"])), ("d", lambda: case_d(daemon, kids["b"], kids["c"]))):
            try:
                case()
            except Exception as exc:  # one broken case must not hide the others
                check(f"{name}_ran", False, error=repr(exc))
    finally:
        daemon.terminate()
        daemon.wait(60)
        for kid in kids.values():
            kid.proc.kill()
    logger.join(10)
    text = (OUT / "daemon.log").read_text()
    check("daemon_log_clean", "Traceback" not in text and ": ERROR:" not in text and "probes detached" in text)
    failed = [n for n, c in checks.items() if not c["pass"]]
    summary = json.dumps({"passed": not failed, "failed": failed, "checks": checks}, indent=1, default=str)
    (OUT / "validate_architecture.json").write_text(summary)
    print(summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(child(sys.argv[2]) if sys.argv[1:2] == ["--child"] else main())
