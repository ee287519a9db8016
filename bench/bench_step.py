"""Time and memory of one training micro-step per method, side by side in one run.

    python bench/bench_step.py --tiny --batch 8                         # CPU, tiny SD
    python bench/bench_step.py --sd15-config --device cuda --dtype bf16 --batch 8
    python bench/bench_step.py --computed-gpu-table --md gpu_cost.md    # no weights, no GPU

A micro-step is what gradient accumulation repeats: encoding the step's unique prompts
once, noising, ONE reference forward (no grad) on every row the method needs, ONE policy
forward + backward on ``[x_t^w; x_t^l]``. It uses the trainer's own functions
(:func:`bench.train_t2i.encode_step`, :func:`bench.train_t2i.compute_loss`). The optimizer
step is left out by default (``--with-optimizer`` adds it): it is the same for every method
and amortised over the accumulation steps.

Counting a backward as about two forwards, D-DPO costs 3 x 2B (policy) + 2B (reference)
= 8B sample-forwards and DDSPO 6B + 3B = 9B, a floor of 9/8 = 1.125 on the ratio (the
paper counts network evaluations, 5 vs 4 = 1.25). Methods run round-robin, so slow drift
hits all of them alike; the median over ``--reps`` is reported.

Memory: on CUDA the peak allocated during the step; on the CPU, where torch keeps no
allocator statistics, the bytes autograd saves for the backward (the policy's activations).

With ``--tiny`` it first times ``make_pairs``' sampling (:func:`bench.make_pairs.build_pairs`,
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

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch

from bench.t2i import backbones, gpu_cost
from bench.t2i.backbones import tiny_backbone
from bench.t2i.config import TrainConfig, resolve
from bench.t2i.reference import Reference
from bench.train_t2i import compute_loss, encode_step
from minddspo.schedules import cfg_combine

METHODS = ("sft", "dpo", "dspo", "dspo_cpp", "ddspo")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def build_backbone(args):
    torch.manual_seed(0)
    bb = tiny_backbone(args.backbone)
    if args.sd15_config:
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

    from bench.make_pairs import build_pairs
    from bench.t2i.pairdata import shard_path

    patch = nullcontext() if batched else mock.patch.object(backbones, "guided", guided_unbatched)
    with tempfile.TemporaryDirectory() as out, patch:
        t0 = time.perf_counter()
        build_pairs(
            backbone, prompts, out, steps=steps, shard_size=len(prompts),
            batch_size=len(prompts), progress=False, latent_dtype="float32",
        )  # fmt: skip
        dt = time.perf_counter() - t0
        return dt, load_file(shard_path(out, 0))["x0_w"]


def sampling_benchmark(args, device: torch.device, dtype: torch.dtype) -> None:
    """make_pairs' images per second, CFG batched vs unbatched, alternating (median)."""
    from bench.t2i.prompts import DEMO_PROMPTS

    bb = tiny_backbone(args.backbone).for_inference(device, dtype)
    prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] + f" #{i}" for i in range(args.batch)]
    steps = args.sampling_steps or bb.default_steps
    times: dict[str, list[float]] = {"batched": [], "unbatched": []}
    latents = {}
    warmup = min(args.warmup, 1)  # one build warms both paths up; each costs seconds
    for rep in range(warmup + args.sampling_reps):
        for mode in times:  # alternating: drift hits both alike
            dt, latents[mode] = make_pairs_run(bb, prompts, steps, mode == "batched")
            if rep >= warmup:
                times[mode].append(dt)
    images = 2 * len(prompts)  # paired variant: winner from c and loser from c- per pair
    rate = {m: images / statistics.median(ts) for m, ts in times.items()}
    diff = (latents["batched"] - latents["unbatched"]).abs().max().item()
    print(
        f"# make_pairs (build_pairs, paired) on tiny {args.backbone}: {len(prompts)} pairs = "
        f"{images} images per sampler call, {steps} steps, CFG {bb.default_guidance}, "
        f"{args.device} {args.dtype}, median of {args.sampling_reps}, threads "
        f"{torch.get_num_threads()}"
    )
    print(f"{'cfg':10s} {'images/s':>10s} {'forwards x rows per step':>26s}")
    print(f"{'batched':10s} {rate['batched']:10.2f} {f'1 x {2 * images}':>26s}")
    print(f"{'unbatched':10s} {rate['unbatched']:10.2f} {f'2 x {images}':>26s}")
    print(
        f"ratio batched/unbatched: {rate['batched'] / rate['unbatched']:.3f} "
        f"(max |x0_w batched - unbatched| = {diff:.1e})"
    )


