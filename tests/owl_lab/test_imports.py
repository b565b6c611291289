"""The import graph of ``owl_lab`` and ``hooks``: every module imports on its own, module-level imports
form no cycle, and no function hides an import of the project's own modules (the usual way to dodge one)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("owl_lab", "hooks")

#: function-level imports of project modules that are allowed, with the reason (module, imported)
ALLOWED_FUNCTION_IMPORTS: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    """Dotted name → file for every module of the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The project modules an import statement loads (``from a import b`` → ``a.b`` when that is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    return [n for n in names if n.split(".")[0] in PACKAGES]


def _import_nodes(tree: ast.AST):
    """(import statement, inside a function?) for every import executed or executable in ``tree``."""
    todo = [(tree, False)]
    while todo:
        node, in_function = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # annotations only: never executed
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            todo.append(
                (child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
            )


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(module-level edges, function-level project imports as (module, target, line))."""
    known = set(modules)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    nested: list[tuple[str, str, int]] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node, in_function in _import_nodes(tree):
            for target in _targets(node, module, path.name == "__init__.py", known):
                if in_function:
                    nested.append((module, target, node.lineno))
                elif target != module:
                    edges[module].add(target)
    return edges, nested


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_the_graph_builder_sees_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_module_level_imports_form_no_cycle():
    modules = _modules()
    edges, _ = _imports(modules)
    assert len(modules) > 40 and edges["owl_lab.zoo"] >= {"owl_lab.families"}
    assert edges["owl_lab.models.owl3.loading_owl3"] >= {"owl_lab.models.owl3.modeling_owl3"}
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_no_function_level_imports_of_project_modules():
    _, nested = _imports(_modules())
    unexplained = [
        f"{m}:{line} imports {t}" for m, t, line in nested if (m, t) not in ALLOWED_FUNCTION_IMPORTS
    ]
    assert not unexplained, "move these to the top of the module (or justify them): " + "; ".join(unexplained)


def test_every_module_imports_on_its_own():
    """Each module in a clean state (every project module dropped from sys.modules first): an import that
    only works after some other module was imported fails here. One child process, so third-party
    packages (torch, transformers) load once."""
    names = sorted(_modules())
    script = (
        "import importlib, sys, traceback\n"
        f"names = {names!r}\n"
        "failed = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('owl_lab', 'hooks')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=2))\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
