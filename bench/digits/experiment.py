"""The experiment driver. Stages, each resumable (``DONE.json``, written atomically, when it
finishes; a stage found half-written is deleted and redone):

1. ``scorer``, ``base``: DigitEval and the base pipeline (cached by config, under ``--cache``).
2. ``guidance``: the base sampled on the dev prompts and dev seeds at every guidance scale of
   the config; the best (highest dev accuracy) is THE guidance of every later stage.
3. ``pairs``: Rand-removal pairs from the base (``bench/make_pairs.py``), one pass of the
   fine-tuning budget (steps x pairs per step prompts from the training pool), stored in
   float32; ``quality``: DigitEval on every winner and loser (:mod:`.pairsets`); the two
   control sets (``ranked``: pairs ranked by DigitEval; ``real``: real scenes).
4. ``grid``: every method at every setting of its grid (same size for each method), trained
   with the dev training seed and sampled on the dev prompts and dev seeds; the selection
   rule (:func:`select`) picks one setting per method. No evaluation prompt or seed is used.
5. per evaluation seed: every method at its selected setting and the two controls, trained
   with that seed, sampled on the evaluation prompts with that seed, scored.

The project's own commands do the work, run as subprocesses with their command lines:
``bench/make_pairs.py``, ``bench/train_t2i.py`` and ``bench/sample.py``; ``--jobs`` runs that
many fine-tunes at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.t2i.config import DSPO_BETA, TrainConfig, resolve_for_backbone
from bench.t2i.errors import UsageError
from bench.t2i.outdir import LOCK_FILE, holds_lock, run_lock
from minddspo.methods import METHODS as CORE_METHODS

from . import model, pairsets, scenes, scorer
from .util import command, done, mark_done, read_marker, run_command, write_json

METHODS = CORE_METHODS  # sft, dpo, dspo, dspo_cpp, ddspo: the method table's order
CONTROLS = ("dpo_ranked", "sft_real")  # D-DPO on DigitEval-ranked pairs; SFT on real scenes
SD_PRETRAIN_LR = 1e-4  # SD-1.x pre-training learning rate, the reference of the lr rule
PAPER_PAIRS = 2048  # pairs per step of the paper's runs, for which its lr rule is stated
# the paper-default beta of each method and the second beta of its grid; dspo/dspo_cpp vary
# the OUTSIDE beta instead (0.001, the official default, makes them numerically SFT at the
# same lr: see the README)
GRID_BETAS = {
    "dpo": (8000.0, 2000.0),
    "ddspo": (16000.0, 4000.0),
    "dspo": (0.01, 0.05),
    "dspo_cpp": (0.01, 0.05),
}


@dataclass(frozen=True)
class RunConfig:
    """One benchmark run. ``full``, ``quick`` and ``smoke`` are the presets (``preset``)."""

    base: model.BaseConfig = field(default_factory=model.BaseConfig)
    train_steps: int = 100  # optimizer steps per fine-tune (the paper: 100)
    pairs_per_step: int = 64  # the paper: 2048; the pair set is one pass: steps x this
    sample_steps: int = 10  # DDIM steps for pairs and samples
    guidances: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0, 7.5)  # the base's guidance search
    eval_per_kind: int = 40  # evaluation prompts per category
    dev_per_kind: int = 40  # dev prompts per category (disjoint from the evaluation ones)
    dev_seeds: tuple[int, ...] = (100, 101)  # sampling seeds of the dev stages
    lr_mults: tuple[float, ...] = (0.25, 1.0, 4.0)  # the grid's lr factors on the rule's lr
    scorer_iters: int = 300  # MLP epochs of the DigitEval classifier
    methods: tuple[str, ...] = METHODS
    controls: tuple[str, ...] = CONTROLS
    data_seed: int = 1000  # pair prompts and make_pairs; dev fine-tunes train with this seed
    seed_offset_eval: int = 20_000  # sample.py seed = offset + evaluation seed
    blank_slack: float = 0.05  # the selection rule: blanks at most base + this

    @property
    def pair_prompts(self) -> int:
        return self.train_steps * self.pairs_per_step

    def rule_lr(self, method: str) -> float:
        """The paper's lr rule carried to this run: beta / 2.048e8 at 2048 pairs per step
        (SFT: 1e-5), scaled linearly to ``pairs_per_step`` and by base lr / SD-1.x's 1e-4
        (the paper's ratio of fine-tune to pre-training lr, for a base pre-trained at
        another lr)."""
        paper = resolve_for_backbone(TrainConfig(method=method), "sd").lr  # the trainer's
        return paper * self.pairs_per_step / PAPER_PAIRS * self.base.unet_lr / SD_PRETRAIN_LR

    def rule_setting(self, method: str) -> dict:
        """The untuned setting: the rule's lr and the paper's beta."""
        beta = None if method == "sft" else GRID_BETAS[method][0]
        return {"name": _setting_name(1.0, beta), "lr": self.rule_lr(method), "beta": beta}

    def grid(self, method: str) -> list[dict]:
        """The settings tried for ``method``: lr factor x beta (SFT: lr factor only)."""
        betas = GRID_BETAS.get(method, (None,))
        return [
            {"name": _setting_name(m, b), "lr": self.rule_lr(method) * m, "beta": b}
            for b in betas
            for m in self.lr_mults
        ]


def _setting_name(mult: float, beta: float | None) -> str:
    return f"lr{mult:g}" + ("" if beta is None else f"-beta{beta:g}")


def preset(name: str) -> RunConfig:
    """``full``: the benchmark; ``quick``: the same with one guidance and a smaller grid
    (pair with ``--seeds 1``); ``smoke``: the whole pipeline in seconds (tests)."""
    if name == "full":
        return RunConfig()
    if name == "quick":
        return RunConfig(guidances=(3.0,), dev_seeds=(100,), lr_mults=(1.0,))
    if name == "smoke":
        return RunConfig(
            base=model.BaseConfig(n_scenes=256, vae_steps=4, unet_steps=6, batch_size=16),
            train_steps=2,
            pairs_per_step=4,
            sample_steps=2,
            guidances=(2.0, 5.0),
            eval_per_kind=2,
            dev_per_kind=2,
            dev_seeds=(100,),
            lr_mults=(1.0,),
            scorer_iters=15,
            methods=("dpo", "ddspo"),
            controls=("sft_real",),  # a random base rarely has a right sample to rank
        )
    raise UsageError(f"unknown preset {name!r} (full | quick | smoke)")


def select(rows: list[dict], base_blank: float, slack: float) -> dict:
    """The selection rule, fixed before any run: among the settings whose dev blank share is
    at most ``base_blank + slack``, the highest mean dev accuracy; ties go to the earlier
    setting of the grid. If none qualifies, the highest accuracy (flagged)."""
    ok = [r for r in rows if r["blank"] <= base_blank + slack + 1e-12]
    pool = ok or rows
    best = max(pool, key=lambda r: (r["overall"], -rows.index(r)))
    return {**best, "qualified": bool(ok)}


class Runner:
    """Runs the stages of ``cfg`` for the given seeds under ``out`` (resumable)."""

    bar = None  # the run's progress bar, while ``run`` runs

    def __init__(
        self, cfg: RunConfig, out: Path, cache: Path, progress=True, jobs=1, train_base=False,
        threads=1,
    ):  # fmt: skip
        self.cfg, self.out, self.cache, self.progress = cfg, Path(out), Path(cache), progress
        self.jobs, self.train_base = jobs, train_base
        self.serial_threads = threads * jobs  # a stage that runs alone uses every core
        self.digits = scenes.load_digits_split()
        self.eval_prompts = scenes.eval_prompts(cfg.eval_per_kind)
        self.dev_prompts = scenes.eval_prompts(cfg.dev_per_kind, dev=True)

    # ------------------------------------------------------------------ plumbing
    def stage(self, path: Path, fn, desc: str) -> dict:
        """Run ``fn(path) -> info`` unless ``path`` is done; the marker holds info + time.

        A stage outside ``--out`` (in a shared ``--cache``) is locked only while it is
        written, so experiments sharing a cache run at once; one that finds the stage being
        written by another stops with an :class:`OutputError` naming it."""
        if done(path):
            info = read_marker(path)
        else:
            with contextlib.ExitStack() as held:
                if not holds_lock(path):
                    held.enter_context(run_lock(path, "--cache"))
                    if done(path):  # finished by another experiment just now
                        return read_marker(path)
                for old in path.iterdir() if path.exists() else ():  # half-written: start over
                    if old.name != LOCK_FILE:
                        shutil.rmtree(
                            old
                        ) if old.is_dir() and not old.is_symlink() else old.unlink()
                path.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                info = fn(path) or {}
                info["seconds"] = round(time.perf_counter() - t0, 1)
                info["stage"] = desc
                mark_done(path, info)
        self._tick(desc)
        return info

    def _tick(self, desc: str) -> None:
        """One stage done, on the run's progress bar."""
        if self.bar is not None:
            self.bar.set_postfix_str(desc)
            self.bar.update(1)

    def parallel(self, thunks: list) -> list:
        """Run the stage thunks ``jobs`` at a time (fine-tunes are separate processes)."""
        if self.jobs == 1:
            return [t() for t in thunks]
        with ThreadPoolExecutor(self.jobs) as pool:
            return list(pool.map(lambda t: t(), thunks))

    @property
    def scorer_dir(self) -> Path:
        # v3: background-normalised, ink-augmented; arrays + JSON (older folders never read)
        return self.cache / f"scorer-v3-{self.cfg.scorer_iters}"

    def sample(self, path: Path, prompts, pipe, ckpts: dict, seed, g, alone=True) -> float:
        """``bench/sample.py`` of the base and ``ckpts`` ({name: folder}) into path/images
        (``alone``: no other stage runs meanwhile, so it takes every core)."""
        (path / "prompts.txt").write_text("".join(p.text() + "\n" for p in prompts))
        args = [a for n, c in ckpts.items() for a in ("--checkpoint", f"{n}={c}")]
        cmd = command(
            "sample.py", "--pretrained", pipe, "--prompts", path / "prompts.txt", *args,
            "--out", path / "images", "--steps", self.cfg.sample_steps, "--guidance", g,
            "--seed", seed, "--batch-size", 64, "--no-progress",
        )  # fmt: skip
        return run_command(cmd, path / "log.txt", self.serial_threads if alone else None)

    def score(self, folder: Path, prompts, models: list[str], seed: int) -> dict:
        """DigitEval of each model's images in ``folder`` (and of real scenes)."""
        sc = scorer.load_scorer(self.scorer_dir)
        d = self.digits
        rng = np.random.default_rng(seed)
        ref = scenes.make_scenes(prompts, d.test_x, d.test_y, rng)  # FID reference
        real = scenes.make_scenes(prompts, d.test_x, d.test_y, rng)  # a second real draw
        res = {"real": scorer.score_images(sc, prompts, real, ref)}
        for m in models:
            imgs = scorer.load_images(folder / m, len(prompts))
            res[m] = scorer.score_images(sc, prompts, imgs, ref)
        return res

    def train(self, path: Path, pipe: str, data: Path, method: str, s: dict, seed: int):
        """One fine-tune (``bench/train_t2i.py``) at setting ``s`` into path/run."""
        c = self.cfg
        beta = [] if s["beta"] is None else ["--beta", f"{s['beta']:g}"]
        cmd = command(
            "train_t2i.py", "--pretrained", pipe, "--data", data, "--method", method,
            "--out", path / "run", "--seed", seed, "--max-steps", c.train_steps,
            "--batch-size", c.pairs_per_step, "--lr", f"{s['lr']:.6g}", *beta,
            "--warmup-steps", c.train_steps, "--warmup-from", 1, "--no-progress",
        )  # fmt: skip
        return {**s, "command_seconds": run_command(cmd, path / "log.txt")}

    # ------------------------------------------------------------------ stages
    def scorer_stage(self) -> dict:
        def fit(path: Path) -> dict:
            sc = scorer.train_scorer(self.digits, max_iter=self.cfg.scorer_iters)
            scorer.save_scorer(sc, path)
            return {"test_accuracy": sc.test_accuracy}

        return self.stage(self.scorer_dir, fit, "scorer")

    def base_stage(self) -> dict:
        key = self.cfg.base.key()
        shipped = None if self.train_base else model.shipped_base(self.cfg.base)
        if shipped is not None:
            self._tick("base (shipped)")
            return {"pipeline": str(shipped[0]), "key": key, "shipped": True, **shipped[1]}

        def build(path: Path) -> dict:
            pipe = model.cached_base(self.cfg.base, self.digits, self.cache, self.progress)
            stats = json.loads((pipe.parent / "stats.json").read_text())
            return {"pipeline": str(pipe), "key": key, **stats}

        return self.stage(self.cache / f"base-{key}-stage", build, "base")

    def guidance_stage(self, pipe: str) -> dict:
        def search(path: Path) -> dict:
            rows = []
            for g in self.cfg.guidances:
                per_seed = []
                for s in self.cfg.dev_seeds:
                    sub = path / f"g{g:g}-seed{s}"
                    sub.mkdir()
                    self.sample(sub, self.dev_prompts, pipe, {}, s, g)
                    per_seed.append(self.score(sub / "images", self.dev_prompts, ["base"], s))
                rows.append(_dev_row({"guidance": g}, [r["base"] for r in per_seed]))
            best = max(rows, key=lambda r: (r["overall"], -rows.index(r)))
            return {"rows": rows, "guidance": best["guidance"], "base_blank": best["blank"]}

        return self.stage(self.out / "guidance", search, "guidance")

    def pairs_stage(self, pipe: str, g: float) -> dict:
        c = self.cfg

        def make(path: Path) -> dict:
            (path / "prompts.txt").write_text("".join(p.text() + "\n" for p in self.pair_prompts))
            cmd = command(
                "make_pairs.py",
                "--pretrained", pipe, "--prompts", path / "prompts.txt", "--out", path / "data",
                "--variant", "paired", "--perturb", "random_removal", "--steps", c.sample_steps,
                "--guidance", g, "--seed", c.data_seed, "--batch-size", 64,
                "--latent-dtype", "fp32", "--no-progress",
            )  # fmt: skip
            return {"command_seconds": run_command(cmd, path / "log.txt", self.serial_threads)}

        return self.stage(self.out / "pairs", make, "pairs")

    @functools.cached_property
    def pair_prompts(self) -> list[scenes.Prompt]:
        rng = np.random.default_rng(self.cfg.data_seed)
        return scenes.sample_train_prompts(self.cfg.pair_prompts, rng)

    def sets_stage(self, pipe: str, g: float) -> dict:
        """Pair quality of the Rand-removal set, and the two control sets."""
        from bench.t2i.models import open_backbone

        c = self.cfg

        def build(path: Path) -> dict:
            import torch

            torch.set_num_threads(self.serial_threads)
            sc = scorer.load_scorer(self.scorer_dir)
            bb = open_backbone(pipe)
            by_text = {p.text(): p for p in self.pair_prompts}
            data = self.out / "pairs" / "data"
            quality = pairsets.pair_quality(sc, bb, data, by_text)
            ranked = {}
            if "dpo_ranked" in self.cfg.controls:
                ranked = pairsets.ranked_pairs(
                    sc, bb, data, by_text, path / "ranked", steps=self.cfg.sample_steps,
                    guidance=g, seed=self.cfg.data_seed + 1,
                )  # fmt: skip
                ranked["quality"] = pairsets.pair_quality(sc, bb, path / "ranked", by_text)
            real = pairsets.real_scene_pairs(
                bb, data, by_text, self.digits, path / "real", self.cfg.data_seed + 2
            )
            stats = pairsets.latent_statistics(bb, data, path / "real")
            n = min(256, len(self.pair_prompts))
            settings = sorted({(1.0, c.sample_steps), (g, c.sample_steps), (7.5, c.sample_steps),
                               (g, 5 * c.sample_steps)})  # fmt: skip
            stats["by_setting"] = pairsets.sampling_statistics(
                sc, bb, self.pair_prompts[:n], settings, c.data_seed + 3
            )
            return {"quality": quality, "ranked": ranked, "real": real, "latents": stats}

        return self.stage(self.out / "sets", build, "pair quality and control sets")

    def grid_stage(self, pipe: str, g: float, base_blank: float) -> dict:
        c = self.cfg
        data = self.out / "pairs" / "data"
        thunks, where = [], []
        for m in c.methods:
            for s in c.grid(m):
                path = self.out / "grid" / m / s["name"]
                where.append((m, s, path))
                thunks.append(
                    lambda m=m, s=s, path=path: self.stage(
                        path,
                        lambda p: self._dev_run(p, pipe, data, m, s, g),
                        f"grid {m} {s['name']}",
                    )
                )
        results = self.parallel(thunks)
        grid: dict = {m: [] for m in c.methods}
        for (m, _, _), r in zip(where, results, strict=True):
            grid[m].append(r)
        chosen = {m: select(rows, base_blank, c.blank_slack) for m, rows in grid.items()}
        return {"grid": grid, "chosen": chosen}

    def _dev_run(self, path: Path, pipe, data, method, s, g) -> dict:
        info = self.train(path, pipe, data, method, s, self.cfg.data_seed)
        per_seed = []
        for seed in self.cfg.dev_seeds:
            sub = path / f"dev-seed{seed}"
            sub.mkdir()
            ckpt = {method: path / "run" / "final"}
            self.sample(sub, self.dev_prompts, pipe, ckpt, seed, g, alone=self.jobs == 1)
            per_seed.append(self.score(sub / "images", self.dev_prompts, [method], seed)[method])
            shutil.rmtree(sub / "images" / "base")  # the guidance stage has the base's
        return _dev_row(info, per_seed)

    def eval_seed(self, seed: int, pipe: str, g: float, chosen: dict) -> dict:
        sdir = self.out / f"seed-{seed}"
        data = {
            **{m: self.out / "pairs" / "data" for m in self.cfg.methods},
            "dpo_ranked": self.out / "sets" / "ranked",
            "sft_real": self.out / "sets" / "real",
        }
        runs = {m: chosen[m] for m in self.cfg.methods}
        runs["dpo_ranked"] = chosen.get("dpo") or self.cfg.rule_setting("dpo")
        runs["sft_real"] = chosen.get("sft") or self.cfg.rule_setting("sft")
        trainer = {"dpo_ranked": "dpo", "sft_real": "sft"}
        names = [*self.cfg.methods, *self.cfg.controls]
        thunks = [
            lambda n=n: self.stage(
                sdir / "train" / n,
                lambda p: self.train(p, pipe, data[n], trainer.get(n, n), _setting(runs[n]), seed),
                f"seed {seed}: {n}",
            )
            for n in names
        ]
        trained = dict(zip(names, self.parallel(thunks), strict=True))

        def sample_and_score(path: Path) -> dict:
            ckpts = {n: sdir / "train" / n / "run" / "final" for n in names}
            s = self.cfg.seed_offset_eval + seed
            self.sample(path, self.eval_prompts, pipe, ckpts, s, g)
            write_json(path / "scores.json", self.score(path / "images", self.eval_prompts,
                                                          ["base", *names], s))  # fmt: skip
            return {}

        scored = self.stage(sdir / "samples", sample_and_score, f"seed {seed}: sample, score")
        return {"train": trained, "samples": scored}

    # ------------------------------------------------------------------ driver
    def stage_count(self, n_seeds: int) -> int:
        grid = sum(len(self.cfg.grid(m)) for m in self.cfg.methods)
        per_seed = len(self.cfg.methods) + len(self.cfg.controls) + 1
        return 6 + grid + n_seeds * per_seed

    def run(self, seeds: list[int]) -> dict:
        """All stages; returns the info of each (for the report)."""
        self.bar = tqdm(total=self.stage_count(len(seeds)), desc="digits", unit="stage",
                        disable=not self.progress)  # fmt: skip
        try:
            info: dict = {"scorer": self.scorer_stage(), "base": self.base_stage()}
            pipe = info["base"]["pipeline"]
            info["guidance"] = gs = self.guidance_stage(pipe)
            g = gs["guidance"]
            info["pairs"] = self.pairs_stage(pipe, g)
            info["sets"] = self.sets_stage(pipe, g)
            info["tuning"] = tune = self.stage(
                self.out / "selection",
                lambda p: self.grid_stage(pipe, g, gs["base_blank"]),
                "selection",
            )
            for s in seeds:
                info[f"seed-{s}"] = self.eval_seed(s, pipe, g, tune["chosen"])
        finally:
            self.bar.close()
            self.bar = None
        return info


