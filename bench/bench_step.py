"""Time and memory of one training micro-step per method, side by side in one run.

    python bench/bench_step.py --tiny sd --batch 8                      # CPU, tiny SD
    python bench/bench_step.py --sd15-config --device cuda --dtype bf16 --batch 8
    python bench/bench_step.py --computed-gpu-table --md gpu_cost.md    # no weights, no GPU

A micro-step is what gradient accumulation repeats: encoding the step's unique prompts
once, noising, ONE reference forward (no grad) on every row the method needs, ONE policy
forward + backward on ``[x_t^w; x_t^l]``. It uses the trainer's own functions
(:func:`bench.t2i.step.encode_step`, :func:`bench.t2i.step.compute_loss`). The optimizer
step is left out by default (``--with-optimizer`` adds it): it is the same for every method
and amortised over the accumulation steps.

Counting a backward as about two forwards, D-DPO costs 3 x 2B (policy) + 2B (reference)
= 8B sample-forwards and DDSPO 6B + 3B = 9B, a floor of 9/8 = 1.125 on the ratio (the
paper counts network evaluations, 5 vs 4 = 1.25). Methods run round-robin, so slow drift
hits all of them alike; the median over ``--reps`` is reported.

Memory: on CUDA the peak allocated during the step; on the CPU, where torch keeps no
allocator statistics, the bytes autograd saves for the backward (the policy's activations).

With ``--tiny`` it first times ``make_pairs``' sampling (:func:`bench.t2i.pairs.build_pairs`,
one sampler call of ``--batch`` pairs = ``2 x batch`` images) with classifier-free guidance
batched as the repository runs it (:func:`minddspo.sampling.guided`: unconditional and
conditional rows in ONE forward) against the same build with the two branches as two
forwards, alternating, and prints images per second of both and their ratio
(``--sampling-reps 0`` skips it).

``--computed-gpu-table`` prints instead the GPU cost of every method on the real SD-1.5,
SDXL, SD3-medium and SANA-1.6B configs, computed (not measured) by :mod:`bench.t2i.gpu_cost`.

The last line of a step benchmark is ``ratio ddspo/dpo: X``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from bench.t2i import backbones, gpu_cost
from bench.t2i.backbones import BACKBONES
from bench.t2i.cli import (
    DTYPES,
    TINY_HELP,
    UsageError,
    check_positive,
    dtype_name,
    opt,
    parse,
    run_command,
    tiny_name,
    torch_dtype,
)
from bench.t2i.config import TrainConfig, resolve
from bench.t2i.models import open_backbone
from bench.t2i.reference import Reference
from bench.t2i.step import compute_loss, encode_step, loss_spec
from minddspo.methods import METHODS
from minddspo.schedules import cfg_combine


def sd15_unet():
    """A UNet with Stable Diffusion 1.5's published config (``bench/t2i/configs/sd15/unet.json``),
    random weights (860M)."""
    return gpu_cost.build_module(gpu_cost.CONFIG_DIR / "sd15" / "unet.json", device="cpu")


def sd15_text_encoder():
    """CLIP ViT-L/14's text tower (SD-1.5's encoder, ``bench/t2i/configs/sd15/text_encoder.json``),
    random weights, with the tiny byte-level tokenizer's vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    _, kw = gpu_cost.read_config(gpu_cost.CONFIG_DIR / "sd15" / "text_encoder.json")
    kw.update(vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    return CLIPTextModel(CLIPTextConfig(**kw)).eval().requires_grad_(False)


def build_backbone(cfg: BenchStepConfig):
    torch.manual_seed(0)
    bb = open_backbone(tiny=cfg.backbone)
    if cfg.sd15_config:
        from bench.t2i.tiny import clip_tokenizer

        bb.denoiser = bb.components["unet"] = sd15_unet()
        bb.components["text_encoder"] = sd15_text_encoder()
        bb.components["tokenizer"] = clip_tokenizer(77)
        bb.latent_channels = 4
    return bb


class SavedBytes:
    """Counts the bytes autograd saves for backward (CPU memory proxy)."""

    def __init__(self):
        self.n = 0

    def pack(self, x):
        self.n += x.numel() * x.element_size()
        return x

    def __enter__(self):
        self.n = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda x: x)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def guided_unbatched(forward, cond, uncond, guidance_scale: float, concat):
    """:func:`minddspo.sampling.guided` with the unconditional and conditional branches as two
    forwards: the unbatched side of the comparison (``concat`` unused)."""
    if guidance_scale == 1.0:
        return lambda x, t: forward(x, t, cond)
    return lambda x, t: cfg_combine(forward(x, t, uncond), forward(x, t, cond), guidance_scale)


