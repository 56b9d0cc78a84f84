"""The commands that change what the daemon does to processes: pause, resume (by itself where no daemon
answers), quota, priority, and the policy they live under."""
from __future__ import annotations

import argparse
import json
from typing import Any

from ..core.protocol import Client, DaemonUnavailable
from ..core.vocabulary import human_bytes, socket_path
from .common import UsageError, size_argument, warn_unsaved

PAUSE_TIMEOUT = 600.0  # the daemon answers within its request_timeout_ms; a swap of a full GPU takes seconds


def cmd_pause(args: argparse.Namespace) -> int:
    with Client(args.socket or socket_path(), timeout=PAUSE_TIMEOUT) as client:
        result = client.call("pause", pid=args.pid, swap=args.swap is not None, bytes=args.swap or 0)
    if result["state"] == "stopped":
        print(f"gpuwatch: pid {args.pid} stopped (SIGSTOP: it does not run under the interposer)")
    elif not result.get("interposed") and args.swap is None:
        print(f"gpuwatch: pid {args.pid} {result['state']} (the driver's lock: its CUDA calls wait, its other "
              "threads run)")
    elif args.swap is not None:
        moved = "?" if result.get("bytes") is None else human_bytes(result["bytes"])
        print(f"gpuwatch: pid {args.pid} {result['state']}: {moved} moved to host memory")
    else:
        print(f"gpuwatch: pid {args.pid} {result['state']}")
    warn_unsaved(result)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    socket = args.socket or socket_path()
    try:
        with Client(socket, timeout=PAUSE_TIMEOUT) as client:
            result = client.call("resume", pid=args.pid)
    except DaemonUnavailable:
        from .recover import RecoverError, resume_without_daemon
        try:
            print(f"gpuwatch: pid {args.pid} {resume_without_daemon(args.pid, socket, force=args.force)}")
        except RecoverError as exc:
            raise UsageError(str(exc)) from None
        return 0
    how = "" if result.get("interposed") or result["state"] != "running" else \
        " (the driver unlocked it)" if result.get("moved") else " (SIGCONT)"
    waiting = f": {result['waiting']}" if result.get("waiting") else ""
    print(f"gpuwatch: pid {args.pid} {result['state']}{how}{waiting}")
    return 0


def quota_size(text: str) -> int:
    """A SIZE, or 0 (no quota)."""
    return 0 if text.strip() == "0" else size_argument(text)


def cmd_quota(args: argparse.Namespace) -> int:
    with Client(args.socket or socket_path()) as client:
        if args.quota_command == "list":
            groups = client.call("quota_list")
            if args.json:
                print(json.dumps(groups, indent=1))
            for g in [] if args.json else groups:
                who = f"pid {g['pid']}" if g["pid"] is not None else f"cgroup {g['cgroup']}"
                held = ", ".join(f"gpu {gpu}: {human_bytes(n)}" for gpu, n in g["held"].items()) or "nothing"
                print(f"{who}: {human_bytes(g['bytes'])} per GPU, {g['action']} at the limit; "
                      f"{len(g['members'])} processes hold {held}")
            return 0
        target = {"pid": args.pid} if args.pid is not None else {"cgroup": args.cgroup}
        result = client.call("quota_set", **target, bytes=args.size, action=args.action)
    who = f"pid {args.pid}" if args.pid is not None else f"cgroup {result.get('cgroup', args.cgroup)}"
    if args.size == 0:
        print(f"gpuwatch: {who}: no quota")
    else:
        how = "through its interposer" if result.get("interposed") else f"{args.action} at the limit"
        print(f"gpuwatch: {who}: quota {human_bytes(args.size)} per GPU ({how})")
    warn_unsaved(result)
    return 0


def cmd_priority(args: argparse.Namespace) -> int:
    with Client(args.socket or socket_path()) as client:
        result = client.call("priority", pid=args.pid, **({"level": args.level} if args.level else {}))
    if args.level:
        print(f"gpuwatch: pid {args.pid} priority {result['priority']} (was {result['was']})")
    else:
        print(f"gpuwatch: pid {args.pid} priority {result['priority']} ({result['source']})")
    return 0


def format_policy(policy: dict[str, Any]) -> str:
    lines = [f"rules: {len(policy['rules'])}   process events: {policy.get('events') or '-'}"]
    for r in policy["rules"]:
        match = " ".join(f"{k}={v}" for k, v in r["match"].items()) or "every process"
        settings = [f"quota {human_bytes(r['quota_bytes'])} ({r['action']})" if r["quota_bytes"] else "",
                    f"priority {r['priority']}" if r["priority"] else "", "exclusive" if r["exclusive"] else ""]
        lines.append(f"  {r['name']}: {match} -> {', '.join(s for s in settings if s) or 'nothing (exempt)'}")
    lines.append(f"{'PID':>7} {'RULE':20} {'PRIORITY':8} {'QUOTA':>10} {'ACTION':6} EXCLUSIVE")
    for p in policy["processes"]:
        lines.append(f"{p['pid']:>7} {(p['rule'] or '-')[:20]:20} {p['priority'] or '-':8} "
                     f"{human_bytes(p['quota_bytes']):>10} {p['action'] or '-':6} {'yes' if p['exclusive'] else 'no'}")
    return "\n".join(lines)


def cmd_policy(args: argparse.Namespace) -> int:
    with Client(args.socket or socket_path()) as client:
        policy = client.call("policy")
    print(json.dumps(policy, indent=1) if args.json else format_policy(policy))
    return 0
