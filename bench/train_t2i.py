"""Preference fine-tuning of text-to-image diffusion models: sft, dpo, dspo, dspo_cpp, ddspo.

    torchrun --nproc_per_node=2 bench/train_t2i.py --tiny sd --method ddspo --max-steps 4 --out DIR
    torchrun --nproc_per_node=8 bench/train_t2i.py --pretrained SD15_DIR --data PAIRS_DIR \\
        --method ddspo --beta 16000 --batch-size 8 --grad-accum 32 --warmup-steps 100 ...

Plain torch.distributed + DDP (gloo on CPU, NCCL on CUDA), or FSDP2 with ``--shard fsdp``
(``bench.t2i.sharding``); ``python bench/train_t2i.py`` without torchrun runs the same code
with world size 1. :func:`train` reads top to bottom: config -> distributed init ->
backbone -> data -> reference -> optimizer -> resume -> loop -> checkpoint. One step's math
(``encode_step``, ``compute_loss``) is in ``bench.t2i.step``; backbones are opened by
``bench.t2i.models.open_backbone``, random-condition mixing is ``bench.t2i.randcond``. All
loss, schedule, timestep and reference-update math comes from ``minddspo``; backbone glue
from ``bench.t2i.backbones``; config, checkpoint and reference helpers from ``bench.t2i``.

Nothing is lost and nothing fails silently: OUT is checked before any work (a file, an
unwritable disk, or another run without --resume is refused), --resume must match the
checkpoint's config and skips a damaged newest checkpoint, the weights are checked finite
after every step (nothing non-finite is saved), and a full disk or Ctrl-C / SIGTERM stops
with one line, earlier checkpoints intact. Exit codes: see ``--help``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from bench.t2i.backbones import Backbone, move_module
from bench.t2i.checkpoint import (
    atomic_write_dir,
    checkpoint_name,
    find_resume,
    latest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    stage_checkpoint,
)
from bench.t2i.cli import DTYPES, torch_dtype
from bench.t2i.config import (
    TrainConfig,
    UsageError,
    adopt_saved_defaults,
    parse_args,
    resolve_for_backbone,
    resume_mismatches,
    write_config,
)
from bench.t2i.data import batch_indices, batch_positions, dataset_fingerprint, row_generators
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
from bench.t2i.models import open_backbone
from bench.t2i.outdir import (
    OutputError,
    check_out_dir,
    no_space,
    remove_stale_tmp,
    run_lock,
    truncate_jsonl,
    writing,
)
from bench.t2i.pairdata import PairDataset, collate_pairs
from bench.t2i.provenance import base_record, check_base, write_base
from bench.t2i.randcond import mix_rows, read_extra_prompts
from bench.t2i.reference import DivergenceProbe, Reference
from bench.t2i.sharding import (
    DCP_DIR,
    all_finite_sharded,
    as_float,
    full_module,
    full_state,
    load_sharded,
    meta_copy,
    mixed_precision,
    model_state,
    optimizer_state,
    save_sharded,
    set_states,
    shard_module,
)
from bench.t2i.step import (
    DIAG_KEYS,
    PAIR_SFT_KEYS,
    build_optimizer,
    compute_loss,
    draw_noise,
    drop_prompts,
    encode_step,
    loss_spec,
)
from bench.t2i.validation import (
    SAMPLES_DIR,
    check_tensorboard,
    many_prompts_warning,
    open_tensorboard,
    tb_image,
    tb_write,
    validation_due,
    write_validation,
)
from bench.t2i.weights import (
    add_lora,
    all_finite,
    check_denoiser_files,
    denoiser_with_lora,
    find_lora,
    load_policy,
    param_digest,
    save_final_pipeline,
    save_lora,
    write_checkpoint,
    write_pipeline_call,
)
from minddspo.extras import missing_extra
from minddspo.methods import dspo_beta_warning
from minddspo.refupdate import ReferenceUpdateRule

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "final")  # OUT holds a run
#: --sft-branch pair: the two trained networks, each written to OUT/<side>/final and
#: OUT/checkpoints/step-N/<side>/ (a plain run's one network: side "", OUT/final)
PAIR_SIDES = ("winner", "loser")
TRAINER_STATE_KEYS = ("optimizer", "scheduler", "scaler", "counters")


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row, or parameters made non-finite by a step."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM; the message says the step reached and how to resume."""


class PeerFailed(RuntimeError):
    """Rank 0 failed a write (and reports it); the other ranks stop with it."""


