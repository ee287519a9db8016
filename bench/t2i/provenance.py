"""Where results came from: the base model of a checkpoint, the settings of a sampled folder.

A comparison is only meaningful between like things. Two records make that checkable:

* ``base.json`` in every checkpoint the trainer writes (``checkpoints/step-N/``, ``final/``),
  and in ``info.json`` of a pair dataset (key ``base``): which base model it was made from,
  ``{"base": "--tiny sd" | "--pretrained /abs/dir", "backbone", "denoiser"}``, where
  ``denoiser`` is :func:`denoiser_fingerprint` of the base denoiser as loaded (float32, before
  any LoRA or training). Loading a checkpoint onto a base (``sample.py --checkpoint``, the
  trainer's ``--resume`` and ``--winner-policy/--loser-policy``) compares the fingerprints
  and refuses another base in one line (:func:`check_base`). A checkpoint without
  ``base.json`` (made elsewhere) is loaded unchecked.
* ``sample.json`` in every model folder ``bench/sample.py`` writes: the seed, the sampling
  settings, a digest of the prompts, and the base (``base`` and :data:`SAMPLE_KEYS`).
  :func:`settings_mismatch` names the first setting in which two folders differ;
  ``sample.py`` refuses to add folders to an ``--out`` whose folders differ from this run,
  and ``evaluate.py`` refuses to compare them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from bench.t2i.errors import UsageError

BASE_FILE = "base.json"
SAMPLE_FILE = "sample.json"
#: the settings recorded per sampled model folder that must agree between compared folders
#: (``base`` names the model for people; its ``denoiser`` fingerprint is what is compared)
SAMPLE_KEYS = (
    "denoiser",
    "prediction_type",
    "seed",
    "steps",
    "guidance",
    "sampler",
    "resolution",
    "negative_prompt",
    "dtype",
    "prompts_sha256",
    "num_prompts",
)
_SAMPLES_PER_TENSOR = 1024


@torch.no_grad()
def denoiser_fingerprint(net: torch.nn.Module) -> str:
    """sha256 (hex) of every base tensor's name and shape and up to 1024 evenly spaced values
    of it as float32: cheap even for billions of parameters, and different for any other
    initialisation or training. LoRA adapters are left out and peft's ``base_layer`` names
    read as the plain ones, so a LoRA-wrapped network has its base's fingerprint."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        values = flat[::step][:_SAMPLES_PER_TENSOR].float().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
        h.update(values.numpy().tobytes())
    return h.hexdigest()


def base_record(backbone, pretrained: str | Path | None = None, tiny: str | None = None) -> dict:
    """The base model a command runs on: call it right after loading, before a dtype cast."""
    source = f"--tiny {tiny}" if tiny else f"--pretrained {Path(pretrained).resolve()}"
    return {
        "base": source,
        "backbone": backbone.name,
        "denoiser": denoiser_fingerprint(backbone.denoiser),
    }


def write_base(folder: str | Path, record: dict) -> Path:
    path = Path(folder) / BASE_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_base(checkpoint: str | Path) -> tuple[dict | None, Path | None]:
    """The base record of a checkpoint and its file: ``base.json`` in ``checkpoint`` or, when
    ``checkpoint`` is its ``lora/``, ``unet/`` or ``transformer/`` folder, in the parent.
    ``(None, None)`` when there is none; a ``UsageError`` naming the file when unreadable."""
    checkpoint = Path(checkpoint)
    for d in (checkpoint, checkpoint.parent):
        f = d / BASE_FILE
        if f.is_file():
            try:
                rec = json.loads(f.read_text())
            except (ValueError, OSError) as e:
                raise UsageError(f"{f}: unreadable ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("denoiser"), str):
                raise UsageError(f"{f}: not a base record (no denoiser fingerprint)")
            return rec, f
        if checkpoint.name not in ("lora", "unet", "transformer"):
            break
    return None, None


def check_base(checkpoint: str | Path, base: dict | None) -> None:
    """A one-line ``UsageError`` when the checkpoint records another base than ``base``
    (:func:`base_record` of the model it is about to be loaded onto)."""
    if base is None:
        return
    rec, f = read_base(checkpoint)
    if rec is None or rec["denoiser"] == base["denoiser"]:
        return
    raise UsageError(
        f"{checkpoint} was trained on another base model: {rec.get('base')} "
        f"(denoiser {rec['denoiser'][:12]}, {f}), not {base['base']} "
        f"(denoiser {base['denoiser'][:12]}); load it onto the base it was trained on"
    )


def prompts_digest(prompts: list[str]) -> str:
    """sha256 of the prompts as ``prompts.txt`` holds them (one line each, stripped)."""
    flat = [p.replace("\n", " ").strip() for p in prompts]
    return hashlib.sha256(json.dumps(flat).encode()).hexdigest()


def sample_record(base: dict | None, prompts: list[str], **settings: Any) -> dict:
    """The record of one ``sample.py`` run (``settings``: the prediction type and the
    resolved seed, steps, guidance, sampler, resolution, negative prompt and dtype)."""
    rec = {
        "base": base["base"] if base else None,
        "denoiser": base["denoiser"] if base else None,
        **settings,
        "prompts_sha256": prompts_digest(prompts),
        "num_prompts": len(prompts),
    }
    missing = [k for k in SAMPLE_KEYS if k not in rec]
    if missing:
        raise TypeError(f"sample_record: missing settings {missing}")
    return {"base": rec["base"], **{k: rec[k] for k in SAMPLE_KEYS}}


def read_sample_record(folder: str | Path) -> dict | None:
    """A model folder's ``sample.json``, or None when it has none (made before the record)."""
    f = Path(folder) / SAMPLE_FILE
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text())
    except (ValueError, OSError) as e:
        raise UsageError(f"{f}: unreadable ({e})") from None
    if not isinstance(rec, dict):
        raise UsageError(f"{f}: not a JSON object")
    return rec


def settings_mismatch(a: dict, b: dict) -> tuple[str, Any, Any] | None:
    """The first of :data:`SAMPLE_KEYS` in which two sample records differ, with both values
    (for the denoiser: the base model's name and the fingerprint's first 12 digits)."""
    for k in SAMPLE_KEYS:
        if a.get(k) != b.get(k):
            if k == "denoiser":
                return k, *(f"{r.get('base')} (denoiser {str(r.get(k))[:12]})" for r in (a, b))
            return k, a.get(k), b.get(k)
    return None
