"""Preference fine-tuning of text-to-image diffusion models: sft, dpo, dspo, dspo_cpp, ddspo.

    torchrun --nproc_per_node=2 bench/train_t2i.py --tiny --method ddspo --max-steps 4 --out DIR
    torchrun --nproc_per_node=8 bench/train_t2i.py --pretrained SD15_DIR --data PAIRS_DIR \\
        --method ddspo --beta 16000 --batch-size 8 --grad-accum 32 --warmup-steps 100 ...

Plain torch.distributed + DDP (gloo on CPU, NCCL on CUDA); ``python bench/train_t2i.py``
without torchrun runs the same code with world size 1. The file reads top to bottom:
one step's math (:func:`compute_loss`), then :func:`train` — config -> distributed init ->
backbone -> data -> reference -> optimizer -> resume -> loop -> checkpoint. All loss,
schedule, timestep and reference-update math comes from ``minddspo``; backbone glue from
``bench.t2i.backbones``; config, checkpoint and reference helpers from ``bench.t2i``.

Nothing is lost and nothing fails silently: OUT is checked before any work (a file, an
unwritable disk, or another run without --resume is refused), --resume must match the
checkpoint's config and skips a damaged newest checkpoint, the weights are checked finite
after every step (nothing non-finite is saved), and a full disk or Ctrl-C / SIGTERM stops
with one line, earlier checkpoints intact. Exit codes: see ``--help``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from bench.t2i.backbones import Backbone, Cond, load_backbone, move_module, tiny_backbone
from bench.t2i.checkpoint import (
    atomic_write_dir,
    checkpoint_name,
    find_resume,
    latest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from bench.t2i.config import (
    TrainConfig,
    UsageError,
    parse_args,
    resolve_for_backbone,
    resume_mismatches,
    write_config,
)
from bench.t2i.data import batch_indices, dataset_fingerprint
from bench.t2i.dist import (
    DistEnv,
    all_reduce_mean,
    broadcast_float,
    cleanup,
    gather_objects,
    init_distributed,
    no_sync,
)
from bench.t2i.interrupt import exit_code, handle_signals
from bench.t2i.outdir import (
    OutputError,
    check_out_dir,
    no_space,
    remove_stale_tmp,
    truncate_jsonl,
    writing,
)
from bench.t2i.pairdata import PairDataset, collate_pairs
from bench.t2i.reference import DivergenceProbe, Reference
from bench.t2i.validation import (
    SAMPLES_DIR,
    check_tensorboard,
    open_tensorboard,
    tb_image,
    tb_write,
    validation_due,
    write_validation,
)
from bench.t2i.weights import (
    add_lora,
    all_finite,
    denoiser_with_lora,
    find_lora,
    load_policy,
    param_digest,
    save_final_pipeline,
    save_lora,
    write_checkpoint,
)
from minddspo.methods import dspo_beta_warning, method_loss, method_spec
from minddspo.refupdate import ReferenceUpdateRule
from minddspo.schedules import cfg_combine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DIAG_KEYS = ("implicit_acc", "gap_w", "gap_l", "err_w", "err_l")


RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "final")  # OUT holds a run
TRAINER_STATE_KEYS = ("optimizer", "scheduler", "scaler", "counters", "rng")


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row, or parameters made non-finite by a step."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM; the message says the step reached and how to resume."""


class PeerFailed(RuntimeError):
    """Rank 0 failed a write (and reports it); the other ranks stop with it."""


# ------------------------------------------------------------------------ one step's math


def encode_step(
    backbone: Backbone, prompts: list[str], neg_prompts: list[str], *, need_neg, need_uncond
) -> tuple[Cond, Cond | None, Cond | None]:
    """Encode the step's unique prompts in ONE text-encoder call -> ``(c, c-, ∅)`` per row."""
    texts = list(prompts)
    if need_neg:
        texts += neg_prompts
    if need_uncond:
        texts.append("")
    texts = list(dict.fromkeys(texts))  # unique, in order
    row = {p: i for i, p in enumerate(texts)}
    enc = backbone.encode_prompts(texts)

    def pick(ps: list[str]) -> Cond:
        return enc.index(torch.tensor([row[p] for p in ps]))

    c_neg = pick(neg_prompts) if need_neg else None
    c_uncond = pick([""] * len(prompts)) if need_uncond else None
    return pick(prompts), c_neg, c_uncond


