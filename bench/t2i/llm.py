"""A local causal language model for the ``llm`` prompt perturbation (DDSPO paper App. G).

Only the model call lives here; the instruction templates, the answer parser and the
fallback to ``random_removal`` are :mod:`minddspo.perturb`'s. Weights are read from a
local directory (``local_files_only=True``); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from bench.t2i.errors import UsageError
from minddspo.perturb import PerturbResult, llama3_prompt, llm_messages, llm_perturb


class LocalLM:
    """Greedy generation with a local ``AutoModelForCausalLM``.

    ``build_prompt`` uses the tokenizer's chat template when it has one and the paper's
    Llama-3 layout otherwise. ``generate_batch`` decodes several requests at once
    (left padding), which is what makes a 200K-prompt run practical on a GPU.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_new_tokens: int = 256,
        batch_size: int = 8,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise UsageError(f"{path}: not a local transformers model directory (no config.json)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as e:  # a folder that is not a usable causal LM
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"{path}: cannot load a causal language model ({first})") from None
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(device)
        self.model.eval().requires_grad_(False)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def build_prompt(self, prompt: str, task: str = "alignment") -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                llm_messages(prompt, task), tokenize=False, add_generation_prompt=True
            )
        return llama3_prompt(prompt, task)

    @torch.no_grad()
    def generate_batch(self, texts: Sequence[str]) -> list[str]:
        """The model's continuation (special tokens dropped) of each text, greedy."""
        out: list[str] = []
        for i in range(0, len(texts), self.batch_size):
            chunk = list(texts[i : i + self.batch_size])
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(self.model.device)
            ids = self.model.generate(
                **enc,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new = ids[:, enc["input_ids"].shape[1] :]
            out.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out

    def __call__(self, text: str) -> str:
        return self.generate_batch([text])[0]

    def perturb(
        self, prompts: Sequence[str], rngs: Sequence, task: str = "alignment"
    ) -> PerturbResult:
        """Degrade each prompt with its own rng (one per prompt keeps results per-index).

        Answers are generated in batches first; ``llm_perturb`` then parses them and falls
        back to ``random_removal`` for unusable ones, counting the fallbacks.
        """
        texts = [self.build_prompt(p, task) for p in prompts]
        answers = dict(zip(texts, self.generate_batch(texts), strict=True))
        outs, fell = [], []
        for p, rng in zip(prompts, rngs, strict=True):
            r = llm_perturb([p], answers.__getitem__, rng, task=task, build=self.build_prompt)
            outs.extend(r.prompts)
            fell.extend(r.fell_back)
        return PerturbResult(outs, fell, sum(fell))
