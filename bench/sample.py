"""Sample a prompt file from a base model and fine-tuned checkpoints, side by side.

Every model sees the same initial noise per prompt (:func:`bench.t2i.backbones.prompt_generator`
of ``(seed, prompt index)``) and the same sampler: the project's own DDIM/DDPM loops for
epsilon and v-prediction backbones, Euler for flow ones, with batched classifier-free
guidance. Output::

    OUT/base/00000.png, OUT/<name>/00000.png, ...   one PNG per prompt and model
    OUT/base/sample.json, OUT/<name>/sample.json    the seed and settings that made them
    OUT/grid.png                                    rows = prompts, columns = base | A | B ...
    OUT/prompts.txt                                 the prompts, in index order

A checkpoint ``NAME=PATH`` is either full denoiser weights (a folder saved with
``save_pretrained``: the model folder itself, or one holding ``unet/`` / ``transformer/``,
e.g. a trainer checkpoint or a full pipeline) or LoRA weights in diffusers' format
(``pytorch_lora_weights.safetensors``, directly or under ``lora/``).

Nothing is half-written: ``--out`` and every checkpoint (that it is the base model's
architecture: same denoiser config, LoRA layers that exist with the right shapes) are checked
before sampling, the images go to a hidden staging folder next to OUT, and that is moved into
place only when every image and the grid are done. Bad input is one ``error:`` line, exit 2.

Like is compared with like (:mod:`bench.t2i.provenance`): a checkpoint whose ``base.json``
names another base model than this one is refused, and so is an ``--out`` that already
holds model folders (other than the ones this run replaces) sampled with other settings
(seed, steps, guidance, sampler, resolution, negative prompt, dtype, prompts or base) or
with no ``sample.json`` to tell.

    python bench/sample.py --tiny sd --checkpoint ft=runs/x/final --out runs/samples
    python bench/sample.py --pretrained /models/sd15 --prompts eval.txt \\
        --checkpoint ddspo=runs/sd15/final --checkpoint dpo=runs/sd15-dpo/final --out samples
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.t2i.backbones import Backbone, move_module, prompt_generator
from bench.t2i.cli import (
    DeviceArgs,
    ModelArgs,
    OutputArgs,
    PredictionArgs,
    PromptArgs,
    SamplingArgs,
    UsageError,
    check_positive,
    opt,
    parse,
    run_command,
    torch_dtype,
)
from bench.t2i.models import open_backbone
from bench.t2i.outdir import (
    OutputError,
    check_out_dir,
    publish_dir,
    run_lock,
    stage_dir,
    writing,
)
from bench.t2i.prompts import cli_prompts
from bench.t2i.provenance import (
    SAMPLE_FILE,
    base_record,
    check_base,
    read_sample_record,
    sample_record,
    settings_mismatch,
)
from bench.t2i.validation import save_grid, save_png, to_uint8
from bench.t2i.weights import LORA_FILE, check_denoiser_files, denoiser_with_lora, find_lora

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_checkpoint(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` -> ``(NAME, PATH)``; NAME must be a plain file name, not ``base``."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise UsageError(f"--checkpoint expects NAME=PATH, got {spec!r}")
    if not _NAME.match(name) or name == "base":
        raise UsageError(f"checkpoint name {name!r} must match [A-Za-z0-9_.-]+ and not be 'base'")
    return name, Path(path)


def resolve_checkpoint(backbone: Backbone, path: str | Path) -> tuple[str, Path]:
    """``("lora", dir)`` or ``("full", dir)`` for a checkpoint path; UsageError otherwise."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: checkpoint not found")
    lora_dir = find_lora(path)
    if lora_dir is not None:
        return "lora", lora_dir
    for d in (path, path / backbone.denoiser_subfolder):
        if (d / "config.json").is_file():
            return "full", d
    raise UsageError(
        f"{path}: neither {backbone.denoiser_subfolder} weights (config.json) nor {LORA_FILE}"
    )


_LORA_KEY = re.compile(r"^(.+)\.(lora\.down|lora\.up|lora_A|lora_B)(?:\.[\w-]+)?\.weight$")


