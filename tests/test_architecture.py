"""The architecture, held: which layer may import which (the README's Architecture section draws them), module sizes,
the C side's copies of gpuwatch.core.vocabulary, and a `gpuwatch ps` that does not load the daemon's stack.
Pure: it reads source text and starts one Python; no root, no BPF."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

from gpuwatch.core.vocabulary import DEFAULT_SOCKET, INTERPOSER_STATES, PRIORITIES_BY_VALUE

LAYERS = ("core", "probes", "interposer", "enforcer", "exporters", "kube", "daemon", "client")

# layer -> the other layers whose modules it may import (its own always)
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "probes": {"core"},
    "interposer": {"core"},
    "enforcer": {"core", "probes", "interposer"},
    "exporters": {"core"},  # the view and the control protocol: never enforcer, daemon, probes or client
    "kube": {"core"},  # the device plugin and the pod resolver: the daemon hands them what they need
    "daemon": {"core", "probes", "interposer", "enforcer", "exporters", "kube"},
    "client": {"core", "interposer", "exporters"},
}
LAZY_ONLY = {("client", "daemon")}  # `gpuwatch run`: inside a function, so that `gpuwatch ps` does not load it

MAX_LINES = 400
REASON = "Over 400 lines:"


def package_dirs() -> dict[str, Path]:
    """Module prefix -> folder, as pyproject.toml maps them (`import gpuwatch.core` is core/). Read with a
    regex: tomllib is not in Python 3.10."""
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[tool\.setuptools\.package-dir\]\n(.*?)(?:^\[|\Z)", text, re.M | re.S)
    assert section, "pyproject.toml: no [tool.setuptools.package-dir]"
    dirs = dict(re.findall(r'^"([\w.]+)"\s*=\s*"([^"]+)"', section.group(1), re.M))
    return {name: ROOT / folder for name, folder in dirs.items()}


def modules() -> dict[str, Path]:
    """Every module of the layers: its dotted name -> its file."""
    found = {}
    for package, folder in package_dirs().items():
        if package.split(".")[-1] not in LAYERS:
            continue
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(absolute module, line, at module level) of every import in the file: statements anywhere (in
    functions, under `if TYPE_CHECKING`), relative ones resolved, and importlib.import_module("...") /
    __import__("...") with a literal name. `from gpuwatch import x` counts as importing gpuwatch.x."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno, top) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level - 1 >= len(base):
                    raise AssertionError(f"{path}:{node.lineno}: relative import beyond the top package")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module == "gpuwatch" or not node.module:  # `from gpuwatch import daemon`, `from .. import x`
                found.extend((f"{module}.{alias.name}", node.lineno, top) for alias in node.names)
            else:
                found.append((module, node.lineno, top))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and (
                    (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                    or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")):
            found.append((node.args[0].value, node.lineno, top))
        inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, True)
    return found


def layer_of(module: str) -> str | None:
    """The layer of a gpuwatch module (gpuwatch.<layer>...), None for anything else and for the top
    package itself (a docstring)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "gpuwatch" and len(parts) > 1 else None


def test_the_layers_import_only_what_they_may():
    found = modules()
    assert len(found) > 20 and {layer_of(m) for m in found} == set(LAYERS), sorted(found)
    violations = []
    for name, path in found.items():
        mine = layer_of(name)
        assert mine is not None
        for target, line, top in imports(name, path):
            theirs = layer_of(target)
            if theirs is None or theirs == mine:
                continue
            if theirs not in LAYERS:
                violations.append(f"{name}: {target} (line {line}: no such layer)")
            elif (mine, theirs) in LAZY_ONLY:
                if top:
                    violations.append(f"{name}: {target} (line {line}: only inside a function)")
            elif theirs not in ALLOWED[mine]:
                violations.append(f"{name}: {target} (line {line})")
    assert not violations, "imports across the layers that the architecture does not allow:\n" + "\n".join(
        violations)