# ------------------------------------------------------------------------------- setup


def check_run_dir(cfg: TrainConfig) -> None:
    """OUT must be a writable folder, and hold no run unless --resume continues it."""
    out = Path(cfg.out)
    try:
        check_out_dir(out)
    except OutputError as e:
        raise UsageError(str(e)) from None
    run_files = RUN_FILES + (PAIR_SIDES if cfg.sft_branch == "pair" else ())
    held = [name for name in run_files if (out / name).exists()]
    if held and not cfg.resume:
        raise UsageError(
            f"{out} holds a run; pass --resume to continue it or choose another --out "
            f"(found {', '.join(held)})"
        )


def load_model(cfg: TrainConfig) -> Backbone:
    try:
        bb = open_backbone(
            cfg.pretrained,
            cfg.backbone if cfg.tiny else None,
            backbone=cfg.backbone,
            prediction_type=cfg.prediction_type,
        )
        if bb.name == "sana":  # official (pipeline preprocessing + instruction prefix) or plain
            bb.prompt_style = cfg.sana_prompt_style
        if bb.name == "flux" and cfg.flux_guidance is not None:  # unset: the pipeline's 3.5
            bb.guidance = cfg.flux_guidance
        return bb
    except (UsageError, OSError) as e:
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
            from bench.t2i.pairs import build_pairs
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
    opened: list[PairDataset] = []

    def open_pairs() -> None:  # rank 0 reads every shard in full; the others their headers
        try:
            opened.append(PairDataset(path, verify=env.is_main))
        except (UsageError, OSError) as e:
            raise UsageError(str(e)) from None

    agree(open_pairs)  # a damaged shard stops every rank with rank 0's line
    return opened[0]


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
    if hasattr(backbone, "resolution"):  # the training image size: SDXL's micro-conditioning,
        try:  # FLUX's resolution-dependent shift
            backbone.resolution = w * backbone.vae_scale_factor
        except UsageError as e:
            raise UsageError(f"{dataset.root}: {e}") from None


def find_checkpoint(
    cfg: TrainConfig, env: DistEnv, ckpt_root: Path, fingerprint: str
) -> tuple[Path | None, dict | None, TrainConfig]:
    """The checkpoint to resume from (the newest intact one for ``latest``), its state and the
    config to continue with (:func:`adopt_saved_defaults`), refused unless the checkpoint's
    config matches in everything that changes what is trained."""
    try:
        ckpt, state, damaged = find_resume(cfg.resume, ckpt_root)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if ckpt is None:
        return None, None, cfg
    if damaged and env.is_main:
        print(f"warning: {'; '.join(damaged)}; resuming from {ckpt}", file=sys.stderr)
    missing = [k for k in TRAINER_STATE_KEYS if k not in state]
    if missing:
        raise UsageError(f"--resume {ckpt}: not a trainer checkpoint (no {', '.join(missing)})")
    saved_fp = state.get("data_fingerprint")
    cfg = adopt_saved_defaults(cfg, state.get("config") or {})
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
    return ckpt, state, cfg


def saved_world(state: dict) -> int:
    return int(state.get("world") or len(state["rng"]))  # old checkpoints: one RNG per rank


def load_policy_pair(cfg: TrainConfig, backbone: Backbone, device, dtype, base=None):
    """``(f_win, f_lose)``, frozen, in eval mode. Each is a full denoiser folder, or a LoRA
    output in diffusers' format (``pytorch_lora_weights.safetensors``, directly or under
    ``lora/``, e.g. ``bench/train_policy_pair.py``'s ``OUT/winner/final``): then a copy of
    the base denoiser with that LoRA loaded. Each must have been trained on ``base``
    (:func:`bench.t2i.provenance.check_base`) when both say so."""

    def load(path: str) -> torch.nn.Module:
        lora_dir = find_lora(path)
        try:
            check_base(path, base)
            check_denoiser_files(path, backbone.denoiser_subfolder)
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


@dataclass
class LoopState:
    """The training loop's counters (saved in every checkpoint as ``counters``)."""

    step: int = 0  # loop steps done, skipped non-finite ones included
    opt_step: int = 0  # optimizer steps taken
    frozen: bool = False  # periodic reference update: frozen once D > delta
    nonfinite_total: int = 0
    nonfinite_run: int = 0  # non-finite steps in a row


