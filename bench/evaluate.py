"""Score generated image folders against their prompts and compare fine-tunes with the base.

    python bench/evaluate.py --images samples/ --base base \\
        --clip weights/clip-vit-large-patch14 --pickscore weights/pickscore --out eval/

Input is what bench/sample.py writes: ``--images DIR`` holds one subfolder per model, each
with ``<index:05d>.png`` for every prompt, and ``prompts.txt``, the prompts in index order
(the default ``--prompts``). Single folders can be added with ``--model NAME=DIR``. The
scorers are local transformers CLIP directories (``--clip``, ``--pickscore``, ``--hps``;
bench/t2i/scorers.py says how each turns a cosine into a score).

Reported for each model and scorer: the mean over prompts +- its standard error. For every
model other than ``--base`` also its win rate over the base: the share of prompts on which
its image scores higher than the base's image of the same prompt, ties counting half (the
layout of the DDSPO paper's Table 4). Results go to ``--out``/results.json, with per-prompt
scores, and results.md. Bad input exits with status 2 and a one-line message naming the
file; ``--out`` is checked (a folder, writable) before any scorer is loaded, and the two
files are written atomically.

Only like is compared with like: every model folder written by bench/sample.py holds a
``sample.json`` (seed, steps, guidance, sampler, resolution, negative prompt, dtype, a digest
of the prompts, the base model), and folders whose records differ, or whose prompts digest
is not that of the prompts scored, are refused, naming the setting and both values. A
folder without ``sample.json`` (made by hand or before the record existed) cannot be
checked: refused, unless ``--allow-unrecorded`` is given (then it is compared unchecked and
results.json lists it under ``unrecorded``).

``--tiny`` scores with random tiny CLIPs instead (bench/t2i/tiny.py ``TINY_SCORERS``): a
smoke test of the pipeline on CPU with no weights, e.g. on ``sample.py --tiny`` output.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image

from bench.t2i.cli import BACKBONES, DTYPES, UsageError, dtype_name, opt, parse, torch_dtype
from bench.t2i.outdir import (
    OutputError,
    check_out_dir,
    run_lock,
    write_text_atomic,
    writing,
)
from bench.t2i.prompts import read_prompts as _read_prompts
from bench.t2i.provenance import (
    SAMPLE_FILE,
    prompts_digest,
    read_sample_record,
    settings_mismatch,
)
from bench.t2i.scorers import (
    SCORERS,
    ClipScorer,
    check_clip_dir,
    check_processor_dir,
    mean_sem,
    win_rate,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class EvalConfig:
    prompts: str | None = opt(
        None, ".txt (one per line) or .jsonl; default: IMAGES/prompts.txt", metavar="FILE"
    )
    images: str | None = opt(
        None, "bench/sample.py output dir (one subfolder of images per model)", metavar="DIR"
    )
    models: list[str] = opt(
        [], "an extra image folder NAME=DIR; repeatable", metavar="NAME=DIR", flag="--model"
    )
    base: str = opt("base", "the model the others are compared with (win rates)")
    clip: str | None = opt(None, "local CLIP dir -> CLIP score", metavar="DIR")
    pickscore: str | None = opt(None, "local PickScore dir (transformers CLIP)", metavar="DIR")
    hps: str | None = opt(None, "local HPS-style CLIP dir (transformers format)", metavar="DIR")
    clip_processor: str | None = opt(
        None, "tokenizer/image-processor dir if not in --clip's", metavar="DIR"
    )
    pickscore_processor: str | None = opt(
        None, "tokenizer/image-processor for --pickscore (e.g. CLIP-ViT-H-14's)", metavar="DIR"
    )
    hps_processor: str | None = opt(None, "tokenizer/image-processor for --hps", metavar="DIR")
    tiny: str | bool | None = opt(
        None,
        "score with random tiny CLIP and PickScore models instead of --clip/--pickscore/--hps "
        "(a smoke test: no weights needed, the numbers mean nothing); a NAME, as the other "
        "commands take, is accepted: the tiny scorers are the same for every backbone",
        choices=BACKBONES,
        nargs="?",
        const=True,
    )
    out: str | None = opt(None, "write results.json and results.md here", metavar="DIR")
    batch_size: int = opt(32, "images per scorer forward")
    device: str | None = opt(None, "cpu | cuda | cuda:N | auto (the default: cuda if available)")
    dtype: str = opt("fp32", "scorer weights dtype", choices=tuple(DTYPES), parse=dtype_name)
    progress: bool = opt(True, "progress bar on stderr (--no-progress: none)")
    allow_unrecorded: bool = opt(
        False,
        "compare image folders that have no sample.json (their seed and sampling settings "
        "cannot be checked) instead of refusing them",
    )


# ----------------------------------------------------------------------------- inputs


def read_prompts(path: str | Path) -> list[str]:
    """Prompts in index order, read by the same function bench/sample.py uses (.txt: one per
    line; .jsonl: {"prompt": ...}; blank lines skipped), so image indices agree."""
    return _read_prompts(path)


def resolve_prompts(prompts: str | None, images: str | None) -> tuple[list[str], Path]:
    """The prompt list and its file. bench/sample.py records the prompts it used in
    ``IMAGES/prompts.txt``: that file is the default, and a ``--prompts`` file must agree
    with it (it may not, e.g. after ``sample.py --max-prompts``)."""
    if images is not None and not Path(images).is_dir():  # the culprit, not the prompts
        raise UsageError(f"--images folder not found: {images}")
    written = Path(images) / "prompts.txt" if images is not None else None
    if prompts is None:
        if written is None or not written.is_file():
            raise UsageError("--prompts FILE is required (no prompts.txt in the --images folder)")
        return read_prompts(written), written
    listed = read_prompts(prompts)
    if written is not None and written.is_file():
        used = read_prompts(written)
        flat = [p.replace("\n", " ").strip() for p in listed]  # as sample.py writes them
        if flat != used:
            i = 0
            while i < min(len(flat), len(used)) and flat[i] == used[i]:
                i += 1
            raise UsageError(
                f"{prompts} ({len(listed)} prompts) and {written} ({len(used)} prompts, written by "
                f"bench/sample.py) differ from prompt index {i} on; omit --prompts to use {written}"
            )
    return listed, Path(prompts)


def collect_models(images: str | None, specs: list[str], base: str) -> dict[str, Path]:
    """Model name -> image folder, base first, then --images subfolders (sorted), then --model."""
    found: dict[str, Path] = {}

    def add(name: str, folder: Path) -> None:
        if not name:
            raise UsageError(f"empty model name for {folder}")
        if name in found:
            raise UsageError(f"model name {name!r} given twice ({found[name]} and {folder})")
        if not folder.is_dir():
            raise UsageError(f"image folder of model {name!r} not found: {folder}")
        found[name] = folder

    if images is not None:
        root = Path(images)
        if not root.is_dir():
            raise UsageError(f"--images folder not found: {root}")
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not subdirs:
            raise UsageError(
                f"--images {root} has no model subfolders (expected one folder per model, as "
                "bench/sample.py writes; use --model NAME=DIR for a single folder)"
            )
        for d in subdirs:
            add(d.name, d)
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            raise UsageError(f"--model expects NAME=DIR, got {spec!r}")
        add(name.strip(), Path(folder))
    if not found:
        raise UsageError("no images given: pass --images DIR and/or --model NAME=DIR")
    if base not in found and len(found) > 1:
        raise UsageError(f"base model {base!r} not among the models {list(found)}; set --base NAME")
    order = sorted(found, key=lambda n: n != base)  # stable: base first, rest as given
    return {n: found[n] for n in order}


def check_settings(
    folders: dict[str, Path], prompts: list[str], allow_unrecorded: bool
) -> tuple[dict | None, list[str]]:
    """The sample.py record the folders share (None if none has one) and the names of the
    folders without one. A UsageError names two folders whose records differ (the setting
    and both values), a record made for other prompts, or a folder with no record unless
    ``allow_unrecorded``."""
    records = {}
    for name, folder in folders.items():
        records[name] = read_sample_record(folder)
    unrecorded = [n for n, r in records.items() if r is None]
    if unrecorded and not allow_unrecorded:
        n = unrecorded[0]
        raise UsageError(
            f"model {n!r}: {folders[n]} has no {SAMPLE_FILE}, so its seed and sampling settings "
            "cannot be checked against the others' (sample it again with bench/sample.py, or "
            "pass --allow-unrecorded to compare anyway)"
        )
    recorded = {n: r for n, r in records.items() if r is not None}
    if not recorded:
        return None, unrecorded
    first, ref = next(iter(recorded.items()))
    for name, rec in recorded.items():
        diff = settings_mismatch(ref, rec)
        if diff is not None:
            key, a, b = diff
            raise UsageError(
                f"models {first!r} and {name!r} were sampled with different {key}: {a!r} in "
                f"{folders[first] / SAMPLE_FILE}, {b!r} in {folders[name] / SAMPLE_FILE}; "
                "compare only folders sampled with the same settings"
            )
    if ref.get("prompts_sha256") != prompts_digest(prompts):
        raise UsageError(
            f"the images in {folders[first]} were sampled from other prompts than the "
            f"{len(prompts)} scored ({SAMPLE_FILE}: {ref.get('num_prompts')} prompts, another "
            "digest); score them with the prompts.txt sample.py wrote next to them"
        )
    return ref, unrecorded


def image_paths(name: str, folder: Path, n: int) -> list[Path]:
    """The folder's ``00000.png``..``{n-1:05d}.png``; any missing or extra image is an error."""
    expected = [folder / f"{i:05d}.png" for i in range(n)]
    want = f"expected exactly {n} images {expected[0].name}..{expected[-1].name}, one per prompt"
    for p in expected:
        if not p.is_file():
            raise UsageError(f"model {name!r}: missing image {p} ({want})")
    names = {p.name for p in expected}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in names:
            raise UsageError(f"model {name!r}: unexpected image {p} ({want})")
    return expected


