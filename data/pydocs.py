"""The installed Python's documentation, read from its source files (nothing is imported, so no
module's side effects run) and from the interpreter's builtins: what the starter learns from and
what the store indexes as the assistant's reference (data.memory)."""

from __future__ import annotations

import ast
import builtins
import sysconfig
import threading
from pathlib import Path
from typing import Iterator

# The standard library's source is read whole, less what is not Python's own (installed
# packages) or not text: compiled caches, codec tables, the pydoc topics (read from pydoc_data).
SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__", "pydoc_data", "encodings"}
# For the instruction data's docstrings: only the library people call, no tests, GUIs or tools.
DOC_SKIP_PARTS = SKIP_PARTS | {
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "venv",
    "msilib",
}
BUILTIN_TYPES = (
    str,
    bytes,
    list,
    dict,
    set,
    frozenset,
    tuple,
    int,
    float,
    complex,
    range,
    bytearray,
    memoryview,
    object,
)


def builtin_docs() -> list[tuple[str, str]]:
    """(name, docstring) of the builtin functions and the public methods of builtin types."""
    docs = [
        (name, getattr(builtins, name).__doc__)
        for name in dir(builtins)
        if not name.startswith("_")
        and callable(getattr(builtins, name))
        and not isinstance(getattr(builtins, name), type)
    ]
    for t in BUILTIN_TYPES:
        docs.append((t.__name__, t.__doc__))
        docs += [(f"{t.__name__}.{m}", getattr(t, m).__doc__) for m in dir(t) if not m.startswith("_")]
    return docs


def stdlib_docstrings(root: str | Path | None = None) -> list[str]:
    """Public module, class and function docstrings of the standard library's source files,
    each headed by the name (and signature) it documents (the instruction data asks about them)."""
    return [text for _module, texts in module_docstrings(root) for text in texts]


# CPython 3.11's parser is not safe to run from two threads at once: two indexers in one process
# (the app's and a server's) failed with "SystemError: AST constructor recursion depth mismatch".
_PARSING = threading.Lock()


def module_docstrings(root: str | Path | None = None) -> Iterator[tuple[str, list[str]]]:
    """stdlib_docstrings module by module: (module name, its docstrings), in path order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if DOC_SKIP_PARTS.intersection(rel.parts) or any(p.startswith(("_", ".")) for p in rel.parts[:-1]):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        if module.split(".")[-1].startswith("_") and not rel.name == "__init__.py":
            continue
        try:
            source = path.read_bytes()
            with _PARSING:
                tree = ast.parse(source, filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        yield module, docstrings(tree, module)


def docstrings(tree: ast.Module, module: str) -> list[str]:
    found = []
    doc = ast.get_docstring(tree)
    if doc and len(doc) > 40:
        found.append(f"Module {module}\n\n{doc}")

    def visit(node, prefix: str) -> None:
        for child in node.body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if child.name.startswith("_") and child.name != "__init__":
                    continue
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if isinstance(child, ast.ClassDef):
                    if doc:
                        found.append(f"class {name}\n\n{doc}")
                    visit(child, name)
                elif doc:
                    args = ast.unparse(child.args)
                    found.append(f"{name}({args})\n\n{doc}")

    visit(tree, module)
    return found
