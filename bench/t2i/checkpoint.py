"""Atomic checkpoints with keep-last-k, and RNG state capture/restore.

Layout: ``OUT/checkpoints/step-000004/`` holds whatever the trainer's ``write`` callback
puts there (weights in diffusers layout, ``trainer_state.pt``). It is first written to
``OUT/checkpoints/.tmp-step-000004-*`` and renamed into place only when complete, so a
crash mid-write leaves the previous checkpoint as the newest loadable one. A checkpoint counts
only if its name matches ``step-<digits>`` and it contains :data:`STATE_FILE`.

:data:`STATE_FILE` also lists the size of every other file of the checkpoint
(:data:`FILES_KEY`): :func:`find_resume` takes the newest checkpoint whose files are all
there, complete, and readable, and says which damaged ones it passed over.

:data:`STATE_FILE` holds tensors and plain data only and is read with
``torch.load(weights_only=True)``: a file that needs anything else unpickled (a crafted
one, or one written before this format) is refused like a damaged checkpoint, never
unpickled.

A ``--shard fsdp`` checkpoint keeps its tensors (model, optimizer, periodic reference) in
``dcp/`` (``torch.distributed.checkpoint``, written by every rank into the staging folder
of :func:`stage_checkpoint`); its ``.metadata`` is read with the restricted unpickler of
:mod:`bench.t2i.sharding`, refused like a damaged checkpoint if it names anything else.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.t2i.errors import UsageError
from bench.t2i.interrupt import critical
from bench.t2i.outdir import stage_dir, tmp_path_for
from bench.t2i.sharding import DCP_DIR, read_metadata_safely

STATE_FILE = "trainer_state.pt"
FILES_KEY = "files"  # in STATE_FILE: {relative path: size in bytes} of the other files
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def atomic_write_dir(final: Path, write: Callable[[Path], None], stage: Path | None = None) -> Path:
    """Run ``write(tmp_dir)`` then rename ``tmp_dir`` to ``final`` (replacing it).
    ``stage``: a staging folder already made (and partly filled) for ``final``."""
    final = Path(final)
    # a name of this process's own: never another writer's folder
    tmp = stage_dir(final) if stage is None else Path(stage)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with critical():  # a signal waits for both renames and the old copy's removal
        if final.exists():
            old = tmp_path_for(final, "old")
            old.unlink()
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    return final


def stage_checkpoint(root: Path, step: int) -> Path:
    """The staging folder of ``root/step-XXXXXX``, made after removing stale ones: for a
    checkpoint that several ranks fill before :func:`save_checkpoint` completes it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    return stage_dir(root / checkpoint_name(step))


def save_checkpoint(
    root: Path,
    step: int,
    write: Callable[[Path], None],
    keep_last: int,
    stage: Path | None = None,
) -> Path:
    """Write ``root/step-XXXXXX`` atomically, then delete all but the newest ``keep_last``.
    ``stage``: the folder of :func:`stage_checkpoint`, already partly filled."""
    root = Path(root)
    if stage is None:
        stage = stage_checkpoint(root, step)
    path = atomic_write_dir(root / checkpoint_name(step), write, stage)
    for old in list_checkpoints(root)[:-keep_last]:
        doomed = root / (TMP_PREFIX + "del-" + old.name)  # renamed first: never half-deleted
        with critical():  # a signal waits until it is gone: no .tmp-del-* left behind
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    return path


def resolve_resume(resume: str, root: Path) -> Path | None:
    """``""`` -> None; ``"latest"`` -> newest complete checkpoint (None if there is none yet);
    otherwise the given directory, which must be a complete checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(root)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint (no {STATE_FILE})")
    return path


def file_sizes(d: Path) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``d`` (the checkpoint's manifest)."""
    d = Path(d)
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}


