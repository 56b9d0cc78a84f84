"""Policy: [[rule]] parsing and its one-line errors, matching on real processes (user, exe, command line,
cgroup, container, pod), process events (netlink and the /proc scan), a daemon applying rules at exec, at
attach, at start and on SIGHUP, releasing them at exit, and `gpuwatch priority`'s permissions."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import GPUWATCH, ROOT, Daemon, Prog, wait_for
from interposer_fixtures import DEVICE, IProg, Page

from gpuwatch.daemon import config as configuration
from gpuwatch.enforcer.rules import Match, Policy, ProcessFacts, Rule
from gpuwatch.enforcer.procevents import ProcEvents
from gpuwatch.enforcer.requests import InterposerRequests
from gpuwatch.core.vocabulary import Priority

MiB, GiB = 1 << 20, 1 << 30
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
TOKEN = f"gwtest{os.getpid()}"  # in every matched command line: rules never touch another test run's processes
SLEEP = shutil.which("sleep")
CID = "4f3c2b1a" * 8
POD = "0b6a7f2e-91c4-4d38-a1e2-5f6b7c8d9e0f"


def named(name: str, *args: str, user: list[str] | None = None) -> subprocess.Popen:
    """`sleep 100` whose command line starts with `name` (argv[0]), optionally as another user."""
    if user:
        return subprocess.Popen([*user, "bash", "-c", f'exec -a "$0" {SLEEP} 100', name])
    return subprocess.Popen([name, *(args or ("100",))], executable=SLEEP)


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.kill()
        p.wait()


# ------------------------------------------------------------------------------------------------ parsing


GOOD = """
[daemon]
launches = "off"

[[rule]]
name = "training"
match = { user = "root", exe = "/usr/bin/python3*", cmdline = 'train\\.py', cgroup = "/kubepods.slice/", container = "4F3C", pod = "0b6a7f2e_91c4_4d38_a1e2_5f6b7c8d9e0f" }
quota = "20GiB"
priority = "high"
action = "kill"
exclusive = true

[[rule]]
match = { user = 65534 }
quota = 1073741824

