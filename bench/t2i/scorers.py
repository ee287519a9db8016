"""Image-text scorers loaded from local transformers CLIP directories, and the statistics
the evaluation table reports.

Every scorer is a ``transformers`` ``CLIPModel`` with its tokenizer and image processor in
one local directory (loaded with ``local_files_only=True``; nothing is downloaded). They
differ only in the weights and in how the cosine similarity ``cos`` of the L2-normalised
image and text embeddings becomes a score:

* ``clip``      CLIP score, ``100 * max(cos, 0)`` -- the "CLIP score" of text-to-image papers
  (torchmetrics' convention). Hessel et al. (2021)'s CLIPScore is ``2.5 * max(cos, 0)``,
  i.e. this value times 0.025.
* ``pickscore`` PickScore (Kirstain et al. 2023), ``logit_scale.exp() * cos`` as in its model
  card; the learned logit scale of PickScore_v1 is 100, so this is ~``100 * cos``.
* ``hps``       an HPS-style preference model (Wu et al. 2023) converted to transformers'
  CLIP format, ``100 * cos``: HPSv2 scores an image by the raw cosine and papers (the
  DDSPO paper's Table 4 included) report it times 100. The official HPSv2 checkpoint is an
  open_clip model; converting it is up to the user (bench/REFERENCE.md, "Evaluation").
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.t2i.cli import UsageError


@dataclass(frozen=True)
class ScoreRule:
    label: str  # column title in the table
    formula: str  # how cos becomes the score (written into results.json)
    use_logit_scale: bool  # scale by the model's learned logit_scale.exp() instead of 100
    clamp_at_zero: bool  # max(cos, 0) as in CLIPScore


SCORERS: dict[str, ScoreRule] = {
    "clip": ScoreRule("CLIP score", "100 * max(cos, 0)", False, True),
    "pickscore": ScoreRule("PickScore", "logit_scale.exp() * cos", True, False),
    "hps": ScoreRule("HPS", "100 * cos", False, False),
}


def check_clip_dir(path: str | Path, flag: str) -> Path:
    """Fail early, naming the directory, unless ``path`` holds a transformers CLIP model."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{flag}: scorer directory not found: {p}")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise UsageError(f"{flag}: {p} has no config.json (not a transformers model directory)")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UsageError(f"{flag}: unreadable {cfg_file}: {e}") from e
    if model_type != "clip":
        raise UsageError(
            f"{flag}: {p} is not a CLIP model directory (config.json model_type={model_type!r}, "
            "expected 'clip')"
        )
    return p


TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # either is enough
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def check_processor_dir(path: str | Path, flag: str) -> Path:
    """Fail unless ``path`` holds tokenizer and image-processor files. Checked by file name
    because transformers 5 silently builds an *empty* CLIPTokenizer from a directory that
    has none."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{flag}: directory not found: {p}")
    for kind, names in (("tokenizer", TOKENIZER_FILES), ("image processor", IMAGE_PROCESSOR_FILES)):
        if not any((p / n).is_file() for n in names):
            raise UsageError(
                f"{flag}: no {kind} in {p} (none of {', '.join(names)}); pass the processor "
                "files of the CLIP the model was fine-tuned from with "
                f"{flag.removesuffix('-processor')}-processor DIR"
            )
    return p


def _features(out: Tensor | object) -> Tensor:
    # transformers < 5 returns the projected embedding; 5.x a ModelOutput whose
    # pooler_output holds it.
    return out if isinstance(out, Tensor) else out.pooler_output


class ClipScorer:
    """One CLIP-family scorer: embeds prompts and images, turns paired cosines into scores."""

    def __init__(self, kind: str, model, tokenizer, image_processor, device="cpu"):
        if kind not in SCORERS:
            raise ValueError(f"unknown scorer kind {kind!r}; expected one of {list(SCORERS)}")
        self.kind, self.rule = kind, SCORERS[kind]
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        max_pos = model.config.text_config.max_position_embeddings
        self.max_length = min(int(getattr(tokenizer, "model_max_length", max_pos)), max_pos)

    @classmethod
    def from_dir(
        cls,
        kind: str,
        path: str | Path,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        processor_dir: str | Path | None = None,
    ) -> ClipScorer:
        """Load ``CLIPModel`` from ``path`` and its tokenizer + image processor from
        ``processor_dir`` (default: ``path``; PickScore_v1, for one, ships without them)."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        flag = f"--{kind}"
        p = check_clip_dir(path, flag)
        if processor_dir is None:
            proc = check_processor_dir(p, flag)
        else:
            proc = check_processor_dir(processor_dir, f"{flag}-processor")
        try:
            model = CLIPModel.from_pretrained(p, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise UsageError(f"{flag}: cannot load the CLIP model in {p}: {e}") from e
        try:
            tokenizer = AutoTokenizer.from_pretrained(proc, local_files_only=True)
            image_processor = AutoImageProcessor.from_pretrained(proc, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(
                f"{flag}: no usable tokenizer/image processor in {proc} ({e}); pass the processor "
                f"files of the CLIP the model was fine-tuned from with {flag}-processor DIR"
            ) from e
        if len(tokenizer) > model.config.text_config.vocab_size:
            raise UsageError(
                f"{flag}: the tokenizer in {proc} has {len(tokenizer)} tokens but the model in "
                f"{p} only {model.config.text_config.vocab_size}: processor of another model?"
            )
        return cls(kind, model.to(device, dtype), tokenizer, image_processor, device)

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings, float32. Shape: (N, D)."""
        tok = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        emb = _features(
            self.model.get_text_features(
                input_ids=tok["input_ids"], attention_mask=tok.get("attention_mask")
            )
        )
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: Sequence) -> Tensor:
        """L2-normalised image embeddings of PIL images, float32. Shape: (N, D)."""
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        emb = _features(
            self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        )
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def score(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """Per-pair scores of row-aligned normalised embeddings. Shape: (N, D) x2 -> (N,)."""
        cos = (image_emb * text_emb).sum(-1)
        if self.rule.clamp_at_zero:
            cos = cos.clamp(min=0.0)
        scale = self.model.logit_scale.float().exp() if self.rule.use_logit_scale else 100.0
        return (scale * cos).float().cpu()


def mean_sem(scores: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean, ``std(ddof=1) / sqrt(n)`` (NaN when n < 2)."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D sequence, got shape {x.shape}")
    sem = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return float(x.mean()), sem


def win_rate(scores: Sequence[float] | np.ndarray, base: Sequence[float] | np.ndarray) -> float:
    """Fraction of prompts on which ``scores`` beats ``base`` (paired by prompt); ties count half."""
    a, b = np.asarray(scores, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"win_rate needs two equal-length 1-D sequences, got {a.shape}, {b.shape}")
    return float(np.mean((a > b) + 0.5 * (a == b)))
