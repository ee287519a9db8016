"""What the bench commands publish follows the umask, as a plain mkdir/open would: staged
folders (``tempfile.mkdtemp``, private 0700) must not stay private once published."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bench.t2i.outdir import publish_dir, stage_dir, write_text_atomic


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_staged_and_published_folders_follow_the_umask(tmp_path, umask):
    final = tmp_path / "out" / "samples"
    stage = stage_dir(final)
    assert mode(stage) == 0o777 & ~umask  # not mkdtemp's 0700
    (stage / "base").mkdir()
    write_text_atomic(stage / "base" / "a.txt", "x\n")
    write_text_atomic(stage / "prompts.txt", "a cat\n")
    publish_dir(stage, final)  # a new folder: one rename
    assert sorted(p.name for p in final.iterdir()) == ["base", "prompts.txt"]
    for d in (final, final / "base"):
        assert mode(d) == 0o777 & ~umask
    for f in (final / "prompts.txt", final / "base" / "a.txt"):
        assert mode(f) == 0o666 & ~umask
    again = stage_dir(final)  # into an existing folder: entry by entry
    (again / "ft").mkdir()
    write_text_atomic(again / "ft" / "b.txt", "y\n")
    publish_dir(again, final)
    assert mode(final / "ft") == 0o777 & ~umask and mode(final / "ft" / "b.txt") == 0o666 & ~umask
    assert (final / "base" / "a.txt").read_text() == "x\n"  # kept


def test_sample_output_is_readable_by_others_under_umask_022(tmp_path, one_thread):
    from bench.sample import main

    old = os.umask(0o022)
    try:
        out = tmp_path / "samples"
        assert main(["--tiny", "sd", "--out", str(out), "--steps", "1", "--max-prompts", "1",
                     "--no-progress"]) == 0  # fmt: skip
    finally:
        os.umask(old)
    assert mode(out) == 0o755 and mode(out / "base") == 0o755
    assert mode(out / "base" / "00000.png") == 0o644 and mode(out / "prompts.txt") == 0o644


def test_a_trainer_checkpoint_folder_follows_the_umask(tmp_path, umask):
    from bench.t2i.checkpoint import atomic_write_dir

    def write(d: Path) -> None:
        (d / "unet").mkdir()
        write_text_atomic(d / "unet" / "config.json", "{}\n")

    final = atomic_write_dir(tmp_path / "checkpoints" / "step-000002", write)
    atomic_write_dir(final, write)  # replacing an existing one
    assert mode(final) == 0o777 & ~umask and mode(final / "unet") == 0o777 & ~umask
    assert mode(final / "unet" / "config.json") == 0o666 & ~umask