def gpu_table(args) -> int:
    """The computed (not measured) GPU cost table of :mod:`bench.t2i.gpu_cost`."""
    keys = [k.strip() for k in args.gpu_models.split(",") if k.strip()]
    t0 = time.perf_counter()
    text = gpu_cost.markdown(gpu_cost.compute_rows(keys))
    print(text, end="")
    print(f"# computed in {time.perf_counter() - t0:.0f} s on the meta device (no weights, no GPU)")
    if args.md:
        Path(args.md).write_text(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny random backbone (default)")
    p.add_argument("--sd15-config", action="store_true", help="SD-1.5-sized UNet, random weights")
    p.add_argument("--backbone", default="sd", choices=("sd", "sdxl", "sana"))
    p.add_argument("--batch", type=int, default=8, help="pairs per micro-step")
    p.add_argument("--latent", type=int, default=0, help="latent side (0: backbone default)")
    p.add_argument("--methods", default="dpo,ddspo,dspo,dspo_cpp,sft")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--with-optimizer", action="store_true", help="include an AdamW step")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument(
        "--sampling-reps",
        type=int,
        default=3,
        help="--tiny: make_pairs CFG batched vs unbatched repetitions (0: skip)",
    )
    p.add_argument(
        "--sampling-steps",
        type=int,
        default=0,
        help="sampler steps of that comparison (0: the backbone's paper setting)",
    )
    p.add_argument(
        "--computed-gpu-table",
        action="store_true",
        help="print the computed GPU cost of every method on the real configs",
    )
    p.add_argument(
        "--gpu-models", default=",".join(gpu_cost.ARCHS), help="backbones of --computed-gpu-table"
    )
    p.add_argument("--md", default="", help="--computed-gpu-table: also write it to this file")
    args = p.parse_args(argv)
    if args.computed_gpu_table:
        for k in args.gpu_models.split(","):
            if k.strip() and k.strip() not in gpu_cost.ARCHS:
                p.error(f"unknown model {k!r}; choose from {', '.join(gpu_cost.ARCHS)}")
        return gpu_table(args)
    if args.sd15_config and args.backbone != "sd":
        p.error("--sd15-config builds an SD-1.5 UNet: use --backbone sd")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}")
    if args.threads:
        torch.set_num_threads(args.threads)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if not args.sd15_config and args.sampling_reps > 0:
        sampling_benchmark(args, device, dtype)
    bb = build_backbone(args).to(device, None if dtype == torch.float32 else dtype)
    policy = bb.denoiser.train()
    reference = Reference(bb, policy, lora=False, periodic=False, dtype=dtype)
    opt = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=1e-12)
    side = args.latent or (64 if args.sd15_config else int(policy.config.sample_size))
    B, C = args.batch, bb.latent_channels
    g = torch.Generator().manual_seed(0)
    x0_w = torch.randn(B, C, side, side, generator=g).to(device)
    x0_l = torch.randn(B, C, side, side, generator=g).to(device)
    prompts = [f"a photo of object {i} on a red table" for i in range(B)]
    negs = [f"object {i} table" for i in range(B)]
    cfgs = {m: resolve(TrainConfig(tiny=True, backbone=args.backbone, method=m)) for m in methods}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(method: str) -> tuple[float, float]:
        cfg = cfgs[method]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        conds = encode_step(bb, prompts, negs, need_neg=cfg.uses_neg, need_uncond=False)
        t = bb.sample_t(B, g, cfg.timestep_sampler).to(device)
        noise = torch.randn(x0_w.shape, generator=g).to(device)
        with SavedBytes() as saved:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss, _ = compute_loss(
                    cfg, bb, policy, reference, x0_w, x0_l, conds, t, noise, noise
                )
            loss.mean().backward()
        if args.with_optimizer:
            opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else saved.n
        return dt, mem / 2**20

    times: dict[str, list[float]] = {m: [] for m in methods}
    mems: dict[str, float] = {}
    for rep in range(args.warmup + args.reps):
        for m in methods:  # round-robin: drift hits every method alike
            dt, mem = step(m)
            if rep >= args.warmup:
                times[m].append(dt)
                mems[m] = max(mems.get(m, 0.0), mem)

    what = "sd15-config UNet" if args.sd15_config else f"tiny {args.backbone}"
    mem_kind = "peak MiB" if device.type == "cuda" else "saved-for-backward MiB"
    print(
        f"# {what}, batch {B} pairs, latents {C}x{side}x{side}, {args.device} {args.dtype}, "
        f"median of {args.reps}, threads {torch.get_num_threads()}"
    )
    print(f"{'method':10s} {'ms/step':>10s} {mem_kind:>24s}")
    med = {m: statistics.median(times[m]) for m in methods}
    for m in methods:
        print(f"{m:10s} {1000 * med[m]:10.1f} {mems[m]:24.1f}")
    if "dpo" in med and "ddspo" in med:
        print(f"ratio ddspo/dpo: {med['ddspo'] / med['dpo']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