def compute_loss(
    cfg: TrainConfig,
    backbone: Backbone,
    policy: torch.nn.Module,
    reference: Reference | None,
    x0_w: torch.Tensor,  # (B, C, h, w) winner latents
    x0_l: torch.Tensor,  # (B, C, h, w) loser latents
    conds: tuple[Cond, Cond | None, Cond | None],  # c, c- (CPP methods), ∅ (target guidance)
    t: torch.Tensor,  # (B,) network timesteps, shared by both branches (SPEC §1)
    noise_w: torch.Tensor,  # (B, C, h, w)
    noise_l: torch.Tensor,  # (B, C, h, w); the same tensor unless --independent-noise
    pair: tuple[torch.nn.Module, torch.nn.Module] | None = None,  # (f_win, f_lose)
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample loss ``(B,)`` of ``cfg.method`` and detached diagnostics.

    One policy forward on ``[x_t^w; x_t^l]`` and one reference forward on the rows the
    method table asks for (:meth:`minddspo.methods.MethodSpec.ref_rows`): ``[x_t^w|c,
    x_t^l|c]``, ``+ [x_t^l|c-]`` (ddspo, dspo_cpp), ``+ [x_t^w|∅, x_t^l|∅]`` (target
    guidance W != 1, SPEC §2). The reference runs first (no grad). Which tensors the loss
    compares and where the timestep weight goes is :func:`minddspo.methods.method_loss`'s.
    """
    c, c_neg, c_uncond = conds
    spec = method_spec(cfg.method)
    x_w, x_l = backbone.noise(x0_w, noise_w, t), backbone.noise(x0_l, noise_l, t)
    y_w, y_l = backbone.target(x0_w, noise_w, t), backbone.target(x0_l, noise_l, t)
    w = backbone.t_weight(cfg.timestep_weight, t)
    beta, beta_logit = (cfg.beta, cfg.beta_logit) if spec.score_matching else (cfg.beta, None)
    if not spec.preference:  # sft: one side only, forward-process targets
        if cfg.sft_branch == "loser":  # DD-CPP's losing model (official): x0_l with c
            pred, target = backbone.forward(policy, x_l, t, c), y_l
        elif cfg.sft_branch == "loser_neg":  # variant: x0_l with the loser's prompt c-
            pred, target = backbone.forward(policy, x_l, t, c_neg), y_l
        else:  # the winners with c (also DD-CPP's winning model)
            pred, target = backbone.forward(policy, x_w, t, c), y_w
        out = method_loss(
            cfg.method, pred_w=pred, target_w=target, weight=w, weight_kind=cfg.timestep_weight
        )
        return out.loss, {}

    rows = {"w": (x_w, c), "l": (x_l, c), "l_neg": (x_l, c_neg)}
    names = list(spec.ref_rows(policy_pair=pair is not None))
    if c_uncond is not None:  # guided targets also need f_ref(., ∅)
        rows |= {"w_uncond": (x_w, c_uncond), "l_uncond": (x_l, c_uncond)}
        names += ["w_uncond", "l_uncond"]
    xs, cs = [rows[n][0] for n in names], [rows[n][1] for n in names]
    k = len(names)
    ref = dict(
        zip(names, reference(torch.cat(xs), t.repeat(k), cs[0].cat(*cs[1:])).chunk(k), strict=True)
    )
    pred_w, pred_l = backbone.forward(policy, torch.cat([x_w, x_l]), t.repeat(2), c.cat(c)).chunk(2)

    pair_w = pair_l = None
    if pair is not None:  # any contrastive policy pair (paper Sec. 3.2)
        with torch.no_grad():
            pair_w, pair_l = (
                backbone.forward(pair[0], x_w, t, c),
                backbone.forward(pair[1], x_l, t, c),
            )
    elif c_uncond is not None:  # guided reference targets (SPEC §2), a variant, not DDSPO
        pair_w = cfg_combine(ref["w_uncond"], ref["w"], cfg.target_guidance)
        pair_l = cfg_combine(ref["l_uncond"], ref["l_neg"], cfg.target_guidance)
    out = method_loss(
        cfg.method,
        pred_w=pred_w,
        pred_l=pred_l,
        ref_w=ref["w"],
        ref_l=ref["l"],
        ref_l_neg=ref.get("l_neg"),
        target_w=y_w,
        target_l=y_l,
        pair_w=pair_w,
        pair_l=pair_l,
        beta=beta,
        beta_logit=beta_logit,
        weight=w,
        weight_kind=cfg.timestep_weight,
    )
    return out.loss, _diag(out)


def drop_prompts(
    cfg: TrainConfig, gen: torch.Generator, prompts: list[str], negs: list[str]
) -> tuple[list[str], list[str]]:
    """``--proportion-empty-prompts p``: each pair's prompt (and its degraded prompt) becomes
    "" with probability p, as the Diffusion-DPO and DSPO trainers do (their default 0.2), so
    the model keeps an unconditional branch for CFG. p = 0 draws nothing from ``gen``."""
    p = cfg.proportion_empty_prompts
    if p <= 0:
        return list(prompts), list(negs)
    drop = (torch.rand(len(prompts), generator=gen) < p).tolist()
    return (
        ["" if d else c for c, d in zip(prompts, drop, strict=True)],
        ["" if d else c for c, d in zip(negs, drop, strict=True)],
    )


def draw_noise(cfg: TrainConfig, backbone: Backbone, gen: torch.Generator, x0: torch.Tensor):
    """Timesteps and forward noise from this rank's generator (drawn on the CPU, so a run
    does not depend on the device). Winner and loser share both unless --independent-noise."""
    t = backbone.sample_t(x0.shape[0], gen, cfg.timestep_sampler, cfg.timestep_gamma)  # (B,)
    noise_w = torch.randn(x0.shape, generator=gen)  # (B, C, h, w)
    noise_l = torch.randn(x0.shape, generator=gen) if cfg.independent_noise else noise_w
    return t.to(x0.device), noise_w.to(x0.device), noise_l.to(x0.device)


def _diag(out) -> dict[str, torch.Tensor]:
    return {k: getattr(out, k) for k in DIAG_KEYS}


# ------------------------------------------------------------------------------- setup


def check_run_dir(cfg: TrainConfig) -> None:
    """OUT must be a writable folder, and hold no run unless --resume continues it."""
    out = Path(cfg.out)
    try:
        check_out_dir(out)
    except OutputError as e:
        raise UsageError(str(e)) from None
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not cfg.resume:
        raise UsageError(
            f"{out} holds a run; pass --resume to continue it or choose another --out "
            f"(found {', '.join(held)})"
        )


def load_model(cfg: TrainConfig) -> Backbone:
    pt = cfg.prediction_type or None
    try:
        if cfg.tiny:
            bb = tiny_backbone(cfg.backbone, seed=cfg.seed, prediction_type=pt)
        else:
            bb = load_backbone(cfg.pretrained, cfg.backbone or None, pt)
        if bb.name == "sana":  # official (pipeline preprocessing + instruction prefix) or plain
            bb.prompt_style = cfg.sana_prompt_style
        return bb
    except (ValueError, OSError) as e:
        raise UsageError(
            f"--pretrained {cfg.pretrained}: {e}" if cfg.pretrained else str(e)
        ) from None


def open_data(cfg: TrainConfig, env: DistEnv, backbone: Backbone | None = None) -> PairDataset:
    """``--data DIR``; with ``--tiny`` and no ``--data`` a small dataset built into OUT/data
    with the make_pairs code (that needs the backbone)."""
    path = cfg.data
    if not path:
        if not cfg.tiny:
            raise UsageError("--data DIR is required (only --tiny builds a demo dataset itself)")
        if backbone is None:
            return None
        path = str(Path(cfg.out) / "data")
        if not (Path(path) / "info.json").exists():
            from bench.make_pairs import build_pairs
            from bench.t2i.prompts import DEMO_PROMPTS

            prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(cfg.tiny_pairs)]
            with writing(path):
                build_pairs(
                    backbone,
                    prompts,
                    path,
                    seed=cfg.seed,
                    steps=4,
                    rank=env.rank,
                    world=env.world,
                    progress=False,
                )
    try:
        return PairDataset(path)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None


def check_data(dataset: PairDataset, backbone: Backbone) -> None:
    built_for = dataset.info.get("backbone")
    if built_for and built_for != backbone.name:  # same shapes, another VAE's latent space
        raise UsageError(
            f"{dataset.root} was built for the {built_for} backbone, not {backbone.name}; "
            "build the pairs with this model (bench/make_pairs.py)"
        )
    c, _, w = dataset.latent_shape
    if c != backbone.latent_channels:
        raise UsageError(
            f"{dataset.root}: latents have {c} channels, the {backbone.name} backbone "
            f"expects {backbone.latent_channels}"
        )
    if hasattr(backbone, "resolution"):  # SDXL micro-conditioning: the training image size
        backbone.resolution = w * backbone.vae_scale_factor


def find_checkpoint(
    cfg: TrainConfig, env: DistEnv, ckpt_root: Path, fingerprint: str
) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from (the newest intact one for ``latest``) and its state,
    refused unless its config matches ``cfg`` in everything that changes what is trained."""
    try:
        ckpt, state, damaged = find_resume(cfg.resume, ckpt_root)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    if ckpt is None:
        return None, None
    if damaged and env.is_main:
        print(f"warning: {'; '.join(damaged)}; resuming from {ckpt}", file=sys.stderr)
    missing = [k for k in TRAINER_STATE_KEYS if k not in state]
    if missing:
        raise UsageError(f"--resume {ckpt}: not a trainer checkpoint (no {', '.join(missing)})")
    saved_fp = state.get("data_fingerprint")
    diffs = resume_mismatches(
        cfg,
        state.get("config") or {},
        world=env.world,
        saved_world=saved_world(state),
        same_data=None if saved_fp is None else saved_fp == fingerprint,
    )
    if diffs:
        raise UsageError(
            f"--resume {ckpt}: the config differs from the checkpoint's in {'; '.join(diffs)} "
            "(see --help for what may change on resume)"
        )
    return ckpt, state


