"""Rules: the `[[rule]]` tables of the daemon's configuration, which give processes a quota, a priority, an
action at the quota and exclusive use of their GPUs, and what they match on.

A rule matches processes by any of: cgroup (a cgroup v2 path prefix), container (id or a prefix of it),
Kubernetes pod (uid), user (name or uid), exe (a glob on the executable's path) and cmdline (a regular
expression searched in the command line); every key given must match. Rules are tried in the order of the
file and the FIRST rule that matches a process is its rule, all of it: later rules are not consulted, not
even for settings the first leaves out (write a combined rule first where both should apply; a rule with
no settings exempts the processes it matches from the rules after it).

`ProcessFacts` is what a rule can look at, read from /proc; `Policy.resolve` picks the rule; the daemon's
record of every process's rule is enforcer/policy.py."""
from __future__ import annotations

import fnmatch
import logging
import pwd
import re
from dataclasses import dataclass, field
from typing import Any

from ..core.procfs import PF_KTHREAD, cgroup_of, container_of, read_record
from ..core.vocabulary import ACTIONS, PRIORITY_NAMES, Priority, SizeError, parse_size

log = logging.getLogger(__name__)

RULE_KEYS = ("name", "match", "quota", "priority", "action", "exclusive")
MATCH_KEYS = ("cgroup", "container", "pod", "user", "exe", "cmdline")
_POD_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HEX = re.compile(r"[0-9a-f]+")


class RuleError(ValueError):
    """A bad rule, in one line naming the rule and the key (config.py adds the file's name)."""


# ------------------------------------------------------------------------------------------------ facts


@dataclass(frozen=True)
class ProcessFacts:
    """What a rule may match on, read from /proc at one moment."""
    pid: int
    start_time: int              # clock ticks after boot: tells a process from a later one with its pid
    uid: int | None              # real uid (the first of /proc/PID/status Uid:)
    cgroup: str | None = None    # cgroup v2 path as /proc/PID/cgroup shows it ("/a/b"); None: no v2 line
    container_id: str = ""       # empty on the host
    pod_uid: str = ""            # empty outside Kubernetes
    exe: str = ""                # the executable's path; empty: not readable
    cmdline: str = ""            # arguments joined with spaces
    comm: str = ""
    kernel_thread: bool = False

    @classmethod
    def read(cls, pid: int) -> ProcessFacts | None:
        """None when the process is gone (or a zombie): a vanishing process is never an error."""
        r = read_record(pid)
        if r is None:
            return None
        container, pod = container_of(r.cgroup_text)
        return cls(pid, r.start_time, r.uid, cgroup_of(r.cgroup_text), container, pod, r.exe, r.cmdline, r.comm,
                   bool(r.flags & PF_KTHREAD))


# ------------------------------------------------------------------------------------------------ rules


def _below(path: str, top: str) -> bool:
    return top == "/" or path == top or path.startswith(top + "/")


@dataclass(frozen=True)
class Match:
    """Every key given must match; no key at all matches every process."""
    cgroup: str | None = None               # "/a/b": the process's cgroup is /a/b or below it
    container: str | None = None            # container id, or a prefix of it
    pod: str | None = None                  # pod uid
    user: int | None = None                 # uid (a name is looked up when the configuration is read)
    exe: str | None = None                  # fnmatch glob on the executable's path (* also matches /)
    cmdline: re.Pattern[str] | None = None  # searched in the command line, arguments joined with spaces

    def matches(self, f: ProcessFacts) -> bool:
        if f.kernel_thread:
            return False
        return ((self.cgroup is None or (f.cgroup is not None and _below(f.cgroup, self.cgroup)))
                and (self.container is None or (f.container_id != "" and f.container_id.startswith(self.container)))
                and (self.pod is None or f.pod_uid == self.pod)
                and (self.user is None or f.uid == self.user)
                and (self.exe is None or (f.exe != "" and fnmatch.fnmatchcase(f.exe, self.exe)))
                and (self.cmdline is None or self.cmdline.search(f.cmdline) is not None))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in MATCH_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value.pattern if isinstance(value, re.Pattern) else value
        return out


@dataclass(frozen=True)
class Rule:
    name: str
    match: Match = field(default_factory=Match)
    quota: int | None = None           # device bytes per GPU, for each process it matches
    priority: Priority | None = None
    action: str = "pause"              # at the quota, for processes not under the interposer: pause or kill
    exclusive: bool = False            # the process has its GPUs to itself while it runs

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "match": self.match.to_json(), "quota_bytes": self.quota,
                "priority": None if self.priority is None else self.priority.name.lower(), "action": self.action,
                "exclusive": self.exclusive}


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...] = ()

    def resolve(self, facts: ProcessFacts) -> Rule | None:
        """The first rule that matches, or None."""
        return next((r for r in self.rules if r.match.matches(facts)), None)


