"""Import preference pairs made elsewhere into our pair format (see :mod:`bench.t2i.importers`).

    python bench/import_pairs.py --from ddspo DDSPO_DIR --backbone sd --out data/ddspo
    python bench/import_pairs.py --from pickapic pickapic/train/ --pretrained /models/sd15 \\
        --resolution 512 --out data/pickapic-sd15
    python bench/import_pairs.py --from pickapic pairs.parquet --tiny sd --out runs/pap-tiny

The output trains unchanged: ``python bench/train_t2i.py --data OUT ...``. Reruns skip
finished shards.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.t2i.backbones import BACKBONES
from bench.t2i.importers import (
    DDSPO_ID_KEY,
    DDSPO_NEG_KEY,
    DDSPO_PROMPT_KEYS,
    NEG_SUFFIX,
    import_ddspo,
    import_pickapic,
)
from bench.t2i.pairdata import LATENT_DTYPES

SOURCES = ("ddspo", "pickapic")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="import_pairs.py",
        description="Convert preference pairs from the official DDSPO layout or the Pick-a-Pic "
        "schema into a minddspo pair dataset (trainable with train_t2i.py --data OUT). "
        "Resumable: finished shards are skipped on a rerun.",
    )
    p.add_argument("--from", dest="source", nargs=2, required=True, metavar=("KIND", "PATH"),
                   help="KIND ddspo: PATH is a directory with metadata.jsonl and latents/<id>"
                   ".safetensors, latents/<id>_neg.safetensors (copied, no VAE). KIND pickapic: "
                   "PATH is a .parquet/.arrow file, a folder of them, or a datasets.save_to_disk "
                   "directory (columns caption, jpg_0, jpg_1, label_0; ties dropped)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    g = p.add_argument_group("VAE (pickapic; for ddspo only names the backbone)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--pretrained", metavar="DIR", help="local diffusers pipeline directory")
    src.add_argument("--tiny", choices=BACKBONES, help="tiny random backbone (tests, smoke runs)")
    g.add_argument("--resolution", type=int,
                   help="pickapic: image side in pixels (default: the model's)")  # fmt: skip
    g.add_argument("--batch-size", type=int, default=8, help="pickapic: pairs per VAE call")
    g.add_argument("--device", default=None, help="pickapic: default cuda if available, else cpu")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="pickapic: VAE compute dtype (float32 when its config forces upcast)")  # fmt: skip
    d = p.add_argument_group("ddspo layout")
    d.add_argument("--backbone", choices=BACKBONES,
                   help="ddspo: the backbone whose VAE made the latents (default: from --tiny/"
                   "--pretrained, else sd)")  # fmt: skip
    d.add_argument("--id-key", default=DDSPO_ID_KEY,
                   help=f"metadata.jsonl field of the pair id (default: {DDSPO_ID_KEY})")  # fmt: skip
    d.add_argument("--prompt-key", action="append", metavar="KEY",
                   help="field of the prompt c; repeat for fallbacks (default: "
                   f"{', then '.join(DDSPO_PROMPT_KEYS)})")  # fmt: skip
    d.add_argument("--neg-key", default=DDSPO_NEG_KEY,
                   help=f"field of the perturbed prompt c- (default: {DDSPO_NEG_KEY})")  # fmt: skip
    d.add_argument(
        "--latents-dir", default="latents", help="latent subdirectory (default: latents)"
    )
    d.add_argument("--neg-suffix", default=NEG_SUFFIX,
                   help=f"loser file name suffix before .safetensors (default: {NEG_SUFFIX})")  # fmt: skip
    d.add_argument("--latent-key", help="tensor name in each latent file (default: its only one)")
    d.add_argument("--latent-scale", type=float, default=1.0,
                   help="multiply latents by this (default 1: they are already scaled by the VAE "
                   "scaling factor; e.g. 0.18215 for raw SD-1.x posterior latents)")  # fmt: skip
    q = p.add_argument_group("pickapic schema")
    for col in ("caption", "jpg_0", "jpg_1", "label_0"):
        q.add_argument(f"--{col.replace('_', '-')}-column", dest=f"col_{col}", default=col, metavar="NAME",
                       help=f"column name of {col} (default: {col})")  # fmt: skip
    q.add_argument("--split", default="train", help="split of a saved DatasetDict (default: train)")
    q.add_argument("--max-pairs", type=int, help="import only the first N kept pairs")
    p.add_argument("--shard-size", type=int, default=64, help="pairs per shard file")
    p.add_argument("--latent-dtype", choices=tuple(LATENT_DTYPES), default="float16",
                   help="storage dtype of the latents")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    kind, path = args.source
    if kind not in SOURCES:
        raise ValueError(f"--from: unknown kind {kind!r}; choose one of {SOURCES}")
    for name in ("shard_size", "batch_size", "max_pairs", "resolution"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    from bench.t2i.backbones import load_backbone, move_module, tiny_backbone

    if kind == "ddspo":
        backbone = args.backbone or args.tiny
        if backbone is None and args.pretrained:
            backbone = load_backbone(args.pretrained).name
        return import_ddspo(
            path,
            args.out,
            backbone=backbone or "sd",
            id_key=args.id_key,
            prompt_keys=tuple(args.prompt_key or DDSPO_PROMPT_KEYS),
            neg_key=args.neg_key,
            latents_dir=args.latents_dir,
            neg_suffix=args.neg_suffix,
            latent_key=args.latent_key,
            latent_scale=args.latent_scale,
            shard_size=args.shard_size,
            latent_dtype=args.latent_dtype,
            progress=not args.no_progress,
        )
    if not (args.tiny or args.pretrained):
        raise ValueError("--from pickapic needs the VAE: give --pretrained DIR or --tiny NAME")
    bb = tiny_backbone(args.tiny) if args.tiny else load_backbone(args.pretrained)
    if args.backbone and args.backbone != bb.name:
        raise ValueError(f"--backbone {args.backbone}, but the VAE is from a {bb.name} model")
    resolution = args.resolution or bb.default_resolution
    shape = bb.latent_shape(resolution)  # checks the resolution
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    upcast = bb.vae.config.get("force_upcast", False)
    move_module(bb.vae, device, None if upcast else getattr(torch, args.dtype))
    columns = {c: getattr(args, f"col_{c}") for c in ("caption", "jpg_0", "jpg_1", "label_0")}
    return import_pickapic(
        path,
        args.out,
        bb.encode_images,
        backbone=bb.name,
        latent_shape=shape,
        resolution=resolution,
        split=args.split,
        columns=columns,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        latent_dtype=args.latent_dtype,
        max_pairs=args.max_pairs,
        progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import json

    info = json.loads((out / "info.json").read_text())
    extra = ""
    if "dropped" in info:
        d = info["dropped"]
        extra = f" (dropped {d['ties']} ties, {d['unlabeled']} unlabeled of {d['rows']} rows)"
    print(f"wrote {info['num_pairs']} pairs to {out}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
