"""``sample.json`` for hand-made image folders, as bench/sample.py writes it."""

import json
from pathlib import Path

from bench.t2i.provenance import SAMPLE_FILE, sample_record


def write_sample_record(folder: Path, prompts: list[str], **changes) -> dict:
    """The record of a tiny-SD run with ``changes`` (e.g. ``seed=1``) in ``folder``."""
    base = {"base": "--tiny sd", "denoiser": "0" * 64}
    settings = dict(prediction_type="epsilon", seed=0, steps=2, guidance=7.5, sampler="ddim",
                    resolution=32, negative_prompt="", dtype="fp32")  # fmt: skip
    base.update({k: changes.pop(k) for k in list(changes) if k in base})
    record = sample_record(base, prompts, **{**settings, **changes})
    (Path(folder) / SAMPLE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record
