"""`gpuwatch run`: hosts the tracer and answers local queries until SIGTERM or SIGINT."""
from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..exporters.metrics import MetricsServer
from ..probes import Tracer
from ..probes.model import Enforcement, Snapshot
from .config import Config, InterposerSection, SchedulerSection
from .control import Command, ControlError, ControlServer, Peer
from .enforcer import Enforcer, SchedulerSettings
from .interposed import InterposedRegistry
from .pause import Pauser, pid_argument
from .policy import PRIORITY_NAMES, Policy, PolicyState, ProcessFacts
from .procevents import ProcEvents
from .quota import QuotaEnforcer
from .scheduler import Priority
from .sizes import MAX_SIZE

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, tracer: Tracer, socket_path: str, metrics_listen: tuple[str, int] | None = None,
                 interposer: InterposerSection = InterposerSection(),
                 scheduler: SchedulerSection = SchedulerSection(), state_file: str | None = None,
                 config: Config | None = None, reload: Callable[[], Config] | None = None) -> None:
        """config: what it started with (its rules); reload: reads the configuration again, for SIGHUP."""
        self.tracer = tracer
        self.socket_path = socket_path
        self.metrics_listen = metrics_listen
        self._stopping = threading.Event()
        self.interposed = InterposedRegistry(interposer.lease_ms, interposer.request_timeout_ms / 1000)
        self.pauser = Pauser(self.interposed, held=lambda pid: self.quota.holds(pid),
                             state_file=Path(state_file or Path(socket_path).parent / "stopped.json").with_name("paused.json"))
        # processes stopped at their quota, for a daemon started after this one was killed: beside the socket
        self.quota = QuotaEnforcer(tracer, Path(state_file or Path(socket_path).parent / "stopped.json"),
                                   held_elsewhere=lambda pid: pid in self.pauser.enforcement())
        # the [[rule]]s: applied at exec (process events), at attach, at start and at every reload (SIGHUP)
        self.config, self._load_config, self._reload = config, reload, threading.Event()
        self._started_with = config  # what a reload cannot change is compared with this
        self.policy = PolicyState(Policy(config.rules if config else ()), self.interposed, self.quota)
        self.interposed.on_attach = self.policy.attached
        self.procevents = ProcEvents(self.policy.apply, self._process_exit, on_lost=self.policy.apply_all)
        self.enforcer = Enforcer(tracer.snapshot, self.interposed, self.pauser,
                                 SchedulerSettings.from_config(scheduler), priority_of=self.policy.priority_of,
                                 exclusive=self.policy.exclusive) if scheduler.enabled else None
        self.interposed.room = self.enforcer is not None
        tracer.set_enforcement(self.enforcement)
        self.commands = {
            "ps": Command(self._ps),
            "status": Command(self._status),
            "trace": Command(self._trace, stream=True),
            "interposer_attach": Command(self.interposed.attach, takeover=True),
            "pause": Command(self._pause, root_only=True),
            "resume": Command(self._resume, root_only=True),
            "quota_set": Command(self._quota_set, root_only=True),
            "quota_list": Command(lambda _peer, _request: self.quota.groups()),
            "priority": Command(self._priority),  # any user may read; changes are checked per peer
            "policy": Command(lambda _peer, _request: {**self.policy.to_json(), "events": self.procevents.source}),
        }

    def request_stop(self, *_: Any) -> None:
        self._stopping.set()

    def request_reload(self, *_: Any) -> None:
        self._reload.set()

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        server = ControlServer(self.socket_path, self.commands)
        metrics: MetricsServer | None = None
        quota_thread: threading.Thread | None = None
        try:
            self.quota.start()
            self.tracer.start()
            quota_thread = threading.Thread(target=self._quota_loop, args=(self.tracer.subscribe(),),
                                            name="gpuwatch-quota", daemon=True)
            quota_thread.start()
            self.interposed.start()
            self.pauser.recover()
            self.procevents.start()
            self.policy.apply_all()
            self.quota.restore()  # after the rules: a quota set by hand was the later word
            if self.enforcer:
                self.enforcer.start()
            server.start()
            if self.metrics_listen:
                host, port = self.metrics_listen
                metrics = MetricsServer(host, port, self.snapshot)
            health = self.tracer.health()
            log.info("running: %d libraries, %d probes, launches=%s, socket %s, metrics %s", len(health.libraries),
                     health.probes_attached, health.launch_mode, self.socket_path,
                     f"on {self.metrics_listen[0]}:{metrics.port}" if metrics else "off")
            while not self._stopping.wait(0.2):
                if self._reload.is_set():
                    self._reload.clear()
                    try:
                        self.reload()
                    except Exception:  # a reload must never end the daemon
                        log.exception("configuration reload failed")
        finally:
            server.close()
            self.procevents.close()
            if self.enforcer:
                self.enforcer.close()
            self.interposed.close()
            self.pauser.continue_all()
            if quota_thread is not None:
                self._stopping.set()
                quota_thread.join(timeout=2)
            self.quota.close()
            if metrics:
                metrics.close()
            self.tracer.stop()
            log.info("stopped: probes detached")

    def reload(self) -> None:
        """SIGHUP: the rules and the settings that can change while running ([interposer] timeouts and
        leases, [scheduler] but `enabled`) from the file again; a bad file changes nothing."""
        if self._load_config is None:
            log.error("configuration NOT reloaded: this daemon was not started from a configuration file")
            return
        try:
            new = self._load_config()
        except Exception as exc:  # ConfigError: one line naming the file, the key and the problem
            log.error("configuration NOT reloaded: %s", exc)
            return
        self.config, old = new, self._started_with
        self.policy.set_policy(Policy(new.rules))
        self.interposed.request_timeout = new.interposer.request_timeout_ms / 1000
        self.interposed.lease_ns, self.interposed.renew_every = new.interposer.lease_ms * 1_000_000, \
            new.interposer.lease_ms / 5000
        if self.enforcer is not None:
            self.enforcer.settings = SchedulerSettings.from_config(new.scheduler)
        matched = self.policy.apply_all()
        restart = [] if old is None else [f"{section}.{key}" for section in ("daemon", "metrics", "scheduler")
                                          for key, value in vars(getattr(new, section)).items()
                                          if (section != "scheduler" or key == "enabled")
                                          and value != getattr(getattr(old, section), key)]
        log.info("configuration reloaded: %d rules; processes with a rule: %d%s", len(new.rules), matched,
                 f"; a restart applies {', '.join(restart)}" if restart else "")

    def _process_exit(self, pid: int) -> None:
        """At exit: the process's rule and priority, its scheduling slot and its quota go at once."""
        self.policy.forget(pid)
        for part in (self.enforcer, self.quota):
            forget = getattr(part, "forget", None)
            if forget is not None:
                forget(pid)

    def _priority(self, peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
        """Read a process's priority (anyone), or set it: root any, others only lower their own."""
        pid, level = pid_argument(request), request.get("level")
        if level is not None and level not in PRIORITY_NAMES:
            raise ControlError(f"priority: level must be one of {', '.join(PRIORITY_NAMES)}, not "
                               f"{str(level)[:20]!r}")
        facts = ProcessFacts.read(pid)
        if facts is None:
            raise ControlError(f"no process with pid {pid}")
        current, source = self.policy.effective_priority(pid)
        rule = self.policy.rule_of(pid)
        result = {"pid": pid, "priority": current.name.lower(), "source": source,
                  "rule": rule.name if rule else None}
        if level is None:
            return result
        new = Priority.parse(level)
        if facts.kernel_thread:
            raise ControlError(f"pid {pid} is a kernel thread: it has no GPU priority")
        if not peer.is_root:
            if facts.uid != peer.uid:
                raise ControlError(f"pid {pid} belongs to uid {facts.uid}: uid {peer.uid} may only change its own "
                                   "processes (root may change any)")
            if new >= current:
                raise ControlError(f"pid {pid} is {current.name.lower()}: uid {peer.uid} may only lower the priority "
                                   f"of its processes, so not to {level} (root may)")
        self.policy.set_override(pid, facts.start_time, new)
        log.info("pid %d: priority %s (was %s), set by uid %d", pid, level, current.name.lower(), peer.uid)
        return {**result, "priority": level, "source": "set with gpuwatch priority", "was": current.name.lower()}

    def enforcement(self) -> dict[int, Enforcement]:
        """What the enforcer adds to the snapshot: interposed processes, and those it stopped."""
        merged = self.quota.enforcement()
        for pid, e in self.pauser.enforcement().items():
            merged[pid] = replace(merged[pid], state=e.state) if pid in merged else e
        for pid, page in self.interposed.enforcement().items():
            held = pid in merged and merged[pid].state == "stopped"  # past its backstop: the probes stopped it
            merged[pid] = replace(page, state="stopped", quota_pauses=merged[pid].quota_pauses) if held else page
        return self.enforcer.enforcement(merged) if self.enforcer else merged

    def snapshot(self) -> Snapshot:
        """The tracer's snapshot with the scheduler's summary: what the metrics serve."""
        snap = self.tracer.snapshot()
        if self.enforcer:
            snap.scheduler = self.enforcer.summary()
        return snap

    def _quota_loop(self, events: queue.Queue) -> None:
        """Quota stops as they happen; frees, exits and libcuda opens as they come; the rest every 0.1 s."""
        last = 0.0
        while not self._stopping.is_set():
            try:
                self.quota.on_event(events.get(timeout=0.1))
            except queue.Empty:
                pass
            except Exception:
                log.exception("quota: an event failed")
            now = time.monotonic()
            if now - last >= 0.1:
                last = now
                try:
                    self.quota.tick(now)
                except Exception:
                    log.exception("quota: a tick failed")
        self.tracer.unsubscribe(events)

    def _quota_set(self, _peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
        pid, cgroup, nbytes = request.get("pid"), request.get("cgroup"), request.get("bytes")
        action = request.get("action", "pause")
        if (pid is None) == (cgroup is None):
            raise ControlError("quota_set: give either pid or cgroup")
        if type(nbytes) is not int or not 0 <= nbytes <= MAX_SIZE:
            raise ControlError("quota_set: bytes must be a number of bytes (0: no quota)")
        if cgroup is not None:
            if not isinstance(cgroup, str) or not cgroup:
                raise ControlError("quota_set: cgroup must be a path")
            return self.quota.set_cgroup(cgroup, nbytes, action, by_hand=True)
        pid = pid_argument(request)
        process = self.interposed.get(pid)
        if process is None:
            return self.quota.set_pid(pid, nbytes, action, by_hand=True)
        if action != "pause":
            raise ControlError(f"quota_set: pid {pid} runs under the interposer, where an allocation past the quota "
                               "fails (CUDA_ERROR_OUT_OF_MEMORY): only the pause action applies")
        process.request("quota", self.interposed.request_timeout, bytes=nbytes)
        self.quota.set_backstop(pid, nbytes, by_hand=True)
        return {"pid": pid, "bytes": nbytes, "interposed": True}

    def _pause(self, _peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
        pid, swap, nbytes = pid_argument(request), request.get("swap", False), request.get("bytes", 0)
        if type(swap) is not bool:
            raise ControlError("pause: swap must be true or false")
        if type(nbytes) is not int or nbytes < 0:
            raise ControlError("pause: bytes must be a number of bytes (0: all)")
        return self.pauser.pause(pid, swap, nbytes)

    def _resume(self, _peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
        return self.pauser.resume(pid_argument(request))

    def _ps(self, _peer: Peer, _request: dict[str, Any]) -> list[dict[str, Any]]:
        rows = [p.to_json() for p in self.tracer.snapshot().processes]
        for row in rows:  # the priority the scheduler uses: set with `gpuwatch priority`, its rule's, or its own
            if (priority := self.policy.priority_of(row["pid"])) is not None:
                row["priority"] = priority.name.lower()
        return rows

    def _status(self, _peer: Peer, _request: dict[str, Any]) -> dict[str, Any]:
        snap = self.tracer.snapshot()
        return {"health": snap.to_json()["health"], "gpus": snap.to_json()["gpus"], "processes": len(snap.processes),
                "interposed": len(self.interposed.pids())}

    def _trace(self, _peer: Peer, request: dict[str, Any], closing: threading.Event) -> Iterator[dict[str, Any]]:
        pid, comm = request.get("pid"), request.get("comm")
        if pid is not None and not isinstance(pid, int):
            raise ControlError("trace: pid must be an integer")
        if comm is not None and not isinstance(comm, str):
            raise ControlError("trace: comm must be a string")
        events = self.tracer.subscribe()
        try:
            while not closing.is_set() and not self._stopping.is_set():
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if (pid is None or event.pid == pid) and (comm is None or event.comm == comm):
                    yield event.to_json()
        finally:
            self.tracer.unsubscribe(events)
