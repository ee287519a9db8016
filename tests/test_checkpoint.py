"""Atomic checkpoints, keep-last-k and RNG capture (bench/t2i/checkpoint.py)."""

import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from bench.t2i.checkpoint import (
    FILES_KEY,
    STATE_FILE,
    atomic_write_dir,
    checkpoint_name,
    file_sizes,
    find_resume,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from bench.t2i.interrupt import critical, handle_signals
from bench.t2i.outdir import truncate_jsonl


def writer(step: int, fail_after_weights: bool = False):
    def write(d):
        (d / "unet").mkdir()
        (d / "unet" / "w.bin").write_bytes(bytes([step]) * 16)
        if fail_after_weights:
            raise KeyboardInterrupt  # killed mid-write
        torch.save({"step": step}, d / STATE_FILE)

    return write


def test_save_list_and_keep_last(tmp_path):
    for step in (1, 2, 3, 10):
        save_checkpoint(tmp_path, step, writer(step), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000010"]
    assert latest_checkpoint(tmp_path).name == "step-000010"  # numeric, not lexical order
    assert load_state(latest_checkpoint(tmp_path)) == {"step": 10}
    assert checkpoint_name(1234567) == "step-1234567"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_interrupted_write_leaves_previous_loadable(tmp_path):
    save_checkpoint(tmp_path, 1, writer(1), keep_last=3)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, writer(2, fail_after_weights=True), keep_last=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]  # partial one removed
    # a hard kill cannot clean up: the temporary directory stays but is never "latest"
    crashed = tmp_path / ".tmp-step-000002"
    crashed.mkdir()
    (crashed / STATE_FILE).write_bytes(b"garbage")
    # nor is a directory with the right name but no state file (written last)
    (tmp_path / "step-000003" / "unet").mkdir(parents=True)
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert load_state(latest_checkpoint(tmp_path)) == {"step": 1}
    # the next save sweeps the stale temporary directory away
    save_checkpoint(tmp_path, 4, writer(4), keep_last=3)
    assert not crashed.exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000004"]


def test_atomic_write_dir_replaces_existing(tmp_path):
    atomic_write_dir(tmp_path / "final", lambda d: (d / "a").write_text("1"))
    atomic_write_dir(tmp_path / "final", lambda d: (d / "b").write_text("2"))
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_resolve_resume(tmp_path):
    assert resolve_resume("", tmp_path) is None
    assert resolve_resume("latest", tmp_path) is None  # nothing yet: start fresh
    save_checkpoint(tmp_path, 5, writer(5), keep_last=1)
    assert resolve_resume("latest", tmp_path).name == "step-000005"
    assert resolve_resume(str(tmp_path / "step-000005"), tmp_path).name == "step-000005"
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        resolve_resume(str(tmp_path), tmp_path)


def test_rng_state_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    random.gauss(0, 1), np.random.randn()  # each caches a second normal: state to restore
    state = rng_state(gen)
    torch.save(state, tmp_path / "rng.pt")

    def draws():
        return (random.gauss(0, 1), random.random(), np.random.randn(), np.random.rand(),
                torch.rand(2), torch.rand(2, generator=gen))  # fmt: skip

    a = draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), gen)
    b = draws()
    assert a[:4] == b[:4] and torch.equal(a[4], b[4]) and torch.equal(a[5], b[5])


def manifest_writer(step: int):
    def write(d):
        (d / "unet").mkdir()
        (d / "unet" / "w.bin").write_bytes(bytes([step]) * 16)
        torch.save({"step": step, FILES_KEY: file_sizes(d)}, d / STATE_FILE)

    return write


def test_find_resume_skips_damaged_checkpoints(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, manifest_writer(step), keep_last=3)
    (tmp_path / "step-000003" / "unet" / "w.bin").write_bytes(b"cut")  # truncated weights
    (tmp_path / "step-000002" / STATE_FILE).write_bytes(b"PK torn")  # truncated state
    path, state, notes = find_resume("latest", tmp_path)
    assert path.name == "step-000001" and state["step"] == 1
    assert len(notes) == 2 and "w.bin has 3 bytes, 16 were written" in notes[0]
    assert "trainer_state.pt unreadable" in notes[1]
    with pytest.raises(ValueError, match="damaged checkpoint"):
        find_resume(str(tmp_path / "step-000003"), tmp_path)
    (tmp_path / "step-000001" / "unet" / "w.bin").unlink()
    with pytest.raises(ValueError, match="every checkpoint"):
        find_resume("latest", tmp_path)
    assert find_resume("latest", tmp_path / "none") == (None, None, [])