[[rule]]
name = "everyone else"
match = {}
priority = "low"
"""  # noqa: E501 (a rule with every match key is one TOML line)


def test_a_good_file_gives_every_setting_of_every_rule():
    cfg = configuration.parse(GOOD, "gpuwatch.toml")
    assert cfg.daemon.launches == "off"
    train, nobody, rest = cfg.rules
    assert train.to_json() == {
        "name": "training", "quota_bytes": 20 * GiB, "priority": "high", "action": "kill", "exclusive": True,
        "match": {"cgroup": "/kubepods.slice", "container": "4f3c", "pod": POD, "user": 0, "exe": "/usr/bin/python3*",
                  "cmdline": r"train\.py"}}
    assert (nobody.name, nobody.match, nobody.quota, nobody.priority, nobody.action, nobody.exclusive) == (
        "rule 2", Match(user=65534), GiB, None, "pause", False)
    assert (rest.name, rest.match, rest.priority, rest.quota) == ("everyone else", Match(), Priority.LOW, None)
    assert configuration.parse("", "x").rules == ()


@pytest.mark.parametrize("text, error", [
    ('[[rule]]\nmatch = {}\nquota = "20XB"',
     "rule 1: quota: '20XB' is not a size (like 512MiB, 20GiB, 1.5GiB, 8GB or 4096 bytes)"),
    ('[[rule]]\nmatch = {}\nquota = 0', "rule 1: quota: must be above 0 bytes, not 0"),
    ('[[rule]]\nmatch = {}\nquota = true',
     'rule 1: quota: must be a size (str, like "20GiB") or bytes (int), not bool True'),
    ('[[rule]]\nname = "a"\nmatch = {}\n[[rule]]\nname = "b"\nmatch = { cmdline = "train(" }',
     "rule 2 (b): match.cmdline: not a valid regular expression: missing ), unterminated subpattern at position 5"),
    ('[[rule]]\nname = "a"\nmatch = { colour = "red" }',
     "rule 1 (a): match.colour: unknown key (known: cgroup, container, pod, user, exe, cmdline)"),
    ('[[rule]]\nmatch = {}\nuser = "root"',
     "rule 1: user: unknown key (known: name, match, quota, priority, action, exclusive); match keys go under match"),
    ('[[rule]]\nmatch = {}\npriority = "urgent"', "rule 1: priority: must be one of high, normal, low, not 'urgent'"),
    ('[[rule]]\nmatch = {}\npriority = 2', "rule 1: priority: must be str, not int 2"),
    ('[[rule]]\nmatch = {}\naction = "stop"', "rule 1: action: must be one of pause, kill, not 'stop'"),
    ('[[rule]]\nmatch = {}\nexclusive = "yes"', "rule 1: exclusive: must be bool, not str 'yes'"),
    ('[[rule]]\nname = 5\nmatch = {}', "rule 1: name: must be str, not int 5"),
    ('[[rule]]\nname = "a"\nmatch = {}\n[[rule]]\nname = "a"\nmatch = {}',
     "rule 2 (a): name: another rule is named 'a'"),
    ('[[rule]]\nname = "a"', "rule 1 (a): match: missing (match = {} matches every process)"),
    ('[[rule]]\nmatch = "root"', "rule 1: match: must be a table, like match = { user = \"alice\" }, not str 'root'"),
    ('[[rule]]\nmatch = { user = "no-such-user-here" }', "rule 1: match.user: no user named 'no-such-user-here'"),
    ('[[rule]]\nmatch = { user = -1 }', "rule 1: match.user: must be a user name or a uid of 0 or more, not -1"),
    ('[[rule]]\nmatch = { user = 1.5 }', "rule 1: match.user: must be a user name (str) or a uid (int), not float 1.5"),
    ('[[rule]]\nmatch = { exe = "" }', "rule 1: match.exe: must not be empty"),
    ('[[rule]]\nmatch = { cgroup = "user.slice" }',
     "rule 1: match.cgroup: must be a cgroup path as /proc/PID/cgroup shows it, like /user.slice, not 'user.slice'"),
    ('[[rule]]\nmatch = { container = "web-1" }',
     "rule 1: match.container: must be a container id or a prefix of one (hex digits), not 'web-1'"),
    ('[[rule]]\nmatch = { pod = "frontend" }',
     "rule 1: match.pod: must be a pod uid like 0b6a7f2e-91c4-4d38-a1e2-5f6b7c8d9e0f, not 'frontend'"),
    ('rule = 5', "rule: must be an array of tables ([[rule]]), not int"),
    ('[rule]\nmatch = {}', "rule: must be an array of tables ([[rule]]), not dict"),
    ('[[rules]]\nmatch = {}',
     "[rules]: unknown section (known: daemon, metrics, interposer, scheduler, kubernetes, [[rule]])"),
])
def test_a_bad_rule_is_one_line_naming_the_rule_and_the_key(text, error):
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.parse(text, "/etc/gpuwatch/gpuwatch.toml")
    assert str(caught.value) == f"/etc/gpuwatch/gpuwatch.toml: {error}"


@pytest.mark.root
def test_a_bad_rule_stops_start_up_with_one_line(tmp_path):
    cfg = tmp_path / "gpuwatch.toml"
    cfg.write_text('[[rule]]\nname = "big"\nmatch = {}\nquota = "lots"\n')
    r = subprocess.run([*GPUWATCH, "--socket", str(tmp_path / "s.sock"), "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stderr) == (1, f"gpuwatch: {cfg}: rule 1 (big): quota: 'lots' is not a size (like 512MiB, "
                                           "20GiB, 1.5GiB, 8GB or 4096 bytes)\n")
    assert not (tmp_path / "s.sock").exists()


def test_the_readme_rule_example_parses():
    import re
    blocks = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    example = next(b for b in blocks if "[[rule]]" in b).replace('user = "alice"', 'user = "root"')
    (r,) = configuration.parse(example, "README.md").rules
    assert set(r.match.to_json()) == {"cgroup", "container", "pod", "user", "exe", "cmdline"}
    assert (r.quota, r.priority, r.action, r.exclusive) == (20 * GiB, Priority.HIGH, "pause", False)


# ------------------------------------------------------------------------------------------------ matching


def rule(name: str, **match) -> Rule:
    return configuration.parse(f"[[rule]]\nname = {json.dumps(name)}\nmatch = {{ "
                               + ", ".join(f"{k} = {json.dumps(v)}" for k, v in match.items()) + " }", "x").rules[0]


@pytest.mark.root
def test_user_exe_and_command_line_match_real_processes():
    mine = named(f"{TOKEN}-train.py", "100", "3")
    theirs = named(f"{TOKEN}-eval.py", user=NOBODY)
    try:
        wait_for(lambda: (f := ProcessFacts.read(theirs.pid)) and f.cmdline.startswith(TOKEN), 5, "bash to exec")
        me, them = ProcessFacts.read(mine.pid), ProcessFacts.read(theirs.pid)
        assert (me.uid, me.exe, me.cmdline) == (0, os.path.realpath(SLEEP), f"{TOKEN}-train.py 100 3")
        assert (them.uid, them.cmdline) == (65534, f"{TOKEN}-eval.py 100")
        assert rule("r", user="root").match.matches(me) and not rule("r", user="root").match.matches(them)
        assert rule("r", user="nobody").match.matches(them) and rule("r", user=65534).match.matches(them)
        assert rule("r", user="65534").match.matches(them)
        assert rule("r", exe="*/sleep").match.matches(me) and not rule("r", exe="/opt/*").match.matches(me)
        assert rule("r", exe="/*/s?ee[p]").match.matches(me)
        assert rule("r", cmdline=r"train\.py 100 \d$").match.matches(me)
        assert not rule("r", cmdline=r"^train").match.matches(me)
        assert not rule("r", cmdline="train", user="nobody").match.matches(me), "every key must match"
        policy = Policy((rule("exempt", cmdline="eval"), rule("sleepers", exe="*/sleep"), rule("all")))
        assert [policy.resolve(f).name for f in (me, them)] == ["sleepers", "exempt"], "the first match wins"
    finally:
        stop(mine, theirs)
    mine.wait()
    assert ProcessFacts.read(mine.pid) is None, "a gone process has no facts, and no exception"


def cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"] and left.split()[3] == "/":
            return Path(left.split()[4])
    return None


@pytest.fixture
def cgroup_sleeper() -> Iterator[tuple[subprocess.Popen, str]]:
    """A sleep moved into a new cgroup v2 leaf laid out as Kubernetes and containerd name theirs."""
    root = cgroup2_root()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy is mounted")
    top = f"/{TOKEN}.slice"
    leaf = f"{top}/kubepods-pod{POD.replace('-', '_')}.slice/cri-containerd-{CID}.scope"
    (root / leaf.lstrip("/")).mkdir(parents=True)
    p = subprocess.Popen([SLEEP, "100"])
    try:
        (root / leaf.lstrip("/") / "cgroup.procs").write_text(str(p.pid))
        yield p, leaf
    finally:
        stop(p)
        for path in (leaf, leaf.rsplit("/", 1)[0], top):
            wait_for(lambda: _rmdir(root / path.lstrip("/")), 5, f"cgroup {path} to be removed")


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def test_cgroup_container_and_pod_match_a_process_moved_into_a_cgroup(cgroup_sleeper):
    p, leaf = cgroup_sleeper
    facts = ProcessFacts.read(p.pid)
    assert (facts.cgroup, facts.container_id, facts.pod_uid) == (leaf, CID, POD)
    top = leaf.split("/")[1]
    assert rule("r", cgroup=f"/{top}").match.matches(facts)
    assert rule("r", cgroup=leaf).match.matches(facts)
    assert rule("r", cgroup="/").match.matches(facts)
    assert not rule("r", cgroup=f"/{top[:-3]}").match.matches(facts), "a prefix of whole path components"
    assert rule("r", container=CID[:12]).match.matches(facts) and rule("r", container=CID.upper()).match.matches(facts)
    assert not rule("r", container="abc").match.matches(facts)
    assert rule("r", pod=POD).match.matches(facts) and rule("r", pod=POD.replace("-", "_")).match.matches(facts)
    host = ProcessFacts.read(os.getpid())
    assert not rule("r", container=CID[:12]).match.matches(host) and not rule("r", pod=POD).match.matches(host)


class FakeAttached:
    def __init__(self, mem_limit: int | None) -> None:
        self.attach = type("Attach", (), {"mem_limit": mem_limit, "priority": "normal"})()
        self.sent: list[int] = []

        def call(line_of, op: str, timeout: float) -> dict:
            assert op == "quota"
            self.sent.append(int(line_of(1).split()[2]))
            return {"ok": True}

        self.requests = InterposerRequests(call, lambda: 1.0)


def test_policy_state_moves_a_quota_from_the_probes_to_the_interposer_and_back_off():
    from gpuwatch.enforcer.policy import PolicyState
    registry: dict[int, FakeAttached] = {}
    calls: list[tuple] = []
    interposed = type("Registry", (), {"request_timeout": 1.0, "get": staticmethod(registry.get)})()
    quotas = type("Quotas", (), {
        "set_pid": staticmethod(lambda pid, n, action="pause": calls.append((pid, n, action))),
        "set_backstop": staticmethod(lambda pid, n, action="pause": calls.append(("backstop", pid, n, action)))})()
    p = named(f"{TOKEN}-state")
    try:
        rules = configuration.parse(f"[[rule]]\nname = 'r'\nmatch = {{ cmdline = '^{TOKEN}-state' }}\n"
                                    "quota = '2GiB'\naction = 'kill'\npriority = 'low'\n", "x").rules
        state = PolicyState(Policy(rules), interposed, quotas)
        assert state.apply(p.pid).name == "r"
        assert (state.priority_of(p.pid), state.exclusive(p.pid), state.rule_of(p.pid).name) == (
            Priority.LOW, False, "r")
        assert calls == [(p.pid, 2 * GiB, "kill")]
        state.apply(p.pid)
        assert len(calls) == 1, "nothing changed: nothing sent"
        registry[p.pid] = fake = FakeAttached(GiB)
        state.attached(p.pid)
        wait_for(lambda: fake.sent == [GiB], 2, "the interposer's quota (its own 1 GiB is below the rule's)")
        assert calls[-1] == ("backstop", p.pid, 2 * GiB, "kill"), "the probes keep a backstop past the quota"
        state.set_override(p.pid, ProcessFacts.read(p.pid).start_time, Priority.HIGH)
        assert state.priority_of(p.pid) == Priority.HIGH
        state.set_policy(Policy())
        state.apply_all()
        wait_for(lambda: fake.sent == [GiB, GiB], 2, "its own quota back")
        assert calls[-1] == (p.pid, 0, "pause"), "no rule quota: no backstop"
        assert (state.rule_of(p.pid), state.priority_of(p.pid)) == (None, Priority.HIGH), "the override stays"
        state.forget(p.pid)
        assert state.priority_of(p.pid) is None and state.pids() == []
    finally:
        stop(p)
    assert state.apply(p.pid) is None


# ------------------------------------------------------------------------------------------------ events


# netlink: listening to the process connector may need CAP_NET_ADMIN (the kernel decides)
@pytest.mark.parametrize("mode", [pytest.param("netlink", marks=pytest.mark.root), "scan"])
def test_process_events_report_exec_and_exit_and_close_leaves_no_thread(mode):
    execs, exits = [], []
    before = set(threading.enumerate())
    events = ProcEvents(execs.append, exits.append, mode=mode)
    events.start()
    try:
        assert events.source == mode
        p = named(f"{TOKEN}-events")
        wait_for(lambda: p.pid in execs, 1.5 if mode == "scan" else 1.0, "the exec")
        p.kill()
        p.wait()
        wait_for(lambda: p.pid in exits, 1.5 if mode == "scan" else 0.5, "the exit")
        assert os.getpid() not in exits
    finally:
        start = time.monotonic()
        events.close()
        assert time.monotonic() - start < 1.5
    assert set(threading.enumerate()) <= before


def test_without_the_connector_one_line_says_so_and_proc_is_scanned(monkeypatch, caplog):
    import pyroute2

    def refused(*_args, **_kw):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(pyroute2, "ProcEventSocket", refused)
    events = ProcEvents(lambda pid: None, lambda pid: None, mode="auto")
    with caplog.at_level("INFO", logger="gpuwatch.enforcer.procevents"):
        events.start()
    try:
        assert events.source == "scan"
        assert [r.getMessage() for r in caplog.records] == [
            "process events: cannot listen to the process connector: [Errno 1] Operation not permitted; scanning "
            "/proc every 1 s instead"]
    finally:
        events.close()


# ------------------------------------------------------------------------------------------------ the daemon


FAKE = f"""
import json, sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from interposer_fixtures import FakeInterposer
f = FakeInterposer(sys.argv[1])
print(json.dumps(f.attach(mem_limit=int(sys.argv[2]) or None)), flush=True)
for _ in sys.stdin:
    print(json.dumps(f.requests), flush=True)