def make_pairs_run(backbone, prompts: list[str], steps: int, batched: bool):
    """Seconds of one ``build_pairs`` on ``prompts`` (one sampler call, a fresh directory)
    and the winner latents it wrote. Unbatched: ``Backbone.generate`` gets
    :func:`guided_unbatched` in place of :func:`minddspo.sampling.guided`."""
    from safetensors.torch import load_file

    from bench.t2i.pairdata import shard_path
    from bench.t2i.pairs import build_pairs

    patch = nullcontext() if batched else mock.patch.object(backbones, "guided", guided_unbatched)
    with tempfile.TemporaryDirectory() as out, patch:
        t0 = time.perf_counter()
        build_pairs(
            backbone, prompts, out, steps=steps, shard_size=len(prompts),
            batch_size=len(prompts), progress=False, latent_dtype="float32",
        )  # fmt: skip
        dt = time.perf_counter() - t0
        return dt, load_file(shard_path(out, 0))["x0_w"]


def sampling_benchmark(cfg: BenchStepConfig, device: torch.device, dtype: torch.dtype) -> None:
    """make_pairs' images per second, CFG batched vs unbatched, alternating (median)."""
    from bench.t2i.prompts import DEMO_PROMPTS

    bb = open_backbone(tiny=cfg.backbone).for_inference(device, dtype)
    prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] + f" #{i}" for i in range(cfg.batch)]
    steps = cfg.sampling_steps or bb.default_steps
    times: dict[str, list[float]] = {"batched": [], "unbatched": []}
    latents = {}
    warmup = min(cfg.warmup, 1)  # one build warms both paths up; each costs seconds
    for rep in range(warmup + cfg.sampling_reps):
        for mode in times:  # alternating: drift hits both alike
            dt, latents[mode] = make_pairs_run(bb, prompts, steps, mode == "batched")
            if rep >= warmup:
                times[mode].append(dt)
    images = 2 * len(prompts)  # paired variant: winner from c and loser from c- per pair
    rate = {m: images / statistics.median(ts) for m, ts in times.items()}
    diff = (latents["batched"] - latents["unbatched"]).abs().max().item()
    print(
        f"# make_pairs (build_pairs, paired) on tiny {cfg.backbone}: {len(prompts)} pairs = "
        f"{images} images per sampler call, {steps} steps, CFG {bb.default_guidance}, "
        f"{cfg.device} {cfg.dtype}, median of {cfg.sampling_reps}, threads "
        f"{torch.get_num_threads()}"
    )
    print(f"{'cfg':10s} {'images/s':>10s} {'forwards x rows per step':>26s}")
    print(f"{'batched':10s} {rate['batched']:10.2f} {f'1 x {2 * images}':>26s}")
    print(f"{'unbatched':10s} {rate['unbatched']:10.2f} {f'2 x {images}':>26s}")
    print(
        f"ratio batched/unbatched: {rate['batched'] / rate['unbatched']:.3f} "
        f"(max |x0_w batched - unbatched| = {diff:.1e})"
    )


