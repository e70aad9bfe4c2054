"""Imports go one way, gpt <- data <- finetune <- tui, and no two files import each other (even
lazily, inside a function): read from the source with `ast`, so a violation fails here before it
becomes a cycle that only some import order trips over. Imports under `if TYPE_CHECKING:` are for
type checkers only and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each package and the packages of Kettle it may import.
ALLOWED = {
    "gpt": set(),
    "data": {"gpt"},
    "finetune": {"gpt", "data"},
    "tui": {"gpt", "data", "finetune"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names imported from it) for every import of a Kettle module in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            entries = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            entries = [(node.module, [a.name for a in node.names])]
        else:
            continue
        for module, names in entries:
            if module.split(".")[0] in ALLOWED and not _type_checking_only(node, parents):
                found.append((node.lineno, module, names))
    return found


def kettle_files() -> dict[str, Path]:
    return {module_name(p): p for package in ALLOWED for p in sorted((ROOT / package).rglob("*.py"))}


def test_each_package_imports_only_the_packages_below_it():
    wrong = []
    for module, path in kettle_files().items():
        package = module.split(".")[0]
        for line, target, _ in imports_of(path):
            other = target.split(".")[0]
            if other != package and other not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "imports against the layers gpt <- data <- finetune <- tui:\n" + "\n".join(wrong)


def test_a_package_imports_only_public_names_of_another():
    wrong = []
    for module, path in kettle_files().items():
        for line, target, names in imports_of(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if target.split(".")[0] != module.split(".")[0] and private:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {', '.join(private)} from {target}")
    assert not wrong, "private names used across packages (make them public):\n" + "\n".join(wrong)


def import_graph() -> dict[str, set[str]]:
    files = kettle_files()
    graph = {}
    for module, path in files.items():
        targets = set()
        for _, target, names in imports_of(path):
            # `from pkg import mod` imports the module pkg.mod; `from pkg.mod import name` pkg.mod.
            for name in names or [""]:
                submodule = f"{target}.{name}"
                targets.add(submodule if submodule in files else target)
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_two_files_import_each_other():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_check_sees_a_cycle_and_a_layer_violation(tmp_path):
    # The checks themselves: a made-up graph with a cycle is caught, an acyclic one is not.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    bad = tmp_path / "x.py"
    bad.write_text(
        "import data.store\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from tui.app import KettleApp\n"
        "def f():\n    from finetune import jobs\n",
        encoding="utf-8",
    )
    assert [(line, module) for line, module, _ in imports_of(bad)] == [(1, "data.store"), (6, "finetune")]
