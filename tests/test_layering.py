"""Import layers, read from the source with ``ast`` (nothing is imported).

    minddspo        the math: imports none of toy2d, bench, paper_figures
    toy2d           the toy: imports minddspo, never bench or paper_figures
    bench           the T2I side: imports minddspo, never toy2d or paper_figures
    paper_figures   thin commands over toy2d

Inside ``bench``, a *command* is a top-level ``bench/*.py`` with an ``if __name__ ==
"__main__"`` block. No command imports another command, no library module imports a
command, and no module imports the tiny test models (``bench.t2i.tiny``). Where today's code
breaks a rule the exception is listed below by name; those lists may only shrink: a new
importer fails, and so does an entry that no longer imports (delete it from the list).
Imports inside functions count; ``importlib``/``runpy`` strings are not seen.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("minddspo", "toy2d", "bench", "paper_figures")

# Production modules that import the tiny test models today. Issue 11 wants none (tests and
# ``--tiny`` only, never a real save); moving them is a later change, which deletes the
# entries here. Do not add to this list.
TINY_IMPORTERS_TO_REMOVE = [
    "bench.t2i.backbones",  # save_components (every real final/ save) and tiny_components
    "bench.bench_step",  # clip_tokenizer for its tiny text encoder
    "bench.t2i.scorers",  # clip_tokenizer for the tiny CLIP scorer
]

# (importer, imported command) pairs that break "no command imports another command" or
# "no library module imports a command" today. Issue 11 wants the shared code moved into
# the library; each move deletes its entry here. Do not add to this list.
COMMAND_IMPORTS_TO_REMOVE = [
    ("bench.bench_step", "bench.make_pairs"),  # build_pairs, for its demo pairs
    ("bench.bench_step", "bench.train_t2i"),  # compute_loss, encode_step
    ("bench.t2i.gpu_cost", "bench.train_t2i"),  # build_optimizer
    ("bench.train_t2i", "bench.make_pairs"),  # build_pairs, for --demo
]

# bench modules allowed to import toy2d: the shim that keeps the README's
# ``python bench/bench_toy.py`` working (the code is ``python -m toy2d.bench``).
BENCH_TO_TOY_SHIMS = ["bench.bench_toy"]


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
    banned = ("paper_figures",) if name in BENCH_TO_TOY_SHIMS else ("toy2d", "paper_figures")
    bad = {m for m in imports_of(path) if _top(m) in banned}
    assert not bad, f"{name} imports {sorted(bad)}"


def test_no_new_importer_of_the_tiny_test_models():
    importers = {_module_name(p) for p in FILES if any(_is_tiny(m) for m in imports_of(p))}
    importers.discard("bench.t2i.tiny")
    new = importers - set(TINY_IMPORTERS_TO_REMOVE)
    assert not new, f"production modules must not import bench.t2i.tiny: {sorted(new)}"
    gone = set(TINY_IMPORTERS_TO_REMOVE) - importers
    assert not gone, (
        f"no longer import bench.t2i.tiny, delete from TINY_IMPORTERS_TO_REMOVE: {gone}"
    )


def test_no_new_import_of_a_command():
    commands = bench_commands()
    pairs = set()
    for p in _in("bench"):
        name = _module_name(p)
        pairs |= {(name, c) for c in commands if c != name and c in imports_of(p)}
    new = pairs - set(COMMAND_IMPORTS_TO_REMOVE)
    assert not new, f"a module imports a command script (move the code into a library): {new}"
    gone = set(COMMAND_IMPORTS_TO_REMOVE) - pairs
    assert not gone, f"no longer imported, delete from COMMAND_IMPORTS_TO_REMOVE: {gone}"
