"""The package's structure, read from the source with ``ast`` (nothing is imported): no import circle between
modules, no import that goes up the layers of ``LAYERS``, no module using another module's private (``_x``)
name, and a thin ``cli.py``. Every import counts, function-level ones included.

``python tests/test_layout.py`` prints every finding, those still pending on other branches included.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "resflax"

# Bottom to top. A module may import modules of its own layer or of a layer below, never of one above. A module
# belongs to the layer that names it exactly, else to the one whose "PACKAGE.*" entry is the longest match.
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["resflax", "resflax.errors", "resflax.quiet", "resflax.lazy", "resflax.interrupts", "resflax.xla",
              "resflax.configs", "resflax.args", "resflax.config_cli"]),
    ("models, data", ["resflax.models", "resflax.models.*", "resflax.data", "resflax.data.*"]),
    ("train", ["resflax.train", "resflax.train.*"]),  # step, state, schedules, tasks, loop, checkpoint, workdir, ...
    ("evaluation, weights", ["resflax.train.evaluate", "resflax.train.protocols", "resflax.train.transfer",
                             "resflax.weights", "resflax.train.bnstats"]),
    ("analysis", ["resflax.analysis", "resflax.analysis.*"]),
    # the command line: cli.py parses and dispatches; each area's commands.py holds its commands' bodies
    ("commands", ["resflax.cli", "resflax.analysis.commands", "resflax.data.commands", "resflax.train.commands"]),
]

# Findings in modules that other branches are reworking right now (issue 22); tolerated, and shown as warnings,
# until that work lands; then delete the entry (a warning says when an entry no longer matches anything).
PENDING: dict[str, str] = {}

# cli.py parses, dispatches and maps errors to exit codes (the --config flags of train/import: config_cli.py).
CLI_MAX_LINES = 200


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str  # module that imports
    imported: str  # module it imports
    path: str  # its file, as shown in messages
    line: int
    in_function: bool
    text: str  # the statement, as written

    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Private:
    importer: str
    owner: str  # the module the private name belongs to
    name: str
    path: str
    line: int


def module_names(src: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of ``package`` under ``src``."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is a module of the package."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def _dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _read_module(me: str, path: Path, src: Path, package: str, modules: dict[str, Path]
                 ) -> tuple[list[Import], list[Private]]:
    text = path.read_text()
    shown = path.relative_to(src.parent).as_posix()
    tree = ast.parse(text, str(path))
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                   for n in ast.walk(f)}
    me_pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    imports: list[Import] = []
    privates: list[Private] = []
    bound: dict[str, str] = {}  # a local name -> the package module it stands for

    def edge(node: ast.stmt, target: str) -> None:
        statement = " ".join((ast.get_source_segment(text, node) or "").split())
        imports.append(Import(me, target, shown, node.lineno, id(node) in in_function, statement))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, modules)
                if target is None:
                    continue
                edge(node, target)
                top = alias.name.split(".")[0]
                bound[alias.asname or top] = target if alias.asname else top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                up = me_pkg.split(".")[: len(me_pkg.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            source = _resolve(base, modules) if base == package or base.startswith(package + ".") else None
            if source is None:
                continue
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:  # from pkg import submodule
                    edge(node, f"{base}.{alias.name}")
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
                    continue
                edge(node, source)
                if _is_private(alias.name):
                    privates.append(Private(me, source, alias.name, shown, node.lineno))
    for node in ast.walk(tree):  # m._x where m is a module imported above
        if not isinstance(node, ast.Attribute) or not _is_private(node.attr):
            continue
        parts = _dotted(node)
        if parts is None or parts[0] not in bound:
            continue
        owner = bound[parts[0]]
        for part in parts[1:-1]:  # through sub-modules: resflax.train.tasks._x
            owner = f"{owner}.{part}" if f"{owner}.{part}" in modules else None
            if owner is None:
                break
        if owner is not None and owner != me:
            privates.append(Private(me, owner, node.attr, shown, node.lineno))
    return imports, privates


def read_imports(src: Path, package: str) -> tuple[dict[str, Path], list[Import], list[Private]]:
    """Every import between the package's modules (function-level ones too), and every private name a module
    takes from another one, by ``from m import _x`` or as ``m._x`` of a module it imported."""
    modules = module_names(src, package)
    imports: list[Import] = []
    privates: list[Private] = []
    for me, path in modules.items():
        i, p = _read_module(me, path, src, package, modules)
        imports += i
        privates += p
    # one edge per (importer, imported, line); a package's __init__ importing itself is no edge
    imports = list({(i.importer, i.imported, i.line): i for i in imports if i.importer != i.imported}.values())
    return modules, imports, privates


def layer_of(module: str, layers=LAYERS) -> int | None:
    """Index into ``layers`` of ``module``'s layer; None if no entry names it."""
    best, best_len = None, -1
    for i, (_, entries) in enumerate(layers):
        for entry in entries:
            if entry == module:
                return i
            if entry.endswith(".*") and module.startswith(entry[:-1]) and len(entry) > best_len:
                best, best_len = i, len(entry)
    return best


