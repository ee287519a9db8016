"""Import layers, read from the source with ``ast`` (nothing is imported).

    minddspo        the math: imports none of toy2d, bench, paper_figures
    toy2d           the toy: imports minddspo, never bench or paper_figures
    bench           the T2I side: imports minddspo, never toy2d or paper_figures
    bench.t2i       the T2I library: never imports a command (a top-level bench/*.py
                    with an ``if __name__ == "__main__"`` block)
    bench/*.py      the commands: none imports another; none touches ``sys.path``
    paper_figures   thin commands over toy2d

No module imports itself through others (no import cycle), inside functions included.

The tiny test models (``bench.t2i.tiny``) are imported by tests and on ``--tiny`` paths
only: never at module level by a production module, and inside a function only in the
``--tiny`` entry points of :data:`TINY_ENTRY_POINTS`. Imports inside functions count;
``importlib``/``runpy`` strings are not seen.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("minddspo", "toy2d", "bench", "paper_figures")

#: the functions that build tiny models for ``--tiny`` (module, function); nothing else may
TINY_ENTRY_POINTS = {
    ("bench.t2i.models", "open_backbone"),  # --tiny NAME of every command
    ("bench.evaluate", "evaluate"),  # evaluate.py --tiny: random tiny CLIP scorers
    ("bench.bench_step", "build_backbone"),  # bench_step --sd15-config: the tiny tokenizer
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@cache
def imports_of(path: Path) -> frozenset[str]:
    """Every module this file imports, absolute; ``from a import b`` gives ``a`` and ``a.b``
    (``b`` may be a submodule)."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")
    return frozenset(out)


def _top(mod: str) -> str:
    return mod.split(".")[0]


def _is_main_guard(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(
            isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators
        )
    )


def bench_commands() -> set[str]:
    return {
        _module_name(p)
        for p in (ROOT / "bench").glob("*.py")
        if any(_is_main_guard(n) for n in _tree(p).body)
    }


def _is_tiny(mod: str) -> bool:
    return _top(mod) == "bench" and "tiny" in mod.split(".")


FILES = _files()
IDS = [_module_name(p) for p in FILES]


def _in(pkg: str) -> list[Path]:
    return [p for p in FILES if _top(_module_name(p)) == pkg]


def test_the_scan_sees_the_packages():
    names = set(IDS)
    assert {"minddspo.losses", "toy2d.report", "bench.train_t2i", "paper_figures.toy_figures"} <= (
        names
    )
    assert imports_of(ROOT / "toy2d" / "report.py") >= {"toy2d.cli", "toy2d.plots"}
    assert {"bench.make_pairs", "bench.train_t2i", "bench.sample"} <= bench_commands()


@pytest.mark.parametrize("path", _in("minddspo"), ids=_module_name)
def test_minddspo_imports_no_other_package(path):
    bad = {m for m in imports_of(path) if _top(m) in ("toy2d", "bench", "paper_figures")}
    assert not bad, f"{_module_name(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _in("toy2d"), ids=_module_name)
def test_toy2d_imports_neither_bench_nor_paper_figures(path):
    bad = {m for m in imports_of(path) if _top(m) in ("bench", "paper_figures")}
    assert not bad, f"{_module_name(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _in("bench"), ids=_module_name)
def test_bench_imports_neither_toy2d_nor_paper_figures(path):
    name = _module_name(path)
    bad = {m for m in imports_of(path) if _top(m) in ("toy2d", "paper_figures")}
    assert not bad, f"{name} imports {sorted(bad)}"


def tiny_import_sites(path: Path) -> set[str | None]:
    """Where ``path`` imports the tiny test models: a function name, or None (module level)."""
    sites: set[str | None] = set()
    name = _module_name(path)
    package = name.split(".")[:-1]

    def hits(node: ast.AST) -> bool:
        if isinstance(node, ast.Import):
            return any(_is_tiny(a.name) for a in node.names)
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(package[: len(package) - (node.level - 1)] + [mod])
            return _is_tiny(mod) or any(_is_tiny(f"{mod}.{a.name}") for a in node.names)
        return False

    def walk(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if hits(child):
                sites.add(func)
            inner = (
                child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else func
            )
            walk(child, inner)

    walk(_tree(path), None)
    return sites


def test_tiny_models_only_on_tiny_paths():
    bad = []
    for p in FILES:
        name = _module_name(p)
        if name == "bench.t2i.tiny":
            continue
        for site in tiny_import_sites(p):
            if site is None or (name, site) not in TINY_ENTRY_POINTS:
                bad.append(f"{name}:{site or '<module>'}")
    assert not bad, f"bench.t2i.tiny imported outside the --tiny entry points: {bad}"
    seen = {(_module_name(p), s) for p in FILES for s in tiny_import_sites(p)}
    assert TINY_ENTRY_POINTS <= seen, f"stale entries: {TINY_ENTRY_POINTS - seen}"


def test_the_tiny_check_sees_a_module_level_import():
    f = ROOT / "bench" / "t2i" / "models.py"
    assert tiny_import_sites(f) == {"open_backbone"}
    assert None in tiny_import_sites(ROOT / "tests" / "test_train_t2i.py")


def test_the_library_imports_no_command():
    commands = bench_commands()
    bad = {
        (_module_name(p), m)
        for p in _in("bench")
        if _module_name(p) not in commands
        for m in imports_of(p)
        if m in commands
    }
    assert not bad, f"a library module imports a command (move the code into bench.t2i): {bad}"


def test_no_command_imports_another():
    commands = bench_commands()
    bad = {
        (_module_name(p), m)
        for p in _in("bench")
        if _module_name(p) in commands
        for m in imports_of(p)
        if m in commands and m != _module_name(p)
    }
    assert not bad, f"a command imports another command: {bad}"


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("*.py")), ids=lambda p: p.name)
def test_commands_leave_sys_path_alone(path):
    assert "sys.path" not in path.read_text(), f"{path.name}: the installed package is the path"


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (the
    strongly connected components of more than one module), each sorted."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        order[v] = low[v] = len(order)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = [stack.pop()]
            while group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in order:
            visit(v)
    return out


def module_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (not itself)."""
    names = set(IDS)
    return {
        n: {m for m in imports_of(p) if m in names and m != n}
        for p, n in zip(FILES, IDS, strict=True)
    }


def test_cycle_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert import_cycles(module_graph()) == []
