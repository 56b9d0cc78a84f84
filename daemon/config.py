"""The daemon's configuration file (TOML). Every key, its default and its check live in one table; every number
has a range [low, high] (the README's configuration reference shows them), checked at start, at every reload and
on the command line's options. A bad file stops start-up with one line naming the key and the problem."""
from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..core.vocabulary import DEFAULT_CONFIG, DEFAULT_SOCKET, is_power_of_two
from ..enforcer.rules import Rule, RuleError, parse_rules
from ..kube.settings import KubernetesSection

DEFAULT_PATH = DEFAULT_CONFIG
MAX_FILE_BYTES = 1 << 20  # a configuration file is a few KiB; anything this large is not one


class ConfigError(Exception):
    pass


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, not {v!r}"


def _listen(v: str) -> str | None:
    try:
        parse_listen(v)
    except ValueError as exc:
        return str(exc)
    return None


def _absolute(v: str) -> str | None:
    return None if v.startswith("/") else f"must be an absolute path, not {v!r}"


def _key(default: Any, check: Callable[[Any], str | None] | None = None, doc: str = "") -> Any:
    return field(default=default, metadata={"check": check, "doc": doc, "range": None})


def _number(default: int, low: int, high: int, doc: str, power_of_two: bool = False) -> Any:
    """An integer key from low to high (both included): a value out of range is refused, never clipped."""
    what = "a power of two " if power_of_two else ""

    def check(v: int) -> str | None:
        good = low <= v <= high and (not power_of_two or is_power_of_two(v))
        return None if good else f"must be {what}from {low} to {high}, not {v}"
    return field(default=default, metadata={"check": check, "doc": doc, "range": (low, high)})


def key_range(section: type, key: str) -> tuple[int, int] | None:
    """[low, high] of a number key (the README shows them; tests hold them to it)."""
    return next(f.metadata["range"] for f in fields(section) if f.name == key)


@dataclass(frozen=True)
class DaemonSection:
    socket: str = _key(DEFAULT_SOCKET, _absolute, "control socket (any user may connect and read)")
    launches: str = _key("sample", _one_of("all", "sample", "off"), "launch and copy probes: all, sample or off")
    nvml: bool = _key(True, None, "query NVML for GPUs and per-process memory")
    driver: str = _key("", lambda v: None if v == "" else _absolute(v),
                       "the driver library whose checkpoint API moves processes not under the interposer; empty: "
                       "the host's libcuda.so.1, found as the probes find it")
    # a BPF ring buffer's size is a power of two that the kernel allocates at once: at most 256 MiB here
    ring_buffer_pages: int = _number(1024, 1, 65536, "event ring buffer size in 4 KiB pages", power_of_two=True)
    sample_window_ms: int = _number(40, 1, 60000, "sample mode: launch probes attached this long ...")
    sample_period_ms: int = _number(4000, 2, 3600000, "... once every this long (counts scaled by period/window)")


@dataclass(frozen=True)
class MetricsSection:
    enabled: bool = _key(True, None, "serve Prometheus metrics")
    listen: str = _key("127.0.0.1:9445", _listen, "HOST:PORT to serve metrics on; an empty HOST is every interface")


@dataclass(frozen=True)
class InterposerSection:
    lease_ms: int = _number(5000, 500, 3600000, "lease: a paused process resumes this long after the daemon goes")
    request_timeout_ms: int = _number(120000, 100, 3600000, "how long a swap-out or a resume that brings memory "
                                      "back may take (other requests: 5 s, or this if shorter)")


