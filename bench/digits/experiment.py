"""The experiment driver: scorer -> base model -> (per seed) pairs -> fine-tunes -> samples
-> DigitEval scores. Every stage writes ``DONE.json`` (atomically) when it finishes and is
skipped on the next run; a stage found half-written is deleted and redone.

The project's own commands do the work, run as subprocesses with their command lines:
``bench/make_pairs.py``, ``bench/train_t2i.py`` and ``bench/sample.py``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.t2i.outdir import LOCK_FILE, holds_lock, run_lock

from . import model, scenes, scorer
from .util import command, done, mark_done, read_marker, run_command, write_json

METHODS = ("sft", "dpo", "dspo", "dspo_cpp", "ddspo")
SD_PRETRAIN_LR = 1e-4  # SD-1.x pre-training learning rate, the reference of the lr rule
# the trainer's own default lr per method (bench/train_t2i.py: beta / 2.048e8, sft 1e-5)
TRAINER_DEFAULT_LR = {
    "sft": 1e-5,
    "dpo": 8000 / 2.048e8,
    "dspo": 8000 / 2.048e8,
    "dspo_cpp": 16000 / 2.048e8,
    "ddspo": 16000 / 2.048e8,
}


@dataclass(frozen=True)
class RunConfig:
    """One benchmark run. ``full`` and ``smoke`` are the two presets (see ``preset``)."""

    base: model.BaseConfig = field(default_factory=model.BaseConfig)
    pair_prompts: int = 512  # preference-pair prompts per seed
    sample_steps: int = 10  # DDIM steps for pairs and evaluation samples
    guidance: float = 7.5  # CFG scale: SD-1.x's default in the paper and the project
    train_steps: int = 64  # optimizer steps per fine-tune
    train_batch: int = 16  # pairs per step
    eval_per_kind: int = 40  # evaluation prompts per category
    scorer_iters: int = 300  # MLP epochs of the DigitEval classifier
    lr_scale: float = 0.0  # fine-tune lr = trainer default x this; 0 = base_lr / SD's 1e-4
    methods: tuple[str, ...] = METHODS
    seed_offset_pairs: int = 10_000  # pair-prompt / make_pairs seed = offset + seed
    seed_offset_eval: int = 20_000  # sample.py seed = offset + seed

    def lr(self, method: str) -> float:
        """The fixed rule: the trainer's default lr for ``method`` (the paper's
        beta / 2.048e8, sft 1e-5) times base_lr / SD_PRETRAIN_LR, i.e. the paper's ratio of
        fine-tune lr to pre-training lr, carried over to this base model."""
        scale = self.lr_scale or self.base.unet_lr / SD_PRETRAIN_LR
        return TRAINER_DEFAULT_LR[method] * scale


def preset(name: str) -> RunConfig:
    """``full``: the benchmark; ``smoke``: the same pipeline with a few steps (tests)."""
    if name == "full":
        return RunConfig()
    if name == "smoke":
        return RunConfig(
            base=model.BaseConfig(
                n_scenes=256, vae_steps=4, unet_steps=4, batch_size=16, refine_steps=2
            ),
            pair_prompts=4,
            sample_steps=2,
            train_steps=1,
            train_batch=2,
            eval_per_kind=2,
            scorer_iters=15,
            methods=("dpo", "ddspo"),
        )
    raise ValueError(f"unknown preset {name!r} (full | smoke)")


class Runner:
    """Runs the stages of ``cfg`` for the given seeds under ``out`` (resumable)."""

    def __init__(self, cfg: RunConfig, out: Path, cache: Path, progress: bool = True):
        self.cfg, self.out, self.cache, self.progress = cfg, Path(out), Path(cache), progress
        self.digits = scenes.load_digits_split()
        self.eval_prompts = scenes.eval_prompts(cfg.eval_per_kind)

    # ------------------------------------------------------------------ shared stages
    def stage(self, path: Path, fn, desc: str) -> dict:
        """Run ``fn(path) -> info`` unless ``path`` is done; the marker holds info + time.

        A stage outside ``--out`` (in a shared ``--cache``) is locked only while it is
        written, so experiments sharing a cache run at once; one that finds the stage being
        written by another stops with an :class:`OutputError` naming it."""
        if done(path):
            return read_marker(path)
        with contextlib.ExitStack() as held:
            if not holds_lock(path):
                held.enter_context(run_lock(path, "--cache"))
                if done(path):  # finished by another experiment just now
                    return read_marker(path)
            for old in path.iterdir() if path.exists() else ():  # half-written: start over
                if old.name != LOCK_FILE:
                    shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
            path.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            info = fn(path) or {}
            info["seconds"] = round(time.perf_counter() - t0, 1)
            info["stage"] = desc
            mark_done(path, info)
        return info

    def scorer_stage(self) -> dict:
        def fit(path: Path) -> dict:
            sc = scorer.train_scorer(self.digits, max_iter=self.cfg.scorer_iters)
            scorer.save_scorer(sc, path)
            return {"test_accuracy": sc.test_accuracy}

        return self.stage(self.scorer_dir, fit, "scorer")

    @property
    def scorer_dir(self) -> Path:
        # v2: arrays + JSON; a cached folder of the pickled format before it is never read
        return self.cache / f"scorer-v2-{self.cfg.scorer_iters}"

    def base_stage(self) -> dict:
        key = self.cfg.base.key()

        def build(path: Path) -> dict:
            pipe = model.cached_base(self.cfg.base, self.digits, self.cache, self.progress)
            stats = json.loads((pipe.parent / "stats.json").read_text())
            return {"pipeline": str(pipe), "key": key, **stats}

        info = self.stage(self.cache / f"base-{key}-stage", build, "base")
        return info

    # ------------------------------------------------------------------ per-seed stages
    def pairs_stage(self, sdir: Path, pipe: str, seed: int) -> dict:
        def make(path: Path) -> dict:
            rng = np.random.default_rng(self.cfg.seed_offset_pairs + seed)
            ps = scenes.sample_train_prompts(self.cfg.pair_prompts, rng)
            (path / "prompts.txt").write_text("".join(p.text() + "\n" for p in ps))
            cmd = command(
                "make_pairs.py",
                "--pretrained", pipe, "--prompts", path / "prompts.txt", "--out", path / "data",
                "--variant", "paired", "--perturb", "random_removal",
                "--steps", self.cfg.sample_steps, "--guidance", self.cfg.guidance,
                "--seed", self.cfg.seed_offset_pairs + seed, "--batch-size", 64, "--no-progress",
            )  # fmt: skip
            return {"command_seconds": run_command(cmd, path / "log.txt")}

        return self.stage(sdir / "pairs", make, "pairs")

    def train_stage(self, sdir: Path, pipe: str, seed: int, method: str) -> dict:
        def train(path: Path) -> dict:
            c = self.cfg
            cmd = command(
                "train_t2i.py",
                "--pretrained", pipe, "--data", sdir / "pairs" / "data", "--method", method,
                "--out", path / "run", "--seed", seed, "--max-steps", c.train_steps,
                "--batch-size", c.train_batch, "--lr", f"{c.lr(method):.6g}",
                "--warmup-steps", c.train_steps, "--warmup-from", 1, "--no-progress",
            )  # fmt: skip
            return {"lr": c.lr(method), "command_seconds": run_command(cmd, path / "log.txt")}

        return self.stage(sdir / "train" / method, train, f"train {method}")

    def sample_stage(self, sdir: Path, pipe: str, seed: int) -> dict:
        def sample(path: Path) -> dict:
            (path / "eval_prompts.txt").write_text(
                "".join(p.text() + "\n" for p in self.eval_prompts)
            )
            ckpts = []
            for m in self.cfg.methods:
                ckpts += ["--checkpoint", f"{m}={sdir / 'train' / m / 'run' / 'final'}"]
            cmd = command(
                "sample.py", "--pretrained", pipe, "--prompts", path / "eval_prompts.txt",
                *ckpts, "--out", path / "images", "--steps", self.cfg.sample_steps,
                "--guidance", self.cfg.guidance, "--seed", self.cfg.seed_offset_eval + seed,
                "--batch-size", 64, "--no-progress",
            )  # fmt: skip
            return {"command_seconds": run_command(cmd, path / "log.txt")}

        return self.stage(sdir / "samples", sample, "sample")

    def score_stage(self, sdir: Path, seed: int) -> dict:
        def score(path: Path) -> dict:
            sc = scorer.load_scorer(self.scorer_dir)
            n, d, ps = len(self.eval_prompts), self.digits, self.eval_prompts
            rng = np.random.default_rng(self.cfg.seed_offset_eval + seed)
            ref = scenes.make_scenes(ps, d.test_x, d.test_y, rng)  # FID reference
            real = scenes.make_scenes(ps, d.test_x, d.test_y, rng)  # a second real draw
            res = {"real": scorer.score_images(sc, ps, real, ref)}
            for m in ("base", *self.cfg.methods):
                imgs = scorer.load_images(sdir / "samples" / "images" / m, n)
                res[m] = scorer.score_images(sc, self.eval_prompts, imgs, ref)
            write_json(path / "scores.json", res)
            return {}

        return self.stage(sdir / "scores", score, "score")

    # ------------------------------------------------------------------ driver
    def run(self, seeds: list[int]) -> dict:
        """All stages; returns the timing/info of each (for the report)."""
        steps = 2 + len(seeds) * (3 + len(self.cfg.methods))
        bar = tqdm(total=steps, desc="digits", disable=not self.progress, unit="stage")
        info: dict = {"scorer": self._tick(bar, "scorer", self.scorer_stage)}
        info["base"] = self._tick(bar, "base model", self.base_stage)
        pipe = info["base"]["pipeline"]
        for s in seeds:
            sdir = self.out / f"seed-{s}"
            info[f"seed-{s}"] = si = {"pairs": self._tick(bar, f"seed {s}: pairs",
                                                          self.pairs_stage, sdir, pipe, s)}  # fmt: skip
            for m in self.cfg.methods:
                si[m] = self._tick(bar, f"seed {s}: {m}", self.train_stage, sdir, pipe, s, m)
            si["sample"] = self._tick(bar, f"seed {s}: sample", self.sample_stage, sdir, pipe, s)
            si["score"] = self._tick(bar, f"seed {s}: score", self.score_stage, sdir, s)
        bar.close()
        return info

    @staticmethod
    def _tick(bar, desc: str, fn, *args) -> dict:
        bar.set_postfix_str(desc)
        out = fn(*args)
        bar.update(1)
        return out


def config_dict(cfg: RunConfig) -> dict:
    """A JSON-able view of ``cfg`` with each method's learning rate."""
    d = asdict(cfg)
    d["lr"] = {m: cfg.lr(m) for m in cfg.methods}
    return d


def check_out_config(cfg: RunConfig, out: Path) -> None:
    """Record ``cfg`` in ``OUT/config.json``; ValueError if OUT holds another config's run
    (its stages would be reused silently). The method list may grow or shrink."""
    mine = json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k != "methods"}))
    path = Path(out) / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in mine.keys() | old.keys() if mine.get(k) != old.get(k))
        if diff:
            raise ValueError(f"{out} holds a run with another config ({', '.join(diff)})")
        return
    write_json(path, mine)


def with_methods(cfg: RunConfig, methods: list[str]) -> RunConfig:
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)} (choose from {', '.join(METHODS)})")
    return replace(cfg, methods=tuple(methods))
