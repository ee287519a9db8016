"""Validation images during training, the image helpers ``bench/sample.py`` shares, and
the optional TensorBoard sink.

* :func:`to_uint8`, :func:`save_png`, :func:`save_grid`: pixels -> PNG files and a captioned
  grid (rows = prompts, columns = models or steps); used by ``bench/sample.py`` too.
* :func:`write_validation`: sample a fixed prompt list with the current policy into
  ``OUT/samples/step-K/<index:05d>.png`` + ``grid.png``. Prompt ``i`` always starts from the
  noise of :func:`bench.t2i.backbones.prompt_generator` ``(seed, i)`` (as ``sample.py``), so the
  images of different steps (and of ``sample.py`` on the saved weights) are comparable. Only
  dedicated generators are drawn from and the global RNG is restored afterwards: training
  with validation on is bit-identical to training with it off.
* :func:`open_tensorboard`: ``torch.utils.tensorboard.SummaryWriter`` when the
  ``tensorboard`` package is importable, else a one-line :class:`~bench.t2i.errors.UsageError`.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from bench.t2i.backbones import Backbone, prompt_generator
from bench.t2i.errors import UsageError
from bench.t2i.outdir import publish_dir, stage_dir, writing

SAMPLES_DIR = "samples"  # OUT/samples/step-K/
#: more validation prompts than this get a warning: each validation samples all of them (in
#: the training's time) and the grid has a row per prompt
MANY_VALIDATION_PROMPTS = 64
TB_DIR = "tb"  # OUT/tb/


# ------------------------------------------------------------------------ images (shared)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1], ``(B, 3, H, W)`` -> uint8 ``(B, H, W, 3)``."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()


def save_png(image: torch.Tensor, path: Path) -> Path:
    """One uint8 ``(H, W, 3)`` image (a row of :func:`to_uint8`) as a PNG."""
    from PIL import Image

    with writing(path):
        Image.fromarray(image.numpy()).save(path)
    return path


def save_grid(
    cells: list[list[Path]], names: list[str], prompts: list[str], out: Path, cell: int = 160
) -> Path:
    """A grid PNG: one row per prompt (caption above), one column per model (name on top)."""
    from PIL import Image, ImageDraw

    head, cap, pad = 18, 16, 4
    rows, cols = len(prompts), len(names)
    w = cols * (cell + pad) + pad
    h = head + rows * (cap + cell + pad) + pad
    grid = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(grid)
    max_chars = max(10, w // 7)
    for c, name in enumerate(names):
        draw.text((pad + c * (cell + pad), 3), name, fill="black")
    for r, prompt in enumerate(prompts):
        y = head + r * (cap + cell + pad)
        text = prompt if len(prompt) <= max_chars else prompt[: max_chars - 3] + "..."
        draw.text((pad, y + 2), text, fill="black")
        for c in range(cols):
            img = Image.open(cells[c][r]).convert("RGB").resize((cell, cell), Image.NEAREST)
            grid.paste(img, (pad + c * (cell + pad), y + cap))
    grid.save(out)
    return out


# ---------------------------------------------------------------------- validation images


def validation_due(step: int, every: int, max_steps: int) -> bool:
    """Every ``every`` steps, and at the last step (``every`` 0: never)."""
    return every > 0 and (step % every == 0 or step == max_steps)


def many_prompts_warning(n: int, source: str) -> str | None:
    """The warning line for ``n`` validation prompts from ``source``, or None when few."""
    if n <= MANY_VALIDATION_PROMPTS:
        return None
    return (
        f"warning: {source}: {n} validation prompts (more than {MANY_VALIDATION_PROMPTS}); "
        "every validation samples all of them and draws a grid row per prompt"
    )


def step_dir(out: str | Path, step: int) -> Path:
    return Path(out) / SAMPLES_DIR / f"step-{step}"


@torch.no_grad()
def write_validation(
    backbone: Backbone,
    net: torch.nn.Module,
    prompts: list[str],
    out: str | Path,
    step: int,
    *,
    seed: int,
    steps: int | None = None,
    resolution: int | None = None,
    batch_size: int = 8,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: bool = False,
) -> Path:
    """Sample ``prompts`` with ``net`` (the unwrapped policy; LoRA adapters on) into
    ``OUT/samples/step-<step>/``, written in a staging folder and renamed into place
    (``progress``: a tqdm bar over the prompts, removed when done).
    ``net`` is put in eval mode and back into the mode it had; the global CPU (and CUDA)
    RNG state is restored, and the initial noise comes from per-prompt generators."""
    final = step_dir(out, step)
    with writing(final):
        stage = stage_dir(final)
    was_training = net.training
    device = next(net.parameters()).device
    cuda = [device] if device.type == "cuda" else []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts), desc=f"validation, step {step}", unit="prompt",
               leave=False, disable=not progress)  # fmt: skip
    try:
        net.eval()
        files = []
        with torch.random.fork_rng(devices=cuda), autocast(), bar:
            for s in range(0, len(prompts), batch_size):
                idx = list(range(s, min(s + batch_size, len(prompts))))
                lat = backbone.generate(
                    [prompts[i] for i in idx],
                    [prompt_generator(seed, i) for i in idx],
                    net=net,
                    steps=steps or None,
                    resolution=resolution,
                )
                images = to_uint8(backbone.decode_latents(lat))
                for i, img in zip(idx, images, strict=True):
                    files.append(save_png(img, stage / f"{i:05d}.png"))
                bar.update(len(idx))
        with writing(final):
            save_grid([files], [f"step {step}"], prompts, stage / "grid.png")
            publish_dir(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        net.train(was_training)
    return final


# ---------------------------------------------------------------------------- TensorBoard


def _import_summary_writer():
    """``torch.utils.tensorboard.SummaryWriter`` (ImportError without ``tensorboard``)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


def tensorboard_available() -> bool:
    try:
        _import_summary_writer()
    except ImportError:
        return False
    return True


def check_tensorboard() -> None:
    """UsageError (one line) unless the ``tensorboard`` package can be imported."""
    try:
        _import_summary_writer()
    except ImportError:
        raise UsageError(
            "--tensorboard needs the tensorboard package (pip install tensorboard); "
            "metrics.jsonl is written without it"
        ) from None


def open_tensorboard(out: str | Path, resume_step: int = 0):
    """A SummaryWriter on ``OUT/tb``. On resume, events after ``resume_step`` from the
    earlier run are purged (they are logged again, as in metrics.jsonl)."""
    writer_cls = _import_summary_writer()
    purge = resume_step + 1 if resume_step else None
    return writer_cls(log_dir=str(Path(out) / TB_DIR), purge_step=purge)


def tb_scalars(rec: dict) -> dict[str, float]:
    """The numeric fields of a metrics.jsonl record (flags as 0/1), by TensorBoard tag."""
    return {
        f"train/{k}": float(v)
        for k, v in rec.items()
        if k not in ("step", "end") and isinstance(v, int | float)
    }


def tb_write(writer, rec: dict) -> None:
    """One metrics.jsonl record as scalars at its step (the end record is skipped)."""
    if rec.get("end"):
        return
    for tag, value in tb_scalars(rec).items():
        writer.add_scalar(tag, value, rec["step"])


def tb_image(writer, grid: Path, step: int, tag: str = "validation/grid") -> None:
    """The validation grid of ``step`` as the ``tag`` image."""
    import numpy as np
    from PIL import Image

    with Image.open(grid) as img:
        writer.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")
