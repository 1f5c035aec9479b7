"""The package's architecture, checked: layers depend one way, no import cycles, no CLI code in the library.

Run it alone with ``python -m pytest tests/test_layout.py -q``; ``python tests/test_layout.py``
prints the package-level dependency graph.
"""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = "densenet_efficient"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: Bottom to top; a module may import modules of its own layer or of the layers before it.
LAYERS = ("errors", "io", "models", "conversion", "perf", "training", "cli", "__init__", "__main__")

#: The one library module allowed to import argparse: it allow-lists ``argparse.Namespace`` for
#: ``torch.load(weights_only=True)``, because training scripts pickle their arguments beside the weights.
ARGPARSE_ALLOWED = {f"{PACKAGE}.io.checkpoint"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports inside functions included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = {alias.name for alias in node.names}
            if target == PACKAGE and names == {"__version__"}:
                continue  # reading the version for a provenance string is not a dependency
            # ``from . import engine`` names a submodule; ``from .config import X`` the module itself
            found.add(target)
            found.update(f"{target}.{name}" for name in names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = {m for m in _imports(path) if m in modules and m != name}
        # a package named only because one of its submodules was imported from it is not a dependency
        graph[name] = {
            m for m in targets if not any(t.startswith(m + ".") for t in targets) or _binds_names(path, m)
        }
    return graph


def _binds_names(path: Path, package: str) -> bool:
    """Whether ``path`` takes a non-module name from ``package``'s ``__init__`` (a real dependency)."""
    modules = {_module_name(p) for p in ROOT.rglob("*.py")}
    name = _module_name(path)
    base_pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = base_pkg.split(".")
            target = (
                ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                if node.level
                else node.module
            )
            if target == package and any(f"{package}.{a.name}" not in modules for a in node.names):
                return True
    return False


def _layer(module: str) -> int:
    rest = module[len(PACKAGE) + 1 :] if module != PACKAGE else "__init__"
    return LAYERS.index(rest.split(".")[0])


def test_layers_depend_one_way():
    wrong = [
        f"{a} (layer {LAYERS[_layer(a)]}) imports {b} (layer {LAYERS[_layer(b)]})"
        for a, targets in _graph().items()
        for b in targets
        if _layer(b) > _layer(a)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_lazy_ones_included():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_library_modules_hold_no_command_line_code():
    offenders = []
    for path in ROOT.rglob("*.py"):
        name = _module_name(path)
        if _layer(name) >= LAYERS.index("cli"):
            continue
        imports = _imports(path)
        if "argparse" in imports and name not in ARGPARSE_ALLOWED:
            offenders.append(f"{name} imports argparse")
        if any(m == f"{PACKAGE}.cli" or m.startswith(f"{PACKAGE}.cli.") for m in imports):
            offenders.append(f"{name} imports the CLI")
        source = path.read_text(encoding="utf-8")
        if "def configure_parser" in source:
            offenders.append(f"{name} defines configure_parser")
    assert not offenders, "\n".join(offenders)


def test_every_subcommand_lives_in_its_own_cli_module():
    from densenet_efficient.cli import SUBCOMMANDS

    for name, (module, _) in SUBCOMMANDS.items():
        assert module == f"{PACKAGE}.cli.{name}"
        assert (ROOT / "cli" / f"{name}.py").is_file()


def test_tests_mirror_the_package_layout():
    tests = Path(__file__).resolve().parent
    for sub in ("io", "models", "conversion", "perf", "training", "cli"):
        assert (ROOT / sub / "__init__.py").is_file()
        assert list((tests / sub).glob("test_*.py")), f"tests/{sub}/ has no test module"


def test_nothing_refers_outside_the_repository():
    """Every Markdown file the docs, the package, the scripts and the tests name exists in the
    repository, and no relative link climbs out of it."""
    repo = ROOT.parent
    present = {p.name for p in repo.rglob("*.md") if ".venv" not in p.parts}
    checked = [*repo.glob("*.md"), *(repo / "docs").glob("*.md"), *(repo / "weights").glob("*.md")]
    checked += [*ROOT.rglob("*.py"), *(repo / "scripts").glob("*.py"), *(repo / "tests").rglob("*.py")]
    checked += [repo / "hubconf.py", *(repo / "examples").glob("*.py")]
    for path in checked:
        text = path.read_text(encoding="utf-8")
        for name in re.findall(r"([\w.-]+\.md)\b", text):
            assert name in present, f"{path} names {name}, which is not in the repository"
        for target in re.findall(r"\]\(((?:\.\./)+[^)]*)\)", text):
            assert (path.parent / target).resolve().is_relative_to(repo), f"{path} links outside: {target}"


def _cells(row: str) -> int:
    """The cells of a Markdown table row: ``|`` inside a code span or escaped (``\\|``) is text."""
    count, code, i = 0, False, 0
    while i < len(row):
        if row.startswith("\\|", i):
            i += 2
            continue
        code ^= row[i] == "`"
        count += row[i] == "|" and not code
        i += 1
    return count - 1


def test_markdown_tables_are_whole():
    """Every row of every table in the Markdown the repository ships has its header's cells: two
    rows pasted into one line (a table's row gone from the rendered page) fail here."""
    repo = ROOT.parent
    for path in [*repo.glob("*.md"), *(repo / "docs").glob("*.md"), *(repo / "weights").glob("*.md")]:
        header = None
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.startswith("|"):
                header = None
            elif header is None:
                header = _cells(line)
            else:
                assert _cells(line) == header, f"{path.name}:{n} has {_cells(line)} cells, its table {header}"


if __name__ == "__main__":  # print the package-level graph
    edges = defaultdict(set)
    for a, targets in _graph().items():
        for b in targets:
            la, lb = LAYERS[_layer(a)], LAYERS[_layer(b)]
            if la != lb:
                edges[la].add(lb)
    for layer in LAYERS:
        print(f"{layer:10s} -> {', '.join(sorted(edges[layer], key=LAYERS.index)) or '-'}")
    sys.exit(0)