"""


def rules_file(quota: str = "64MiB") -> str:
    return f"""
[[rule]]
name = "low ones"
match = {{ cmdline = '^{TOKEN}-low ' }}
priority = "low"

[[rule]]
name = "quota ones"
match = {{ cmdline = '^{TOKEN}-quota ' }}
quota = "1GiB"
action = "kill"

[[rule]]
name = "interposed"
match = {{ cmdline = ' {TOKEN}-fake' }}
quota = "{quota}"
priority = "high"

[[rule]]
name = "tampering"
match = {{ cmdline = '{TOKEN}-tamper' }}
quota = "64MiB"

[[rule]]
name = "cuda"
match = {{ exe = "*/cudaprog", cmdline = '{TOKEN}-cuda' }}
priority = "high"
exclusive = true
"""


@pytest.fixture(scope="module")
def pdaemon() -> Iterator[Daemon]:
    workdir = Path(tempfile.mkdtemp(prefix="gpuwatch-test-"))
    workdir.chmod(0o755)  # the unprivileged CLI reaches the socket
    cfg = workdir / "gpuwatch.toml"
    cfg.write_text(rules_file())
    d = Daemon(workdir, "--launches", "off", "--config", str(cfg))
    d.config = cfg  # type: ignore[attr-defined]
    yield d
    start = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - start < 2.0


def policy_of(d: Daemon) -> dict[int, dict]:
    """Asked in-process (no CLI start-up in the measurement): tests time rules against 1 s."""
    from gpuwatch.core.protocol import Client
    with Client(d.socket) as client:
        return {p["pid"]: p for p in client.call("policy")["processes"]}


def quota_groups(d: Daemon) -> dict[int, dict]:
    from gpuwatch.core.protocol import Client
    with Client(d.socket) as client:
        return {g["pid"]: g for g in client.call("quota_list") if g["pid"] is not None}


def test_a_process_started_after_the_daemon_gets_its_rule_within_a_second_and_loses_it_at_exit(pdaemon):
    assert pdaemon.cli("policy", "--json").stdout and json.loads(pdaemon.cli("policy", "--json").stdout)["events"] \
        == "netlink"
    start = time.monotonic()
    p = named(f"{TOKEN}-low")
    try:
        entry = wait_for(lambda: policy_of(pdaemon).get(p.pid), 1.0, "the rule")
        assert time.monotonic() - start < 1.0
        assert (entry["rule"], entry["priority"], entry["quota_bytes"]) == ("low ones", "low", None)
        assert pdaemon.cli("priority", str(p.pid)).stdout == f"gpuwatch: pid {p.pid} priority low (rule low ones)\n"
        human = pdaemon.cli("policy").stdout
        assert f"low ones: cmdline=^{TOKEN}-low  -> priority low" in human
        assert [line.split()[:3] for line in human.splitlines() if line.split()[:1] == [str(p.pid)]] == [
            [str(p.pid), "low", "ones"]]
    finally:
        stop(p)
    wait_for(lambda: p.pid not in policy_of(pdaemon), 0.5, "the exit to release the rule")


def test_a_rule_quota_goes_to_the_probes_for_a_plain_process_and_is_released_after_exit(pdaemon):
    p = named(f"{TOKEN}-quota")
    try:
        group = wait_for(lambda: quota_groups(pdaemon).get(p.pid), 1.0, "the quota group")
        assert (group["bytes"], group["action"], group["members"]) == (GiB, "kill", [p.pid])
        assert policy_of(pdaemon)[p.pid]["quota_bytes"] == GiB
    finally:
        stop(p)
    wait_for(lambda: p.pid not in policy_of(pdaemon), 0.5, "the rule to go")
    wait_for(lambda: p.pid not in quota_groups(pdaemon), 0.5, "the quota group to go at once")


@pytest.mark.root
def test_processes_running_before_the_daemon_get_their_rules_at_start(tmp_path):
    p = named(f"{TOKEN}-low")
    cfg = tmp_path / "gpuwatch.toml"
    cfg.write_text(rules_file())
    d = Daemon(tmp_path, "--launches", "off", "--config", str(cfg))
    try:
        assert policy_of(d)[p.pid]["rule"] == "low ones"
    finally:
        stop(p)
        d.stop()


class FakeProcess:
    """A process of its own attaching as an interposer, with the rule's token in its command line."""

    def __init__(self, socket_path: str, mem_limit: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", FAKE, socket_path, str(mem_limit), f"{TOKEN}-fake"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.pid = self.proc.pid
        self.attach = json.loads(self.proc.stdout.readline())

    def requests(self) -> list[dict]:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return [{k: v for k, v in r.items() if k != "id"} for r in json.loads(self.proc.stdout.readline())]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.mark.parametrize("own, sent", [(GiB, 64 * MiB), (32 * MiB, 32 * MiB), (0, 64 * MiB)])
def test_an_interposed_process_gets_its_rule_quota_when_it_attaches(pdaemon, own, sent):
    fake = FakeProcess(pdaemon.socket, own)
    try:
        assert fake.attach["ok"] is True, fake.attach
        wait_for(lambda: fake.requests() == [{"op": "quota", "bytes": sent}], 2, "the rule's quota")
        group = quota_groups(pdaemon)[fake.pid]
        assert (group["bytes"], group["action"]) == (128 * MiB, "pause"), "a backstop: the rule's 64 MiB + 64 MiB"
        assert policy_of(pdaemon)[fake.pid]["rule"] == "interposed"
    finally:
        fake.close()


def test_an_interposed_process_that_rewrites_its_quota_is_stopped_by_the_probes_past_the_backstop(
        pdaemon, fakecuda, interposer, tmp_path):
    """The shared page is the process's own memory: one that sets its quota there to none escapes its
    library's refusals, but the probes' backstop (the rule's 64 MiB + 64 MiB) stops it before the allocation
    that would cross 128 MiB, holding exactly 128 MiB."""
    lib = fakecuda / "libcuda.so.1"
    link = tmp_path / f"{TOKEN}-tamper"
    link.symlink_to(fakecuda / "cudaprog")
    p = IProg([str(link)], {"LD_PRELOAD": str(interposer), "GPUWATCH_SOCKET": pdaemon.socket,
                            "GPUWATCH_REAL_LIBCUDA": str(lib)})
    try:
        p.ok(f"load {lib}")
        wait_for(lambda: pdaemon.watching(lib), 5, "the daemon to watch the driver")
        p.ok("ctx 0")
        page = Page(p.pid)
        wait_for(lambda: page.device(0)["quota"] == 64 * MiB, 5, "the rule's quota in the page")
        wait_for(lambda: quota_groups(pdaemon).get(p.pid, {}).get("bytes") == 128 * MiB, 5, "the backstop")
        p.ok("alloc a 32M")
        p.ok("alloc b 32M")
        assert p.err("alloc c 32M") == 2, "the library refuses at the quota: CUDA_ERROR_OUT_OF_MEMORY"
        DEVICE.pack_into(page.map, 256, 0, *DEVICE.unpack_from(page.map, 256)[1:])  # quota: none
        p.ok("alloc c 32M")
        p.ok("alloc d 32M")
        assert p.proc.stdin
        p.proc.stdin.write("alloc e 32M\n")
        p.proc.stdin.flush()
        wait_for(lambda: proc_state(p.pid) == "T", 5, "the probes to stop it before the fifth 32 MiB")
        row = wait_for(lambda: next(iter(pdaemon.ps(p.pid)), None), 5, "its row")
        assert (row["state"], row["device_bytes"]) == ("stopped", 128 * MiB)
    finally:
        p.close()


def proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_ps_shows_the_priority_of_a_rule(pdaemon, fakecuda, tmp_path):
    link = tmp_path / f"{TOKEN}-cuda"
    link.symlink_to(fakecuda / "cudaprog")
    p = Prog([str(link)])
    try:
        p.ok(f"load {fakecuda / 'libcuda.so.1'}")
        wait_for(lambda: pdaemon.watching(fakecuda / "libcuda.so.1"), 5, "the daemon to watch the driver")
        p.ok("ctx 0")
        p.ok("alloc a 1M")
        row = wait_for(lambda: next(iter(pdaemon.ps(p.pid)), None), 5, "the process's row")
        assert (row["interposed"], row["priority"], row["device_bytes"]) == (False, "high", MiB)
        assert policy_of(pdaemon)[p.pid]["exclusive"] is True
    finally:
        p.close()


def as_nobody(d: Daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, *GPUWATCH, "--socket", d.socket, *args], capture_output=True, text=True,
                          timeout=30)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1, (r.stdout, r.stderr)
    return r.stderr.strip()