def saved_world(state: dict) -> int:
    return int(state.get("world") or len(state["rng"]))


def load_policy_pair(cfg: TrainConfig, backbone: Backbone, device, dtype):
    """``(f_win, f_lose)``, frozen, in eval mode. Each is a full denoiser folder, or a LoRA
    output in diffusers' format (``pytorch_lora_weights.safetensors``, directly or under
    ``lora/``, e.g. ``bench/train_policy_pair.py``'s ``OUT/winner/final``): then a copy of
    the base denoiser with that LoRA loaded."""

    def load(path: str) -> torch.nn.Module:
        lora_dir = find_lora(path)
        try:
            if lora_dir is not None:
                net = denoiser_with_lora(backbone.denoiser, lora_dir, backbone.denoiser_subfolder)
            else:
                net = backbone.load_denoiser(path)
        except Exception as e:  # unreadable or mismatched weights (safetensors, peft, ...)
            raise UsageError(
                f"policy {path}: {str(e).splitlines()[0] if str(e) else e!r}"
            ) from None
        if getattr(net, "is_gradient_checkpointing", False):
            net.disable_gradient_checkpointing()  # copied from the policy; no backward here
        move_module(net, device, dtype)
        return net.eval().requires_grad_(False)

    return load(cfg.winner_policy), load(cfg.loser_policy)


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]):
    if cfg.optimizer == "adafactor":  # Diffusion-DPO's SDXL setting: fixed lr, no relative step
        from transformers.optimization import Adafactor

        opt = Adafactor(
            params,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    else:
        opt = torch.optim.AdamW(
            params,
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
    warmup = cfg.warmup_steps  # linear warmup from lr/warmup to lr, then constant
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    return opt, sched


def agree(check) -> None:
    """Run ``check()`` on every rank; if it fails on any, all raise its UsageError (no rank
    goes on to a collective the others never reach). Also a barrier."""
    try:
        check()
        msg = None
    except UsageError as e:
        msg = str(e)
    failed = [m for m in gather_objects(msg) if m]
    if failed:
        raise UsageError(failed[0])


def on_rank0(env: DistEnv, write) -> None:
    """``write()`` on rank 0; if it fails every rank raises, so none waits at a barrier that
    rank 0 never reaches. Also a barrier."""
    err = None
    if env.is_main:
        try:
            write()
        except Exception as e:
            err = e
    if any(gather_objects(err is not None)):
        if err is not None:
            raise err
        raise PeerFailed("rank 0 failed to write; stopping too")


# -------------------------------------------------------------------------------- train


def train(cfg: TrainConfig) -> Path:
    """Run the training described by ``cfg`` (validated); returns the run directory."""
    env = init_distributed(cfg.device)
    st = {"step": 0, "opt_step": 0, "frozen": False, "nonfinite_total": 0, "nonfinite_run": 0}
    ok = False
    try:
        with handle_signals():  # SIGTERM unwinds like Ctrl-C: temporary folders are removed
            try:
                out = _run(cfg, env, st)
            except KeyboardInterrupt:
                raise Interrupted(interrupt_message(cfg, st["step"])) from None
        ok = True
        return out
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)  # drop the DDP model the failed frames hold
        raise
    finally:
        cleanup(graceful=ok)  # gc before destroy_process_group (PITFALLS.md)


def interrupt_message(cfg: TrainConfig, step: int) -> str:
    last = latest_checkpoint(Path(cfg.out) / "checkpoints")
    if last is None and cfg.resume not in ("", "latest"):
        return f"interrupted at step {step}; resume with --resume {cfg.resume} (nothing saved yet)"
    where = f"newest checkpoint: {last.name}" if last else "no checkpoint yet: it starts over"
    return f"interrupted at step {step}; resume with --resume latest ({where})"


def _run(cfg: TrainConfig, env: DistEnv, st: dict) -> Path:
    print0 = print if env.is_main else (lambda *a, **k: None)
    out, device, dtype = Path(cfg.out), env.device, DTYPES[cfg.dtype]
    ckpt_root = out / "checkpoints"

    def autocast():  # bf16/fp16 compute; losses are float32 inside minddspo
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    # ---- run directory: refused before any work (and before any rank writes into it)
    agree(lambda: check_run_dir(cfg))
    if cfg.tensorboard:
        agree(lambda: _usage(check_tensorboard))
    val_prompts: list[str] = []  # read by every rank, so a bad file stops them all alike
    agree(lambda: val_prompts.extend(validation_prompts(cfg)))
    if env.is_main:
        remove_stale_tmp(out, ckpt_root, out / SAMPLES_DIR)  # left by a kill -9 mid-write

    # ---- data and backbone, validated before anything is written into OUT/checkpoints
    dataset = open_data(cfg, env)  # a cheap header check first: fail fast on bad --data
    torch.manual_seed(cfg.seed)  # identical init on every rank (LoRA); DDP broadcasts anyway
    backbone = load_model(cfg)
    cfg = resolve_for_backbone(cfg, backbone.name)
    backbone.to(device, None if dtype == torch.float32 else dtype)
    policy = backbone.denoiser  # fp32 master weights; autocast does the rest
    dataset = dataset or open_data(cfg, env, backbone)
    check_data(dataset, backbone)
    fingerprint = dataset_fingerprint(dataset.root)
    ckpt, state = find_checkpoint(cfg, env, ckpt_root, fingerprint)

    # ---- reference, probe, policy pair
    if cfg.lora:
        add_lora(policy, cfg.lora, cfg.lora_alpha)
    if cfg.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    policy.train()
    periodic = cfg.ref_update == "periodic"
    needs_ref = cfg.method != "sft"
    reference = (
        Reference(backbone, policy, lora=cfg.lora > 0, periodic=periodic, dtype=dtype)
        if needs_ref
        else None
    )
    rule = ReferenceUpdateRule(cfg.ref_update, cfg.ref_tau, cfg.ref_delta)
    probe = None
    if periodic and needs_ref:  # initial model's predictions on fixed samples, before any resume
        items = collate_pairs([dataset[i % len(dataset)] for i in range(cfg.ref_probe)])
        probe_cond = backbone.encode_prompts(items["prompt"])
        probe = DivergenceProbe(
            backbone, items["x0_w"].to(device), probe_cond, reference, cfg.seed, autocast
        )
    pair = load_policy_pair(cfg, backbone, device, dtype) if cfg.policy_pair else None

    # ---- optimizer (only the trainable parameters: all, or the LoRA adapters)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(cfg, params)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16")
    gen = torch.Generator().manual_seed(cfg.seed * env.world + env.rank)  # t and noise, per rank

    # ---- resume (checkpoint found and checked above)
    if ckpt is not None:
        load_policy(backbone, policy, ckpt, cfg.lora > 0)
        if periodic and needs_ref:
            reference.load(ckpt / "reference")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        st.update(state["counters"])
        if saved_world(state) == env.world:
            set_rng_state(state["rng"][env.rank], gen)
        elif env.is_main:
            print(
                f"warning: checkpoint from world size {saved_world(state)}, this run has "
                f"{env.world}: the noise streams restart (every step reads the same pairs)",
                file=sys.stderr,
            )
        print0(f"resumed from {ckpt} at step {st['step']}")
        del state

    ddp = (
        DDP(policy, device_ids=[device.index] if device.type == "cuda" else None)
        if env.distributed
        else policy
    )

    # ---- run directory: config, and the log cut back to the checkpoint's step
    log = out / "metrics.jsonl"

    def start_run_dir():
        out.mkdir(parents=True, exist_ok=True)
        with writing(out / "config.json"):
            write_config(cfg, out / "config.json")
        with writing(log):
            truncate_jsonl(log, st["step"])  # steps after the checkpoint are logged again

    on_rank0(env, start_run_dir)
    n_trainable = sum(p.numel() for p in params)
    print0(
        f"{cfg.method} on {backbone.name} ({n_trainable / 1e6:.2f}M trainable), world {env.world}, "
        f"{len(dataset)} pairs from {dataset.root}, beta {cfg.beta:g}"
        + (f" (beta_logit {cfg.beta_logit:g})" if cfg.beta_logit else "")
        + f", lr {cfg.lr:.3g}"
    )
    warning = dspo_beta_warning(cfg.method, cfg.beta)
    if warning and env.is_main:
        print(warning, file=sys.stderr)

    # ---- loop
    from diffusers.utils import logging as diffusers_logging
    from tqdm import tqdm
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # one bar: ours
    transformers_logging.disable_progress_bar()

    nan_steps = cfg.nan_steps()
    stack = contextlib.ExitStack()  # closes the log and the bar however the loop ends
    metrics = stack.enter_context(open(log, "a")) if env.is_main else None  # noqa: SIM115
    tb = None
    if cfg.tensorboard and env.is_main:  # the same records as metrics.jsonl, into OUT/tb/
        with writing(out / "tb"):
            tb = open_tensorboard(out, resume_step=st["step"])
        stack.callback(tb.close)
    bar = stack.enter_context(
        tqdm(total=cfg.max_steps, initial=st["step"], disable=not (env.is_main and cfg.progress))
    )

    def log_line(rec: dict) -> None:
        if metrics is not None:
            with writing(log):
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
        if tb is not None:
            with writing(out / "tb"):
                tb_write(tb, rec)

    def validate(step: int) -> None:
        """Validation images of the current policy (unwrapped: no DDP hooks; LoRA adapters
        on). Dedicated generators, global RNG restored: the training is not changed."""
        final = write_validation(
            backbone,
            policy,
            val_prompts,
            out,
            step,
            seed=cfg.validation_seed,
            steps=cfg.validation_steps or None,
            resolution=dataset.latent_shape[-1] * backbone.vae_scale_factor,
            batch_size=cfg.batch_size,
            autocast=autocast,
        )
        if tb is not None:
            with writing(out / "tb"):
                tb_image(tb, final / "grid.png", step)

    with stack:
        while st["step"] < cfg.max_steps:
            t0 = time.perf_counter()
            sums = torch.zeros(1 + len(DIAG_KEYS), dtype=torch.float64)  # loss, diagnostics
            for micro in range(cfg.grad_accum):
                idx = batch_indices(
                    len(dataset),
                    seed=cfg.seed,
                    step=st["step"],
                    micro=micro,
                    accum=cfg.grad_accum,
                    rank=env.rank,
                    world=env.world,
                    batch=cfg.batch_size,
                )
                batch = collate_pairs([dataset[i] for i in idx])
                x0_w, x0_l = batch["x0_w"].to(device), batch["x0_l"].to(device)  # (B, C, h, w)
                t, noise_w, noise_l = draw_noise(cfg, backbone, gen, x0_w)
                prompts, negs = drop_prompts(cfg, gen, batch["prompt"], batch["neg_prompt"])
                conds = encode_step(
                    backbone,
                    prompts,
                    negs,
                    need_neg=cfg.uses_neg,
                    need_uncond=cfg.target_guidance != 1.0,
                )
                with no_sync(ddp, sync=micro == cfg.grad_accum - 1):  # all-reduce on the last
                    with autocast():
                        loss_vec, diag = compute_loss(
                            cfg,
                            backbone,
                            ddp,
                            reference,
                            x0_w,
                            x0_l,
                            conds,
                            t,
                            noise_w,
                            noise_l,
                            pair,
                        )
                    loss = loss_vec.mean()
                    if env.is_main and st["step"] + 1 in nan_steps:  # test hook
                        loss = loss * float("nan")
                    scaler.scale(loss / cfg.grad_accum).backward()
                sums[0] += loss.item()
                for j, key in enumerate(DIAG_KEYS):
                    if key in diag:
                        sums[1 + j] += diag[key].double().mean().item()
            stats = all_reduce_mean((sums / cfg.grad_accum).to(device)).cpu().tolist()

            # ---- optimizer step, or a counted skip when the loss or gradient is not finite
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
            lr = scheduler.get_last_lr()[0]
            # fp16: an overflowing gradient is the GradScaler's business (it skips and
            # rescales). Loss and grad norm are the same on every rank: all decide alike.
            finite = math.isfinite(stats[0]) and (cfg.dtype == "fp16" or math.isfinite(grad_norm))
            if finite:
                scaler.step(optimizer)
                scheduler.step()
                st["opt_step"] += 1
                st["nonfinite_run"] = 0
                # A finite loss and gradient can still overflow the weights (a huge --lr):
                # stop before such weights reach a checkpoint or final/.
                if not all_finite(params):
                    raise NonFiniteError(
                        f"step {st['step'] + 1}: the optimizer step (lr {lr:.3g}) made the "
                        "parameters non-finite; stopped without saving them. Lower --lr"
                    )
            else:
                st["nonfinite_total"] += 1
                st["nonfinite_run"] += 1
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            st["step"] += 1
            bar.update(1)

            rec = {"step": st["step"], "loss": stats[0], "grad_norm": grad_norm, "lr": lr}
            if cfg.method != "sft":
                rec.update({key: stats[1 + j] for j, key in enumerate(DIAG_KEYS)})
            pairs = cfg.batch_size * cfg.grad_accum * env.world
            rec["samples_per_s"] = pairs / (time.perf_counter() - t0)
            rec["nonfinite_total"] = st["nonfinite_total"]
            event = not finite
            if not finite:
                rec["skipped"] = True
                print0(
                    f"step {st['step']}: non-finite loss or gradient, step skipped "
                    f"({st['nonfinite_run']} in a row, {st['nonfinite_total']} in total)"
                )

            # ---- stable reference update (Kang et al.): copy every tau steps until D > delta
            if finite and probe is not None and rule.copy_due(st["opt_step"], st["frozen"]):
                reference.copy_from_policy()
                div = broadcast_float(probe(reference), device)
                rec["ref_updated"], rec["ref_divergence"], event = True, div, True
                if rule.freezes(div):
                    st["frozen"] = rec["ref_frozen"] = True
                    print0(
                        f"step {st['step']}: reference frozen (D = {div:.4g} > {cfg.ref_delta:g})"
                    )
            if event or st["step"] % cfg.log_every == 0:
                log_line(rec)
            bar.set_postfix(loss=f"{stats[0]:.4g}", acc=f"{rec.get('implicit_acc', 0):.2f}")
            if st["nonfinite_run"] >= cfg.max_nonfinite:
                raise NonFiniteError(
                    f"loss or gradient non-finite for {st['nonfinite_run']} steps in a row (up to "
                    f"step {st['step']}); aborting. Lower --lr or --beta, use --dtype fp32, or "
                    "check the data"
                )

            # ---- checkpoint: rank 0 writes everything, including every rank's RNG streams
            due = cfg.ckpt_every and st["step"] % cfg.ckpt_every == 0
            if due or st["step"] == cfg.max_steps:
                trainer_state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "counters": dict(st),  # step, opt_step, frozen flag, non-finite counts
                    "rng": gather_objects(rng_state(gen)),  # per rank; the data order needs none
                    "world": env.world,
                    "data_fingerprint": fingerprint,
                    "config": dataclasses.asdict(cfg),
                }
                write = functools.partial(
                    write_checkpoint,
                    backbone=backbone,
                    policy=policy,
                    lora=cfg.lora > 0,
                    reference=reference if periodic else None,
                    trainer_state=trainer_state,
                )
                path = ckpt_root / checkpoint_name(st["step"])
                on_rank0(
                    env,
                    functools.partial(save_finite, params, st["step"], path, write, cfg.keep_last),
                )

            # ---- validation images (rank 0; the others wait at the barrier)
            if validation_due(st["step"], cfg.validation_every, cfg.max_steps):
                on_rank0(env, functools.partial(validate, st["step"]))
        bar.close()
        digests = gather_objects(param_digest(policy))
        log_line({"step": st["step"], "end": True, "param_sha256": digests})
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different parameters: {digests}")

    # ---- final weights: a full pipeline in diffusers layout, or the LoRA weights
    def write_final():
        if not all_finite(params):  # never reached (checked after every step): belt and braces
            raise NonFiniteError(f"step {st['step']}: non-finite parameters; final/ not written")
        with writing(out / "final"):
            if cfg.lora:
                atomic_write_dir(out / "final", lambda d: save_lora(backbone, policy, d))
            elif cfg.pretrained:  # the untouched components as given, the trained denoiser
                atomic_write_dir(
                    out / "final",
                    lambda d: save_final_pipeline(backbone, policy, cfg.pretrained, d),
                )
            else:
                atomic_write_dir(out / "final", backbone.save_pretrained)

    on_rank0(env, write_final)
    print0(
        f"done: {st['step']} steps ({st['nonfinite_total']} skipped); final weights in {out / 'final'}"
    )
    return out