def _bad_image() -> tuple[type[BaseException], ...]:
    from PIL import Image  # the t2i extra: imported where used, so a missing one is named

    return (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def verify_image(path: Path) -> None:
    """Cheap structural check (PNG chunk CRCs, truncation) before any model is loaded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except _bad_image() as e:
        raise UsageError(f"corrupt or unreadable image {path}: {e}") from e


def load_image(path: Path) -> Image.Image:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() decodes the pixel data
    except _bad_image() as e:
        raise UsageError(f"corrupt or unreadable image {path}: {e}") from e


# ----------------------------------------------------------------------------- scoring


def score_models(
    model_images: dict[str, list[Path]],
    prompts: list[str],
    scorers: dict[str, ClipScorer],
    batch_size: int,
    progress: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """Per-prompt scores: model -> scorer -> (N,). Each image is decoded once for all scorers."""
    n = len(prompts)
    starts = range(0, n, batch_size)
    text = {
        k: torch.cat([s.embed_text(prompts[i : i + batch_size]) for i in starts])  # (N, D)
        for k, s in scorers.items()
    }
    chunks: dict[str, dict[str, list[torch.Tensor]]] = {
        m: {k: [] for k in scorers} for m in model_images
    }
    from tqdm.auto import tqdm

    workers = min(8, os.cpu_count() or 1)  # PIL decodes outside the GIL
    bar = tqdm(total=n * len(model_images), unit="img", disable=not progress, desc="scoring")
    with ThreadPoolExecutor(workers) as pool, bar:
        for m, paths in model_images.items():
            for i in starts:
                images = list(pool.map(load_image, paths[i : i + batch_size]))
                for k, s in scorers.items():
                    emb = s.embed_images(images)
                    chunks[m][k].append(s.score(emb, text[k][i : i + batch_size]))
                bar.update(len(images))
    return {m: {k: torch.cat(v).numpy() for k, v in per.items()} for m, per in chunks.items()}


def summarize(scores: dict[str, dict[str, np.ndarray]], base: str) -> dict[str, dict]:
    """model -> {"scores": {scorer: {mean, sem, n}}, "win_rate": {scorer: rate} (non-base)}."""
    out = {}
    for m, per in scores.items():
        entry: dict[str, dict] = {"scores": {}}
        for k, x in per.items():
            mean, sem = mean_sem(x)
            entry["scores"][k] = {"mean": mean, "sem": sem, "n": int(len(x))}
        if m != base and base in scores:
            entry["win_rate"] = {k: win_rate(x, scores[base][k]) for k, x in per.items()}
        out[m] = entry
    return out


def render_markdown(summary: dict[str, dict], base: str) -> str:
    """Table-4-style markdown: one row per model, mean +- s.e. per scorer, then win rates.

    ``summary`` is :func:`summarize`'s output (or results.json's "models").
    """
    kinds = [k for k in SCORERS if k in next(iter(summary.values()))["scores"]]
    has_base = base in summary
    head = ["model"] + [f"{SCORERS[k].label} ↑" for k in kinds]
    if has_base:
        head += [f"win vs {base}: {SCORERS[k].label}" for k in kinds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, entry in summary.items():
        row = [m]
        for k in kinds:
            s = entry["scores"][k]
            row.append(f"{s['mean']:.2f}" + ("" if math.isnan(s["sem"]) else f" ± {s['sem']:.2f}"))
        if has_base:
            wins = entry.get("win_rate", {})
            row += [f"{100 * wins[k]:.1f}%" if k in wins else "—" for k in kinds]
        lines.append("| " + " | ".join(row) + " |")
    n = next(iter(next(iter(summary.values()))["scores"].values()))["n"]
    note = f"\n{n} prompts; mean ± standard error over prompts."
    if has_base:
        note += (
            f" Win rate: share of prompts on which the model's image scores higher than"
            f" {base}'s (same prompt and seed; ties count half)."
        )
    return "\n".join(lines) + "\n" + note + "\n"


# ----------------------------------------------------------------------------- main


def evaluate(cfg: EvalConfig) -> dict:
    """Validate every input, score, and return the results dict written to results.json."""
    chosen = {k: getattr(cfg, k) for k in SCORERS if getattr(cfg, k) is not None}
    if cfg.tiny and chosen:
        raise UsageError("--tiny replaces --clip/--pickscore/--hps: give one or the other")
    if cfg.tiny:  # smoke runs only: the tiny test models are imported on this path alone
        from bench.t2i.tiny import TINY_SCORERS

        chosen = {k: f"tiny (random, seed {seed})" for k, (seed, _) in TINY_SCORERS.items()}
    if not chosen:
        raise UsageError(
            "no scorer given: pass at least one of --clip, --pickscore, --hps DIR (or --tiny)"
        )
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    dtype = torch_dtype(cfg.dtype)
    # Everything cheap is checked before any weights are loaded.
    prompts, prompt_file = resolve_prompts(cfg.prompts, cfg.images)
    folders = collect_models(cfg.images, cfg.models, cfg.base)
    model_images = {m: image_paths(m, d, len(prompts)) for m, d in folders.items()}
    settings, unrecorded = check_settings(folders, prompts, cfg.allow_unrecorded)
    if unrecorded:
        print(
            f"warning: {', '.join(unrecorded)}: no {SAMPLE_FILE}; compared without checking "
            "their seed and sampling settings (--allow-unrecorded)",
            file=sys.stderr,
        )
    processors = {k: getattr(cfg, f"{k}_processor") for k in chosen}
    if not cfg.tiny:
        _check_scorer_dirs(chosen, processors)
    if cfg.out is not None:  # a file or a read-only disk fails now, not after the scoring
        try:
            check_out_dir(cfg.out)
        except OutputError as e:
            raise UsageError(str(e)) from None
    _verify_images(model_images, cfg.progress)

    device = cfg.device if cfg.device not in (None, "auto") else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.tiny:
        from bench.t2i.tiny import tiny_scorer

        scorers = {k: tiny_scorer(k, device) for k in chosen}
    else:
        scorers = {
            k: ClipScorer.from_dir(k, d, device, dtype, processors[k]) for k, d in chosen.items()
        }
    print(
        f"scoring {len(folders)} model(s) x {len(prompts)} prompts with "
        f"{', '.join(chosen)} on {device}",
        file=sys.stderr,
    )
    scores = score_models(model_images, prompts, scorers, cfg.batch_size, cfg.progress)
    summary = summarize(scores, cfg.base)
    return {
        "prompts": str(prompt_file),
        "n_prompts": len(prompts),
        "base": cfg.base if cfg.base in folders else None,
        "sample_settings": settings,
        "unrecorded": unrecorded,
        "scorers": {
            k: {
                "dir": str(d),
                "processor_dir": str(processors[k] or d),
                "label": SCORERS[k].label,
                "formula": SCORERS[k].formula,
            }
            for k, d in chosen.items()
        },
        "models": {m: {"dir": str(folders[m]), **summary[m]} for m in folders},
        "per_prompt": {m: {k: x.tolist() for k, x in per.items()} for m, per in scores.items()},
    }


def _check_scorer_dirs(chosen: dict[str, str], processors: dict[str, str | None]) -> None:
    """Each scorer's model folder, and its processor's (its own folder unless given apart)."""
    for k, d in chosen.items():
        check_clip_dir(d, f"--{k}")
        if processors[k] is None:
            check_processor_dir(d, f"--{k}")
        else:
            check_processor_dir(processors[k], f"--{k}-processor")


def _verify_images(model_images: dict[str, list[Path]], progress: bool) -> None:
    """Open every image once before any weights are loaded (a bad one fails now)."""
    all_paths = [p for paths in model_images.values() for p in paths]
    from tqdm.auto import tqdm

    for p in tqdm(all_paths, unit="img", desc="checking", disable=not progress):
        verify_image(p)


def _nan_to_none(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def write_results(results: dict, table: str, out_dir: str | Path) -> None:
    """results.json and results.md, each complete or not there (OutputError on a full disk)."""
    out = Path(out_dir)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "results.json", json.dumps(_nan_to_none(results), indent=2) + "\n")
        write_text_atomic(out / "results.md", table)


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    return parse(
        EvalConfig,
        argv,
        prog="evaluate.py",
        description="Score image folders against their prompts with local CLIP-family scorers.",
    )


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        with run_lock(cfg.out) if cfg.out is not None else contextlib.nullcontext():
            results = evaluate(cfg)
            table = render_markdown(results["models"], cfg.base)
            if cfg.out is not None:
                write_results(results, table, cfg.out)
    except UsageError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    print(table, end="")
    if cfg.out is not None:
        print(f"wrote {Path(cfg.out) / 'results.json'} and results.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