def _cycles(modules: list[str], imports: list[Import]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each as a sorted list."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for i in imports:
        graph[i.importer].add(i.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return out


def _loop_through(group: list[str], imports: list[Import]) -> list[Import]:
    """One closed path of imports through the modules of ``group``, from its first module back to it."""
    inside = [i for i in imports if i.importer in group and i.imported in group]
    start = group[0]
    paths: dict[str, list[Import]] = {start: []}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back
        nxt = []
        for m in frontier:
            for i in sorted(inside, key=lambda i: (i.importer, i.imported, i.line)):
                if i.importer != m:
                    continue
                if i.imported == start:
                    return paths[m] + [i]
                if i.imported not in paths:
                    paths[i.imported] = paths[m] + [i]
                    nxt.append(i.imported)
        frontier = nxt
    return []


def _how(i: Import) -> str:
    return f"{i.where()}: `{i.text}`" + (" (inside a function)" if i.in_function else "")


def findings(src: Path = SRC, package: str = PACKAGE, layers=LAYERS) -> dict[str, dict[str, str]]:
    """``{check: {key: message}}`` for the checks ``circles``, ``upward``, ``private`` and ``unplaced``."""
    modules, imports, privates = read_imports(src, package)
    out: dict[str, dict[str, str]] = {"circles": {}, "upward": {}, "private": {}, "unplaced": {}}
    for group in _cycles(list(modules), imports):
        path = _loop_through(group, imports)
        chain = " -> ".join([p.importer for p in path] + [path[0].importer]) if path else ", ".join(group)
        out["circles"][f"circle: {', '.join(group)}"] = (
            f"import circle {chain}: none of these modules can be read (or changed) without the others; move "
            "what both need into a module below them, or merge them\n" + "\n".join(f"    {_how(p)}" for p in path))
    for m in modules:
        if layer_of(m, layers) is None:
            out["unplaced"][f"unplaced: {m}"] = (f"{m} ({modules[m]}) is in no layer: add it to LAYERS in "
                                                 "tests/test_layout.py, at the level of what it does")
    for i in sorted(imports, key=lambda i: (i.importer, i.line)):
        a, b = layer_of(i.importer, layers), layer_of(i.imported, layers)
        if a is not None and b is not None and b > a:
            key = f"upward: {i.importer} -> {i.imported}"
            msg = (f"{i.importer} (layer {layers[a][0]!r}) imports {i.imported} (layer {layers[b][0]!r}, above it): "
                   f"a lower layer must not depend on a higher one; move the shared code down, or pass it in\n"
                   f"    {_how(i)}")
            out["upward"][key] = out["upward"][key] + f"\n    {_how(i)}" if key in out["upward"] else msg
    for p in sorted(privates, key=lambda p: (p.importer, p.line)):
        key = f"private: {p.importer} uses {p.owner}.{p.name}"
        where = f"{p.path}:{p.line}"
        out["private"].setdefault(key, f"{p.importer} uses {p.name}, a private name of {p.owner}: make it public "
                                       f"(a name without the underscore, documented) or keep its use inside "
                                       f"{p.owner}\n    {where}")
    return out


def _check(kind: str) -> None:
    found = findings()[kind]
    pending = {k: v for k, v in found.items() if k in PENDING}
    for key, msg in pending.items():
        warnings.warn(f"pending ({PENDING[key]}): {msg}", stacklevel=2)
    bad = {k: v for k, v in found.items() if k not in PENDING}
    if bad:
        pytest.fail(f"{len(bad)} {kind} finding(s):\n" + "\n".join(bad.values()), pytrace=False)


def test_the_reader_sees_every_kind_of_import():
    modules, imports, _ = read_imports(SRC, PACKAGE)
    assert {"resflax.cli", "resflax.train.loop", "resflax.models", "resflax.errors"} <= set(modules)
    edges = {(i.importer, i.imported): i for i in imports}
    assert ("resflax.train.loop", "resflax.train.checkpoint") in edges  # from resflax.train.checkpoint import ...
    assert ("resflax.train.loop", "resflax.train.step") in edges  # from resflax.train import step as step_lib
    assert ("resflax.train.build", "resflax.models") in edges  # from resflax.models import get_model, ...
    assert edges[("resflax.cli", "resflax.train.commands")].in_function  # imported when the command runs


def test_no_import_circles():
    _check("circles")


def test_no_upward_imports():
    _check("upward")


def test_no_private_names_of_other_modules():
    _check("private")


def test_every_module_has_a_layer():
    _check("unplaced")


def test_pending_entries_still_match_something():
    """An entry of PENDING that no longer matches a finding is done: a warning says to delete it."""
    found = {k for kind in findings().values() for k in kind}
    for key in PENDING.keys() - found:
        warnings.warn(f"PENDING entry {key!r} matches nothing any more: delete it from tests/test_layout.py",
                      stacklevel=1)


def test_cli_stays_thin():
    n = len((SRC / PACKAGE / "cli.py").read_text().splitlines())
    assert n <= CLI_MAX_LINES, (f"src/resflax/cli.py has {n} lines (at most {CLI_MAX_LINES}): it parses, "
                                "dispatches and maps errors to exit codes; put a command's work in the commands.py "
                                "of the area it drives (analysis/, data/, train/)")


def test_cli_calls_only_the_commands_modules():
    """cli.py reaches the library only through the areas' commands.py (and the base layer: errors, configs)."""
    _, imports, _ = read_imports(SRC, PACKAGE)
    allowed = set(LAYERS[0][1]) | set(LAYERS[-1][1])
    bad = [i for i in imports if i.importer == f"{PACKAGE}.cli" and i.imported not in allowed]
    if bad:
        pytest.fail("cli.py imports library modules itself; call them from the commands.py of their area "
                    "instead:\n" + "\n".join(f"    {_how(i)}" for i in bad), pytrace=False)


def test_help_and_flag_errors_start_without_jax_or_tfds():
    """What the function-level imports of cli.py and train/commands.py are for: help, and a flag error, answer
    without importing JAX or TFDS."""
    code = (
        "import contextlib, io, sys\n"
        "from resflax import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    codes = [cli.main(a) for a in (['--help'], ['train', '--help'], ['import', '--help'], ['nope'],\n"
        "                                    ['eval'], ['export', '--workdir', 'w'], ['predict', '--workdir', 'w'])]\n"
        "print(codes, sorted(m for m in ('jax', 'tensorflow_datasets', 'orbax') if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=SRC.parent)
    assert out.stdout.strip() == "[0, 0, 0, 2, 2, 2, 2] []", out.stdout + out.stderr


def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("kind,files,expect", [
    ("circles", {"pkg/__init__.py": "", "pkg/a.py": "def f():\n    from pkg import b\n", "pkg/b.py": "import pkg.a\n"},
     ["import circle pkg.a -> pkg.b -> pkg.a", "pkg/a.py:2: `from pkg import b` (inside a function)"]),
    ("upward", {"pkg/__init__.py": "", "pkg/low.py": "from pkg.high import x\n", "pkg/high.py": "x = 1\n"},
     ["pkg.low (layer 'low') imports pkg.high (layer 'high', above it)", "pkg/low.py:1"]),
    ("private", {"pkg/__init__.py": "", "pkg/low.py": "_x = 1\n",
                 "pkg/high.py": "from pkg import low\nfrom pkg.low import _x\ny = low._x\n"},
     ["pkg.high uses _x, a private name of pkg.low", "pkg/high.py:2"]),
    ("unplaced", {"pkg/__init__.py": "", "pkg/low.py": "", "pkg/new.py": ""}, ["pkg.new"]),
])
def test_the_checks_fail_on_planted_faults(tmp_path, kind, files, expect):
    layers = [("low", ["pkg", "pkg.low", "pkg.a", "pkg.b"]), ("high", ["pkg.high"])]
    found = findings(_plant(tmp_path, files), "pkg", layers)
    assert len(found[kind]) == 1, found
    msg = next(iter(found[kind].values()))
    for text in expect:
        assert text in msg, msg
    assert all(not v for k, v in found.items() if k != kind), found


if __name__ == "__main__":
    everything = findings()
    for kind, found in everything.items():
        for key, msg in found.items():
            print(f"[{kind}{', pending: ' + PENDING[key] if key in PENDING else ''}] {msg}\n")
    n = sum(map(len, everything.values()))
    print(f"{n} finding(s), {sum(k in PENDING for f in everything.values() for k in f)} of them pending")
    sys.exit(1 if n else 0)
