"""House rules read from the source with ``ast`` (nothing is imported).

No function or method outside ``tests/`` is longer than :data:`MAX_LINES` lines (from its
``def`` line to its last line, docstring included, decorators not), except the few in
:data:`ALLOWED`, each with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("minddspo", "toy2d", "bench", "paper_figures")
MAX_LINES = 80

#: (file, qualified name) -> why it may stay longer than MAX_LINES (none does today)
ALLOWED: dict[tuple[str, str], str] = {}


def long_functions(source: str, limit: int = MAX_LINES) -> dict[str, int]:
    """``{qualified name: lines}`` of every function or method in ``source`` longer than
    ``limit`` lines; nested ones are named ``outer.inner``."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                lines = child.end_lineno - child.lineno + 1
                if lines > limit:
                    found[name] = lines
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def all_long_functions() -> dict[tuple[str, str], int]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for name, lines in long_functions(path.read_text()).items():
                out[(rel, name)] = lines
    return out


def _function(name: str, body_lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(body_lines))
    return f"{indent}def {name}():\n{body}"


def test_long_functions_counts_def_to_last_line():
    src = (
        _function("short", 79)  # 80 lines: at the limit
        + "\n\n@staticmethod\n"  # decorators do not count
        + _function("long", 80)  # 81 lines
        + "\n\nclass C:\n"
        + _function("method", 81, indent="    ")
        + "\n\ndef outer():\n"
        + _function("inner", 90, indent="    ")
    )
    assert long_functions(src) == {"long": 81, "C.method": 82, "outer": 92, "outer.inner": 91}
    assert long_functions(src, limit=90) == {"outer": 92, "outer.inner": 91}


def test_no_function_over_the_limit_outside_the_allow_list():
    found = all_long_functions()
    extra = {f"{f}:{n} ({lines} lines)" for (f, n), lines in found.items() if (f, n) not in ALLOWED}
    assert not extra, f"over {MAX_LINES} lines; split into named pieces: {sorted(extra)}"
    stale = sorted(f"{f}:{n}" for f, n in ALLOWED if (f, n) not in found)
    assert not stale, f"no longer over {MAX_LINES} lines (or renamed); drop from ALLOWED: {stale}"