@dataclass(frozen=True)
class SchedulerSection:
    enabled: bool = _key(True, None, "time-slice and oversubscribe each GPU between the processes that share it")
    quantum_ms: int = _number(0, 0, 86400000, "a slice's length; 0: 20 times the cost of a switch at the measured "
                                              "swap rate, at least 1 s")
    idle_ms: int = _number(500, 1, 3600000, "a holder without launches this long gives up the rest of its slice")
    reserve_mib: int = _number(1024, 0, 16777216, "device memory left out of every plan")  # 16 TiB
    context_mib: int = _number(768, 0, 1048576, "a process's own context memory, where NVML cannot tell")
    tick_ms: int = _number(50, 1, 10000, "how often the scheduler decides")
    room_wait_ms: int = _number(30000, 1, 86400000, "an allocation waiting for room that is not its turn fails "
                                                    "after this long (what cannot move holds the device, or host "
                                                    "memory is short)")
    host_reserve_mib: int = _number(-1, -1, 16777216, "host memory never used for swapped-out memory; -1: the "
                                                      "larger of 4096 and 5 % of RAM")
    host_limit_mib: int = _number(0, 0, 16777216, "at most this much host memory for swapped-out memory; 0: no cap")
    move_plain: bool = _key(True, None, "lock, checkpoint and restore processes not under the interposer with the "
                                        "driver's checkpoint API, where it has one (r570 and later)")
    lock_timeout_ms: int = _number(5000, 10, 600000, "a lock that does not get a process's CUDA calls this soon "
                                                     "leaves it running (three times: it is unmovable)")
    move_idle: bool = _key(False, None, "move an idle process not under the interposer from an oversubscribed GPU "
                                        "to another GPU with room for it (the driver's checkpoint API, r580)")


@dataclass(frozen=True)
class Config:
    daemon: DaemonSection = field(default_factory=DaemonSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    interposer: InterposerSection = field(default_factory=InterposerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    kubernetes: KubernetesSection = field(default_factory=KubernetesSection)
    rules: tuple[Rule, ...] = ()  # the [[rule]] tables (enforcer/rules.py), in order


def _sections() -> dict[str, Any]:
    return {f.name: f for f in fields(Config) if f.name != "rules"}


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be HOST:PORT with a port from 1 to 65535, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _section(cls: type, name: str, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{where}: {name}.{key}: unknown key (known: {', '.join(known)})")
    settings = {}
    for key, value in values.items():
        f = known[key]
        want = type(f.default)
        if type(value) is not want:
            raise ConfigError(f"{where}: {name}.{key}: must be {want.__name__}, not {type(value).__name__} {value!r}")
        if f.metadata["check"] and (problem := f.metadata["check"](value)):
            raise ConfigError(f"{where}: {name}.{key}: {problem}")
        settings[key] = value
    return cls(**settings)


def parse(text: str, where: str = "config") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from None
    rules = data.pop("rule", [])
    sections = _sections()
    for name in data:
        if name not in sections:
            raise ConfigError(f"{where}: [{name}]: unknown section (known: {', '.join(sections)}, [[rule]])")
    config = Config(**{name: _section(sections[name].default_factory().__class__, name, value, where)
                       for name, value in data.items()})
    try:
        config = replace(config, rules=parse_rules(rules))
    except RuleError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    d = config.daemon
    if d.sample_window_ms >= d.sample_period_ms:
        raise ConfigError(f"{where}: daemon.sample_window_ms: must be shorter than daemon.sample_period_ms "
                          f"({d.sample_window_ms} >= {d.sample_period_ms})")
    return config


def load(path: str | None) -> Config:
    """The file at `path`; built-in defaults when the default file does not exist."""
    target = Path(path or DEFAULT_PATH)
    try:
        with open(target, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        if path is None:
            return Config()
        raise ConfigError(f"{target}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{target}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{target}: larger than {MAX_FILE_BYTES >> 20} MiB: not a configuration file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{target}: not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}): TOML files "
                          "are UTF-8; save it as UTF-8") from None
    return parse(text, str(target))


def with_overrides(config: Config, daemon: dict[str, Any], metrics: dict[str, Any]) -> Config:
    """Command-line options win over the file; None means 'not given'. Each is checked as its key is."""
    def checked(cls: type, given: dict[str, Any]) -> dict[str, Any]:
        known = {f.name: f for f in fields(cls)}
        for key, value in given.items():
            check = known[key].metadata["check"]
            if value is not None and check and (problem := check(value)):
                raise ConfigError(f"--{key.replace('_', '-')}: {problem}")
        return {k: v for k, v in given.items() if v is not None}
    return replace(config, daemon=replace(config.daemon, **checked(DaemonSection, daemon)),
                   metrics=replace(config.metrics, **checked(MetricsSection, metrics)))
