"""Import preference pairs made elsewhere into our pair format (see :mod:`bench.t2i.importers`).

    python bench/import_pairs.py --from ddspo DDSPO_DIR --backbone sd --out data/ddspo
    python bench/import_pairs.py --from pickapic pickapic/train/ --pretrained /models/sd15 \\
        --resolution 512 --out data/pickapic-sd15
    python bench/import_pairs.py --from pickapic pairs.parquet --tiny sd --out runs/pap-tiny

The output trains unchanged: ``python bench/train_t2i.py --data OUT ...``. Reruns skip
finished shards.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.t2i.backbones import BACKBONES, load_backbone, move_module
from bench.t2i.cli import (
    DeviceArgs,
    ModelArgs,
    OutputArgs,
    UsageError,
    check_positive,
    opt,
    parse,
    run_command,
    torch_dtype,
)
from bench.t2i.importers import (
    DDSPO_ID_KEY,
    DDSPO_NEG_KEY,
    DDSPO_PROMPT_KEYS,
    NEG_SUFFIX,
    import_ddspo,
    import_pickapic,
)
from bench.t2i.models import open_backbone
from bench.t2i.outdir import run_lock
from bench.t2i.pairs import latent_dtype_name, storage_dtype

SOURCES = ("ddspo", "pickapic")
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


@dataclass
class ImportConfig(OutputArgs, DeviceArgs, ModelArgs):
    source: list[str] = opt(
        [],
        "KIND ddspo: PATH is a directory with metadata.jsonl and latents/<id>.safetensors, "
        "latents/<id>_neg.safetensors (copied, no VAE). KIND pickapic: PATH is a "
        ".parquet/.arrow file, a folder of them, or a datasets.save_to_disk directory (columns "
        "caption, jpg_0, jpg_1, label_0; ties dropped)",
        flag="--from",
        nargs=2,
        metavar=("KIND", "PATH"),
        required=True,
    )
    resolution: int | None = opt(None, "pickapic: image side in pixels (default: the model's)")
    batch_size: int = opt(8, "pickapic: pairs per VAE call")
    backbone: str | None = opt(
        None,
        "ddspo: the backbone whose VAE made the latents (default: from --tiny/--pretrained, "
        "else sd)",
        choices=BACKBONES,
    )
    id_key: str = opt(DDSPO_ID_KEY, "ddspo: metadata.jsonl field of the pair id")
    prompt_key: list[str] = opt(
        [],
        "ddspo: field of the prompt c; repeat for fallbacks (default: "
        f"{', then '.join(DDSPO_PROMPT_KEYS)})",
        metavar="KEY",
    )
    neg_key: str = opt(DDSPO_NEG_KEY, "ddspo: field of the perturbed prompt c-")
    latents_dir: str = opt("latents", "ddspo: latent subdirectory")
    neg_suffix: str = opt(
        NEG_SUFFIX,
        "ddspo: loser file name suffix before .safetensors, for lines without pos_file/neg_file",
    )
    latent_key: str | None = opt(
        None, "ddspo: tensor name in each latent file (default: its only one)"
    )
    latent_scale: float = opt(
        1.0,
        "ddspo: multiply latents by this (1: they are already scaled by the VAE scaling "
        "factor; e.g. 0.18215 for raw SD-1.x posterior latents)",
    )
    caption_column: str = opt("caption", "pickapic: column of the caption", metavar="NAME")
    jpg_0_column: str = opt("jpg_0", "pickapic: column of the first image", metavar="NAME")
    jpg_1_column: str = opt("jpg_1", "pickapic: column of the second image", metavar="NAME")
    label_0_column: str = opt(
        "label_0", "pickapic: column of the first image's preference label", metavar="NAME"
    )
    split: str = opt("train", "pickapic: split of a saved DatasetDict")
    max_pairs: int | None = opt(None, "pickapic: import only the first N kept pairs")
    shard_size: int = opt(64, "pairs per shard file")
    latent_dtype: str | None = opt(
        None,
        "storage dtype of the latents; unset: ddspo: the source's (fp16 when every source "
        "latent is fp16, else fp32), pickapic: fp16",
        choices=("fp16", "fp32"),
        parse=latent_dtype_name,
    )


def parse_args(argv: Sequence[str] | None = None) -> ImportConfig:
    cfg = parse(
        ImportConfig,
        argv,
        prog="import_pairs.py",
        description="Convert preference pairs from the official DDSPO layout or the Pick-a-Pic "
        "schema into a minddspo pair dataset (trainable with train_t2i.py --data OUT). "
        "Resumable: finished shards are skipped on a rerun.",
    )
    if cfg.pretrained and cfg.tiny:
        raise UsageError("give at most one of --pretrained | --tiny")
    if cfg.source[0] not in SOURCES:
        raise UsageError(f"--from: unknown kind {cfg.source[0]!r}; choose one of {SOURCES}")
    check_positive(cfg, ("shard_size", "batch_size", "max_pairs", "resolution"))
    return cfg


def _import_ddspo(cfg: ImportConfig, path: str) -> Path:
    backbone = cfg.backbone or cfg.tiny
    if backbone is None and cfg.pretrained:
        backbone = load_backbone(cfg.pretrained).name
    return import_ddspo(
        path, cfg.out, backbone=backbone or "sd", id_key=cfg.id_key,
        prompt_keys=tuple(cfg.prompt_key or DDSPO_PROMPT_KEYS), neg_key=cfg.neg_key,
        latents_dir=cfg.latents_dir, neg_suffix=cfg.neg_suffix, latent_key=cfg.latent_key,
        latent_scale=cfg.latent_scale, shard_size=cfg.shard_size,
        latent_dtype=storage_dtype(cfg.latent_dtype) if cfg.latent_dtype else None,
        progress=cfg.progress,
    )  # fmt: skip


def _import_pickapic(cfg: ImportConfig, path: str) -> Path:
    if not (cfg.tiny or cfg.pretrained):
        raise UsageError("--from pickapic needs the VAE: give --pretrained DIR or --tiny NAME")
    bb = open_backbone(cfg.pretrained, cfg.tiny)
    if cfg.backbone and cfg.backbone != bb.name:
        raise UsageError(f"--backbone {cfg.backbone}, but the VAE is from a {bb.name} model")
    resolution = cfg.resolution or bb.default_resolution
    shape = bb.latent_shape(resolution)  # checks the resolution
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    upcast = bb.vae.config.get("force_upcast", False)
    move_module(bb.vae, device, None if upcast else torch_dtype(cfg.dtype))
    columns = {c: getattr(cfg, f"{c}_column") for c in PICKAPIC_COLUMNS}
    return import_pickapic(
        path, cfg.out, bb.encode_images, backbone=bb.name, latent_shape=shape,
        resolution=resolution, split=cfg.split, columns=columns, shard_size=cfg.shard_size,
        batch_size=cfg.batch_size, latent_dtype=storage_dtype(cfg.latent_dtype or "fp16"),
        max_pairs=cfg.max_pairs, progress=cfg.progress,
    )  # fmt: skip


def run(cfg: ImportConfig) -> Path:
    kind, path = cfg.source
    return _import_ddspo(cfg, path) if kind == "ddspo" else _import_pickapic(cfg, path)


def _main(argv: Sequence[str] | None) -> int:
    cfg = parse_args(argv)
    with run_lock(cfg.out):  # the only writer of OUT until done
        out = run(cfg)
    info = json.loads((out / "info.json").read_text())
    extra = ""
    if "dropped" in info:
        d = info["dropped"]
        extra = f" (dropped {d['ties']} ties, {d['unlabeled']} unlabeled of {d['rows']} rows)"
    print(f"wrote {info['num_pairs']} pairs to {out}{extra}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
