"""Prompt lists for the T2I tools: one reader, so that make_pairs, sample and evaluate
agree on prompt indices (blank lines skipped), and the built-in demo prompts for ``--tiny``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.t2i.errors import UsageError

DEMO_PROMPTS = [
    "a red fox sitting in fresh snow at dawn",
    "a bowl of ramen with a soft boiled egg, top view",
    "an astronaut riding a horse on the moon",
    "a lighthouse on a rocky cliff during a storm",
    "a cozy reading corner with a green armchair and a lamp",
    "two cats sleeping on a sunny windowsill",
    "a watercolor painting of a sailing boat on a calm lake",
    "a futuristic city skyline at night with flying cars",
    "a close-up photo of a honeybee on a purple flower",
    "a wooden cabin in a pine forest under the milky way",
    "a vintage red bicycle leaning against a brick wall",
    "a plate of pancakes with blueberries and maple syrup",
    "a dragon made of origami paper on a white table",
    "a child flying a yellow kite on a windy beach",
    "an oil painting of a quiet village street in autumn",
    "a robot watering plants in a greenhouse",
]


#: longest prompt kept, in characters. No backbone reads more than 300 tokens of a prompt
#: (SANA's Gemma; CLIP and SD3's T5 here read 77) and every token covers at least one
#: character, usually a few: 16,384 characters is over 50 per token, so the text a model sees
#: is unchanged, while a runaway line (a whole file with no newlines) no longer costs
#: gigabytes in the tokenizers and the prompt perturbations.
MAX_PROMPT_CHARS = 16_384


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.txt`` (one per line) or ``.jsonl`` (``{"prompt": ...}``) file.
    Prompts longer than :data:`MAX_PROMPT_CHARS` are cut to it, with one warning on stderr
    naming the file and the first such line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: prompts file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UsageError(
            f"{path}: not UTF-8 text (byte offset {e.start}, line {line}: {e.reason})"
        ) from None
    numbered = [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), 1)]
    if path.suffix == ".jsonl":
        prompts = []
        for i, ln in numbered:
            if not ln:
                continue
            try:
                obj = json.loads(ln)
            except ValueError:
                raise UsageError(f"{path}:{i}: invalid JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise UsageError(f'{path}:{i}: expected {{"prompt": "..."}}')
            prompts.append((i, obj["prompt"].strip()))
    else:
        prompts = numbered
    prompts = [(i, p) for i, p in prompts if p]
    if not prompts:
        raise UsageError(f"{path}: no prompts")
    long = [(i, len(p)) for i, p in prompts if len(p) > MAX_PROMPT_CHARS]
    if long:
        i, n = long[0]
        more = f" (and {len(long) - 1} more)" if len(long) > 1 else ""
        print(
            f"warning: {path}:{i}: prompt of {n} characters cut to {MAX_PROMPT_CHARS}{more}; "
            "the text encoders read at most 300 tokens of it",
            file=sys.stderr,
        )
    return [p[:MAX_PROMPT_CHARS].strip() for _, p in prompts]


def cli_prompts(
    prompts_file: str | None, *, tiny: bool, max_prompts: int | None, demo: int | None = None
) -> list[str]:
    """The prompts of a CLI run: ``prompts_file``, else (``--tiny`` only) the first ``demo``
    demo prompts; cut to ``max_prompts``. Raises ``UsageError`` with a one-line message."""
    if prompts_file:
        prompts = read_prompts(prompts_file)
    elif tiny:
        prompts = list(DEMO_PROMPTS[:demo])
    else:
        raise UsageError("--prompts FILE is required with --pretrained")
    return prompts[:max_prompts] if max_prompts else prompts
