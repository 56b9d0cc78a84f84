"""The daemon's record of every process's rule (enforcer/rules.py) and of priorities set with `gpuwatch
priority`, which the scheduler reads through `priority_of` and `exclusive`, and which applies a rule's quota:
through the process's interposer when it runs under `gpuwatch exec` and has attached, through the probes'
quota groups (enforcer/quota.py) otherwise. A Kubernetes container's terms (`pods`: its quota and priority, as
the daemon resolved them from the kubelet) count as a rule's would, a rule's own quota and priority winning; for
processes not under the interposer its quota is a cgroup quota group that `pods` sets. An interposer's limit is
its quota less the process's CUDA context (`context_of`), which the quota counts too."""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..core.procfs import pids as proc_pids
from ..core.protocol import ControlError
from ..core.vocabulary import Priority
from .rules import Policy, ProcessFacts, Rule

log = logging.getLogger(__name__)


class _Interposed(Protocol):  # interposed.InterposedRegistry
    request_timeout: float

    def get(self, pid: int) -> Any: ...  # InterposedProcess | None


class _Quotas(Protocol):  # quota.QuotaEnforcer
    def set_pid(self, pid: int, nbytes: int, action: str = "pause") -> dict[str, Any]: ...
    def set_backstop(self, pid: int, quota: int, action: str = "pause") -> dict[str, Any]: ...


@dataclass(frozen=True)
class PodTerms:
    """What a Kubernetes container's devices give each of its processes."""
    quota_bytes: int | None         # gpuwatch.io/memory on its GPU; None: no memory bound
    priority: Priority | None       # from the API server; None: the default


@dataclass
class _Entry:
    start_time: int
    rule: Rule | None = None
    override: Priority | None = None      # set with `gpuwatch priority`; wins over the rule
    pod: PodTerms | None = None           # its container's, below the rule's
    applied: tuple | None = None          # the quota this policy set: ("probes", bytes, action) or
    #                                       ("interposer", process, bytes)


