"""The backbone a command runs on: ``--pretrained DIR`` or ``--tiny NAME``.

Kept apart from :mod:`bench.t2i.backbones` because the tiny models (:mod:`bench.t2i.tiny`)
are built on the adapters there: importing them from here leaves no import circle.
"""

from __future__ import annotations

from pathlib import Path

from bench.t2i.backbones import Backbone, load_backbone
from bench.t2i.errors import UsageError


def open_backbone(
    pretrained: str | Path | None = None,
    tiny: str | None = None,
    *,
    backbone: str | None = None,
    prediction_type: str | None = None,
) -> Backbone:
    """The backbone a command runs on: ``--tiny NAME`` (random tiny models built from configs,
    :mod:`bench.t2i.tiny`, imported only here and only then) or ``--pretrained DIR``.
    ``--tiny NAME`` is the same model in every command: its weights come from a fixed seed
    of their own, never from a command's ``--seed``."""
    if tiny:
        from bench.t2i.tiny import tiny_backbone

        return tiny_backbone(tiny, prediction_type=prediction_type)
    if not pretrained:
        raise UsageError("give --pretrained DIR (a local diffusers pipeline) or --tiny NAME")
    return load_backbone(pretrained, backbone, prediction_type)