def test_priority_root_changes_anything_others_read_and_lower_their_own(pdaemon):
    rootp = named(f"{TOKEN}-plain")
    theirs = named(f"{TOKEN}-theirs", user=NOBODY)
    try:
        wait_for(lambda: (f := ProcessFacts.read(theirs.pid)) and f.uid == 65534 and f.exe == os.path.realpath(SLEEP),
                 5, "bash to exec")
        r, t = str(rootp.pid), str(theirs.pid)
        # anyone reads
        assert as_nobody(pdaemon, "priority", r).stdout == f"gpuwatch: pid {r} priority normal (default)\n"
        assert not [e for e in json.loads(as_nobody(pdaemon, "policy", "--json").stdout)["processes"]
                    if e["pid"] == rootp.pid]
        # not one's own process: refused, whatever the level
        for level in ("low", "high"):
            assert one_line_error(as_nobody(pdaemon, "priority", r, level)) == \
                f"gpuwatch: pid {r} belongs to uid 0: uid 65534 may only change its own processes (root may change any)"
        # one's own: only lower
        for level in ("high", "normal"):
            assert one_line_error(as_nobody(pdaemon, "priority", t, level)) == \
                f"gpuwatch: pid {t} is normal: uid 65534 may only lower the priority of its processes, so not to " \
                f"{level} (root may)"
        assert as_nobody(pdaemon, "priority", t, "low").stdout == f"gpuwatch: pid {t} priority low (was normal)\n"
        assert one_line_error(as_nobody(pdaemon, "priority", t, "normal")).endswith("so not to normal (root may)")
        assert policy_of(pdaemon)[theirs.pid]["priority"] == "low"
        # root: anything
        assert pdaemon.cli("priority", t, "high").stdout == f"gpuwatch: pid {t} priority high (was low)\n"
        assert pdaemon.cli("priority", r, "low").stdout == f"gpuwatch: pid {r} priority low (was normal)\n"
        assert pdaemon.cli("priority", r).stdout == f"gpuwatch: pid {r} priority low (set with gpuwatch priority)\n"
        assert as_nobody(pdaemon, "priority", t, "normal").returncode == 0, "high to normal is lower"
    finally:
        stop(rootp, theirs)
    wait_for(lambda: not {rootp.pid, theirs.pid} & set(policy_of(pdaemon)), 0.5, "the exits to release them")
    assert one_line_error(pdaemon.cli("priority", r, "low", check=False)) == f"gpuwatch: no process with pid {r}"
    bad = pdaemon.cli("priority", "1", "urgent", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and \
        bad.stderr.startswith("gpuwatch: priority: argument LEVEL: invalid choice: 'urgent'"), bad.stderr
    from gpuwatch.core.protocol import Client, ControlError
    with Client(pdaemon.socket) as client, pytest.raises(ControlError, match="level must be one of high, normal, low"):
        client.call("priority", pid=1, level="urgent")


def log_lines(d: Daemon, text: str) -> list[str]:
    return [line for line in d.log.read_text().splitlines() if text in line]


def test_sighup_reloads_a_good_file_and_keeps_the_old_policy_for_a_bad_one(pdaemon):
    cfg: Path = pdaemon.config  # type: ignore[attr-defined]
    original = cfg.read_text()
    p = named(f"{TOKEN}-low")
    try:
        wait_for(lambda: policy_of(pdaemon).get(p.pid), 1.0, "the rule")
        # good: the running process is re-resolved against the new rules
        cfg.write_text(original.replace('priority = "low"', 'priority = "normal"\nexclusive = true')
                       + '\n[daemon]\nlaunches = "all"\nring_buffer_pages = 64\n')
        pdaemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: policy_of(pdaemon).get(p.pid, {}).get("exclusive"), 2, "the new rule")
        assert policy_of(pdaemon)[p.pid]["priority"] == "normal"
        assert wait_for(lambda: log_lines(pdaemon, "configuration reloaded"), 2, "the log line") == [
            "gpuwatch: INFO: configuration reloaded: 5 rules; processes with a rule: 1; a restart applies "
            "daemon.ring_buffer_pages"]
        # bad: nothing changes, one line says why, the daemon goes on
        cfg.write_text(original.replace('quota = "1GiB"', 'quota = "1 gallon"'))
        pdaemon.proc.send_signal(signal.SIGHUP)
        line = wait_for(lambda: log_lines(pdaemon, "NOT reloaded"), 2, "the refusal")
        assert line == [f"gpuwatch: ERROR: configuration NOT reloaded: {cfg}: rule 2 (quota ones): quota: '1 gallon' "
                        "is not a size (like 512MiB, 20GiB, 1.5GiB, 8GB or 4096 bytes)"]
        assert pdaemon.proc.poll() is None and pdaemon.answers()
        assert policy_of(pdaemon)[p.pid]["exclusive"] is True, "the last good policy holds"
    finally:
        stop(p)
        cfg.write_text(original)
        count = len(log_lines(pdaemon, "configuration reloaded"))
        pdaemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(log_lines(pdaemon, "configuration reloaded")) > count, 2, "the original rules")