def test_find_resume_never_unpickles_objects(tmp_path, touch_on_unpickle):
    """A state file that needs more than tensors and plain data is refused unread, like a
    damaged one: ``latest`` passes over it, a named one is an error."""
    marker = tmp_path / "MARKER"
    root = tmp_path / "ckpts"
    for step in (1, 2):
        save_checkpoint(root, step, manifest_writer(step), keep_last=3)
    bad = root / "step-000002" / STATE_FILE
    torch.save({"step": 2, "x": touch_on_unpickle(marker)}, bad)
    path, state, notes = find_resume("latest", root)
    assert path.name == "step-000001" and state == {"step": 1, FILES_KEY: {"unet/w.bin": 16}}
    assert len(notes) == 1 and str(bad.parent) in notes[0]
    assert "trainer_state.pt refused (" in notes[0] and "it needs posix.system," in notes[0]
    assert "written by an older version" in notes[0]
    with pytest.raises(ValueError, match="step-000002: damaged checkpoint: trainer_state.pt ref"):
        find_resume(str(root / "step-000002"), root)
    # the state of the format before this one: numpy's RNG state pickled as numpy objects
    torch.save({"step": 2, "numpy": np.random.get_state()}, bad)
    path, _, notes = find_resume("latest", root)
    assert path.name == "step-000001" and "refused" in notes[0] and "numpy" in notes[0]
    assert not marker.exists()


def test_truncate_jsonl(tmp_path):
    log = tmp_path / "metrics.jsonl"
    assert truncate_jsonl(log, 3) == 0  # no log yet
    lines = [json.dumps({"step": s}) for s in (1, 2, 3, 4)]
    log.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # torn by a kill
    assert truncate_jsonl(log, 2) == 3
    assert log.read_text().splitlines() == lines[:2]
    assert truncate_jsonl(log, 2) == 0


def test_signal_waits_for_the_critical_section():
    with handle_signals():
        with pytest.raises(KeyboardInterrupt):
            with critical():
                os.kill(os.getpid(), signal.SIGTERM)
                done = True  # reached: the signal is held back until the block ends
        assert done


@pytest.mark.parametrize("when", ["rename", "rmtree"])
def test_a_signal_while_old_checkpoints_go_leaves_no_temporary_folder(tmp_path, monkeypatch, when):
    """SIGTERM arriving while save_checkpoint removes a checkpoint past --keep-last (at its
    rename to .tmp-del-*, or during its removal) is held back until that one is gone: the
    interrupt comes after, the newer checkpoints stay, and no .tmp-* folder is left."""
    import bench.t2i.checkpoint as ck

    for step in (1, 2):
        save_checkpoint(tmp_path, step, writer(step), keep_last=3)
    name = "replace" if when == "rename" else "rmtree"
    target = ck.os if when == "rename" else ck.shutil
    real, hits = getattr(target, name), []

    def signalled(*args, **kwargs):
        if "del-" in str(args[-1] if when == "rename" else args[0]):  # a doomed checkpoint
            hits.append(args)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, signalled)
    with handle_signals(), pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, writer(3), keep_last=1)  # drops steps 1 and 2
    monkeypatch.undo()
    assert len(hits) == 1  # interrupted after the first removal, before the second
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_cut_safetensors_file_is_named_alike_by_both_checks(tmp_path):
    """checkpoint_problem (resume) and check_denoiser_files (sample, evaluate) read a
    safetensors header with one helper and give the same reason; an intact file passes both."""
    from safetensors.torch import save_file

    from bench.t2i.checkpoint import checkpoint_problem
    from bench.t2i.weights import check_denoiser_files

    ckpt = tmp_path / "step-000001"
    (ckpt / "unet").mkdir(parents=True)
    (ckpt / "unet" / "config.json").write_text("{}")
    w = ckpt / "unet" / "w.safetensors"
    save_file({"a": torch.zeros(64)}, w)
    torch.save({"step": 1}, ckpt / STATE_FILE)  # no size list: only the header can tell
    assert checkpoint_problem(ckpt)[1] is None
    check_denoiser_files(ckpt, "unet")
    w.write_bytes(w.read_bytes()[:-8])
    problem = checkpoint_problem(ckpt)[1]
    assert problem.startswith("unet/w.safetensors unreadable (") and "\n" not in problem
    reason = problem.removeprefix("unet/w.safetensors unreadable (")[:-1]
    with pytest.raises(ValueError) as e:
        check_denoiser_files(ckpt, "unet")
    assert str(e.value) == f"{w}: unreadable weights ({w.stat().st_size} bytes; {reason})"


@pytest.mark.parametrize(
    "key, weights, pickled",
    [("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
     ("text_encoder", "model.safetensors", "pytorch_model.bin")],
)  # fmt: skip
def test_a_model_folder_with_a_crafted_bin_runs_no_code(tmp_path, touch_on_unpickle, key,
                                                        weights, pickled):  # fmt: skip
    """diffusers and transformers read a ``.bin`` with ``torch.load(weights_only=True)``: a
    pickle that needs more than tensors is refused unread, one line naming the folder."""
    from bench.t2i.backbones import load_backbone
    from bench.t2i.tiny import tiny_backbone

    marker, model = tmp_path / "MARKER", tmp_path / "model"
    tiny_backbone("sd").save_pretrained(model)
    (model / key / weights).unlink()
    torch.save({"w": touch_on_unpickle(marker)}, model / key / pickled)
    with pytest.raises(ValueError, match=f"^{model / key}: cannot load ") as e:
        load_backbone(model)
    assert "\n" not in str(e.value)
    assert not marker.exists()