def gpu_table(cfg: BenchStepConfig) -> int:
    """The computed (not measured) GPU cost table of :mod:`bench.t2i.gpu_cost`."""
    keys = [k.strip() for k in cfg.gpu_models.split(",") if k.strip()]
    t0 = time.perf_counter()
    text = gpu_cost.markdown(gpu_cost.compute_rows(keys))
    print(text, end="")
    print(f"# computed in {time.perf_counter() - t0:.0f} s on the meta device (no weights, no GPU)")
    if cfg.md:
        Path(cfg.md).write_text(text)
    return 0


@dataclass
class BenchStepConfig:
    tiny: str | bool | None = opt(
        None,
        TINY_HELP + ", or --backbone's; the default (--sd15-config swaps its UNet)",
        choices=BACKBONES,
        nargs="?",
        const=True,
    )
    sd15_config: bool = opt(False, "SD-1.5-sized UNet and text encoder, random weights")
    backbone: str | None = opt(
        None, "the tiny backbone, as --tiny NAME (default: sd)", choices=BACKBONES
    )
    batch: int = opt(8, "pairs per micro-step")
    latent: int | None = opt(None, "latent side (unset or 0: the backbone's)")
    methods: str = opt("dpo,ddspo,dspo,dspo_cpp,sft", "comma-separated methods to time")
    reps: int = opt(10, "timed steps per method (median reported)")
    warmup: int = opt(2, "untimed steps per method first")
    device: str = opt("cpu", "torch device")
    dtype: str = opt("fp32", "autocast dtype of the step", choices=tuple(DTYPES), parse=dtype_name)
    with_optimizer: bool = opt(False, "include an AdamW step")
    threads: int | None = opt(None, "torch CPU threads (unset or 0: torch's)")
    sampling_reps: int = opt(3, "--tiny: make_pairs CFG batched vs unbatched repetitions (0: skip)")
    sampling_steps: int | None = opt(
        None, "sampler steps of that comparison (default: the backbone's paper setting)"
    )
    computed_gpu_table: bool = opt(
        False, "print the computed GPU cost of every method on the real configs"
    )
    gpu_models: str = opt(",".join(gpu_cost.ARCHS), "backbones of --computed-gpu-table")
    md: str | None = opt(None, "--computed-gpu-table: also write it to this file", metavar="FILE")


def parse_args(argv: list[str] | None = None) -> BenchStepConfig:
    cfg = parse(BenchStepConfig, argv, prog="bench_step.py", description=__doc__.splitlines()[0])
    for name in ("latent", "threads", "sampling_steps"):  # 0 meant "the default" before None
        if getattr(cfg, name) == 0:
            setattr(cfg, name, None)
    for k in cfg.gpu_models.split(","):
        if k.strip() and k.strip() not in gpu_cost.ARCHS:
            raise UsageError(f"unknown model {k!r}; choose from {', '.join(gpu_cost.ARCHS)}")
    cfg.backbone = tiny_name(cfg.tiny or True, cfg.backbone)  # always tiny: sd by default
    cfg.tiny = True
    if cfg.sd15_config and cfg.backbone != "sd":
        raise UsageError("--sd15-config builds an SD-1.5 UNet: use --tiny sd")
    for m in _methods(cfg):
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r}")
    check_positive(cfg, ("batch", "reps", "latent", "threads", "sampling_steps"))
    return cfg


def _methods(cfg: BenchStepConfig) -> list[str]:
    return [m.strip() for m in cfg.methods.split(",") if m.strip()]