def train(cfg: TrainConfig) -> Path:
    """Run the training described by ``cfg`` (validated); returns the run directory."""
    env = init_distributed(cfg.device, group=cfg.shard == "fsdp")
    state = LoopState()
    ok = False
    try:
        # SIGTERM unwinds like Ctrl-C: temporary folders are removed; `held`: OUT's lock
        with handle_signals(), contextlib.ExitStack() as held:
            try:
                out = Trainer(cfg, env, state, held).run()
            except KeyboardInterrupt:
                raise Interrupted(interrupt_message(cfg, state.step)) from None
        ok = True
        return out
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)  # drop the DDP model the failed frames hold
        raise
    finally:
        cleanup(graceful=ok)  # gc before destroy_process_group (tests/README.md, "Traps")


def interrupt_message(cfg: TrainConfig, step: int) -> str:
    last = latest_checkpoint(Path(cfg.out) / "checkpoints")
    if last is None and cfg.resume not in (None, "latest"):
        return f"interrupted at step {step}; resume with --resume {cfg.resume} (nothing saved yet)"
    where = f"newest checkpoint: {last.name}" if last else "no checkpoint yet: it starts over"
    return f"interrupted at step {step}; resume with --resume latest ({where})"


class Trainer:
    """One training run: :meth:`run` = set-up (every check before any write), the loop, the
    final weights. ``state`` is shared with the caller, which reports the step on Ctrl-C."""

    def __init__(
        self, cfg: TrainConfig, env: DistEnv, state: LoopState, held: contextlib.ExitStack
    ):
        self.cfg, self.env, self.st, self.held = cfg, env, state, held
        self.out, self.device, self.dtype = Path(cfg.out), env.device, DTYPES[cfg.dtype]
        self.ckpt_root = self.out / "checkpoints"
        self.log = self.out / "metrics.jsonl"
        self.metrics = self.tb = self.bar = None
        self.val_prompts: list[str] = []
        self.sharded = cfg.shard == "fsdp"  # FSDP2 (bench.t2i.sharding), else DDP

    def print0(self, *a, **k) -> None:
        if self.env.is_main:
            print(*a, **k)

    def autocast(self):  # bf16/fp16 compute; losses are float32 inside minddspo
        dtype = self.dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    # ------------------------------------------------------------------------- set-up

    def run(self) -> Path:
        self._check_inputs()
        ckpt, saved = self._open_model_and_data()
        self._build_training()
        if ckpt is not None:
            self._resume(ckpt, saved)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddps = {  # an FSDP2 policy is its own wrapper
            side: DDP(net, device_ids=ids) if self.env.distributed and not self.sharded else net
            for side, net in self.nets.items()
        }
        on_rank0(self.env, self._start_run_dir)
        self._announce()
        with self._loop_context():
            while self.st.step < self.cfg.max_steps:
                self._step()
            self.bar.close()
            digests = self._digests()
            self._log_line({"step": self.st.step, "end": True, "param_sha256": digests})
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks ended with different parameters: {digests}")
        on_rank0(self.env, self._write_final)
        finals = " and ".join(str(self.out / side / "final") for side in self.nets)
        self.print0(
            f"done: {self.st.step} steps ({self.st.nonfinite_total} skipped); final weights in "
            f"{finals}"
        )
        return self.out

    def _check_inputs(self) -> None:
        """Refused before any work (and before any rank writes into OUT)."""
        cfg, env = self.cfg, self.env
        agree(self._claim_run_dir)  # no rank writes into OUT before rank 0 holds its lock
        if cfg.tensorboard:
            agree(check_tensorboard)
        # read by every rank, so a bad file stops them all alike
        agree(lambda: self.val_prompts.extend(validation_prompts(cfg)))
        if env.is_main:  # left by a kill -9 mid-write
            sides = [self.out / side for side in PAIR_SIDES] if cfg.sft_branch == "pair" else []
            for d in [self.out, *sides]:
                remove_stale_tmp(d, d / SAMPLES_DIR)
            remove_stale_tmp(self.ckpt_root)

    def _claim_run_dir(self) -> None:
        """Rank 0 takes OUT's lock for the whole run (another run on OUT is refused), then
        every rank checks OUT."""
        if self.env.is_main:
            self.held.enter_context(run_lock(self.cfg.out))
        check_run_dir(self.cfg)

    def _open_model_and_data(self):
        """Data and backbone, validated before anything is written into OUT/checkpoints;
        returns the checkpoint to resume from and its trainer state (or None, None)."""
        cfg, env = self.cfg, self.env
        dataset = open_data(cfg, env)  # a cheap header check first: fail fast on bad --data
        torch.manual_seed(cfg.seed)  # identical init on every rank (LoRA); DDP broadcasts anyway
        self.backbone = backbone = load_model(cfg)
        self.base = base_record(backbone, cfg.pretrained, backbone.name if cfg.tiny else None)
        self.cfg = cfg = resolve_for_backbone(cfg, backbone.name)
        text_dtype = torch_dtype(cfg.text_dtype) if cfg.text_dtype else None
        backbone.to(self.device, None if self.dtype == torch.float32 else self.dtype, text_dtype)
        self.policy = backbone.denoiser  # fp32 master weights; autocast does the rest
        self.dataset = dataset or open_data(cfg, env, backbone)
        check_data(self.dataset, backbone)
        built_on = (self.dataset.info.get("base") or {}).get("denoiser")
        if built_on and built_on != self.base["denoiser"] and env.is_main:
            print(
                f"warning: {self.dataset.root} was built from another base model "
                f"({self.dataset.info['base'].get('base')}) than this run's ({self.base['base']})",
                file=sys.stderr,
            )
        self.fingerprint = dataset_fingerprint(self.dataset.root)
        self.extra: list = []  # --rand-cond-prompts, read by every rank
        if cfg.rand_cond_prompts:
            train_prompts = {r["prompt"] for r in self.dataset.records}
            read = functools.partial(read_extra_prompts, cfg.rand_cond_prompts, train_prompts)
            agree(lambda: self.extra.extend(read()))
        ckpt, state, self.cfg = find_checkpoint(cfg, env, self.ckpt_root, self.fingerprint)
        return ckpt, state

    def _build_training(self) -> None:
        """LoRA, the reference and its probe, the policy pair, the optimizer."""
        cfg, backbone, policy = self.cfg, self.backbone, self.policy
        self.nets = {"": policy}  # the trained networks by side
        if cfg.sft_branch == "pair":  # the loser: a copy sharing the frozen base weights
            shared = {id(t): t for t in [*policy.parameters(), *policy.buffers()]}
            self.nets = {"winner": policy, "loser": copy.deepcopy(policy, memo=shared)}
        if cfg.lora:
            targets = cfg.lora_target_list()
            draws = rng_state()  # every adapter starts from the same draw (as separate runs)
            for net in self.nets.values():
                set_rng_state(draws)
                add_lora(net, cfg.lora, cfg.lora_alpha, targets, cfg.lora_init)
        for net in self.nets.values():
            if cfg.gradient_checkpointing:
                net.enable_gradient_checkpointing()
            net.train()
        self.periodic = cfg.ref_update == "periodic"
        needs_ref = cfg.method != "sft"
        self.reference = (
            Reference(backbone, policy, lora=cfg.lora > 0, periodic=self.periodic, dtype=self.dtype)
            if needs_ref
            else None
        )
        self.rule = ReferenceUpdateRule(cfg.ref_update, cfg.ref_tau, cfg.ref_delta)
        self.pair = (
            load_policy_pair(cfg, backbone, self.device, self.dtype, self.base)
            if cfg.policy_pair
            else None
        )
        if self.sharded:  # after the reference's copy and the pair: both from the whole model
            self._shard()
        self.probe = None
        if self.periodic and needs_ref:  # the initial model on fixed samples, before any resume
            items = collate_pairs(
                [self.dataset[i % len(self.dataset)] for i in range(cfg.ref_probe)]
            )
            cond = backbone.encode_prompts(items["prompt"])
            x0 = items["x0_w"].to(self.device)
            self.probe = DivergenceProbe(
                backbone, x0, cond, self.reference, cfg.seed, self.autocast
            )
        # only the trainable parameters (all, or the LoRA adapters; FSDP2: their shards), of
        # every side: one optimizer, one gradient clip over them all
        self.params = [p for net in self.nets.values() for p in net.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(cfg, self.params)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.dtype == "fp16")
        self.spec = loss_spec(cfg, backbone)  # what every step computes

    def _shard(self) -> None:
        """FSDP2: the policy sharded per block (an empty twin kept for final/), and the
        reference adapted (:meth:`Reference.after_sharding`)."""
        cfg, policy = self.cfg, self.policy
        mp = mixed_precision(self.device, self.dtype)
        self.skeleton = meta_copy(policy)  # filled with the gathered weights for final/
        shard_module(policy, mp)
        if self.reference is not None:
            shard_copy = (
                functools.partial(shard_module, mp_policy=mp)
                if cfg.shard_reference == "shard"
                else None
            )
            gather = functools.partial(full_state, all_ranks=True)
            self.reference.after_sharding(shard_copy, gather)

    def _sharded_state(self) -> tuple[dict, list]:
        """A sharded checkpoint's tensors (live: a load fills them in place) and the
        optimizer's param groups (plain data, for trainer_state.pt). A collective."""
        lora = self.cfg.lora > 0
        optim = optimizer_state(self.policy, self.optimizer)
        tensors = {"model": model_state(self.policy, trainable_only=lora), "optim": optim["state"]}
        if self.probe is not None:  # a periodically updated reference is state too
            tensors["reference"] = self.reference.state_tensors()
        return tensors, optim["param_groups"]

    def _resume(self, ckpt: Path, saved: dict) -> None:
        check_base(ckpt, self.base)
        if self.sharded:  # the tensors from dcp/, resharded to this world
            tensors, _ = self._sharded_state()
            load_sharded(tensors, ckpt / DCP_DIR)
            optim = {"state": tensors["optim"], "param_groups": saved["optimizer"]["param_groups"]}
            set_states(
                self.policy, self.optimizer, tensors["model"], optim,
                trainable_only=self.cfg.lora > 0,
            )  # fmt: skip
            if self.probe is not None:
                self.reference.load_tensors(tensors["reference"])
        else:
            for side, net in self.nets.items():
                load_policy(self.backbone, net, ckpt / side, self.cfg.lora > 0)
            if self.probe is not None:
                self.reference.load(ckpt / "reference")
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        for key, value in saved["counters"].items():
            setattr(self.st, key, value)
        if "rng" in saved and self.env.is_main:  # written before the per-pair noise keys
            print(
                f"warning: {ckpt} was written by an older trainer whose noise came from "
                "per-rank streams; the resumed steps draw per-pair noise instead",
                file=sys.stderr,
            )
        self.print0(f"resumed from {ckpt} at step {self.st.step}")

    def _start_run_dir(self) -> None:
        """Config, and the log cut back to the checkpoint's step (rank 0)."""
        self.out.mkdir(parents=True, exist_ok=True)
        with writing(self.out / "config.json"):
            write_config(self.cfg, self.out / "config.json")
        with writing(self.log):
            truncate_jsonl(self.log, self.st.step)  # steps after the checkpoint are logged again

    def _announce(self) -> None:
        cfg, env = self.cfg, self.env
        n_trainable = sum(p.numel() for p in self.params)
        self.print0(
            f"{cfg.method} on {self.backbone.name} ({n_trainable / 1e6:.2f}M trainable), world "
            f"{env.world}, {len(self.dataset)} pairs from {self.dataset.root}, beta {cfg.beta:g}"
            + (f" (beta_logit {cfg.beta_logit:g})" if cfg.beta_logit else "")
            + f", lr {cfg.lr:.3g}"
        )
        warning = dspo_beta_warning(cfg.method, cfg.beta)
        if warning and env.is_main:
            print(warning, file=sys.stderr)

    def _loop_context(self) -> contextlib.ExitStack:
        """The log file, the TensorBoard sink and the bar, closed however the loop ends."""
        from diffusers.utils import logging as diffusers_logging
        from tqdm import tqdm
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()  # one bar: ours
        transformers_logging.disable_progress_bar()
        cfg, main = self.cfg, self.env.is_main
        self.nan_steps = cfg.nan_steps()
        stack = contextlib.ExitStack()
        self.metrics = stack.enter_context(open(self.log, "a")) if main else None  # noqa: SIM115
        if cfg.tensorboard and main:  # the same records as metrics.jsonl, into OUT/tb/
            with writing(self.out / "tb"):
                self.tb = open_tensorboard(self.out, resume_step=self.st.step)
            stack.callback(self.tb.close)
        self.bar = stack.enter_context(
            tqdm(total=cfg.max_steps, initial=self.st.step, disable=not (main and cfg.progress))
        )
        return stack

    # --------------------------------------------------------------------------- loop

    def _step(self) -> None:
        """One optimizer step (or a counted skip), its log line, reference update,
        checkpoint and validation images."""
        cfg, st = self.cfg, self.st
        t0 = time.perf_counter()
        stats = self._forward_backward()
        finite, grad_norm, lr = self._optimizer_step(stats)
        st.step += 1
        self.bar.update(1)
        rec = {"step": st.step, "loss": stats[0], "grad_norm": grad_norm, "lr": lr}
        rec.update({key: stats[1 + j] for j, key in enumerate(self.diag_keys())})
        if self.extra:
            rec["rand_cond_share"] = stats[-1]  # share of rows swapped to extra prompts
        pairs = cfg.batch_size * cfg.grad_accum * self.env.world
        rec["samples_per_s"] = pairs / (time.perf_counter() - t0)
        rec["nonfinite_total"] = st.nonfinite_total
        event = not finite
        if not finite:
            rec["skipped"] = True
            self.print0(
                f"step {st.step}: non-finite loss or gradient, step skipped "
                f"({st.nonfinite_run} in a row, {st.nonfinite_total} in total)"
            )
        if finite and self._update_reference(rec):
            event = True
        if event or st.step % cfg.log_every == 0:
            self._log_line(rec)
        self.bar.set_postfix(loss=f"{stats[0]:.4g}", acc=f"{rec.get('implicit_acc', 0):.2f}")
        if st.nonfinite_run >= cfg.max_nonfinite:
            raise NonFiniteError(
                f"loss or gradient non-finite for {st.nonfinite_run} steps in a row (up to "
                f"step {st.step}); aborting. Lower --lr or --beta, use --dtype fp32, or "
                "check the data"
            )
        if (cfg.ckpt_every and st.step % cfg.ckpt_every == 0) or st.step == cfg.max_steps:
            self._checkpoint()
        if validation_due(st.step, cfg.validation_every, cfg.max_steps):
            on_rank0(self.env, functools.partial(self._validate, st.step))  # others wait

    def _forward_backward(self) -> list[float]:
        """Loss and diagnostics averaged over the micro-steps and the ranks; gradients
        all-reduced on the last micro-step only."""
        cfg, env, bb, device = self.cfg, self.env, self.backbone, self.device
        keys = self.diag_keys()
        sums = torch.zeros(2 + len(keys), dtype=torch.float64)  # loss, diag., swapped
        ddps = list(self.ddps.values())
        policy = ddps[0] if len(ddps) == 1 else tuple(ddps)  # pair: (winner, loser)
        for micro in range(cfg.grad_accum):
            pos = batch_positions(
                step=self.st.step, micro=micro, accum=cfg.grad_accum, rank=env.rank,
                world=env.world, batch=cfg.batch_size,
            )  # fmt: skip
            idx = batch_indices(len(self.dataset), seed=cfg.seed, positions=pos)
            batch = collate_pairs([self.dataset[i] for i in idx])
            x0_w, x0_l = batch["x0_w"].to(device), batch["x0_l"].to(device)  # (B, C, h, w)
            gens = row_generators(cfg.seed, pos)  # every draw of row i: from gens[i]
            t, noise_w, noise_l = draw_noise(cfg, bb, gens, x0_w)
            prompts, negs, swapped = batch["prompt"], batch["neg_prompt"], None
            if self.extra:  # random-condition mixing: rows swapped by their noise level
                prompts, negs, swapped = mix_rows(
                    prompts, negs, t, bb.num_train_timesteps, gens, self.extra,
                    cfg.rand_cond_schedule, cfg.rand_cond_lambda, cfg.rand_cond_timing,
                )  # fmt: skip
                sums[-1] += swapped.double().mean().item()
            prompts, negs = drop_prompts(cfg, gens, prompts, negs)
            conds = encode_step(
                bb, prompts, negs, need_neg=cfg.uses_neg, need_uncond=cfg.target_guidance != 1.0,
                encode_empty=cfg.dropped_prompt_encoding == "encoded",
            )  # fmt: skip
            with contextlib.ExitStack() as syncs:  # all-reduce on the last micro-step
                for ddp in ddps:
                    syncs.enter_context(no_sync(ddp, sync=micro == cfg.grad_accum - 1))
                with self.autocast():
                    loss_vec, diag = compute_loss(
                        self.spec, bb, policy, self.reference, x0_w, x0_l, conds, t, noise_w,
                        noise_l, self.pair, swapped,
                    )  # fmt: skip
                loss = loss_vec.mean()
                if env.is_main and self.st.step + 1 in self.nan_steps:  # test hook
                    loss = loss * float("nan")
                self.scaler.scale(loss / cfg.grad_accum).backward()
            sums[0] += loss.item()
            for j, key in enumerate(keys):
                if key in diag:
                    sums[1 + j] += diag[key].double().mean().item()
        return all_reduce_mean((sums / cfg.grad_accum).to(device)).cpu().tolist()

    def diag_keys(self) -> tuple[str, ...]:
        """The diagnostics logged per step: the preference methods' or each side's loss."""
        if self.cfg.method != "sft":
            return DIAG_KEYS
        return PAIR_SFT_KEYS if self.cfg.sft_branch == "pair" else ()

    def _optimizer_step(self, stats: list[float]) -> tuple[bool, float, float]:
        """The optimizer step, or a counted skip when the loss or gradient is not finite.
        Returns ``(finite, grad_norm, lr)``."""
        cfg, st = self.cfg, self.st
        self.scaler.unscale_(self.optimizer)
        clip = cfg.max_grad_norm or math.inf
        grad_norm = as_float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        lr = self.scheduler.get_last_lr()[0]
        # fp16: an overflowing gradient is the GradScaler's business (it skips and
        # rescales). Loss and grad norm are the same on every rank: all decide alike.
        finite = math.isfinite(stats[0]) and (cfg.dtype == "fp16" or math.isfinite(grad_norm))
        if finite:
            self.scaler.step(self.optimizer)
            self.scheduler.step()
            st.opt_step += 1
            st.nonfinite_run = 0
            # A finite loss and gradient can still overflow the weights (a huge --lr):
            # stop before such weights reach a checkpoint or final/.
            if not self._all_finite():
                raise NonFiniteError(
                    f"step {st.step + 1}: the optimizer step (lr {lr:.3g}) made the "
                    "parameters non-finite; stopped without saving them. Lower --lr"
                )
        else:
            st.nonfinite_total += 1
            st.nonfinite_run += 1
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return finite, grad_norm, lr

    def _update_reference(self, rec: dict) -> bool:
        """Stable reference update (Kang et al.): copy every tau steps until D > delta."""
        st = self.st
        if self.probe is None or not self.rule.copy_due(st.opt_step, st.frozen):
            return False
        self.reference.copy_from_policy()
        div = broadcast_float(self.probe(self.reference), self.device)
        rec["ref_updated"], rec["ref_divergence"] = True, div
        if self.rule.freezes(div):
            st.frozen = rec["ref_frozen"] = True
            self.print0(
                f"step {st.step}: reference frozen (D = {div:.4g} > {self.cfg.ref_delta:g})"
            )
        return True

    def _all_finite(self) -> bool:
        """Every trainable parameter finite (FSDP2: every rank's shards; a collective)."""
        return all_finite_sharded(self.params) if self.sharded else all_finite(self.params)

    def _digests(self) -> list[str]:
        """sha256 of the final parameters: one per rank (DDP: all must agree), or one of
        the gathered full weights (FSDP2), which become :attr:`final_nets` for final/."""
        if not self.sharded:
            self.final_nets = self.nets
            nets = list(self.nets.values())  # a pair: both networks in one digest
            net = nets[0] if len(nets) == 1 else torch.nn.ModuleList(nets)
            return gather_objects(param_digest(net))
        full = full_module(self.skeleton, self.policy)  # rank 0; None elsewhere
        self.final_nets = {"": full}
        return [gather_objects(param_digest(full) if self.env.is_main else None)[0]]

    def _checkpoint(self) -> None:
        """Rank 0 writes everything (FSDP2: every rank writes its shards into dcp/ first).
        No RNG state: every draw of a step is keyed by the step's data positions."""
        cfg, st = self.cfg, self.st
        path = self.ckpt_root / checkpoint_name(st.step)
        stage = groups = None
        if self.sharded:
            if not self._all_finite():  # never reached (checked after every step)
                raise NonFiniteError(f"step {st.step}: non-finite parameters; not saved")
            tensors, groups = self._sharded_state()
            made: list[Path] = []
            on_rank0(self.env, lambda: made.append(stage_checkpoint(self.ckpt_root, st.step)))
            stage = Path(gather_objects(str(made[0]) if made else None)[0])
            try:
                with writing(path):
                    save_sharded(tensors, stage / DCP_DIR)
            except BaseException:
                if self.env.is_main:
                    shutil.rmtree(stage, ignore_errors=True)
                raise
        trainer_state = {
            "optimizer": {"param_groups": groups} if self.sharded else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "counters": dataclasses.asdict(st),
            "world": self.env.world,
            "data_fingerprint": self.fingerprint,
            "config": dataclasses.asdict(cfg),
        }
        write = functools.partial(
            write_checkpoint,
            backbone=self.backbone,
            policies={} if self.sharded else self.nets,  # FSDP2: in dcp/ already
            lora=cfg.lora > 0,
            reference=self.reference if self.periodic and not self.sharded else None,
            trainer_state=trainer_state,
            base=self.base,
        )
        params = [] if self.sharded else self.params  # FSDP2: checked on every rank above
        save = functools.partial(
            save_finite, params, st.step, path, write, cfg.keep_last, stage=stage
        )
        on_rank0(self.env, save)

    def _log_line(self, rec: dict) -> None:
        if self.metrics is not None:
            with writing(self.log):
                self.metrics.write(json.dumps(rec) + "\n")
                self.metrics.flush()
        if self.tb is not None:
            with writing(self.out / "tb"):
                tb_write(self.tb, rec)

    def _validate(self, step: int) -> None:
        """Validation images of the current policy (unwrapped: no DDP hooks; LoRA adapters
        on), of each side into OUT/<side>/samples with --sft-branch pair. Dedicated
        generators, global RNG restored: the training is not changed."""
        for side, net in self.nets.items():
            final = write_validation(
                self.backbone, net, self.val_prompts, self.out / side, step,
                seed=self.cfg.validation_seed, steps=self.cfg.validation_steps,
                resolution=self.dataset.latent_shape[-1] * self.backbone.vae_scale_factor,
                batch_size=self.cfg.batch_size, autocast=self.autocast,
                progress=self.cfg.progress,
            )  # fmt: skip
            if self.tb is not None:
                with writing(self.out / "tb"):
                    tag = f"validation/{side}/grid" if side else "validation/grid"
                    tb_image(self.tb, final / "grid.png", step, tag=tag)

    def _write_final(self) -> None:
        """A full pipeline in diffusers layout, or the LoRA weights (rank 0); with
        --sft-branch pair each side's LoRA into OUT/<side>/final."""
        cfg, nets = self.cfg, self.final_nets  # FSDP2: the full weights gathered on rank 0
        if not all_finite(p for net in nets.values() for p in net.parameters()):
            raise NonFiniteError(f"step {self.st.step}: non-finite parameters; final/ not written")

        def write(net: torch.nn.Module, d: Path) -> None:
            if cfg.lora:
                save_lora(self.backbone, net, d)
            elif cfg.pretrained:  # the untouched components as given, the trained denoiser
                save_final_pipeline(self.backbone, net, cfg.pretrained, d)
            else:  # the one network of a full fine-tune (FSDP2: its gathered weights)
                with denoiser_as(self.backbone, net):
                    self.backbone.save_pretrained(d)
            write_pipeline_call(self.backbone, d)  # the call arguments that sample as we do (sd3)
            write_base(d, self.base)  # last: a base.json copied from --pretrained is replaced

        for side, net in nets.items():
            final = self.out / side / "final"
            with writing(final):
                atomic_write_dir(final, functools.partial(write, net))


