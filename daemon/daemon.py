"""The daemon's composition root: builds the probes, the enforcer's parts and the servers, wires them
(facts flow up from the probes, the enforcer decides, the exporters read the view), and runs them until
SIGTERM or SIGINT. The control commands are daemon/commands.py."""
from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..core import procfs
from ..core.view import Snapshot
from ..core.vocabulary import STATE_FILE_NAME
from ..enforcer.enforcer import Enforcer, SchedulerSettings
from ..enforcer.hostmemory import HostBudget, HostSettings
from ..enforcer.interposed import InterposedRegistry
from ..enforcer.ledger import Ledger
from ..enforcer.pause import Pauser
from ..enforcer.policy import PolicyState
from ..enforcer.procevents import ProcEvents
from ..enforcer.quota import QuotaEnforcer
from ..enforcer.records import Enforcement
from ..enforcer.rules import Policy
from ..enforcer.view import ViewSources, build_view
from ..exporters.metrics import MetricsServer
from ..probes import Tracer
from ..probes.devices import DeviceResolver
from .commands import commands
from .config import Config, InterposerSection, SchedulerSection
from .server import ControlServer

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
        self.stopping = threading.Event()
        # processes stopped and quotas set by hand, for a daemon started after this one was killed
        self.ledger = Ledger(Path(state_file or Path(socket_path).parent / STATE_FILE_NAME))
        self.interposed = InterposedRegistry(interposer.lease_ms, interposer.request_timeout_ms / 1000)
        self.pauser = Pauser(self.interposed, self.ledger)
        self.quota = QuotaEnforcer(tracer.quota, self.ledger)
        # the [[rule]]s: applied at exec (process events), at attach, at start and at every reload (SIGHUP)
        self.config, self._load_config, self._reload = config, reload, threading.Event()
        self._started_with = config  # what a reload cannot change is compared with this
        self.policy = PolicyState(Policy(config.rules if config else ()), self.interposed, self.quota)
        self.interposed.on_attach = self.policy.attached
        self.procevents = ProcEvents(self.policy.apply, self._process_exit, on_lost=self.policy.apply_all)
        self.host = HostBudget(HostSettings.from_config(scheduler))
        self.enforcer = Enforcer(self.view_and_pages, self.interposed, self.pauser,
                                 SchedulerSettings.from_config(scheduler), priority_of=self.policy.priority_of,
                                 exclusive=self.policy.exclusive, host=self.host) if scheduler.enabled else None
        self.interposed.room = self.enforcer is not None
        self._devices = DeviceResolver()
        self._described: dict[int, procfs.ProcInfo] = {}
        tracer.exit_listeners.append(self._forget_exited)
        self.commands = commands(self)

    # the view

    def view_and_pages(self) -> tuple[Snapshot, Mapping[int, Enforcement]]:
        """The one view, and the interposers' pages it was built from (each page read once)."""
        pages = self.interposed.enforcement()
        sources = ViewSources(
            facts=self.tracer.facts(), pages=pages, stopped=self.ledger.stopped(), quotas=self.quota.enforcement(),
            scheduling=self.enforcer.scheduling() if self.enforcer else {},
            summary=self.enforcer.summary() if self.enforcer else None, priority_of=self.policy.priority_of,
            reasons=self.enforcer.reasons if self.enforcer else {},
            resolve=self._devices.resolve, describe=self._describe, alive=procfs.alive, host=self.host.reading(pages))
        return build_view(sources), pages

    def view(self) -> Snapshot:
        return self.view_and_pages()[0]

    def _describe(self, pid: int) -> procfs.ProcInfo | None:
        info = self._described.get(pid)
        if info is None and (info := procfs.read(pid)) is not None:
            self._described[pid] = info
        return info

    def _forget_exited(self, pid: int) -> None:
        self._described.pop(pid, None)
        self._devices.forget(pid)

    # lifecycle

    def request_stop(self, *_: Any) -> None:
        self.stopping.set()

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
            saved_quotas = self.ledger.recover()
            self.tracer.start()
            quota_thread = threading.Thread(target=self._quota_loop, args=(self.tracer.subscribe(),),
                                            name="gpuwatch-quota", daemon=True)
            quota_thread.start()
            self.interposed.start()
            self.procevents.start()
            self.policy.apply_all()
            self.quota.restore(saved_quotas)  # after the rules: a quota set by hand was the later word
            if self.enforcer:
                self.enforcer.start()
            server.start()
            if self.metrics_listen:
                host, port = self.metrics_listen
                metrics = MetricsServer(host, port, self.view)
            health = self.tracer.health()
            log.info("running: %d libraries, %d probes, launches=%s, socket %s, metrics %s", len(health.libraries),
                     health.probes_attached, health.launch_mode, self.socket_path,
                     f"on {self.metrics_listen[0]}:{metrics.port}" if self.metrics_listen and metrics else "off")
            while not self.stopping.wait(0.2):
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
            if quota_thread is not None:
                self.stopping.set()
                quota_thread.join(timeout=2)
            self.quota.close()
            self.ledger.continue_all()
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
        self.host.settings = HostSettings.from_config(new.scheduler)
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
        """At exit: the process's rule and priority, its quota and its place in the ledger go at once."""
        self.policy.forget(pid)
        self.quota.forget(pid)
        self.ledger.forget(pid)

    def _quota_loop(self, events: queue.Queue) -> None:
        """Quota stops as they happen; frees, exits and libcuda opens as they come; the rest every 0.1 s."""
        last = 0.0
        while not self.stopping.is_set():
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