class PolicyState:
    """Every process's rule, by pid, and the quotas the rules set. Any thread may call any method."""

    def __init__(self, policy: Policy = Policy(), interposed: _Interposed | None = None,
                 quotas: _Quotas | None = None, pods: Callable[[int], PodTerms | None] | None = None,
                 context_of: Callable[[int], int] = lambda pid: 0) -> None:
        self.interposed, self.quotas, self.pods, self.context_of = interposed, quotas, pods, context_of
        self._interposer_quotas: dict[int, tuple[int, int]] = {}  # pid -> (quota, limit sent: the quota less context)
        self._policy = policy
        self._entries: dict[int, _Entry] = {}
        self._lock = threading.Lock()
        self._senders: dict[int, int | None] = {}  # pid -> quota still to send to its interposer (a sender runs)
        self._own_pid = os.getpid()

    # the policy

    def set_policy(self, policy: Policy) -> None:
        """A new policy; apply_all() re-resolves every process against it."""
        with self._lock:
            self._policy = policy

    # lookups (the scheduler's callbacks)

    def rule_of(self, pid: int) -> Rule | None:
        with self._lock:
            e = self._entries.get(pid)
            return e.rule if e else None

    def priority_of(self, pid: int) -> Priority | None:
        """A priority set with `gpuwatch priority`, else the rule's, else None (the process's own)."""
        with self._lock:
            e = self._entries.get(pid)
            if e is None:
                return None
            if e.override is not None:
                return e.override
            if e.rule is not None and e.rule.priority is not None:
                return e.rule.priority
            return e.pod.priority if e.pod else None

    def exclusive(self, pid: int) -> bool:
        with self._lock:
            e = self._entries.get(pid)
            return bool(e and e.rule and e.rule.exclusive)

    def pids(self) -> list[int]:
        with self._lock:
            return sorted(self._entries)

    def effective_priority(self, pid: int) -> tuple[Priority, str]:
        """The priority the scheduler gives a process now, and where it comes from."""
        with self._lock:
            e = self._entries.get(pid)
            if e is not None and e.override is not None:
                return e.override, "set with gpuwatch priority"
            if e is not None and e.rule is not None and e.rule.priority is not None:
                return e.rule.priority, f"rule {e.rule.name}"
            if e is not None and e.pod is not None and e.pod.priority is not None:
                return e.pod.priority, "its pod"
        process = self.interposed.get(pid) if self.interposed else None
        if process is not None:
            return Priority.parse(process.attach.priority), "gpuwatch exec --priority"
        return Priority.NORMAL, "default"

    # process lifecycle

    def apply(self, pid: int) -> Rule | None:
        """At exec (and fork, and start-up, and reload): the process's rule, recorded and its quota set."""
        if pid == self._own_pid:
            return None
        with self._lock:
            if not self._policy.rules and self.pods is None and pid not in self._entries:
                return None  # nothing to match and nothing to undo: no /proc reads per exec
        facts = ProcessFacts.read(pid)
        if facts is None:
            self.forget(pid)
            return None
        pod = self.pods(pid) if self.pods is not None else None
        with self._lock:
            e = self._entries.get(pid)
            if e is not None and e.start_time != facts.start_time:
                e = None  # the pid is another process's now
            rule = self._policy.resolve(facts)
            if e is None:
                e = _Entry(facts.start_time)
            e.rule, e.pod = rule, pod
            if rule is None and pod is None and e.override is None and e.applied is None:
                self._entries.pop(pid, None)
            else:
                self._entries[pid] = e
        if rule is not None:
            log.debug("pid %d (%s): rule %s", pid, facts.comm, rule.name)
        self._sync_quota(pid)
        return rule

    def apply_all(self) -> int:
        """Every running process re-resolved (start-up, reload); returns how many have a rule."""
        alive = set(proc_pids())
        with self._lock:
            gone = [pid for pid in self._entries if pid not in alive]
        for pid in gone:
            self.forget(pid)
        for pid in sorted(alive):
            self.apply(pid)
        with self._lock:
            return sum(1 for e in self._entries.values() if e.rule is not None)

    def attached(self, pid: int) -> None:
        """A process's interposer attached (a little after exec, when it loaded libcuda): its rule's quota
        goes to the interposer now."""
        with self._lock:
            known = pid in self._entries and self.pods is None
        if known:
            self._sync_quota(pid)
        else:
            self.apply(pid)

    def forget(self, pid: int) -> None:
        """At exit: the process's rule, priority and quota record go at once."""
        with self._lock:
            self._entries.pop(pid, None)
            self._interposer_quotas.pop(pid, None)

    def set_override(self, pid: int, start_time: int, priority: Priority) -> None:
        with self._lock:
            e = self._entries.get(pid)
            if e is None or e.start_time != start_time:
                e = self._entries[pid] = _Entry(start_time, rule=e.rule if e else None)
            e.override = priority

    # quotas

    def _sync_quota(self, pid: int) -> None:
        process = self.interposed.get(pid) if self.interposed else None
        with self._lock:
            e = self._entries.get(pid)
            if e is None:
                return
            rule = e.rule
            want: tuple | None = None
            pod_quota = e.pod.quota_bytes if e.pod is not None else None
            if rule is not None and rule.quota:
                # under the interposer the library refuses at the quota; the probes keep a backstop past it
                want = ("interposer", rule.quota, rule.action, process) if process is not None else \
                    ("probes", rule.quota, rule.action)
            elif pod_quota and process is not None:  # a plain process: its container's cgroup quota holds it
                want = ("interposer", pod_quota, "pause", process)
            previous, e.applied = e.applied, want
            if rule is None and e.pod is None and e.override is None and want is None:
                del self._entries[pid]
        if want == previous:
            return
        if want is None:
            if previous is not None:
                self._probe_quota(pid, 0, "pause")  # its rule has no quota now
        elif want[0] == "probes":
            self._probe_quota(pid, want[1], want[2])
        else:
            self._probe_quota(pid, want[1], want[2], backstop=True)
        if process is not None and (want is not None or (previous is not None and previous[0] == "interposer")):
            own = process.attach.mem_limit or 0  # `gpuwatch exec --mem-limit`: the rule's quota may only lower it
            nbytes = min(want[1], own) if want is not None and own else want[1] if want is not None else own
            self._send_quota(pid, process, nbytes)

    def _probe_quota(self, pid: int, nbytes: int, action: str, backstop: bool = False) -> None:
        if self.quotas is None:
            return
        try:
            if backstop:
                self.quotas.set_backstop(pid, nbytes, action)
            else:
                self.quotas.set_pid(pid, nbytes, action)
            if nbytes and not backstop:
                log.info("pid %d: quota %d bytes per GPU (%s at the limit), from its rule", pid, nbytes, action)
        except ControlError as exc:
            log.debug("pid %d: rule quota not set: %s", pid, exc)
        except Exception:
            log.exception("pid %d: rule quota not set", pid)

    def interposer_limit(self, pid: int, quota: int) -> int:
        """What an interposer enforces for a quota: the quota less the process's context (at least 1 byte: a
        context as large as the quota leaves no room for allocations; 0 stays no quota)."""
        return max(quota - self.context_of(pid), 1) if quota else 0

    def interposer_quota(self, pid: int) -> int | None:
        """The quota sent to the process's interposer (its rule's or its pod's), before the context is taken
        off: what `ps` shows."""
        with self._lock:
            sent = self._interposer_quotas.get(pid)
        return sent[0] if sent else None

    def recount(self, pids: list[int]) -> None:
        """The contexts were learnt again: interposers whose limit moved get the new one."""
        for pid in pids:
            with self._lock:
                sent = self._interposer_quotas.get(pid)
            process = self.interposed.get(pid) if self.interposed else None
            if sent is not None and process is not None and self.interposer_limit(pid, sent[0]) != sent[1]:
                self._send_quota(pid, process, sent[0])

    def _send_quota(self, pid: int, process: Any, quota: int) -> None:
        """Requests run on a thread of their own (an attach must be answered before its process answers
        requests); the last value asked for is the one sent last."""
        nbytes = self.interposer_limit(pid, quota)
        with self._lock:
            self._interposer_quotas[pid] = (quota, nbytes)
            running = pid in self._senders
            self._senders[pid] = nbytes
        if not running:
            threading.Thread(target=self._sender, args=(pid, process), name=f"gpuwatch-policy-{pid}",
                             daemon=True).start()

    def _sender(self, pid: int, process: Any) -> None:
        while True:
            with self._lock:
                nbytes = self._senders.get(pid)
                if nbytes is None:
                    self._senders.pop(pid, None)
                    return
                self._senders[pid] = None
            try:
                process.requests.set_quota(nbytes)
                log.info("pid %d: allocations limited to %s bytes per GPU through its interposer (its quota less its "
                         "context)", pid, nbytes or "no")
            except ControlError as exc:
                log.warning("pid %d: rule quota not sent to its interposer: %s", pid, exc)

    # the `policy` command

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            entries = sorted(self._entries.items())
            rules = [r.to_json() for r in self._policy.rules]
        processes = []
        for pid, e in entries:
            priority = e.override if e.override is not None else e.rule.priority if e.rule else None
            processes.append({"pid": pid, "rule": e.rule.name if e.rule else None,
                              "priority": None if priority is None else priority.label,
                              "priority_set": None if e.override is None else e.override.label,
                              "quota_bytes": e.rule.quota if e.rule and e.rule.quota else
                              e.pod.quota_bytes if e.pod else None,
                              "action": e.rule.action if e.rule else None,
                              "exclusive": bool(e.rule and e.rule.exclusive)})
        return {"rules": rules, "processes": processes}