@contextlib.contextmanager
def denoiser_as(backbone: Backbone, net: torch.nn.Module):
    """``backbone``'s components with ``net`` as the denoiser (e.g. the gathered full
    weights of a sharded policy) for the duration."""
    key, old = backbone.denoiser_subfolder, backbone.components[backbone.denoiser_subfolder]
    backbone.components[key] = net
    try:
        yield
    finally:
        backbone.components[key] = old


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
        prompts = cli_prompts(
            cfg.validation_prompts or None, tiny=cfg.tiny, max_prompts=None, demo=4
        )
    except UsageError as e:
        raise UsageError(f"--validation-prompts: {e}") from None
    warning = many_prompts_warning(len(prompts), f"--validation-prompts {cfg.validation_prompts}")
    if warning and int(os.environ.get("RANK", "0")) == 0:
        print(warning, file=sys.stderr)
    return prompts


def save_finite(params, step: int, path: Path, write, keep_last: int, stage=None) -> None:
    """An atomic checkpoint, written only if every parameter is finite (``stage``: its
    staging folder, already holding the ranks' shards)."""
    if not all_finite(params):  # never reached (checked after every step): belt and braces
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        raise NonFiniteError(f"step {step}: non-finite parameters; checkpoint not written")
    with writing(path):
        save_checkpoint(path.parent, step, write, keep_last, stage)


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
    except ModuleNotFoundError as e:  # an optional package imported on the way (e.g. peft)
        line = missing_extra(e)
        if line is None:
            raise
        report(line)
        return 2
    except Exception as e:
        if not no_space(e):  # a full disk met outside the guarded writes (e.g. tiny data)
            raise
        report(f"error: no space left on device while writing into {out}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