class StepBench:
    """One backbone, policy, reference and fixed batch; :meth:`time` runs one training step."""

    def __init__(self, cfg: BenchStepConfig, device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.bb = build_backbone(cfg).to(device, None if dtype == torch.float32 else dtype)
        self.policy = self.bb.denoiser.train()
        self.reference = Reference(self.bb, self.policy, lora=False, periodic=False, dtype=dtype)
        params = [q for q in self.policy.parameters() if q.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-12)
        self.side = cfg.latent or (64 if cfg.sd15_config else self.bb.latent_shape()[-1])
        B, C = cfg.batch, self.bb.latent_channels
        self.g = torch.Generator().manual_seed(0)
        self.x0_w = torch.randn(B, C, self.side, self.side, generator=self.g).to(device)
        self.x0_l = torch.randn(B, C, self.side, self.side, generator=self.g).to(device)
        self.prompts = [f"a photo of object {i} on a red table" for i in range(B)]
        self.negs = [f"object {i} table" for i in range(B)]
        self.train_cfgs = {
            m: resolve(TrainConfig(tiny=True, backbone=cfg.backbone, method=m))
            for m in _methods(cfg)
        }
        self.specs = {m: loss_spec(c, self.bb) for m, c in self.train_cfgs.items()}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, method: str) -> tuple[float, float]:
        """Seconds of one step of ``method`` and its memory (CUDA peak or saved bytes), MiB."""
        cfg, bb, dtype = self.train_cfgs[method], self.bb, self.dtype
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._sync()
        t0 = time.perf_counter()
        conds = encode_step(bb, self.prompts, self.negs, need_neg=cfg.uses_neg, need_uncond=False)
        t = bb.sample_t(self.cfg.batch, self.g, cfg.timestep_sampler).to(self.device)
        noise = torch.randn(self.x0_w.shape, generator=self.g).to(self.device)
        with SavedBytes() as saved:
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss, _ = compute_loss(
                    self.specs[method], bb, self.policy, self.reference, self.x0_w, self.x0_l,
                    conds, t, noise, noise,
                )  # fmt: skip
            loss.mean().backward()
        if self.cfg.with_optimizer:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._sync()
        dt = time.perf_counter() - t0
        mem = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else saved.n
        return dt, mem / 2**20


def step_benchmark(cfg: BenchStepConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Median step time and memory per method, measured round-robin (drift hits all alike)."""
    bench, methods = StepBench(cfg, device, dtype), _methods(cfg)
    times: dict[str, list[float]] = {m: [] for m in methods}
    mems: dict[str, float] = {}
    for rep in range(cfg.warmup + cfg.reps):
        for m in methods:
            dt, mem = bench.time(m)
            if rep >= cfg.warmup:
                times[m].append(dt)
                mems[m] = max(mems.get(m, 0.0), mem)
    what = "sd15-config UNet" if cfg.sd15_config else f"tiny {cfg.backbone}"
    mem_kind = "peak MiB" if device.type == "cuda" else "saved-for-backward MiB"
    C, side = bench.bb.latent_channels, bench.side
    print(
        f"# {what}, batch {cfg.batch} pairs, latents {C}x{side}x{side}, {cfg.device} "
        f"{cfg.dtype}, median of {cfg.reps}, threads {torch.get_num_threads()}"
    )
    print(f"{'method':10s} {'ms/step':>10s} {mem_kind:>24s}")
    med = {m: statistics.median(times[m]) for m in methods}
    for m in methods:
        print(f"{m:10s} {1000 * med[m]:10.1f} {mems[m]:24.1f}")
    if "dpo" in med and "ddspo" in med:
        print(f"ratio ddspo/dpo: {med['ddspo'] / med['dpo']:.3f}")


def _run(cfg: BenchStepConfig) -> int:
    if cfg.computed_gpu_table:
        return gpu_table(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, dtype = torch.device(cfg.device), torch_dtype(cfg.dtype)
    if cfg.backbone == "flux" and not cfg.sd15_config and cfg.sampling_reps > 0:
        print("# make_pairs CFG batched vs unbatched: skipped, flux samples without CFG")
    elif not cfg.sd15_config and cfg.sampling_reps > 0:
        sampling_benchmark(cfg, device, dtype)
    step_benchmark(cfg, device, dtype)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
