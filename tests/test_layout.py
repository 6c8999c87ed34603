"""The layout stays what pipeline/__init__.py and docs/ARCHITECTURE.md say: layers import downwards
only, no import cycles, our own modules imported at module top, one ray importer, short files and
functions. Read from the source with ``ast``: nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"pipeline": "demix.pipeline", "models": "demix.models", "flows": "demix.flows"}

# layer -> the layers it may import (besides itself)
ALLOWED = {
    "core": set(),
    "io": {"core"},
    "models": {"core", "io"},
    "engine": {"core", "io", "models"},
    "data": {"core", "io"},
    "batch": {"core", "io", "models", "engine"},
    "learn": {"core", "io", "models", "engine", "data"},
    "flows": {"core", "io", "models", "engine", "batch"},
    "cli": {"core", "io", "models", "engine", "data", "batch", "learn", "flows"},
}
MAX_FILE_LINES = 420
MAX_FUNCTION_LINES = 60
LONG_OK = "# long:"  # a function over the limit says why on its def line or the line above


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[1] in ("models", "flows"):
        return parts[1]
    if len(parts) == 2 or parts[2] in ("stems", "errors", "markdown"):
        return "core"
    return parts[2]


def _own_imports(tree: ast.AST, module: str) -> list[tuple[ast.stmt, str]]:
    """Every import of a demix module in ``tree`` as (node, imported module)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node, a.name) for a in node.names if a.name.startswith("demix.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("demix."):
            for a in node.names:  # `from demix.pipeline import io` imports the module demix.pipeline.io
                sub = f"{node.module}.{a.name}"
                out.append((node, sub if sub in MODULES else node.module))
    return out


def _top_level(tree: ast.Module) -> set[ast.stmt]:
    return {n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}


def test_layers_import_downwards_only():
    wrong = []
    for module, path in MODULES.items():
        for node, target in _own_imports(ast.parse(path.read_text()), module):
            a, b = _layer(module), _layer(target)
            if a != b and b not in ALLOWED[a]:
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} ({a}) imports {target} ({b})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_own_modules_are_imported_at_module_top():
    """Except where a lazy import is the point (a module that pulls in Prefect, say): the import line
    then says so with a ``# lazy:`` comment."""
    hidden = []
    for module, path in MODULES.items():
        text = path.read_text()
        lines, tree = text.splitlines(), ast.parse(text)
        top = _top_level(tree)
        hidden += [
            f"{path.relative_to(ROOT)}:{n.lineno} {t}" for n, t in _own_imports(tree, module)
            if n not in top and "# lazy:" not in lines[n.lineno - 1]
        ]
    assert not hidden, "imports of our own modules inside functions (break the cycle instead):\n" + "\n".join(hidden)


def test_no_import_cycles():
    graph = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for _, target in _own_imports(ast.parse(path.read_text()), module):
            if target in MODULES and target != module:
                graph[module].add(target)
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


RAY_LAYER = {"demix.pipeline.batch.cluster", "demix.pipeline.batch.workers", "demix.pipeline.batch.model_actors"}


def test_only_the_ray_layer_imports_ray():
    importers = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                importers.append(module)
    assert set(importers) <= RAY_LAYER, importers


def test_files_and_functions_stay_short():
    long_files, long_functions = [], []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(ROOT)}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                n = node.end_lineno - first + 1
                said = any(LONG_OK in lines[i] for i in (first - 2, node.lineno - 1) if 0 <= i < len(lines))
                if n > MAX_FUNCTION_LINES and not said:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long_files, "files over the limit:\n" + "\n".join(long_files)
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines without a '{LONG_OK}' reason:\n" + "\n".join(long_functions)


def test_the_layering_is_written_where_the_test_says():
    doc = (ROOT / "pipeline" / "__init__.py").read_text()
    for layer in ALLOWED:
        if layer not in ("core", "models", "flows", "cli"):
            assert f"{layer}/" in doc or f"``{layer}``" in doc, layer