def check_fits(backbone: Backbone, path: str | Path, base: dict | None = None) -> None:
    """UsageError (one line) unless the checkpoint at ``path`` is for ``backbone``'s
    denoiser: full weights of the same class and config, or LoRA weights on layers it has,
    with matching shapes, trained on ``base`` (:func:`bench.t2i.provenance.base_record` of
    the model loaded, when the checkpoint records its base). Reads only config.json,
    base.json and the safetensors headers."""
    kind, d = resolve_checkpoint(backbone, path)
    check_denoiser_files(path, backbone.denoiser_subfolder)
    check_base(path, base)
    if kind == "full":
        try:
            cfg = json.loads((d / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{d / 'config.json'}: not valid JSON ({e})") from None
        base = json.loads(json.dumps(dict(backbone.denoiser.config), default=str))
        cls, want = cfg.get("_class_name"), type(backbone.denoiser).__name__
        diffs = [] if cls in (None, want) else [f"class {cls} (not {want})"]
        diffs += [
            f"{k} {cfg[k]!r} (not {base[k]!r})"
            for k in sorted(cfg.keys() & base.keys())
            if not k.startswith("_") and cfg[k] != base[k]
        ]
    else:
        diffs = _lora_mismatches(backbone, d / LORA_FILE)
    if diffs:
        raise UsageError(
            f"{path}: not a checkpoint of this {backbone.name} model "
            f"({', '.join(diffs[:3])}{', ...' if len(diffs) > 3 else ''})"
        )


def _lora_mismatches(backbone: Backbone, file: Path) -> list[str]:
    from safetensors import safe_open

    prefix = backbone.denoiser_subfolder + "."
    try:
        with safe_open(file, "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:
        return [f"unreadable {file.name}: {str(e).splitlines()[0] if str(e) else e!r}"]
    ours = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    if not ours:
        first = next(iter(shapes), "")
        return [f"no {prefix[:-1]} LoRA layers (keys start with {first.split('.')[0]!r})"]
    out = []
    for key, shape in ours.items():
        m = _LORA_KEY.match(key)
        if m is None:
            continue  # alpha and other scalars
        try:
            weight = backbone.denoiser.get_submodule(m[1]).weight
        except AttributeError:
            out.append(f"no layer {m[1]}")
            continue
        down = m[2] in ("lora.down", "lora_A")
        got, want = (shape[1], weight.shape[1]) if down else (shape[0], weight.shape[0])
        if got != want:
            side = "in" if down else "out"
            out.append(f"{m[1]} has {side} size {want}, the LoRA {got}")
    return out


def load_checkpoint(backbone: Backbone, path: str | Path) -> torch.nn.Module:
    """A denoiser with the weights at ``path`` (full weights or diffusers-format LoRA)."""
    kind, lora_dir = resolve_checkpoint(backbone, path)
    if kind == "lora":
        return denoiser_with_lora(backbone.denoiser, lora_dir, backbone.denoiser_subfolder)
    net = backbone.load_denoiser(lora_dir)
    p = next(backbone.denoiser.parameters())
    move_module(net, p.device, p.dtype)
    return net


def sample_models(
    backbone: Backbone,
    prompts: list[str],
    checkpoints: list[tuple[str, Path]],
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 8,
    resolution: int | None = None,
    sampler: str = "ddim",
    negative_prompt: str = "",
    progress: bool = True,
    base: dict | None = None,
    dtype: str = "fp32",
) -> Path:
    """Sample ``prompts`` with the base denoiser and each checkpoint; write PNGs and a grid
    into a staging folder that becomes ``out_dir`` when complete (see the module doc).
    ``base``: :func:`bench.t2i.provenance.base_record` of the backbone as loaded (before a
    dtype cast; None: checkpoints are not checked against it); ``dtype`` is recorded."""
    from tqdm import tqdm

    for _, path in checkpoints:  # a bad or foreign checkpoint fails before anything is written
        check_fits(backbone, path, base)
    out = check_out_dir(out_dir)
    models: list[tuple[str, Path | None]] = [("base", None), *checkpoints]
    sampler = sampler if sampler in backbone.process.samplers else backbone.process.samplers[0]
    record = sample_record(
        base, prompts, prediction_type=backbone.prediction_type, seed=seed,
        steps=steps or backbone.default_steps,
        guidance=backbone.default_guidance if guidance is None else float(guidance),
        sampler=sampler, resolution=resolution or backbone.default_resolution,
        negative_prompt=negative_prompt, dtype=dtype,
    )  # fmt: skip
    check_out_settings(out, record, [m for m, _ in models])
    with writing(out):
        stage = stage_dir(out)
    try:
        with writing(out):
            text = "".join(p.replace("\n", " ") + "\n" for p in prompts)
            (stage / "prompts.txt").write_text(text)
        bar = tqdm(total=len(models) * len(prompts), unit="img", disable=not progress)
        cells = []
        for name, path in models:
            try:
                cells.append(
                    _sample_one(backbone, path, prompts, stage / name, bar, record, seed=seed,
                                steps=steps, guidance=guidance, batch_size=batch_size,
                                resolution=resolution, sampler=sampler,
                                negative_prompt=negative_prompt)
                )  # fmt: skip
            except (RuntimeError, ValueError, KeyError) as e:
                if path is None or isinstance(e, OutputError):
                    raise
                line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UsageError(f"checkpoint {name}={path} failed to sample: {line}") from e
        bar.close()
        with writing(out):
            save_grid(cells, [m for m, _ in models], prompts, stage / "grid.png")
            publish_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out / "grid.png"


def _sample_one(
    backbone: Backbone, path: Path | None, prompts: list[str], folder: Path, bar, record, **kw
) -> list[Path]:
    """One model's images: ``folder/<index:05d>.png``, and ``record`` as ``folder/sample.json``."""
    net = backbone.denoiser if path is None else load_checkpoint(backbone, path)
    net.eval()
    folder.mkdir()
    files, batch_size = [], kw.pop("batch_size")
    seed = kw.pop("seed")
    for s in range(0, len(prompts), batch_size):
        idx = list(range(s, min(s + batch_size, len(prompts))))
        lat = backbone.generate(
            [prompts[i] for i in idx], [prompt_generator(seed, i) for i in idx], net=net, **kw
        )
        for i, img in zip(idx, to_uint8(backbone.decode_latents(lat)), strict=True):
            files.append(save_png(img, folder / f"{i:05d}.png"))
        bar.update(len(idx))
    (folder / SAMPLE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return files


def check_out_settings(out: Path, record: dict, replaced: list[str]) -> None:
    """A one-line UsageError when ``out`` holds a model folder this run keeps (not in
    ``replaced``) that was sampled with other settings than ``record``, or has no record."""
    if not out.is_dir():
        return
    for folder in sorted(d for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")):
        if folder.name in replaced:
            continue
        old = read_sample_record(folder)
        if old is None:
            raise UsageError(
                f"--out {out} holds {folder.name}/ with no {SAMPLE_FILE} (sampled before "
                "settings were recorded): its settings cannot be checked against this run's; "
                "move it away or choose another --out"
            )
        diff = settings_mismatch(old, record)
        if diff is not None:
            key, was, now = diff
            raise UsageError(
                f"--out {out} holds {folder.name}/ sampled with {key} {was!r}, this run has "
                f"{now!r}: images of different settings must not be compared; choose another --out"
            )


@dataclass
class SampleConfig(OutputArgs, DeviceArgs, SamplingArgs, PromptArgs, PredictionArgs, ModelArgs):
    checkpoint: list[str] = opt(
        [], "fine-tuned weights NAME=PATH (full denoiser dir or LoRA dir); repeatable",
        metavar="NAME=PATH",
    )  # fmt: skip
    sampler: str = opt("ddim", "SD/SDXL sampler (SANA: Euler)", choices=("ddim", "ddpm"))
    negative_prompt: str = opt("", "unconditional branch prompt")
    batch_size: int = opt(8, "prompts per sampler call")


def parse_args(argv: Sequence[str] | None = None) -> SampleConfig:
    cfg = parse(
        SampleConfig,
        argv,
        prog="sample.py",
        description="Sample the same prompts and seeds from a base model and fine-tuned "
        "checkpoints; write OUT/<model>/<index>.png and OUT/grid.png.",
        one_of=[("pretrained", "tiny")],
    )
    check_positive(cfg, ("steps", "batch_size", "max_prompts", "resolution"))
    return cfg


def _run(cfg: SampleConfig) -> int:
    check_out_dir(cfg.out)  # before any model is loaded
    checkpoints = [parse_checkpoint(s) for s in cfg.checkpoint]
    names = [n for n, _ in checkpoints]
    if len(set(names)) != len(names):
        raise UsageError(f"duplicate checkpoint names in {names}")
    prompts = cli_prompts(cfg.prompts, tiny=bool(cfg.tiny), max_prompts=cfg.max_prompts, demo=4)
    backbone = open_backbone(cfg.pretrained, cfg.tiny, prediction_type=cfg.prediction_type)
    base = base_record(backbone, cfg.pretrained, cfg.tiny)  # as loaded: before the dtype cast
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone.for_inference(device, torch_dtype(cfg.dtype))
    grid = sample_models(
        backbone, prompts, checkpoints, cfg.out, seed=cfg.seed, steps=cfg.steps,
        guidance=cfg.guidance, batch_size=cfg.batch_size, resolution=cfg.resolution,
        sampler=cfg.sampler, negative_prompt=cfg.negative_prompt, progress=cfg.progress,
        base=base, dtype=cfg.dtype,
    )  # fmt: skip
    print(f"wrote {len(prompts)} x {1 + len(checkpoints)} images and {grid}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    out = "--out"

    def body() -> int:
        nonlocal out
        cfg = parse_args(argv)
        out = cfg.out
        with run_lock(cfg.out):  # the only writer of OUT until done
            return _run(cfg)

    try:
        return run_command(body)
    except KeyboardInterrupt:  # while loading or sampling: OUT is staged, nothing half-written
        print(f"interrupted; nothing written to {out}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
