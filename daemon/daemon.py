"""The daemon's composition root: builds the probes, the enforcer's parts and the servers, wires them
(facts flow up from the probes, the enforcer decides, the exporters read the view), and runs them until
SIGTERM or SIGINT. The control commands are daemon/commands.py."""
from __future__ import annotations

import logging
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..core import procfs, threads
from ..core.view import Snapshot
from ..core.vocabulary import STATE_FILE_NAME
from ..core.checkpoint import Driver
from ..core.vocabulary import CHECKPOINTED
from ..enforcer.checkpointer import Checkpointer, CheckpointSettings
from ..enforcer.contexts import ContextLearner
from ..enforcer.enforcer import Enforcer, SchedulerSettings
from ..enforcer.hostmemory import HostBudget, HostSettings
from ..enforcer.interposed import InterposedRegistry
from ..enforcer.ledger import Ledger
from ..enforcer.mover import Mover
from ..enforcer.pause import Pauser
from ..enforcer.policy import PolicyState
from ..enforcer.procevents import ProcEvents
from ..enforcer.quota import QuotaEnforcer
from ..enforcer.records import Enforcement
from ..enforcer.roomstops import RoomStops, free_bytes
from ..enforcer.rules import Policy
from ..enforcer.seed import Seeder
from ..enforcer.view import ViewSources, build_view
from ..exporters.metrics import MetricsServer
from ..probes import PreflightError, Tracer
from ..probes.devices import DeviceResolver
from ..probes.fanout import Subscription
from ..probes.libraries import host_libraries
from .commands import commands
from .config import Config, InterposerSection, SchedulerSection
from .kubequota import PodQuotas
from .paths import check_state_directories
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
        self.checkpointer = Checkpointer(
            None, self.ledger, CheckpointSettings(scheduler.move_plain, scheduler.lock_timeout_ms),
            why_not="the driver is opened at start", ipc_user=tracer.room.ipc_user,
            host_room=lambda pid, n: self.host.room_for(pid, n, self.host.reading(self.interposed.enforcement())))
        self._driver_path = config.daemon.driver if config is not None else ""
        self.pauser = Pauser(self.interposed, self.ledger, self.checkpointer, self.room_for, self.device_holding)
        self.quota = QuotaEnforcer(tracer.quota, self.ledger)
        # the [[rule]]s: applied at exec (process events), at attach, at start and at every reload (SIGHUP)
        self.config, self._load_config, self._reload = config, reload, threading.Event()
        self._started_with = config  # what a reload cannot change is compared with this
        self.policy = PolicyState(Policy(config.rules if config else ()), self.interposed, self.quota)
        self.interposed.on_attach = self.policy.attached
        self.procevents = ProcEvents(self.policy.apply, self._process_exit, on_lost=self.policy.apply_all)
        self.host = HostBudget(HostSettings.from_config(scheduler), checkpointed=self._checkpointed_bytes)
        self.room_stops = RoomStops(tracer.room, self.ledger) if scheduler.enabled else None
        if self.room_stops is not None:
            self.checkpointer.claim = self.room_stops.claim
        self.enforcer = Enforcer(self.view_and_pages, self.interposed, self.pauser,
                                 SchedulerSettings.from_config(scheduler), priority_of=self.policy.priority_of,
                                 exclusive=self.policy.exclusive, host=self.host,
                                 room=self.room_stops) if scheduler.enabled else None
        self.interposed.room = self.enforcer is not None
        self.mover = Mover(self.pauser, lambda: self.view().gpus, self.free_bytes, self.room_for,
                           lambda pid: self.interposed.get(pid) is not None)
        if self.enforcer is not None:
            self.enforcer.placement.mover = self.mover  # [scheduler] move_idle
        self._devices = DeviceResolver(self.ledger.placement)  # where `gpuwatch move` put processes
        # what processes held before the probes attached (a restart): in their device figures and quotas
        self.seeder = Seeder(tracer.seeds, self._devices.resolve,
                             SchedulerSettings.from_config(scheduler).context_bytes,
                             lambda: tracer.facts(work=False), self.interposed.enforcement)
        # each process's CUDA context, counted against its quota
        self.contexts = ContextLearner(lambda: tracer.facts(work=False), self._devices.resolve, lambda: (
            self.enforcer.settings if self.enforcer else SchedulerSettings.from_config(scheduler)).context_bytes,
            [self.quota.set_contexts, lambda found: self.policy.recount(sorted(found))])
        self.policy.context_of = self.contexts.expected
        self._described: dict[int, procfs.ProcInfo] = {}
        tracer.exit_listeners.append(self._forget_exited)
        self.kube: Any = None
        if config is not None and config.kubernetes.enabled:
            try:
                from ..kube.node import Kubernetes  # only here: grpc loads only where Kubernetes is on
            except (ImportError, RuntimeError) as exc:  # no grpcio, or one older than the generated code wants
                raise PreflightError(f"[kubernetes] needs grpcio and protobuf as pyproject.toml asks: {exc} "
                                     "(./install.sh installs them; or set [kubernetes] enabled = false)") from None
            self.kube = Kubernetes(config.kubernetes, socket_path)
        self.pod_quotas = PodQuotas(self.kube, self.quota) if self.kube is not None else None
        if self.pod_quotas is not None:  # containers' quotas and priorities, applied as the rules' are
            self.policy.pods, self.pod_quotas.reapply = self.pod_quotas.terms, self.policy.apply
            self.contexts.each_round.append(self.pod_quotas.retry)
        self.commands = commands(self)

    # the view

    def view_and_pages(self) -> tuple[Snapshot, Mapping[int, Enforcement]]:
        """The one view, and the interposers' pages it was built from (each page read once)."""
        pages = self.interposed.enforcement()
        sources = ViewSources(
            facts=self.tracer.facts(), pages=pages, stopped=self.ledger.stopped(), quotas=self.quota.enforcement(),
            moved={pid: how for pid in self.ledger.stopped() if (how := self.ledger.moved(pid)[0])},
            unmovable=self.checkpointer.unmovable_now(),
            scheduling=self.enforcer.scheduling() if self.enforcer else {},
            summary=self.enforcer.summary() if self.enforcer else None, priority_of=self.policy.priority_of,
            reasons=self.enforcer.reasons if self.enforcer else {},
            plans=self.enforcer.placement.plans if self.enforcer else {},
            resolve=self._devices.resolve, describe=self._describe, alive=procfs.alive, host=self.host.reading(pages),
            placement=self.ledger.placement, quota_of=self.policy.interposer_quota)
        return build_view(sources), pages

    def view(self) -> Snapshot:
        return self.view_and_pages()[0]

    def device_holding(self, pid: int) -> tuple[int, dict[int, int]]:
        """What a process not under the interposer holds on the device (NVML's figure, its context included,
        else the probes' and a context), in all and on each GPU: what a checkpoint of it moves."""
        context = self.enforcer.settings.context_bytes if self.enforcer else 0
        on_gpus: dict[int, int] = {}
        for r in self.view().processes:
            if r.pid == pid and r.gpu is not None:
                on_gpus[r.gpu] = on_gpus.get(r.gpu, 0) + (r.nvml_bytes if r.nvml_bytes is not None else
                                                          r.device_bytes + context)
        return sum(on_gpus.values()), on_gpus

    def free_bytes(self) -> dict[int, int]:
        """What each GPU can still give beside what its processes hold now and the reserve."""
        settings = self.enforcer.settings if self.enforcer else SchedulerSettings()
        free = free_bytes(self.view(), settings.reserve_bytes, settings.context_bytes)
        for gpu, n in (self.room_stops.in_flight() if self.room_stops else {}).items():
            if gpu in free:
                free[gpu] -= n  # let through or being restored, not seen yet
        return free

    def room_for(self, nbytes: int, gpus: list[int]) -> bool:
        """Whether every GPU in `gpus` (all, if none is known) has room for `nbytes` beside what the others hold
        now and the reserve: a restore is asked for only then."""
        free = self.free_bytes()
        wanted = [free.get(gpu) for gpu in gpus] if gpus else list(free.values())
        return bool(wanted) and all(f is not None and f >= nbytes for f in wanted)

    def _checkpointed_bytes(self) -> int:
        """What the driver holds in host memory for the processes it checkpointed."""
        return sum(self.ledger.moved(pid)[1] for pid in self.ledger.stopped()
                   if self.ledger.moved(pid)[0] == CHECKPOINTED)

    def _open_driver(self) -> None:
        """The checkpoint API: never a reason not to start; `status` says why it is not there."""
        path = self._driver_path or next((lib.path for lib in host_libraries()), "")
        if not path:
            self.checkpointer.why_not = "no libcuda.so.1 found on the host"
        else:
            self.checkpointer.driver = Driver(path)
            self.checkpointer.why_not = self.checkpointer.driver.why_not
        log.info("checkpoint API: %s", f"in {path}" if self.checkpointer.available else self.checkpointer.why_not)

    def _describe(self, pid: int) -> procfs.ProcInfo | None:
        info = self._described.get(pid)
        if info is None and (info := procfs.read(pid)) is not None:
            if self.kube is not None:
                namespace, pod, container = self.kube.labels_for(pid)
                info = replace(info, namespace=namespace, pod=pod, container=container)
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
        """Starts the parts in order, serves until SIGTERM or SIGINT, and stops what started in reverse order.
        A part that fails to start: StartError (one line); what had started is stopped again first, so that
        nothing stays attached or stopped. SIGTERM during start-up ends it at the next part."""
        check_state_directories(self.socket_path, self.ledger.path)  # before anything starts: one line if unsafe
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        stops: list[tuple[str, Callable[[], None]]] = []
        server: ControlServer | None = None
        try:
            server = _starting(f"control socket {self.socket_path}",
                               lambda: ControlServer(self.socket_path, self.commands))
            metrics = self._start_parts(stops)
            server.start()
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
        except _Interrupted:
            log.info("stopping: asked to stop during start-up")
        finally:
            attached = any(what == PROBES for what, _ in stops)
            if server is not None:
                server.close()  # first: no command arrives while the rest stops
            while stops:
                what, stop = stops.pop()
                try:
                    stop()
                except Exception:  # the rest still stops
                    log.exception("stopping %s failed", what)
            if attached:
                log.info("stopped: probes detached")

    def _start_parts(self, stops: list[tuple[str, Callable[[], None]]]) -> MetricsServer | None:
        """Each part in turn, its stop recorded once it started. The metrics address is bound before any
        probe attaches (tried and released: a busy port costs nothing to find out), served at the end."""
        def part(what: str, start: Callable[[], Any], stop: Callable[[], None] | None = None, hint: str = "") -> Any:
            if self.stopping.is_set():
                raise _Interrupted
            result = _starting(what, start, hint)
            if stop is not None:
                stops.append((what, stop))
            return result

        if self.metrics_listen:  # served once everything runs (a scrape that answers means a running daemon)
            host, port = self.metrics_listen
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            hint = "choose another address with --listen or [metrics] listen, or --no-metrics"
            part(f"metrics on {where}", lambda: _check_bind(host, port), hint=hint)
        saved_quotas = part("the state file", self.ledger.recover, self.ledger.continue_all)
        part(PROBES, self.tracer.start, self.tracer.stop)
        part("what running processes held", self.seeder.start, self.seeder.close)  # before any quota is set
        events = self.tracer.subscribe()
        quota_thread = threading.Thread(target=threads.supervised("gpuwatch-quota", lambda: self._quota_loop(events),
                                                                  self.stopping), name="gpuwatch-quota", daemon=True)

        def stop_quota() -> None:
            self.stopping.set()
            quota_thread.join(timeout=2)
            self.quota.close()
        part("the quota thread", quota_thread.start, stop_quota)
        part("the contexts", self.contexts.start, self.contexts.close)
        part("the interposers' leases", self.interposed.start, self.interposed.close)
        part("process events", self.procevents.start, self.procevents.close)
        if self.kube is not None:
            part("Kubernetes", self.kube.start, self.kube.stop)
        part("the rules", self.policy.apply_all)
        part("the quotas set by hand", lambda: self.quota.restore(saved_quotas))  # after the rules: the later word
        part("the driver's checkpoint API", self._open_driver)
        part("processes a previous daemon checkpointed", lambda: self.checkpointer.take_over(self.room_for),
             lambda: self.checkpointer.release_all(self.room_for))
        if self.enforcer:
            part("the scheduler", self.enforcer.start, self.enforcer.close)
        metrics: MetricsServer | None = None
        if self.metrics_listen:
            metrics = part(f"metrics on {where}", lambda: MetricsServer(host, port, self.view), hint=hint)
            assert metrics is not None
            stops.append(("metrics", metrics.close))
        return metrics

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
        restart = [] if old is None else [f"{section}.{key}" for section in ("daemon", "metrics", "scheduler",
                                                                          "kubernetes")
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
        self.checkpointer.forget(pid)
        if self.kube is not None and self.pod_quotas is not None:
            self.kube.forget(pid)
            self.pod_quotas.forget(pid)

    def _quota_loop(self, events: Subscription) -> None:
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


PROBES = "the probes"


class StartError(Exception):
    """A part of the daemon could not start: one line naming it and the problem."""


class _Interrupted(Exception):
    """SIGTERM or SIGINT during start-up."""


def _check_bind(host: str, port: int) -> None:
    """OSError unless the metrics server could bind (host, port) now; the socket is released at once."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server binds it
        s.bind((host, port))


def _starting(what: str, start: Callable[[], Any], hint: str = "") -> Any:
    try:
        return start()
    except (StartError, PreflightError):  # PreflightError: one line of its own (run.py)
        raise
    except Exception as exc:
        if isinstance(exc, OSError) and exc.strerror:
            problem = exc.strerror + (f": {exc.filename}" if exc.filename else "")
        else:
            problem = str(exc) or type(exc).__name__
        log.debug("start-up failed: %s", what, exc_info=True)
        raise StartError(f"{what}: {' '.join(problem.split())}{': ' + hint if hint else ''}") from exc