def checkpoint_problem(path: Path) -> tuple[dict | None, str | None]:
    """``(state, None)`` for an intact checkpoint, ``(None, what is wrong)`` otherwise:
    an unreadable :data:`STATE_FILE`, a listed file missing or of another size, or a
    safetensors file whose header does not cover it (truncated)."""
    path = Path(path)
    try:
        state = load_state(path)
    except Exception as e:  # torch.load: RuntimeError, EOFError, UnpicklingError, ...
        return None, _load_error(e)
    if not isinstance(state, dict):
        return None, f"{STATE_FILE} holds no trainer state"
    for rel, size in (state.get(FILES_KEY) or {}).items():
        f = path / rel
        if not f.is_file():
            return None, f"{rel} missing"
        if f.stat().st_size != size:
            return None, f"{rel} has {f.stat().st_size} bytes, {size} were written"
    for f in sorted(path.rglob("*.safetensors")):
        reason = safetensors_problem(f)
        if reason is not None:
            return None, f"{f.relative_to(path)} unreadable ({reason})"
    if (path / DCP_DIR).is_dir():
        try:
            read_metadata_safely(path / DCP_DIR)
        except Exception as e:  # UnpicklingError (refused), EOFError, OSError, ...
            return None, f"{DCP_DIR}/.metadata unreadable or refused ({_first_line(e)})"
    return state, None


def safetensors_problem(f: Path) -> str | None:
    """None when the header of the safetensors file ``f`` reads and covers the file, else
    why not (one line): empty, truncated or not safetensors at all. Reads the header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(f), "pt"):
            pass
    except Exception as e:  # SafetensorError, OSError, ...
        return _first_line(e)
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def _load_error(e: Exception) -> str:
    """Why :data:`STATE_FILE` did not load, without torch's advice to load it unsafely."""
    text = str(e)
    if not (isinstance(e, pickle.UnpicklingError) and "weights only load failed" in text.lower()):
        return f"{STATE_FILE} unreadable ({_first_line(e)})"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:  # an object weights_only will not build: never unpickled
        return (
            f"{STATE_FILE} refused (it needs {found.group(1)}, not only tensors and plain "
            "data: written by an older version of this program, or not by it)"
        )
    skip = ("weights only load failed", "please file an issue", "check the documentation")
    detail = next((ln for ln in lines if not ln.lower().startswith(skip)), type(e).__name__)
    return f"{STATE_FILE} unreadable ({detail[:160]})"


def find_resume(resume: str, root: Path) -> tuple[Path | None, dict | None, list[str]]:
    """The checkpoint ``--resume`` names, its loaded state, and one note per damaged
    checkpoint passed over. ``"latest"`` takes the newest intact one under ``root``
    (``(None, None, notes)`` when there is none: a fresh start); a named directory must be
    intact. Raises ``FileNotFoundError`` (or ``UsageError`` for a damaged named one, or when
    every checkpoint under ``root`` is damaged)."""
    if not resume:
        return None, None, []
    if resume != "latest":
        path = resolve_resume(resume, root)
        state, problem = checkpoint_problem(path)
        if problem:
            raise UsageError(f"--resume {resume}: damaged checkpoint: {problem}")
        return path, state, []
    notes = []
    candidates = list_checkpoints(root)
    for path in reversed(candidates):
        state, problem = checkpoint_problem(path)
        if problem is None:
            return path, state, notes
        notes.append(f"{path} is damaged ({problem})")
    if candidates:
        raise UsageError(f"--resume latest: every checkpoint under {root} is damaged: {notes[0]}")
    return None, None, notes


def rng_state(generator: torch.Generator | None = None) -> dict:
    """Python, numpy, torch (CPU and CUDA) and the trainer's own generator states, as
    tensors and plain lists and numbers (loadable with ``weights_only=True``)."""
    version, internal, gauss_next = random.getstate()
    numpy = np.random.get_state(legacy=False)
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": {
            "bit_generator": numpy["bit_generator"],
            "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
            "pos": int(numpy["state"]["pos"]),
            "has_gauss": int(numpy["has_gauss"]),
            "gauss": float(numpy["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy["bit_generator"],
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def load_state(path: Path) -> dict:
    """The checkpoint's :data:`STATE_FILE`: tensors and plain data only; anything else
    raises ``pickle.UnpicklingError`` before it is built."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
