"""The tiny T2I examples of README.md and bench/README.md: each parses with its command's
flags, and each folder one reads was written by an earlier example of the same file."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"(?:torchrun \S+ |python )(bench/\w+\.py [^`\n]*)")
READS = ("--data", "--images", "--checkpoint")


def tiny_examples(doc: str) -> list[list[str]]:
    text = (ROOT / doc).read_text().replace("\\\n", " ")  # join continued lines
    found = [shlex.split(m.group(1), comments=True) for m in COMMAND.finditer(text)]
    return [argv for argv in found if "--tiny" in argv]


def parse(argv: list[str]):
    module = importlib.import_module("bench." + Path(argv[0]).stem)
    if module.__name__ == "bench.train_t2i":
        from bench.t2i.config import parse_args
    else:
        parse_args = module.parse_args
    return parse_args(argv[1:])


@pytest.mark.parametrize("doc", ["README.md", "bench/README.md"])
def test_tiny_examples_chain_and_parse(doc):
    examples = tiny_examples(doc)
    assert len(examples) >= 4, examples
    written: set[str] = set()
    for argv in examples:
        parse(argv)  # the flags are the command's (--tiny NAME everywhere)
        for flag, value in zip(argv, argv[1:], strict=False):
            if flag in READS and not value.startswith("/"):
                folder = value.partition("=")[2] if flag == "--checkpoint" else value
                folder = folder.rstrip("/").removesuffix("/final")
                assert folder in written, (
                    f"{doc}: {shlex.join(argv)} reads {folder}, not written before"
                )
        if "--out" in argv:
            written.add(argv[argv.index("--out") + 1].rstrip("/"))
