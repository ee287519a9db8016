"""Training configuration: one dataclass, ``--flags`` from its fields, ``--config file.json``.

Precedence: dataclass defaults < ``--config`` JSON < command-line flags. :func:`resolve`
validates every value (numbers finite and in range) and fills the method- and
backbone-dependent defaults (beta, lr, timestep sampler) so that the ``config.json`` written
into the run directory says exactly what ran. :func:`resume_mismatches` compares a config
with the one saved in a checkpoint: only the fields in :data:`RESUME_MAY_CHANGE` may differ.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import textwrap
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from bench.t2i.backbones import BACKBONES, FLOW_BACKBONES, SANA_PROMPT_STYLES
from bench.t2i.cli import (
    DTYPES,
    TINY_HELP,
    UsageError,
    check_at_least,
    dtype_name,
    flag,
    opt,
    parse,
    tiny_name,
)
from bench.t2i.outdir import write_text_atomic
from bench.t2i.randcond import RAND_COND_SCHEDULES
from minddspo.methods import CPP_METHODS, METHODS, SCORE_MATCHING_METHODS, method_spec
from minddspo.refupdate import REF_UPDATES
from minddspo.timesteps import SAMPLERS, WEIGHTS

OPTIMIZERS = ("adamw", "adafactor")
DEVICES = ("auto", "cpu", "cuda")
SHARDS = ("ddp", "fsdp")  # --shard: a whole policy per rank, or FSDP2 shards
SHARD_REFERENCES = ("whole", "shard")  # --shard-reference: the full fine-tune's frozen copy
RAND_COND_KEPT = ("contrastive", "forward")  # targets of the rows --rand-cond-prompts keeps
RAND_COND_TIMINGS = ("step", "independent")  # which t decides a row's swap
#: sft: which side of each pair is regressed; pair: both, by two LoRA adapters in one run
SFT_BRANCHES = ("winner", "loser", "loser_neg", "pair")
LR_PER_BETA = 1 / 2.048e8  # DDSPO App. E, after Diffusion-DPO: lr = beta / 2.048e8
DPO_BETA = 8000.0  # Diffusion-DPO default (DDSPO App. E)
PAIR_BETA = 8000.0  # ddspo with a DD-CPP policy pair (official scripts/train_ddspo_lora_target.sh)
DSPO_BETA = 0.001  # official DSPO SD-1.5 runs (outside beta; searched over 0.001, 0.01, 0.05)


#: fields that may differ between a checkpoint and the run resuming it: none changes what is
#: trained (``batch_size``/``grad_accum``: see :data:`RESUME_BATCH`)
RESUME_MAY_CHANGE = (
    "out",
    "resume",
    "max_steps",
    "ckpt_every",
    "keep_last",
    "log_every",
    "max_nonfinite",
    "progress",
    "debug_nan_steps",
    "device",
    "gradient_checkpointing",
    "validation_prompts",  # validation and the TensorBoard sink only observe the training
    "validation_every",
    "validation_steps",
    "validation_seed",
    "tensorboard",
    "shard_reference",  # where the reference's weights live; its values are the same
)
#: may change on resume as long as batch_size x grad_accum x ranks (the pairs per optimizer
#: step) stays: every step then reads the same pairs (bench/t2i/data.py)
RESUME_BATCH = ("batch_size", "grad_accum")
_PATH_FIELDS = ("data", "pretrained", "winner_policy", "loser_policy")  # compared as real paths
#: what a field added since meant for a checkpoint saved before it existed (the old behaviour);
#: on resume a field left at its default takes this value from such a checkpoint
#: (:func:`adopt_saved_defaults`), so the old run continues exactly
_LEGACY_MISSING = {
    "precondition_outputs": False,
    "train_shift": None,  # the scheduler's own shift (SANA's flow_shift)
    "max_grad_norm": 1.0,  # clipped under every optimizer, Adafactor too
    "rand_cond_kept": "forward",
    "rand_cond_timing": "step",
    "warmup_from": 1,
    "dropped_prompt_encoding": "zeros",
}
#: fields that change nothing while their condition on the config is false (not compared then)
_ONLY_WHEN = {
    "rand_cond_kept": lambda c: bool(c.rand_cond_prompts),
    "rand_cond_timing": lambda c: bool(c.rand_cond_prompts),
    "warmup_from": lambda c: bool(c.warmup_steps),
    "dropped_prompt_encoding": lambda c: c.proportion_empty_prompts > 0 and c.backbone == "sdxl",
}
FLOAT32_MAX = 3.4028234663852886e38  # a larger lr overflows the optimizer's float32 math
#: allowed ranges of the float fields (all must also be finite)
_RANGES = {
    "beta": (lambda v: v > 0, "> 0"),
    "beta_logit": (lambda v: v > 0, "> 0"),
    "lr": (lambda v: v > 0, "> 0"),
    "lora_alpha": (lambda v: v > 0, "> 0"),
    "timestep_gamma": (lambda v: v > 0, "> 0"),
    "ref_delta": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_eps": (lambda v: v > 0, "> 0"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0 = no clipping)"),
    "train_shift": (lambda v: v > 0, "> 0"),
    "rand_cond_lambda": (lambda v: v > 0, "> 0"),
    "flux_guidance": (lambda v: v >= 0, ">= 0 (unset: 3.5)"),
}


@dataclass
class ModelOptions:
    """Options of the model group (``--help`` section below)."""

    help_section = "model: the backbone, where its weights come from, LoRA"

    # after resolve(): True/False, with the tiny backbone's name in `backbone` (config.json)
    tiny: str | bool | None = opt(
        False, TINY_HELP + ", or --backbone's", choices=BACKBONES, nargs="?", const=True
    )
    backbone: str | None = opt(
        None,
        " | ".join(BACKBONES) + "; unset: auto-detected with --pretrained (with --tiny, the "
        "same as --tiny NAME)",
    )
    pretrained: str | None = opt(
        None,
        "local diffusers pipeline dir (model_index.json + subfolders)",
    )
    prediction_type: str | None = opt(
        None,
        "override the scheduler's: epsilon | v_prediction (unset: as saved)",
    )
    sana_prompt_style: str = opt(
        "official",
        "sana: official = the pipeline's text preprocessing + complex-human-instruction prefix (SanaPipeline.encode_prompt), as the official DDSPO SANA trainer | plain = the raw prompt",
    )
    flux_guidance: float | None = opt(
        None,
        "flux: the guidance-embedding value of every policy and reference forward, c- rows included (FLUX.1-dev is guidance-distilled); unset: 3.5, FluxPipeline's default",
    )
    lora: int = opt(0, "LoRA rank on the denoiser's attention projections; 0 = full fine-tune")
    lora_alpha: float | None = opt(None, "LoRA alpha; unset: same as the rank")
    lora_targets: str | None = opt(
        None,
        "comma-separated module names LoRA adapts; unset: to_q,to_k,to_v,to_out.0 plus the joint-attention add_q/k/v_proj,to_add_out where the denoiser has them (sd3, flux). The official DDSPO SANA trainer uses to_k,to_q,to_v",
    )
    lora_init: str = opt(
        "gaussian",
        "LoRA initialisation (B = 0 in both): gaussian (A ~ N(0, 1/rank^2), as diffusers' DPO "
        "example and the official DDSPO SD3/SANA trainers) | kaiming (peft's default "
        "Kaiming-uniform A, as the official DD-CPP pair; train_policy_pair.py's default)",
        choices=("gaussian", "kaiming"),
    )
    gradient_checkpointing: bool = opt(False, "trade compute for activation memory")


@dataclass
class MethodOptions:
    """Options of the method group (``--help`` section below)."""

    help_section = "method: the loss, its targets, betas and noise levels (SPEC §1-§4)"

    method: str = opt("ddspo", "sft | dpo | dspo | dspo_cpp | ddspo")
    sft_branch: str = opt(
        "winner",
        "sft: winner (x0_w, c) | loser (x0_l, c: DD-CPP's losing model, as the official code) | loser_neg (x0_l, c-) | pair (DD-CPP's pair in one run, as the official code: a winner and a loser LoRA adapter, one optimizer, loss mse_w + mse_l, one clip over both, separate noise per side; writes OUT/winner/final and OUT/loser/final; needs --lora)",
    )
    beta: float | None = opt(
        None,
        "unset: the method's default: dpo 8000, ddspo 16000 (8000 with a policy pair; 2000 on sana, sd3 and flux); dspo/dspo_cpp: the OUTSIDE beta, official scale, 0.001",
    )
    beta_logit: float | None = opt(
        None,
        "dspo/dspo_cpp: beta inside the sigmoid; unset: dpo's default beta for dspo, ddspo's for dspo_cpp (8000 with a policy pair)",
    )
    target_guidance: float = opt(
        1.0,
        "ddspo/dspo_cpp: CFG-combined reference targets with scale W (a variant the official DDSPO code removed as 'not DDSPO'; SPEC §2)",
    )
    winner_policy: str | None = opt(
        None,
        "ddspo/dspo_cpp: denoiser dir or LoRA output (final/) giving y_w = f_win(x_t^w, c)",
    )
    loser_policy: str | None = opt(
        None,
        "ddspo/dspo_cpp: denoiser dir or LoRA output (final/) giving y_l = f_lose(x_t^l, c)",
    )
    independent_noise: bool = opt(
        False, "draw separate forward noise for the loser branch (always with --sft-branch pair)"
    )
    timestep_sampler: str | None = opt(
        None,
        "uniform | geometric | logit_normal; unset: uniform (official DDSPO and paper, also on sana), logit_normal on sd3 (SD3's and the official DDSPO SD3 script's) and flux (then the resolution-dependent shift)",
    )
    train_shift: float | None = opt(
        None,
        "flow backbones: the resolution shift of the TRAINING noise levels (sampling keeps the "
        "pipeline's); unset: 1 on sana (the official trainer's FlowMatchEulerDiscreteScheduler "
        "ignores SANA's flow_shift, so sigma is uniform as the paper's t ~ U), the scheduler's "
        "shift on sd3",
    )
    timestep_gamma: float = opt(
        0.9,
        "geometric sampler: decay per 1 percent of the schedule, P(t) ∝ gamma^(100 (T-1-t)/T)",
    )
    timestep_weight: str = opt("none", "none | lambda (logit weight) | linear (loss weight)")
    precondition_outputs: bool | None = opt(
        None,
        "flow backbones (sana, sd3, flux): compare x0 = x_t - sigma * v predictions with x0 targets instead of velocities (SD3's 'precondition outputs'); unset: on for sd3 (the official DDSPO SD3 trainer's default and script), off elsewhere",
    )


@dataclass
class DataOptions:
    """Options of the data group (``--help`` section below)."""

    help_section = "data: the pairs, how many per step, the prompts each row trains on"

    data: str | None = opt(
        None,
        "pair dataset dir (bench/make_pairs.py); unset with --tiny: built into OUT/data",
    )
    tiny_pairs: int = opt(16, "--tiny without --data: number of pairs to build")
    batch_size: int = opt(2, "pairs per rank per micro-step")
    grad_accum: int = opt(1, "micro-steps per optimizer step (no_sync on all but the last)")
    proportion_empty_prompts: float = opt(
        0.0,
        "share of pairs trained on the empty prompt (Diffusion-DPO/DSPO use 0.2; DDSPO's official code 0)",
    )
    dropped_prompt_encoding: str = opt(
        "encoded",
        'sdxl with --proportion-empty-prompts: a dropped prompt is encoded: encoded ("" '
        "through both CLIPs, as Diffusion-DPO's SDXL trainer) | zeros (the pipeline's zero "
        'embeddings for "", as its CFG branch); other backbones always encode ""',
        choices=("encoded", "zeros"),
    )
    rand_cond_prompts: list[str] = opt(
        [],
        "random-condition mixing (official --rand_cond --extra_text_path; ddspo, dspo_cpp): "
        "extra prompt file, .jsonl {prompt, neg_prompts: [...]} or .txt (c- by random word "
        "removal); repeatable. A row swapped at its noise level trains on an extra prompt with "
        "the contrastive targets; the other rows use the forward-process targets (Diffusion-DPO "
        "/ DSPO). See bench/t2i/randcond.py",
        metavar="FILE",
    )
    rand_cond_kept: str | None = opt(
        None,
        "random-condition mixing: targets of the rows NOT swapped: contrastive (every row on "
        "the contrastive targets, swapped rows differing only in their prompts: the official "
        "--cpp --rand_cond, DDSPO as the paper defines it) | forward (the forward-process "
        "targets: the official --rand_cond without --cpp); unset: contrastive",
        choices=RAND_COND_KEPT,
    )
    rand_cond_timing: str | None = opt(
        None,
        "random-condition mixing: the noise level that decides a row's swap: step (the step's "
        "own t) | independent (a separate uniform draw of t, as the official SD3/SANA "
        "trainers, whose step then draws its own t); unset: independent on sana and sd3, "
        "step on sd and sdxl (where the official trainer uses the step's t)",
        choices=RAND_COND_TIMINGS,
    )
    rand_cond_schedule: str = opt(
        "sigmoid",
        "swap probability over the noise level t/T: sigmoid (1/2 at 0.7) | exponential | constant",
        choices=RAND_COND_SCHEDULES,
    )
    rand_cond_lambda: float = opt(20.0, "steepness of the sigmoid/exponential swap schedule")


@dataclass
class ReferenceOptions:
    """Options of the reference group (``--help`` section below)."""

    help_section = "reference: the frozen model, or Kang et al.'s stable reference update"

    ref_update: str = opt("frozen", "frozen | periodic (Kang et al. stable reference update)")
    ref_tau: int = opt(32, "periodic: copy the policy into the reference every tau optimizer steps")
    ref_delta: float = opt(0.005, "periodic: freeze once the divergence estimate exceeds delta")
    ref_probe: int = opt(4, "periodic: fixed winner samples for the divergence estimate")


@dataclass
class OptimisationOptions:
    """Options of the optimisation group (``--help`` section below)."""

    help_section = "optimisation: optimizer, learning rate and its warmup, clipping"

    max_steps: int = opt(100, "optimizer steps (skipped non-finite steps count too)")
    optimizer: str = opt("adamw", "adamw | adafactor")
    lr: float | None = opt(
        None,
        "unset: beta / 2.048e8 (DDSPO App. E; dspo/dspo_cpp: beta_logit / 2.048e8), 1e-5 for sft",
    )
    warmup_steps: int = opt(0, "linear warmup; the paper uses 100 on SD/SDXL, 0 on SANA")
    warmup_from: int = opt(
        0,
        "the warmup's lr factor at optimizer step s is (s + warmup_from) / warmup_steps: 0 = "
        "diffusers' constant_with_warmup (the first step at lr 0; the official DDSPO and "
        "Diffusion-DPO trainers) | 1 = from lr / warmup_steps at the first step",
    )
    weight_decay: float = opt(0.01, "AdamW decoupled weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    max_grad_norm: float | None = opt(
        None,
        "clip the global grad norm; 0 = no clipping (norm still logged); unset: 1.0 with "
        "adamw, 0 with adafactor (which clips its updates itself; the official DDSPO and "
        "Diffusion-DPO trainers clip only under AdamW)",
    )


@dataclass
class RuntimeOptions:
    """Options of the runtime group (``--help`` section below)."""

    help_section = "runtime: run directory, seed, devices and precision, sharding, logging, checkpoints, validation images"

    out: str = opt("runs/t2i", "run directory: config.json, metrics.jsonl, checkpoints/, final/")
    resume: str | None = opt(
        None,
        'checkpoint dir to continue from, or "latest" (newest in OUT/checkpoints)',
    )
    seed: int = opt(
        0, "data order, and each pair's noise keyed by its place in the data (any rank count)"
    )
    device: str = opt("auto", "auto | cpu | cuda")
    dtype: str = opt(
        "fp32",
        "autocast compute dtype (float32/bfloat16/float16 accepted); the loss is always fp32",
        choices=tuple(DTYPES),
        parse=dtype_name,
    )
    text_dtype: str | None = opt(
        None,
        "dtype of the text encoders; unset: the compute dtype (--dtype). The official SANA "
        "trainer keeps Gemma-2 in bf16 whatever its precision: --text-dtype bf16",
        choices=tuple(DTYPES),
        parse=dtype_name,
    )
    shard: str = opt(
        "ddp",
        "ddp: every rank holds the whole policy, gradients all-reduced | fsdp: FSDP2 "
        "(torch.distributed.fsdp.fully_shard per block): parameters, gradients and "
        "optimizer state split over the ranks (bf16 gathered weights, fp32 reduction with "
        "--dtype bf16 on CUDA); sharded checkpoints (torch.distributed.checkpoint) that "
        "resume on another number of ranks",
        choices=SHARDS,
    )
    shard_reference: str | None = opt(
        None,
        "--shard fsdp, full fine-tune: the frozen reference copy kept whole on every rank "
        "(fastest; one full copy per GPU) or shard (1/ranks of it per GPU, its weights "
        "gathered block by block for every reference forward). LoRA has no copy. Unset: whole",
        choices=SHARD_REFERENCES,
    )
    log_every: int = opt(1, "write a metrics.jsonl line every n steps")
    ckpt_every: int = opt(0, "checkpoint every n steps (0 = only at the end)")
    keep_last: int = opt(2, "keep the newest k checkpoints")
    max_nonfinite: int = opt(5, "abort after this many non-finite steps in a row")
    progress: bool = opt(True, "tqdm bar on rank 0")
    tensorboard: bool = opt(
        False,
        "also write the metrics to OUT/tb/ (needs the tensorboard package)",
    )
    validation_prompts: str | None = opt(
        None,
        ".txt/.jsonl prompts file; unset with --tiny: 4 demo prompts",
    )
    validation_every: int = opt(
        0,
        "every n steps into OUT/samples/step-K/, and at the end; 0 = off",
    )
    validation_steps: int | None = opt(
        None,
        "sampler steps for validation images (unset: the backbone's default)",
    )
    validation_seed: int = opt(
        0,
        "prompt i starts from the noise of (seed, i), as in bench/sample.py",
    )
    debug_nan_steps: str | None = opt(
        None,
        "test hook: comma-separated steps whose loss is made NaN on rank 0",
    )


@dataclass
class TrainConfig(
    RuntimeOptions, OptimisationOptions, ReferenceOptions, DataOptions, MethodOptions, ModelOptions
):
    """Every option of ``train_t2i.py``: the groups' fields, flat (``cfg.beta``, one
    ``--flag`` each, one ``config.json`` object); :func:`resolve` runs one validator per
    group (:data:`VALIDATORS`). A group's ``help_section`` (a class attribute, not a field)
    titles its ``--help`` section."""

    @property
    def uses_neg(self) -> bool:
        """Does the step need the degraded prompt c- (the reference on it, or sft's loser branch)?"""
        if self.method == "sft":  # the loser_neg variant regresses x0_l with c-
            return self.sft_branch == "loser_neg"
        return "l_neg" in method_spec(self.method).ref_rows(self.policy_pair)

    @property
    def policy_pair(self) -> bool:
        return bool(self.winner_policy or self.loser_policy)

    def lora_target_list(self) -> list[str] | None:
        if self.lora_targets is None:
            return None
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def nan_steps(self) -> set[int]:
        return {int(s) for s in (self.debug_nan_steps or "").split(",") if s.strip()}


def epilog() -> str:
    """The ``--help`` text after the flags: run directory, resume rules, exit codes."""
    may = ", ".join(flag(n) for n in RESUME_MAY_CHANGE)
    paragraphs = [
        "--out must not hold a run (config.json, metrics.jsonl, checkpoints/, final/) unless "
        "--resume is given.",
        "On --resume the config must match the checkpoint's in everything that changes what "
        "is trained; a mismatch is one error line naming the fields. May change on resume: "
        f"{may}; and --batch-size, --grad-accum as long as batch-size x grad-accum x ranks "
        "stays the same: each pair's timestep and noise are keyed by its place in the data, so "
        "the run goes on as it would have on the old number of ranks, up to float rounding. A "
        "flag left at its default keeps the old behaviour of a checkpoint saved before it existed.",
        "Exit codes: 0 done; 1 training aborted (non-finite loss, gradient or parameters; "
        "nothing non-finite is ever saved); 2 bad input, refused, or a write failed such as a "
        "full disk (one 'error:' line; earlier checkpoints stay intact); 130 / 143 interrupted "
        "by Ctrl-C / SIGTERM (resume with --resume latest).",
    ]
    wrap = functools.partial(textwrap.fill, width=88, break_on_hyphens=False)
    return "\n\n".join(wrap(p) for p in paragraphs)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags over ``--config`` over defaults; then :func:`resolve`. Raises :class:`UsageError`."""
    cfg = parse(
        TrainConfig,
        argv,
        prog="train_t2i.py",
        description="Preference fine-tuning of text-to-image diffusion models "
        "(sft, dpo, dspo, dspo_cpp, ddspo).",
        epilog=epilog(),
    )
    return resolve(cfg)


def _choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise UsageError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Validate and fill method/backbone-dependent defaults; returns a new config. One
    validator per option group (:data:`VALIDATORS`, in order: a group may read the groups
    before it), then every float's range, then the backbone's defaults."""
    cfg = dataclasses.replace(cfg)
    for f in fields(TrainConfig):  # no field takes "": leaving a flag out is the default
        if getattr(cfg, f.name) == "":
            raise UsageError(f"{flag(f.name)} is empty; leave it out for the default")
    for check in VALIDATORS:
        check(cfg)
    _check_numbers(cfg)
    return resolve_for_backbone(cfg, cfg.backbone) if cfg.backbone else cfg


def _check_model(cfg: TrainConfig) -> None:
    """:class:`ModelOptions`: a tiny backbone or a pipeline folder, the backbone, LoRA."""
    if cfg.backbone:
        _choice("backbone", cfg.backbone, BACKBONES)
    if cfg.tiny:
        cfg.backbone = tiny_name(cfg.tiny, cfg.backbone)
    cfg.tiny = bool(cfg.tiny)
    if cfg.tiny == bool(cfg.pretrained):
        raise UsageError("give exactly one of --tiny or --pretrained DIR")
    _choice("sana prompt style", cfg.sana_prompt_style, SANA_PROMPT_STYLES)
    if cfg.prediction_type:
        _choice("prediction type", cfg.prediction_type, ("epsilon", "v_prediction", "flow"))
    check_at_least(cfg, ("lora",), 0)
    _choice("lora init", cfg.lora_init, ("gaussian", "kaiming"))
    if cfg.lora_targets is not None and not (cfg.lora and cfg.lora_target_list()):
        raise UsageError("--lora-targets needs --lora R and at least one module name")


def _check_method(cfg: TrainConfig) -> None:
    """:class:`MethodOptions`: the method and what applies to it only."""
    _choice("method", cfg.method, METHODS)
    _choice("sft branch", cfg.sft_branch, SFT_BRANCHES)
    if cfg.sft_branch != "winner" and cfg.method != "sft":
        raise UsageError("--sft-branch applies to --method sft only")
    if cfg.sft_branch == "pair":
        if not cfg.lora:
            raise UsageError("--sft-branch pair trains two LoRA adapters: give --lora R")
        cfg.independent_noise = True  # each side its own noise draw (one t per pair)
    if cfg.beta_logit and cfg.method not in SCORE_MATCHING_METHODS:
        raise UsageError("--beta-logit applies to dspo and dspo_cpp only")
    if cfg.target_guidance != 1.0 and cfg.method not in CPP_METHODS:
        raise UsageError("--target-guidance applies to ddspo and dspo_cpp only")
    if cfg.policy_pair:
        if cfg.method not in CPP_METHODS:
            raise UsageError("--winner-policy/--loser-policy apply to ddspo and dspo_cpp only")
        if not (cfg.winner_policy and cfg.loser_policy):
            raise UsageError("give both --winner-policy and --loser-policy")
        if cfg.target_guidance != 1.0:
            raise UsageError(
                "--target-guidance and a --winner/--loser-policy pair exclude each other"
            )
    if cfg.timestep_sampler:
        _choice("timestep sampler", cfg.timestep_sampler, SAMPLERS)
    _choice("timestep weight", cfg.timestep_weight, WEIGHTS)


def _check_data(cfg: TrainConfig) -> None:
    """:class:`DataOptions`: batch sizes, dropped prompts, random-condition mixing."""
    check_at_least(cfg, ("batch_size", "grad_accum"), 1)
    if cfg.tiny and not cfg.data:  # the pairs built into OUT/data
        check_at_least(cfg, ("tiny_pairs",), 1)
    if not 0.0 <= cfg.proportion_empty_prompts < 1.0:
        raise UsageError(
            f"--proportion-empty-prompts must be in [0, 1), got {cfg.proportion_empty_prompts}"
        )
    _choice("dropped prompt encoding", cfg.dropped_prompt_encoding, ("encoded", "zeros"))
    if cfg.rand_cond_prompts and cfg.method not in CPP_METHODS:
        raise UsageError("--rand-cond-prompts applies to ddspo and dspo_cpp only")
    _choice("rand-cond schedule", cfg.rand_cond_schedule, RAND_COND_SCHEDULES)
    rc_set = [n for n in ("rand_cond_kept", "rand_cond_timing") if getattr(cfg, n) is not None]
    if rc_set and not cfg.rand_cond_prompts:
        raise UsageError(f"{flag(rc_set[0])} applies with --rand-cond-prompts only")
    if cfg.rand_cond_prompts and cfg.rand_cond_kept is None:
        cfg.rand_cond_kept = "contrastive"  # the official --cpp --rand_cond, the paper's DDSPO
    if cfg.rand_cond_kept is not None:
        _choice("rand-cond kept", cfg.rand_cond_kept, RAND_COND_KEPT)
    if cfg.rand_cond_timing is not None:
        _choice("rand-cond timing", cfg.rand_cond_timing, RAND_COND_TIMINGS)


def _check_reference(cfg: TrainConfig) -> None:
    """:class:`ReferenceOptions`."""
    _choice("ref update", cfg.ref_update, REF_UPDATES)
    check_at_least(cfg, ("ref_tau", "ref_probe"), 1)


def _check_optimisation(cfg: TrainConfig) -> None:
    """:class:`OptimisationOptions`; fills the clipping default of the optimizer."""
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    check_at_least(cfg, ("max_steps",), 1)
    check_at_least(cfg, ("warmup_steps",), 0)
    if cfg.warmup_from not in (0, 1):
        raise UsageError(f"--warmup-from must be 0 or 1, got {cfg.warmup_from}")
    if cfg.max_grad_norm is None:  # the official trainers clip under AdamW only
        cfg.max_grad_norm = 0.0 if cfg.optimizer == "adafactor" else 1.0


def _check_runtime(cfg: TrainConfig) -> None:
    """:class:`RuntimeOptions`: device and precision, sharding, logging, validation."""
    _choice("dtype", cfg.dtype, tuple(DTYPES))
    _choice("device", cfg.device, DEVICES)
    if cfg.dtype == "fp16" and cfg.device == "cpu":
        raise UsageError("--dtype fp16 needs CUDA; use bf16 or fp32 on CPU")
    if cfg.text_dtype is not None:
        _choice("text dtype", cfg.text_dtype, tuple(DTYPES))
        if cfg.text_dtype == "fp16" and cfg.device == "cpu":
            raise UsageError("--text-dtype fp16 needs CUDA; use bf16 or fp32 on CPU")
    check_at_least(cfg, ("keep_last", "max_nonfinite", "log_every", "validation_steps"), 1)
    check_at_least(cfg, ("ckpt_every", "validation_every"), 0)
    if cfg.validation_every and not (cfg.validation_prompts or cfg.tiny):
        raise UsageError("--validation-every needs --validation-prompts FILE (with --pretrained)")
    _check_shard(cfg)
    try:
        cfg.nan_steps()
    except ValueError:
        raise UsageError(
            f"--debug-nan-steps must be comma-separated ints, got {cfg.debug_nan_steps!r}"
        ) from None


#: one validator per option group, in this order (each may read the groups before it)
VALIDATORS = (_check_model, _check_method, _check_data, _check_reference, _check_optimisation,
              _check_runtime)  # fmt: skip


def _check_shard(cfg: TrainConfig) -> None:
    """--shard and what it cannot be combined with (one line each)."""
    _choice("shard", cfg.shard, SHARDS)
    if cfg.shard_reference is not None:
        _choice("shard reference", cfg.shard_reference, SHARD_REFERENCES)
    if cfg.shard != "fsdp":
        if cfg.shard_reference is not None:
            raise UsageError("--shard-reference applies with --shard fsdp only")
        return
    if cfg.shard_reference is None:
        cfg.shard_reference = "whole"
    if cfg.dtype == "fp16":  # torch.amp.GradScaler does not unscale sharded gradients
        raise UsageError("--shard fsdp runs --dtype bf16 or fp32, not fp16")
    if cfg.optimizer != "adamw":
        raise UsageError(f"--shard fsdp supports --optimizer adamw only, not {cfg.optimizer}")
    if cfg.sft_branch == "pair":  # two networks in one run: each would need its own shards
        raise UsageError("--shard fsdp trains one network, not --sft-branch pair")
    if cfg.validation_every:  # validation samples on rank 0 alone: a sharded model needs all
        raise UsageError(
            "--validation-every is not available with --shard fsdp (sample final/ with "
            "bench/sample.py instead)"
        )


def _check_numbers(cfg: TrainConfig) -> None:
    """Every float field finite (argparse and JSON both accept inf and nan) and in range."""
    for f in fields(TrainConfig):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not (math.isfinite(v) and abs(v) <= FLOAT32_MAX):
            raise UsageError(f"{flag(f.name)} must be a finite float32 number, got {v:g}")
    for name, (ok, wording) in _RANGES.items():
        if getattr(cfg, name) is not None and not ok(getattr(cfg, name)):
            raise UsageError(f"{flag(name)} must be {wording}, got {getattr(cfg, name)}")


def resolve_for_backbone(cfg: TrainConfig, backbone: str) -> TrainConfig:
    """Fill the defaults that depend on the backbone (known after loading with --pretrained),
    group by group."""
    cfg = dataclasses.replace(cfg, backbone=backbone)
    for fill in (
        _model_for_backbone,
        _method_for_backbone,
        _data_for_backbone,
        _optimisation_for_backbone,
    ):
        fill(cfg, backbone)
    return cfg


def _model_for_backbone(cfg: TrainConfig, backbone: str) -> None:
    if cfg.flux_guidance is not None and backbone != "flux":
        raise UsageError(f"--flux-guidance applies to the flux backbone only, not {backbone}")
    if backbone == "flux" and cfg.flux_guidance is None:
        cfg.flux_guidance = 3.5  # FluxPipeline's default guidance


def _method_for_backbone(cfg: TrainConfig, backbone: str) -> None:
    """Output space, training noise levels and betas as the official trainers of ``backbone``."""
    if cfg.precondition_outputs and backbone not in FLOW_BACKBONES:
        raise UsageError(f"--precondition-outputs applies to flow backbones only, not {backbone}")
    if cfg.precondition_outputs is None:
        cfg.precondition_outputs = backbone == "sd3"
    if cfg.train_shift is not None and backbone not in FLOW_BACKBONES:
        raise UsageError(f"--train-shift applies to flow backbones only, not {backbone}")
    if cfg.train_shift is None and backbone == "sana":
        cfg.train_shift = 1.0  # the official SANA trainer: uniform sigma (flow_shift unused)
    if not cfg.timestep_sampler:  # the paper and the official SANA script; SD3 and FLUX: theirs
        cfg.timestep_sampler = "logit_normal" if backbone in ("sd3", "flux") else "uniform"
    _choice("timestep sampler", cfg.timestep_sampler, SAMPLERS)
    score_matching = cfg.method in SCORE_MATCHING_METHODS
    # the logistic methods' default beta; DSPO's logit is D-DPO's, DSPO+CPP's is DDSPO's
    logit_beta = (
        (2000.0 if backbone in FLOW_BACKBONES else 16000.0)  # DDSPO paper: SANA, SD3 2000
        if cfg.method in CPP_METHODS
        else DPO_BETA
    )
    if cfg.policy_pair and cfg.method in CPP_METHODS and backbone not in FLOW_BACKBONES:
        logit_beta = PAIR_BETA  # DD-CPP: the official SD-1.x/SDXL pair runs use 8000, not 16000
    if cfg.beta is None:
        cfg.beta = DSPO_BETA if score_matching else logit_beta
    if score_matching and cfg.beta_logit is None:
        cfg.beta_logit = logit_beta


def _optimisation_for_backbone(cfg: TrainConfig, backbone: str) -> None:
    """The lr rule (DDSPO App. E), from the logit scale (after the method's beta defaults):
    DSPO's tiny outside beta would give lr ~ 5e-12."""
    if cfg.lr is None:
        scale = cfg.beta_logit if cfg.method in SCORE_MATCHING_METHODS else cfg.beta
        cfg.lr = 1e-5 if cfg.method == "sft" else scale * LR_PER_BETA


def _data_for_backbone(cfg: TrainConfig, backbone: str) -> None:
    if cfg.rand_cond_prompts and cfg.rand_cond_timing is None:  # as the official trainers
        cfg.rand_cond_timing = "independent" if backbone in FLOW_BACKBONES else "step"


def adopt_saved_defaults(cfg: TrainConfig, saved: dict) -> TrainConfig:
    """On resume: each field of ``_LEGACY_MISSING`` that ``cfg`` leaves at its resolved
    default takes the checkpoint's old-behaviour value where ``saved`` lacks the field (saved
    before it existed) or holds that value, so an old run continues exactly. A value given
    explicitly and different from the default is compared by :func:`resume_mismatches`."""
    out = cfg
    for name, legacy in _LEGACY_MISSING.items():
        if name in _ONLY_WHEN and not _ONLY_WHEN[name](cfg):
            continue
        old, new = saved.get(name, legacy), getattr(cfg, name)
        if old != legacy or new == old:
            continue
        field_default = next(f.default for f in fields(TrainConfig) if f.name == name)
        if new == getattr(resolve(dataclasses.replace(cfg, **{name: field_default})), name):
            out = dataclasses.replace(out, **{name: old})
    return out


def resume_mismatches(
    cfg: TrainConfig,
    saved: dict,
    *,
    world: int,
    saved_world: int,
    same_data: bool | None = None,
) -> list[str]:
    """``--flag old -> new`` for each field of the resolved ``cfg`` that differs from the
    checkpoint's ``saved`` config and changes what is trained. Paths compare as real paths;
    ``same_data`` (the datasets' fingerprints agree), when known, replaces the path test of
    ``--data``; ``batch_size``/``grad_accum`` count only through the pairs per step."""
    out = []
    for f in fields(TrainConfig):
        if f.name in RESUME_MAY_CHANGE or f.name in RESUME_BATCH:
            continue
        if f.name in _ONLY_WHEN and not _ONLY_WHEN[f.name](cfg):
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        new, old = getattr(cfg, f.name), saved.get(f.name, _LEGACY_MISSING.get(f.name, default))
        if old == "" and new is None:  # an unset path or name in an old config.json
            continue
        if f.name == "rand_cond_prompts" and _same_paths(new, old):
            continue
        if f.name == "data" and same_data is not None:
            if not same_data:
                out.append(f"--data (another dataset: {old!r} -> {new!r})")
            continue
        if f.name in _PATH_FIELDS and new and old:
            if os.path.realpath(new) == os.path.realpath(old):
                continue
        if new != old:
            out.append(f"{flag(f.name)} {old!r} -> {new!r}")
    pairs = cfg.batch_size * cfg.grad_accum * world
    saved_pairs = (
        saved.get("batch_size", TrainConfig.batch_size)
        * saved.get("grad_accum", TrainConfig.grad_accum)
        * saved_world
    )
    if pairs != saved_pairs:
        out.append(f"pairs per step (--batch-size x --grad-accum x ranks) {saved_pairs} -> {pairs}")
    return out


def _same_paths(a, b) -> bool:
    if not (isinstance(a, list) and isinstance(b, list)) or len(a) != len(b):
        return False
    return all(os.path.realpath(x) == os.path.realpath(y) for x, y in zip(a, b, strict=True))


def to_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def write_config(cfg: TrainConfig, path: Path) -> None:
    write_text_atomic(path, json.dumps(to_dict(cfg), indent=2, sort_keys=False) + "\n")