def _usage(check) -> None:
    """``check()``, its one-line ValueError turned into a :class:`UsageError`."""
    try:
        check()
    except ValueError as e:
        raise UsageError(str(e)) from None


def validation_prompts(cfg: TrainConfig) -> list[str]:
    """The validation prompts (read before any work; [] when validation is off)."""
    if not cfg.validation_every:
        return []
    from bench.t2i.prompts import cli_prompts

    try:
        return cli_prompts(cfg.validation_prompts or None, tiny=cfg.tiny, max_prompts=None, demo=4)
    except ValueError as e:
        raise UsageError(f"--validation-prompts: {e}") from None


def save_finite(params, step: int, path: Path, write, keep_last: int) -> None:
    """An atomic checkpoint, written only if every parameter is finite."""
    if not all_finite(params):  # never reached (checked after every step): belt and braces
        raise NonFiniteError(f"step {step}: non-finite parameters; checkpoint not written")
    with writing(path):
        save_checkpoint(path.parent, step, write, keep_last)


def main(argv: list[str] | None = None) -> int:
    """CLI entry. Exit codes (also in ``--help``): 0 done; 1 training aborted (non-finite
    loss, gradient or parameters); 2 bad input, refused, or a failed write (one ``error:``
    line); 130 / 143 interrupted by Ctrl-C / SIGTERM."""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    out = "--out"

    def report(msg) -> None:
        if rank0:
            print(msg, file=sys.stderr)

    try:
        cfg = parse_args(argv)
        out = cfg.out
        train(cfg)
    except (UsageError, OutputError) as e:
        report(f"error: {e}")
        return 2
    except NonFiniteError as e:
        report(f"error: {e}")
        return 1
    except Interrupted as e:
        report(e)
        return exit_code()
    except KeyboardInterrupt:  # before training started
        report("interrupted before training started; nothing written")
        return exit_code()
    except PeerFailed:  # rank 0 reports its own error
        return 1
    except Exception as e:
        if not no_space(e):  # a full disk met outside the guarded writes (e.g. tiny data)
            raise
        report(f"error: no space left on device while writing into {out}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
