"""The repository explains itself: every citation in its code and docs resolves inside it.

* ``SPEC §N`` (also ``§N-§M``, ``§N.M``) names a ``## N.`` section of ``minddspo/SPEC.md``;
* a Markdown document cited in code or docs (a Markdown link to a ``.md`` file, or a
  capitalised name such as ``README.md``, ``bench/RESULTS.md``) exists in the repository:
  relative to the citing file, to the repository root, or as the one file of that name
  (lower-case names like ``results.md`` are outputs a command writes, not citations);
* nothing points outside the checkout (``../shared``) or at an issue tracker's numbers;
* every relative link of a Markdown document resolves: its file or folder exists, and its
  ``#anchor`` is a heading of the linked (or the same) Markdown file, slugged as GitHub does.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "minddspo" / "SPEC.md"
SPEC_CITE = re.compile(r"SPEC\s*((?:§\s*\d+(?:\.\d+)?\s*(?:[-–,]|and|)\s*)+)")
SECTION = re.compile(r"§\s*(\d+)")
MD_LINK = re.compile(r"\]\(((?!https?:)[^)\s#]+\.md)(?:#[^)]*)?\)")
MD_NAME = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[A-Z][A-Z0-9_]*\.md)\b")
OUTSIDE = re.compile(r"\.\./shared|[Ii]ssue[ -]?#?\d+")


@cache
def tracked() -> tuple[Path, ...]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = (ROOT / f for f in out.split("\0") if f)
    return tuple(sorted(p for p in files if _scanned(p) and p.is_file()))


#: the text files scanned besides code and docs: configuration, scripts, the CI entry point
TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".cfg", ".yml", ".yaml", ".txt"}


def _scanned(path: Path) -> bool:
    return path.suffix in TEXT_SUFFIXES or path == ROOT / ".ci" / "run"


def spec_sections() -> set[int]:
    return {int(m) for m in re.findall(r"^## (\d+)\.", SPEC.read_text(), flags=re.M)}


def spec_citations(text: str) -> list[int]:
    return [int(n) for m in SPEC_CITE.finditer(text) for n in SECTION.findall(m.group(1))]


def cited_docs(text: str) -> list[str]:
    return MD_LINK.findall(text) + MD_NAME.findall(text)


def md_resolves(name: str, cited_from: Path) -> bool:
    name = name.split("#")[0]
    if (cited_from.parent / name).is_file() or (ROOT / name).is_file():
        return True
    if "/" in name:
        return False
    return sum(p.name == name for p in tracked()) == 1


def test_configuration_and_scripts_are_scanned():
    names = {str(p.relative_to(ROOT)) for p in tracked()}
    assert {"pyproject.toml", ".ci/run", "README.md", "minddspo/perturb.py"} <= names
    assert _scanned(ROOT / "x.yaml") and _scanned(ROOT / "a" / "b.sh")
    assert not _scanned(ROOT / "x.png") and not _scanned(ROOT / "run")


def test_the_spec_has_the_sections_the_code_cites():
    assert spec_sections() == set(range(1, 8))


def test_citation_parsers_see_what_they_must():
    assert spec_citations("SPEC §2-§4, §7 and SPEC §5") == [2, 4, 7, 5]
    text = "see PITFALLS.md, [x](../bench/README.md#faults), writes results.md"
    assert set(cited_docs(text)) == {"../bench/README.md", "PITFALLS.md"}
    assert not md_resolves("PITFALLS.md", ROOT / "tests" / "conftest.py")
    assert md_resolves("README.md", ROOT / "minddspo" / "SPEC.md")
    assert OUTSIDE.search("as issue 14 asks") and OUTSIDE.search("../shared/SPEC.md")


@pytest.mark.parametrize("path", tracked(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_citation_resolves(path: Path):
    text = path.read_text(encoding="utf-8")
    bad = [f"SPEC §{n}" for n in spec_citations(text) if n not in spec_sections()]
    bad += [n for n in cited_docs(text) if not md_resolves(n, path)]
    bad += [m.group(0) for m in OUTSIDE.finditer(text)]
    if path == Path(__file__).resolve():
        return  # this file quotes bad citations on purpose
    assert not bad, f"{path.relative_to(ROOT)} cites what the repository does not hold: {bad}"


LINK = re.compile(r"\]\((?!https?:|mailto:)([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.M | re.S)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", flags=re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings; a repeated heading gets -1, -2, ..."""
    found: set[str] = set()
    count: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = count.get(base, 0)
        count[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(text: str, cited_from: Path) -> list[str]:
    bad = []
    for target in LINK.findall(FENCE.sub("", text)):
        name, _, anchor = target.partition("#")
        path = (cited_from.parent / name).resolve() if name else cited_from
        if not path.exists():
            bad.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            bad.append(target)
    return bad


def test_link_checker_sees_what_it_must():
    readme = ROOT / "README.md"
    assert slug("The GPU cost on paper — computed, not measured") == (
        "the-gpu-cost-on-paper--computed-not-measured"
    )
    assert slug("Backbones (`bench/t2i/backbones.py`)") == "backbones-bencht2ibackbonespy"
    assert slug("See [the spec](x.md) §3") == "see-the-spec-3"
    assert "text-to-image-in-one-example" in anchors(readme)
    text = (
        "[a](bench/README.md#install) [b](bench/README.md#no-such-heading) [c](#minddspo) "
        "[d](no/such/file.md) [e](https://example.org/x.md#y) [f](bench/t2i)\n"
        "```\n[g](not/checked.md)\n```\n"
    )
    assert broken_links(text, readme) == ["bench/README.md#no-such-heading", "no/such/file.md"]
    assert "tiny-smoke-run-built-in-demo-prompts-random-tiny-sd" not in anchors(
        ROOT / "bench" / "README.md"
    )  # a comment line in a fenced block is no heading


MARKDOWN = [p for p in tracked() if p.suffix == ".md"]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_markdown_link_resolves(path: Path):
    bad = broken_links(path.read_text(encoding="utf-8"), path)
    assert not bad, f"{path.relative_to(ROOT)} links to what the repository does not hold: {bad}"
