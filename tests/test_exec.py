"""`gpuwatch exec`: sizes, one-line errors that start nothing, and exactly the environment the command gets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GPUWATCH, ROOT

from gpuwatch.core.vocabulary import SizeError, parse_size

MiB, GiB = 1 << 20, 1 << 30
PRINT_ENV = [sys.executable, "-c", "import json, os; print(json.dumps({'pid': os.getpid(), 'env': dict(os.environ)}))"]


@pytest.mark.parametrize("text, size", [
    ("512MiB", 512 * MiB), ("20GiB", 20 * GiB), ("1.5GiB", 3 * GiB // 2), ("4096", 4096), ("4096B", 4096),
    ("8GB", 8 * 10**9), ("250MB", 250 * 10**6), ("3KB", 3000), ("2G", 2 * GiB), ("64M", 64 * MiB), ("4K", 4096),
    ("1T", 1 << 40), ("2TiB", 2 << 40), ("1 GiB", GiB), (" 7mib ", 7 * MiB), ("0.5K", 512), (".5G", GiB // 2),
    ("1.3K", 1331),  # 1331.2 bytes: the fraction of a byte is dropped
])
def test_size_parsing(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, problem", [
    ("0", "not above zero"), ("0GiB", "not above zero"), ("0.0001", "not above zero"), ("", "is not a size"),
    ("GiB", "is not a size"), ("-1G", "is not a size"), ("1e9", "is not a size"), ("12XB", "is not a size"),
    ("1.5.5G", "is not a size"), ("1 2G", "is not a size"), ("nan", "is not a size"), ("16EiB", "is not a size"),
    ("99999999999TB", "more than 16 EiB"),
])
def test_bad_sizes(text, problem):
    with pytest.raises(SizeError, match=problem):
        parse_size(text)


@pytest.fixture(scope="module")
def preloads(tmp_path_factory) -> tuple[Path, Path]:
    """Two harmless shared libraries: one stands in for the interposer, one for a preload already set."""
    out = tmp_path_factory.mktemp("preloads")
    source = out / "empty.c"
    source.write_text("void gpuwatch_test_nothing(void) {}\n")
    libs = out / "libgpuwatch.so", out / "libother.so"
    for lib in libs:
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    return libs


def gpuwatch(*args: str, env: dict[str, str] | None = None, socket: str | None = "/tmp/gw-exec-test.sock",
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPUWATCH_") and k != "LD_PRELOAD"}
    options = ["--socket", socket] if socket else []
    return subprocess.run([*GPUWATCH, *options, *args], capture_output=True, text=True, timeout=30,
                          env={**base, **(env or {})}, cwd=cwd)


def child(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no loader warning, nothing from gpuwatch
    return json.loads(result.stdout)


def test_the_command_gets_the_library_first_and_exact_settings(preloads):
    interposer, other = preloads
    r = gpuwatch("exec", "--mem-limit", "1.5GiB", "--priority", "high", "--no-swap", "--", *PRINT_ENV,
                 env={"GPUWATCH_INTERPOSER": str(interposer), "LD_PRELOAD": str(other), "KEEP": "me"})
    env = child(r)["env"]
    assert env["LD_PRELOAD"] == f"{interposer} {other}"
    assert {k: v for k, v in env.items() if k.startswith("GPUWATCH_") and k != "GPUWATCH_INTERPOSER"} == {
        "GPUWATCH_MEM_LIMIT": str(3 * GiB // 2), "GPUWATCH_PRIORITY": "high", "GPUWATCH_SWAP": "0",
        "GPUWATCH_SOCKET": "/tmp/gw-exec-test.sock"}
    assert env["KEEP"] == "me"


def test_defaults_and_what_an_outer_exec_left_behind(preloads):
    interposer, _ = preloads
    r = gpuwatch("exec", *PRINT_ENV, socket=None,
                 env={"GPUWATCH_INTERPOSER": str(interposer), "GPUWATCH_SOCKET": "/run/other.sock",
                      "GPUWATCH_MEM_LIMIT": "123", "GPUWATCH_SWAP": "0", "LD_PRELOAD": f"{interposer}"})
    env = child(r)["env"]
    assert env["LD_PRELOAD"] == str(interposer)  # not twice
    assert "GPUWATCH_MEM_LIMIT" not in env
    assert (env["GPUWATCH_PRIORITY"], env["GPUWATCH_SWAP"], env["GPUWATCH_SOCKET"]) == ("normal", "1",
                                                                                       "/run/other.sock")


def test_exec_replaces_gpuwatch(preloads):
    interposer, _ = preloads
    proc = subprocess.Popen([*GPUWATCH, "exec", "--", *PRINT_ENV], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "GPUWATCH_INTERPOSER": str(interposer)})
    out, _ = proc.communicate(timeout=30)
    assert json.loads(out)["pid"] == proc.pid
    assert proc.returncode == 0


def test_arguments_after_the_command_are_its_own(preloads):
    interposer, _ = preloads
    r = gpuwatch("exec", "--", sys.executable, "-c", "import sys; print(sys.argv[1:])", "--no-swap", "--mem-limit",
                 "x", env={"GPUWATCH_INTERPOSER": str(interposer)})
    assert r.returncode == 0 and r.stdout.strip() == "['--no-swap', '--mem-limit', 'x']", r.stderr
    r = gpuwatch("exec", sys.executable, "-c", "import sys; print(sys.argv[1:])", "--priority", "low",
                 env={"GPUWATCH_INTERPOSER": str(interposer)})
    assert r.returncode == 0 and r.stdout.strip() == "['--priority', 'low']", r.stderr


@pytest.mark.parametrize("args, message", [
    (["--mem-limit", "0"], "gpuwatch: exec: argument --mem-limit: '0' is not above zero bytes"),
    (["--mem-limit", "12XB"], "gpuwatch: exec: argument --mem-limit: '12XB' is not a size"),
    (["--mem-limit", "-5G"], "gpuwatch: exec: argument --mem-limit: expected one argument"),
    (["--priority", "urgent"], "gpuwatch: exec: argument --priority: invalid choice: 'urgent'"),
    (["--bogus"], "gpuwatch: unrecognized arguments: --bogus"),
    (["--no-swap"], None),
])
def test_bad_input_is_one_line_and_starts_nothing(preloads, tmp_path, args, message):
    interposer, _ = preloads
    marker = tmp_path / "started"
    r = gpuwatch("exec", *args, "--", "touch", str(marker), env={"GPUWATCH_INTERPOSER": str(interposer)})
    if message is None:  # the control case: the same command line, good, starts the command
        assert r.returncode == 0 and marker.exists()
        return
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(message), r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("args", [[], ["--"], ["--mem-limit", "1G"], ["--mem-limit", "1G", "--"]])
def test_no_command(preloads, args):
    interposer, _ = preloads
    r = gpuwatch("exec", *args, env={"GPUWATCH_INTERPOSER": str(interposer)})
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("gpuwatch: exec: no command given"), r.stderr


def test_command_not_found_or_not_runnable(preloads, tmp_path):
    interposer, _ = preloads
    r = gpuwatch("exec", "--", "gpuwatch-no-such-command", "x", env={"GPUWATCH_INTERPOSER": str(interposer)})
    assert (r.returncode, r.stdout, r.stderr) == (127, "", "gpuwatch: exec: gpuwatch-no-such-command: command not "
                                                           "found\n")
    r = gpuwatch("exec", "--", str(tmp_path), env={"GPUWATCH_INTERPOSER": str(interposer)})
    assert (r.returncode, r.stderr) == (126, f"gpuwatch: exec: {tmp_path}: permission denied\n")


def test_library_not_built_says_how_to_build_it(tmp_path):
    marker = tmp_path / "started"
    r = gpuwatch("exec", "--", "touch", str(marker), env={"GPUWATCH_INTERPOSER": str(tmp_path / "libgpuwatch.so")})
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"gpuwatch: the interposer library {tmp_path}/libgpuwatch.so is not built") and \
        "./install.sh" in r.stderr
    assert not marker.exists()


def test_library_path(monkeypatch, tmp_path):
    from gpuwatch import interposer
    monkeypatch.setenv("GPUWATCH_INTERPOSER", str(tmp_path / "x.so"))
    assert interposer.library_path() == tmp_path / "x.so"
    monkeypatch.delenv("GPUWATCH_INTERPOSER")
    beside = Path(interposer.__file__).resolve().with_name("libgpuwatch.so")
    expected = beside if beside.exists() else Path("/opt/gpuwatch/lib/libgpuwatch.so")
    assert interposer.library_path() == expected
    if (ROOT / "interposer" / "Makefile").exists():
        assert Path(interposer.__file__).resolve().parent == ROOT / "interposer"  # the editable checkout


@pytest.mark.root
def test_a_user_asking_for_high_priority_is_told_it_runs_at_normal(tmp_path):
    """Only root gives a priority above normal (issue 12): another user's `exec --priority high` says so."""
    run_as = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
              "env", "HOME=/tmp", "PATH=/usr/local/bin:/usr/bin:/bin"]
    asked = subprocess.run([*run_as, *GPUWATCH, "--socket", str(tmp_path / "none.sock"), "exec", "--priority", "high",
                            "--", "true"], capture_output=True, text=True, timeout=30, cwd="/")
    assert asked.returncode == 0 and asked.stderr.startswith("gpuwatch: warning: only root gives a priority above "
                                                             "normal"), asked.stderr
    as_root = subprocess.run([*GPUWATCH, "--socket", str(tmp_path / "none.sock"), "exec", "--priority", "high", "--",
                              "true"], capture_output=True, text=True, timeout=30)
    assert as_root.returncode == 0 and as_root.stderr == "", as_root.stderr