def test_a_reload_sends_the_new_quota_to_an_interposed_process_and_gives_its_own_back(pdaemon):
    cfg: Path = pdaemon.config  # type: ignore[attr-defined]
    original = cfg.read_text()
    fake = FakeProcess(pdaemon.socket, GiB)
    try:
        wait_for(lambda: fake.requests() == [{"op": "quota", "bytes": 64 * MiB}], 2, "the rule's quota")
        for text, sent in ((rules_file("128MiB"), 128 * MiB), (rules_file().replace('quota = "64MiB"', ""), GiB)):
            cfg.write_text(text)
            pdaemon.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: fake.requests()[-1] == {"op": "quota", "bytes": sent}, 2, f"quota {sent}")
        assert len(fake.requests()) == 3
    finally:
        fake.close()
        cfg.write_text(original)
        count = len(log_lines(pdaemon, "configuration reloaded"))
        pdaemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(log_lines(pdaemon, "configuration reloaded")) > count, 2, "the original rules")


@pytest.mark.root
def test_without_the_process_connector_the_daemon_scans_proc(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUWATCH_PROC_EVENTS", "scan")
    cfg = tmp_path / "gpuwatch.toml"
    cfg.write_text(rules_file())
    d = Daemon(tmp_path, "--launches", "off", "--config", str(cfg))
    try:
        assert json.loads(d.cli("policy", "--json").stdout)["events"] == "scan"
        p = named(f"{TOKEN}-low")
        try:
            wait_for(lambda: policy_of(d).get(p.pid), 1.5, "the rule, at the next scan")
        finally:
            stop(p)
        wait_for(lambda: p.pid not in policy_of(d), 1.5, "the exit, at the next scan")
    finally:
        d.stop()