def _setting(row: dict) -> dict:
    return {k: row[k] for k in ("name", "lr", "beta")}


def _dev_row(info: dict, per_seed: list[dict]) -> dict:
    """A dev result: ``info`` plus accuracy, per-kind accuracy and blanks, averaged over the
    dev seeds."""
    keys = ("overall", "blank", "details", "fid")
    row = {**info, **{k: float(np.mean([r[k] for r in per_seed])) for k in keys}}
    row["per_kind"] = {
        k: float(np.mean([r["per_kind"][k] for r in per_seed])) for k in per_seed[0]["per_kind"]
    }
    return row


def config_dict(cfg: RunConfig) -> dict:
    """A JSON-able view of ``cfg`` with each method's rule lr and grid."""
    d = asdict(cfg)
    d["rule_lr"] = {m: cfg.rule_lr(m) for m in cfg.methods}
    d["grid"] = {m: cfg.grid(m) for m in cfg.methods}
    d["dspo_official_outside_beta"] = DSPO_BETA
    return d


def check_out_config(cfg: RunConfig, out: Path) -> None:
    """Record ``cfg`` in ``OUT/config.json``; UsageError if OUT holds another config's run
    (its stages would be reused silently)."""
    mine = json.loads(json.dumps(asdict(cfg)))
    path = Path(out) / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in mine.keys() | old.keys() if mine.get(k) != old.get(k))
        if diff:
            raise UsageError(f"{out} holds a run with another config ({', '.join(diff)})")
        return
    write_json(path, mine)


def with_methods(cfg: RunConfig, methods: list[str]) -> RunConfig:
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UsageError(f"unknown method(s) {', '.join(bad)} (choose from {', '.join(METHODS)})")
    return replace(cfg, methods=tuple(methods))
