"""The `gpuwatch` command."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from ..core.protocol import Client, ControlError, DaemonUnavailable
from ..core.vocabulary import (DEFAULT_CONFIG, PRIORITY_NAMES, human_bytes, is_power_of_two, socket_path)
from ..core.events import Event, EventType, Kind
from .common import UsageError, common_options, size_argument
from .control import cmd_pause, cmd_policy, cmd_priority, cmd_quota, cmd_resume, quota_size
from .launch import LaunchError, child_environment, exec_command, interposer_library
from .move import add_move_parser



PS_COLUMNS = [("PID", "pid", ">7"), ("COMM", "comm", "<16"), ("GPU", "gpu", ">3"), ("STATE", "state", "<12"),
              ("DEVICE", "device_bytes", ">10"), ("QUOTA", "quota_bytes", ">10"), ("MANAGED", "managed_bytes", ">10"),
              ("PINNED", "host_pinned_bytes", ">10"), ("NVML", "nvml_bytes", ">10"),
              ("UNTRACKED", "untracked_bytes", ">10"), ("ALLOCS", "allocs", ">8"), ("FAILED", "failed_allocs", ">6"),
              ("LAUNCHES", "launches", ">10"), ("GRAPHS", "graph_launches", ">7"), ("REASON", "reason", "<32")]


def format_ps(rows: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any], key: str) -> str:
        v = row[key]
        if key == "untracked_bytes" and row.get("nvml_bytes") is None:
            return "-"  # without NVML nothing is known beside the traced bytes
        if key == "device_bytes" and row.get("device_bytes_estimated"):
            return f"~{human_bytes(v)}"  # with an estimate of what it held before the probes saw it
        if key.endswith("bytes"):
            return human_bytes(v)
        if key == "launches" and row.get("launches_estimated"):
            return f"~{v}"
        return "-" if v is None else str(v)

    lines = [" ".join(f"{title:{align}}" for title, _, align in PS_COLUMNS)]
    for row in rows:
        lines.append(" ".join(f"{cell(row, key)[:int(align[1:])]:{align}}" for _, key, align in PS_COLUMNS))
    return "\n".join(lines)


def event_from_json(d: dict[str, Any]) -> Event:
    return Event(**{**d, "type": EventType[d["type"].upper()], "kind": Kind[d["kind"].upper()]})


def cmd_run(args: argparse.Namespace) -> int:
    from ..daemon import run  # the daemon's stack (bcc, prometheus_client) only for `gpuwatch run`
    return run.main(args)


def listen_address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT with a port from 1 to 65535, not {text!r}")
    return text


def cmd_exec(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if not command:
            raise LaunchError("exec: no command given (gpuwatch exec [OPTIONS] -- COMMAND [ARGS...])", 2)
        env = child_environment(os.environ, interposer_library(), args.socket or socket_path(), args.mem_limit,
                                args.priority, swap=not args.no_swap)
        if args.priority == "high" and os.geteuid() != 0:
            print("gpuwatch: warning: only root gives a priority above normal (a rule, or `gpuwatch priority`): "
                  "this command runs at normal", file=sys.stderr)
        sys.stdout.flush()
        exec_command(command, env)
    except LaunchError as exc:
        print(f"gpuwatch: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0  # not reached: exec_command replaces this process


def cmd_ps(args: argparse.Namespace) -> int:
    with Client(args.socket or socket_path()) as client:
        rows = client.call("ps")
    print(json.dumps(rows, indent=1) if args.json else format_ps(rows))
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    with Client(args.socket or socket_path()) as client:
        if not args.json:
            print(Event.header(), flush=True)
        for event in client.stream("trace", pid=args.pid, comm=args.comm):
            if "lost" in event and not args.json:  # this stream fell behind: the daemon dropped its events
                print(f"-- {event['lost']} events lost here: this trace fell behind (read it faster, or narrow it "
                      "with --pid or --comm)", flush=True)
                continue
            print(json.dumps(event) if args.json else event_from_json(event).line(), flush=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with Client(args.socket or socket_path()) as client:
        status = client.call("status")
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    h = status["health"]
    print(f"launch mode: {h['launch_mode']}   probes attached: {h['probes_attached']}   events lost: "
          f"{h['events_lost']}   NVML: {'yes' if h['nvml'] else 'no'}   processes: {status['processes']}   "
          f"interposed: {status.get('interposed', 0)}")
    print("libraries: " + (", ".join(h["libraries"]) or "none yet (waiting for a process to load libcuda)"))
    if (checkpoint := status.get("checkpoint")) is not None:
        print("moving processes not under the interposer (the driver's checkpoint API): " +
              ("yes" if checkpoint["move_plain"] else f"no ({checkpoint['why_not']})"))
    if (host := status.get("host")) is not None:
        cap = f", cap {human_bytes(host['limit_bytes'])}" if host["limit_bytes"] is not None else ""
        print(f"host memory for swapping: {human_bytes(host['pinned_bytes'])} pinned "
              f"({human_bytes(host['swapped_bytes'])} swapped out), {human_bytes(host['spare_bytes'])} spare of "
              f"{human_bytes(host['available_bytes'])} "
              f"available (reserve {human_bytes(host['reserve_bytes'])}{cap})")
    for g in status["gpus"]:
        print(f"gpu {g['index']}: {g['name']} {g['uuid']} {human_bytes(g['memory_used'])} / "
              f"{human_bytes(g['memory_total'])} used, {g['utilization']}% busy")
    return 0


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def cmd_top(args: argparse.Namespace) -> int:
    from ..exporters import top  # urwid, only for `gpuwatch top`
    return top.main(args.socket or socket_path(), args.interval, args.sort, args.filter)


def power_of_two(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not is_power_of_two(n):
        raise argparse.ArgumentTypeError(f"{text!r} is not a power of two")
    return n


def positive_pid(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id")
    return int(text)


class Parser(argparse.ArgumentParser):
    """Usage errors in one line, `gpuwatch: ...`, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        where = self.prog.removeprefix("gpuwatch").strip()
        self.exit(2, f"gpuwatch: {where + ': ' if where else ''}{message}\n")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="gpuwatch", description="Watch and share NVIDIA GPUs between processes.")
    common_options(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon (as root)",
                         description="Options given here win over the configuration file.")
    run.add_argument("--config", metavar="FILE", help=f"configuration file (default: {DEFAULT_CONFIG}; "
                                                      "built-in defaults when it does not exist)")
    run.add_argument("--launches", choices=["all", "sample", "off"],
                     help="kernel launch and copy probes: all, sample (part of the time, scaled), off "
                          "(default: sample)")
    run.add_argument("--no-nvml", action="store_true", help="do not query NVML")
    run.add_argument("--ring-buffer-pages", type=power_of_two, metavar="N",
                     help="event ring buffer size in 4 KiB pages, a power of two (default: 1024)")
    run.add_argument("--sample-window-ms", type=int, metavar="MS",
                     help="sample mode: launch probes attached this long (default: 40) ...")
    run.add_argument("--sample-period-ms", type=int, metavar="MS",
                     help="... once every this long (default: 4000); counts are scaled by period/window")
    run.add_argument("--listen", type=listen_address, metavar="HOST:PORT",
                     help="serve Prometheus metrics here (default: 127.0.0.1:9445, this host only; :9445 is every "
                          "interface)")
    run.add_argument("--no-metrics", action="store_true", help="serve no metrics")
    run.add_argument("--ebpf", action="store_true", help="print the BPF program the daemon compiles, and exit")
    run.set_defaults(func=cmd_run)

    ps = sub.add_parser("ps", help="traced processes, per GPU")
    ps.add_argument("--json", action="store_true", help="print a JSON list")
    ps.set_defaults(func=cmd_ps)

    trace = sub.add_parser("trace", help="stream allocation, free, failure and exit events")
    trace.add_argument("--pid", type=int, help="only this process")
    trace.add_argument("--comm", help="only processes with this command name")
    trace.add_argument("--json", action="store_true", help="one JSON object per line")
    trace.set_defaults(func=cmd_trace)

    status = sub.add_parser("status", help="the daemon's state: libraries, probes, GPUs")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    top = sub.add_parser("top", help="a live view of processes and GPUs",
                         description="Keys: m p l f n c sort by memory, pid, launches/s, failures, name, container; "
                                     "r reverses; / filters; + and - change the interval; q quits.")
    top.add_argument("--interval", type=positive_seconds, default=1.0, metavar="SECONDS",
                     help="refresh interval in seconds (default: 1)")
    top.add_argument("--sort", choices=["memory", "pid", "launches", "failed", "command", "container"],
                     default="memory", help="sort key (default: memory)")
    top.add_argument("--filter", metavar="TEXT", help="only rows whose command, user, container or pid contains TEXT")
    top.set_defaults(func=cmd_top)

    exe = sub.add_parser("exec", help="run a command under the interposer (quota, priority, swapping)",
                         usage="gpuwatch exec [--mem-limit SIZE] [--priority high|normal|low] [--no-swap] "
                               "-- COMMAND [ARGS...]",
                         description="Runs COMMAND with libgpuwatch.so preloaded. SIZE: 512MiB, 20GiB, 1.5GiB, 8GB, "
                                     "2G (binary), or bytes.")
    exe.add_argument("--mem-limit", type=size_argument, metavar="SIZE", help="device memory quota, per GPU")
    exe.add_argument("--priority", choices=PRIORITY_NAMES, default="normal",
                     help="scheduling priority (default: normal)")
    exe.add_argument("--no-swap", action="store_true",
                     help="do not back allocations for swapping (the quota still holds; nothing can be swapped out)")
    exe.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    exe.set_defaults(func=cmd_exec)

    pause = sub.add_parser("pause", help="pause a process (as root)",
                           description="A process under `gpuwatch exec` stops submitting GPU work (and with --swap "
                                       "moves its device memory to host memory); any other process gets SIGSTOP.")
    pause.add_argument("pid", type=positive_pid, metavar="PID")
    pause.add_argument("--swap", nargs="?", const=0, type=size_argument, metavar="SIZE",
                       help="also move at least SIZE (default: all it can) of its device memory to host memory")
    pause.set_defaults(func=cmd_pause)

    add_move_parser(sub)

    resume = sub.add_parser("resume", help="resume a paused process (as root)")
    resume.add_argument("pid", type=positive_pid, metavar="PID")
    resume.add_argument("--force", action="store_true",
                        help="with no daemon running: restore a checkpointed process even where NVML cannot show "
                             "room for it")
    resume.set_defaults(func=cmd_resume)

    priority = sub.add_parser("priority", help="read or set a process's scheduling priority",
                              description="Without LEVEL, prints the priority. Root may set any process's; other "
                                          "users may only lower the priority of their own processes.")
    priority.add_argument("pid", type=positive_pid, metavar="PID")
    priority.add_argument("level", nargs="?", choices=["high", "normal", "low"], metavar="LEVEL",
                          help="high, normal or low")
    priority.set_defaults(func=cmd_priority)

    policy = sub.add_parser("policy", help="the configuration's rules and the processes they match")
    policy.add_argument("--json", action="store_true", help="print JSON")
    policy.set_defaults(func=cmd_policy)

    quota = sub.add_parser("quota", help="device memory quotas for any process or cgroup",
                           description="A process or cgroup that would cross its quota is stopped (SIGSTOP) before "
                                       "the allocation and continued once it fits; processes under `gpuwatch exec` "
                                       "get CUDA_ERROR_OUT_OF_MEMORY instead.")
    quota_sub = quota.add_subparsers(dest="quota_command", required=True, metavar="COMMAND")
    quota_set = quota_sub.add_parser("set", help="set or remove a quota (as root)",
                                     usage="gpuwatch quota set (--pid PID | --cgroup PATH) [--action pause|kill] SIZE",
                                     description="SIZE per GPU: 512MiB, 20GiB, 1.5GiB, 8GB, 2G (binary), or bytes; 0 "
                                                 "removes the quota. A cgroup's quota is shared by its processes and "
                                                 "those of the cgroups below it.")
    target = quota_set.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid", type=positive_pid, help="one process")
    target.add_argument("--cgroup", metavar="PATH", help="a cgroup v2 path, as /proc/PID/cgroup shows it")
    quota_set.add_argument("--action", choices=["pause", "kill"], default="pause",
                           help="at the limit: stop until it fits (default), or kill")
    quota_set.add_argument("size", type=quota_size, metavar="SIZE")
    quota_set.set_defaults(func=cmd_quota)
    quota_list = quota_sub.add_parser("list", help="quotas, their members and what they hold")
    quota_list.add_argument("--json", action="store_true")
    quota_list.set_defaults(func=cmd_quota)
    for name, command in [*sub.choices.items(), ("quota", quota_set), ("quota", quota_list)]:
        common_options(command, run=name == "run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="gpuwatch: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (DaemonUnavailable, ControlError, UsageError) as exc:
        print(f"gpuwatch: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"gpuwatch: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
