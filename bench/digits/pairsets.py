"""The pair sets of the benchmark, measured: what DigitEval says about every winner and loser,
and the two control sets (pairs ranked by DigitEval; real scenes for SFT).

* :func:`pair_quality`: for a pair dataset, the share of pairs whose winner is right, whose
  loser is right (both judged against the full prompt ``c``), winner right and loser wrong,
  the reverse, and blank winners / losers, per category; the *margin* is
  ``P(winner right, loser wrong) - P(loser right, winner wrong)`` in points.
* :func:`ranked_pairs`: for each prompt, two samples of the same prompt ``c`` (different
  noise); where DigitEval finds exactly one of them right, that one is the winner. The
  known-good setting for D-DPO (a positive control).
* :func:`real_scene_pairs`: real scenes of the pair prompts (through the VAE) as winners,
  for an SFT control on real data.

Latents are decoded and read exactly as ``bench/sample.py`` writes and ``scorer.load_images``
reads PNGs (uint8 RGB, then PIL's grey conversion), so a pair's score is its image's score.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bench.t2i.pairdata import PairDataset, finalize, write_shard
from bench.t2i.validation import to_uint8

from . import scenes, scorer

SHARD = 1024  # pairs per shard of the control sets


def latents_to_images(backbone, latents: torch.Tensor, batch: int = 512) -> np.ndarray:
    """Scaled latents -> ``(N, 16, 16)`` grey images in [0, 1], as a PNG round trip gives."""
    from PIL import Image

    out = []
    for i in range(0, len(latents), batch):
        u8 = to_uint8(backbone.decode_latents(latents[i : i + batch].float()))
        grey = [np.asarray(Image.fromarray(a.numpy()).convert("L")) for a in u8]
        out.append(np.stack(grey).astype(np.float32) / 255.0)
    return np.concatenate(out) if out else np.zeros((0, scenes.SIDE, scenes.SIDE), np.float32)


def read_pairs(data: Path) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """Records and stacked ``(x0_w, x0_l)`` latents of a pair dataset, in index order."""
    ds = PairDataset(data)
    items = [ds[i] for i in range(len(ds))]
    return (
        ds.records,
        torch.stack([it["x0_w"] for it in items]),
        torch.stack([it["x0_l"] for it in items]),
    )


def judge(sc: scorer.Scorer, prompts: list[scenes.Prompt], images: np.ndarray):
    """``(right, blank)`` boolean arrays of ``images`` against ``prompts``."""
    labels, _ = sc.read(images)
    right = np.array([p.check(list(map(int, lab))) for p, lab in zip(prompts, labels, strict=True)])
    return right, (labels == scenes.BLANK).all(axis=1)


def quality_table(
    prompts: list[scenes.Prompt], w_right, l_right, w_blank, l_blank
) -> dict[str, dict[str, float]]:
    """The pair-quality figures (fractions; ``margin`` in points), per kind and ``all``."""
    kinds = np.array([p.kind for p in prompts])
    out = {}
    for k in (*scenes.KINDS, "all"):
        m = np.ones(len(kinds), bool) if k == "all" else kinds == k
        if not m.any():
            continue
        wr, lr = w_right[m], l_right[m]
        row = {
            "n": int(m.sum()),
            "winner_right": float(wr.mean()),
            "loser_right": float(lr.mean()),
            "winner_right_loser_wrong": float((wr & ~lr).mean()),
            "loser_right_winner_wrong": float((lr & ~wr).mean()),
            "winner_blank": float(w_blank[m].mean()),
            "loser_blank": float(l_blank[m].mean()),
        }
        row["margin"] = 100.0 * (row["winner_right_loser_wrong"] - row["loser_right_winner_wrong"])
        out[k] = row
    return out


def pair_quality(sc, backbone, data: Path, by_text: dict[str, scenes.Prompt]) -> dict:
    """:func:`quality_table` of the pair dataset ``data`` (its prompts looked up by text)."""
    records, xw, xl = read_pairs(data)
    prompts = [by_text[r["prompt"]] for r in records]
    w_right, w_blank = judge(sc, prompts, latents_to_images(backbone, xw))
    l_right, l_blank = judge(sc, prompts, latents_to_images(backbone, xl))
    return quality_table(prompts, w_right, l_right, w_blank, l_blank)


def _write_set(out: Path, xw, xl, records: list[dict], info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    n_shards = max(1, -(-len(records) // SHARD))
    for k in range(n_shards):
        lo, hi = k * SHARD, min(len(records), (k + 1) * SHARD)
        recs = [dict(r, shard=k, row=i - lo) for i, r in enumerate(records[lo:hi], lo)]
        write_shard(out, k, xw[lo:hi], xl[lo:hi], recs, params=info, dtype="float32")
    finalize(out, info, n_shards)


def rank(a_right: np.ndarray, b_right: np.ndarray, xa: torch.Tensor, xb: torch.Tensor):
    """The prompts where exactly one of two samples is right, and (winner, loser) latents of
    each: the right sample wins."""
    keep = np.flatnonzero(a_right != b_right)
    pick = torch.as_tensor(a_right[keep]).view(-1, *([1] * (xa.dim() - 1)))
    idx = torch.as_tensor(keep, dtype=torch.long)
    return keep, torch.where(pick, xa[idx], xb[idx]), torch.where(pick, xb[idx], xa[idx])


def ranked_pairs(
    sc, backbone, data: Path, by_text: dict, out: Path, *, steps: int, guidance: float, seed: int
) -> dict:
    """Write the DigitEval-ranked pair set to ``out``: the winners of ``data`` (samples of
    ``c``) against a second sample of each ``c`` (seed ``seed``); pairs where exactly one of
    the two is right, the right one as the winner. Returns its counts."""
    from bench.t2i.backbones import prompt_generator

    records, xw, _ = read_pairs(data)
    prompts = [by_text[r["prompt"]] for r in records]
    texts = [r["prompt"] for r in records]
    second = []
    for i in range(0, len(texts), 256):
        gens = [prompt_generator(seed, j) for j in range(i, min(len(texts), i + 256))]
        second.append(backbone.generate(texts[i : i + 256], gens, steps=steps, guidance=guidance))
    x2 = torch.cat(second).cpu()
    a_right, _ = judge(sc, prompts, latents_to_images(backbone, xw))
    b_right, _ = judge(sc, prompts, latents_to_images(backbone, x2))
    keep, win, lose = rank(a_right, b_right, xw, x2)
    if not len(keep):
        raise ValueError(
            f"no prompt of {data} had exactly one right sample of two: no ranked pairs"
        )
    recs = [
        dict(index=j, prompt=texts[i], neg_prompt=texts[i], variant="paired", seed=seed)
        for j, i in enumerate(keep)
    ]
    info = _info(data, "digiteval_ranked", seed)
    _write_set(out, win, lose, recs, info)
    return {"pairs": len(keep), "of": len(texts), "first_right": float(a_right.mean()),
            "second_right": float(b_right.mean())}  # fmt: skip


def real_scene_pairs(
    backbone, data: Path, by_text: dict, digits: scenes.Digits, out: Path, seed: int
) -> dict:
    """Write real scenes of ``data``'s prompts (train digits, through the VAE) as winners to
    ``out`` (the losers are the same latents: SFT reads only winners)."""
    from .model import to_pixels

    records, _, _ = read_pairs(data)
    prompts = [by_text[r["prompt"]] for r in records]
    images = scenes.make_scenes(
        prompts, digits.train_x, digits.train_y, np.random.default_rng(seed)
    )
    with torch.no_grad():
        z = torch.cat(
            [
                backbone.encode_images(to_pixels(images[i : i + 512]))
                for i in range(0, len(images), 512)
            ]
        )
    recs = [
        dict(index=i, prompt=r["prompt"], neg_prompt=r["neg_prompt"], variant="paired", seed=seed)
        for i, r in enumerate(records)
    ]
    _write_set(out, z, z, recs, _info(data, "real_scenes", seed))
    return {"pairs": len(recs)}


def _info(data: Path, perturb: str, seed: int) -> dict:
    """``info.json`` fields of a control set, taken from the pair dataset it derives from."""
    src = json.loads((Path(data) / "info.json").read_text())
    keep = ("backbone", "latent_shape", "steps", "guidance", "resolution", "base")
    info = {k: src[k] for k in keep if k in src}
    return {
        **info,
        "variant": "paired",
        "perturb": perturb,
        "seed": seed,
        "latent_dtype": "float32",
    }


def _stats(x: torch.Tensor) -> dict:
    x = x.double()
    return {"mean": x.mean((0, 2, 3)).tolist(), "std": x.std((0, 2, 3)).tolist(),
            "abs_max": float(x.abs().max())}  # fmt: skip


def sampling_statistics(sc, backbone, prompts: list[scenes.Prompt], settings, seed: int) -> list:
    """Latent statistics and the blank share of fresh samples of ``prompts`` at each
    ``(guidance, steps)`` of ``settings`` (same noise for every setting)."""
    from bench.t2i.backbones import prompt_generator

    texts = [p.text() for p in prompts]
    rows = []
    for g, steps in settings:
        gens = [prompt_generator(seed, i) for i in range(len(texts))]
        z = backbone.generate(texts, gens, steps=steps, guidance=g).cpu()
        right, blank = judge(sc, prompts, latents_to_images(backbone, z))
        rows.append({"guidance": g, "steps": steps, **_stats(z),
                     "blank": float(blank.mean()), "right": float(right.mean())})  # fmt: skip
    return rows


def latent_statistics(backbone, data: Path, real: Path) -> dict:
    """Per-channel mean and std of the sampled winners of ``data`` and of the encoded real
    scenes in ``real`` (same prompts), and what storing the winners in float16 would change
    (the largest absolute rounding error, relative to their std)."""
    _, xw, _ = read_pairs(data)
    _, xr, _ = read_pairs(real)
    fp16 = (xw.half().float() - xw).abs().max() / xw.std()
    return {"sampled": _stats(xw), "encoded": _stats(xr), "fp16_max_error_over_std": float(fp16)}
