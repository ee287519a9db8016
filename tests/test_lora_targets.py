"""--lora-targets: the official SANA trainer's to_k,to_q,to_v, or any module names."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from bench import train_t2i
from bench.t2i.config import TrainConfig, UsageError, resolve
from bench.t2i.pairs import build_pairs
from bench.t2i.prompts import DEMO_PROMPTS
from bench.t2i.tiny import tiny_backbone
from bench.t2i.weights import LORA_FILE, add_lora


@pytest.fixture(scope="module")
def sana_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sana-pairs")
    build_pairs(tiny_backbone("sana"), DEMO_PROMPTS[:2], out, steps=1, progress=False)
    return out


def _lora_modules(path: Path) -> set[str]:
    keys = load_file(path / "final" / LORA_FILE).keys()
    return {k.split(".lora")[0].rsplit(".", 1)[-1] for k in keys}


def test_official_sana_targets_are_what_trains(sana_data, tmp_path):
    base = ["--tiny", "--backbone", "sana", "--data", str(sana_data), "--no-progress",
            "--max-steps", "1", "--batch-size", "1", "--lora", "4"]  # fmt: skip
    assert (
        train_t2i.main([*base, "--out", str(tmp_path / "o"), "--lora-targets", "to_k,to_q,to_v"])
        == 0
    )
    assert _lora_modules(tmp_path / "o") == {"to_q", "to_k", "to_v"}
    assert train_t2i.main([*base, "--out", str(tmp_path / "d")]) == 0
    assert _lora_modules(tmp_path / "d") == {"to_q", "to_k", "to_v", "0"}  # to_out.0 too
    rc = train_t2i.main([*base, "--out", str(tmp_path / "bad"), "--lora-targets", "to_qq"])
    assert rc == 2 and not (tmp_path / "bad" / "config.json").exists()


def test_checks():
    with pytest.raises(UsageError, match="needs --lora"):
        resolve(TrainConfig(tiny=True, lora_targets="to_q"))
    with pytest.raises(UsageError, match="at least one"):
        resolve(TrainConfig(tiny=True, lora=4, lora_targets=" , "))
    with pytest.raises(ValueError, match="no module named"):
        add_lora(tiny_backbone("sd").denoiser, 4, None, ["add_q_proj"])