def test_relative_imports_resolve_to_absolute_modules(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("from ..core.vocabulary import MiB\nfrom . import shm\nfrom .. import daemon\n"
                      "import gpuwatch.probes.tracer\nfrom gpuwatch import exporters\n"
                      "def later():\n    import importlib\n    importlib.import_module('gpuwatch.daemon.run')\n")
    assert imports("gpuwatch.interposer.x", source) == [
        ("gpuwatch.core.vocabulary", 1, True), ("gpuwatch.interposer.shm", 2, True), ("gpuwatch.daemon", 3, True),
        ("gpuwatch.probes.tracer", 4, True), ("gpuwatch.exporters", 5, True), ("importlib", 7, False),
        ("gpuwatch.daemon.run", 8, False)]
    package = tmp_path / "__init__.py"
    package.write_text("from .model import Event\nfrom ..core import view\n")
    assert imports("gpuwatch.probes", package) == [("gpuwatch.probes.model", 1, True), ("gpuwatch.core", 2, True)]


def test_no_module_is_over_400_lines_without_saying_why():
    long = []
    for path in modules().values():
        text = path.read_text()
        lines = text.count("\n") + (not text.endswith("\n") and bool(text))
        if lines <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(line.strip().startswith(REASON) for line in doc.splitlines()):
            long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long, (f"modules over {MAX_LINES} lines whose docstring has no line starting {REASON!r} (split "
                      "them, or say why they are one):\n" + "\n".join(long))


# ------------------------------------------------------------------------------------------------ the C side


def c_source(name: str) -> str:
    path = ROOT / "interposer" / name
    assert path.exists(), f"{path} is missing: the C side's copy of the vocabulary cannot be checked"
    return path.read_text()


def c_match(pattern: str, text: str, where: str, what: str) -> re.Match[str]:
    m = re.search(pattern, text, re.S)
    assert m, f"interposer/{where}: {what} not found (the pattern {pattern!r}): was it renamed or rewritten?"
    return m


def c_strings(text: str) -> list[str]:
    return re.findall(r'"((?:[^"\\]|\\.)*)"', text)


def test_the_page_states_in_shm_h_are_the_vocabularys():
    body = c_match(r"enum\s+gw_state\s*\{(.*?)\}", c_source("shm.h"), "shm.h", "enum gw_state { ... }").group(1)
    names = [n.strip() for n in body.split(",") if n.strip()]
    assert all(re.fullmatch(r"GW_[A-Z_]+", n) for n in names), f"shm.h: enum gw_state has values set by hand: {names}"
    assert tuple(n.removeprefix("GW_").lower() for n in names) == INTERPOSER_STATES


def test_the_state_names_in_control_c_are_the_vocabularys():
    body = c_match(r"state_name\s*\([^)]*\)\s*\{.*?names\s*\[\s*\]\s*=\s*\{(.*?)\}", c_source("control.c"),
                   "control.c", "the names[] array of state_name()").group(1)
    assert tuple(c_strings(body)) == INTERPOSER_STATES


def test_the_default_socket_in_control_c_is_the_vocabularys():
    m = c_match(r'#define\s+DEFAULT_SOCKET\s+"([^"]*)"', c_source("control.c"), "control.c", "#define DEFAULT_SOCKET")
    assert m.group(1) == DEFAULT_SOCKET


def test_the_priorities_control_c_parses_are_the_vocabularys():
    text = c_source("control.c")
    expr = c_match(r'getenv\("GPUWATCH_PRIORITY"\)+\s*gw_cfg\.priority\s*=\s*([^;]*);', text, "control.c",
                   'gw_cfg.priority = ... from getenv("GPUWATCH_PRIORITY")').group(1)
    parsed = {name: int(n) for name, n in re.findall(r'!strcmp\(\s*\w+\s*,\s*"(\w+)"\s*\)\s*\?\s*(\d+)', expr)}
    default = c_match(r":\s*(\d+)\s*$", expr, "control.c", "the default of gw_cfg.priority").group(1)
    assert parsed, f"control.c: no !strcmp(s, \"name\") ? N in {expr!r}"
    expected = {name: value for value, name in enumerate(PRIORITIES_BY_VALUE)}
    assert {**parsed, "normal": int(default)} == expected, (
        f"control.c reads GPUWATCH_PRIORITY as {parsed}, anything else as {default} (normal); the page's numbers "
        f"are PRIORITIES_BY_VALUE's indices: {expected}")
    names = c_match(r'\(const char \*\[\]\)\s*\{([^}]*)\}\s*\[\s*gw_cfg\.priority\s*\]', text, "control.c",
                    "the priority names of the attach line").group(1)
    assert tuple(c_strings(names)) == PRIORITIES_BY_VALUE


# ------------------------------------------------------------------------------------------------ the client


def test_the_cli_does_not_import_the_daemons_stack():
    code = ("import sys, gpuwatch.client.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('bcc', 'prometheus_client', 'urwid', 'pynvml')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", "`gpuwatch ps` would load these: " + r.stdout