def _type_error(value: Any, want: str) -> str:
    return f"must be {want}, not {type(value).__name__} {value!r}"


def _string(value: Any, empty_ok: bool = False) -> str:
    if type(value) is not str:
        raise RuleError(_type_error(value, "str"))
    if not value and not empty_ok:
        raise RuleError("must not be empty")
    return value


def _match_value(key: str, value: Any) -> Any:
    if key == "user":
        if type(value) is int:
            if value < 0:
                raise RuleError(f"must be a user name or a uid of 0 or more, not {value}")
            return value
        name = _string(value) if type(value) is str else None
        if name is None:
            raise RuleError(_type_error(value, "a user name (str) or a uid (int)"))
        if name.isdigit():
            return int(name)
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            raise RuleError(f"no user named {name!r}") from None
    text = _string(value)
    if key == "cgroup":
        if not text.startswith("/"):
            raise RuleError(f"must be a cgroup path as /proc/PID/cgroup shows it, like /user.slice, not {text!r}")
        return "/" + "/".join(part for part in text.split("/") if part)
    if key == "container":
        if not _HEX.fullmatch(text.lower()):
            raise RuleError(f"must be a container id or a prefix of one (hex digits), not {text!r}")
        return text.lower()
    if key == "pod":
        pod = text.lower().replace("_", "-")
        if not _POD_UID.fullmatch(pod):
            raise RuleError(f"must be a pod uid like 0b6a7f2e-91c4-4d38-a1e2-5f6b7c8d9e0f, not {text!r}")
        return pod
    if key == "cmdline":
        try:
            return re.compile(text)
        except re.error as exc:
            raise RuleError(f"not a valid regular expression: {exc}") from None
    return text  # exe


def _rule(index: int, table: Any, names: set[str]) -> Rule:
    label = f"rule {index}"
    if not isinstance(table, dict):
        raise RuleError(f"{label}: must be a table, not {type(table).__name__}")
    if "name" in table:
        try:
            name = _string(table["name"])
        except RuleError as exc:
            raise RuleError(f"{label}: name: {exc}") from None
        if name in names:
            raise RuleError(f"{label} ({name}): name: another rule is named {name!r}")
        label = f"{label} ({name})"
    else:
        name = label
    for key in table:
        if key not in RULE_KEYS:
            hint = "; match keys go under match" if key in MATCH_KEYS else ""
            raise RuleError(f"{label}: {key}: unknown key (known: {', '.join(RULE_KEYS)}){hint}")
    if "match" not in table:
        raise RuleError(f"{label}: match: missing (match = {{}} matches every process)")
    match = table["match"]
    if not isinstance(match, dict):
        raise RuleError(f"{label}: match: must be a table, like match = {{ user = \"alice\" }}, "
                        f"not {type(match).__name__} {match!r}")
    values: dict[str, Any] = {}
    for key, value in match.items():
        if key not in MATCH_KEYS:
            raise RuleError(f"{label}: match.{key}: unknown key (known: {', '.join(MATCH_KEYS)})")
        try:
            values[key] = _match_value(key, value)
        except RuleError as exc:
            raise RuleError(f"{label}: match.{key}: {exc}") from None
    settings: dict[str, Any] = {}
    try:
        key = "quota"
        if key in table:
            value = table[key]
            if type(value) is int:
                if value <= 0:
                    raise RuleError(f"must be above 0 bytes, not {value}")
                settings[key] = value
            elif type(value) is str:
                try:
                    settings[key] = parse_size(value)
                except SizeError as exc:
                    raise RuleError(str(exc)) from None
            else:
                raise RuleError(_type_error(value, "a size (str, like \"20GiB\") or bytes (int)"))
        key = "priority"
        if key in table:
            text = _string(table[key], empty_ok=True)
            if text not in PRIORITY_NAMES:
                raise RuleError(f"must be one of {', '.join(PRIORITY_NAMES)}, not {text!r}")
            settings[key] = Priority.parse(text)
        key = "action"
        if key in table:
            text = _string(table[key], empty_ok=True)
            if text not in ACTIONS:
                raise RuleError(f"must be one of {', '.join(ACTIONS)}, not {text!r}")
            settings[key] = text
        key = "exclusive"
        if key in table:
            if type(table[key]) is not bool:
                raise RuleError(_type_error(table[key], "bool"))
            settings[key] = table[key]
    except RuleError as exc:
        raise RuleError(f"{label}: {key}: {exc}") from None
    names.add(name)
    return Rule(name, Match(**values), **settings)


def parse_rules(value: Any) -> tuple[Rule, ...]:
    """The `rule` array of the configuration (`[[rule]]` tables); RuleError names the rule and the key."""
    if not isinstance(value, list):
        raise RuleError(f"rule: must be an array of tables ([[rule]]), not {type(value).__name__}")
    names: set[str] = set()
    return tuple(_rule(i, table, names) for i, table in enumerate(value, 1))
