"""The GPU cost of one training step per method, computed from the real model configs.

    python bench/bench_step.py --computed-gpu-table [--md PATH]

Computed, not measured: no weights, no GPU. The denoisers (SD-1.5 and SDXL
``UNet2DConditionModel``, SD3-medium ``SD3Transformer2DModel``, SANA-1.6B
``SanaTransformer2DModel``, FLUX.1-dev ``FluxTransformer2DModel``), their text encoders and VAEs are built with diffusers' and
transformers' own classes from the published configs in ``bench/t2i/configs/`` (sources in
``bench/t2i/configs/README.md``) on the ``meta`` device: every tensor has its real shape and
dtype and no storage, so building SDXL takes a tenth of a second and no memory.

FLOPs (:func:`step_flops`) are counted by ``torch.utils.flop_counter.FlopCounterMode`` while
the networks run on meta tensors, one micro-step per pair as ``bench/train_t2i.py``'s
``encode_step`` + ``compute_loss`` run it, rows from the method table
(:meth:`minddspo.methods.MethodSpec.ref_rows`):

* text encoding of the step's prompts: ``c`` (1 per pair), ``+ c-`` for ddspo/dspo_cpp;
* ONE reference forward without grad on its rows: 2 (dpo, dspo), 3 (ddspo, dspo_cpp);
  with LoRA the reference is the base model with the adapters off (no copy);
* ONE policy forward + backward on ``[x_t^w; x_t^l]`` (sft: winners only). With LoRA the
  backward computes no weight gradient of the frozen base, so it costs about one forward,
  not two;
* with gradient checkpointing (the SD-1.5 and SDXL recipes), the forward the backward
  re-runs: counted by running again with checkpointing on, reported as ``recompute``.

The counter counts matrix multiplies, convolutions and attention at 2 FLOPs per
multiply-add; norms, activations and other elementwise work are not counted. Attention is
forced onto SDPA's math path so that its two matmuls (QK^T, AV) are counted on any device
(the fused CPU kernel is not in the counter's table).

Memory per GPU (:func:`memory`) is byte counts of the tensors the trainer allocates for a
recipe (``bench/t2i/configs/recipes.json``), read off the built modules: the policy's fp32
parameters (the trainer keeps fp32 master weights under autocast, LoRA adapters included)
and buffers, fp32 gradients of the trainable ones, the optimizer state after one real
``opt.step()`` of the trainer's own ``build_optimizer`` on meta tensors, the reference
(``Reference``: a copy in the compute dtype for a full fine-tune, nothing with LoRA), and
the frozen text encoders and VAE as ``Backbone.to`` places them (compute dtype; a VAE with
``force_upcast`` stays fp32). A recipe marked ``fsdp`` (FLUX.1-dev's full fine-tune over 8
GPUs) divides the policy's weights, gradients and optimizer state by its GPU count, as
``train_t2i.py --shard fsdp`` holds them; the frozen encoders stay whole on every GPU, and
the reference copy too (``--shard-reference whole``, the default; with ``shard`` it is divided
as well: :attr:`Memory.reference_sharded`). Computed only: the sharded trainer has run on
CPUs, never on a GPU. Activations are NOT included: their size depends on the
attention kernel, gradient checkpointing and the allocator; measure them on a GPU with
``bench_step.py --device cuda``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.t2i.cli import torch_dtype
from minddspo.methods import METHODS, method_spec

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
H100_BF16_DENSE = 989e12  # FLOP/s: H100 SXM dense bf16 tensor-core peak (1979 is with sparsity)
UTILISATION = 0.40  # assumed fraction of that peak a training step reaches
GIB = 2**30


# ------------------------------------------------------------------------- the models


@dataclass(frozen=True)
class Arch:
    """A backbone: where its configs live and how its denoiser and text encoders are called."""

    key: str  # folder under the config root: <key>/<denoiser>.json, <text>.json, vae.json
    label: str
    kind: str  # sd | sdxl | sd3 | sana | flux: the denoiser's call signature
    denoiser: str  # unet | transformer
    text: tuple[tuple[str, int], ...]  # (text encoder file stem, tokens per prompt)
    cond_tokens: int  # sequence length of the denoiser's text conditioning
    latent_side: int = 0  # latent side when the denoiser config has no sample_size (flux)


ARCHS = {
    a.key: a
    for a in (
        # CLIP-L's last hidden state, 77 x 768
        Arch("sd15", "SD-1.5", "sd", "unet", (("text_encoder", 77),), 77),
        # CLIP-L (768) and OpenCLIP-bigG (1280) penultimate states concatenated: 77 x 2048,
        # bigG's pooled projection (1280) and 6 micro-conditioning time ids
        Arch("sdxl", "SDXL", "sdxl", "unet", (("text_encoder", 77), ("text_encoder_2", 77)), 77),
        # joint sequence: [CLIP-L | CLIP-G] 77 x 2048 zero-padded to 4096, then T5 256 x 4096;
        # pooled 768 + 1280 = 2048
        Arch(
            "sd3_medium",
            "SD3-medium",
            "sd3",
            "transformer",
            (("text_encoder", 77), ("text_encoder_2", 77), ("text_encoder_3", 256)),
            77 + 256,
        ),
        # Gemma-2-2B last hidden state, 300 x 2304, with its attention mask
        Arch("sana_1600m", "SANA-1.6B", "sana", "transformer", (("text_encoder", 300),), 300),
        # T5-XXL 512 x 4096 (FluxPipeline's default max_sequence_length), CLIP-L pooled 768;
        # 1024 px: 16 x 128 x 128 latents packed 2 x 2 into 4096 tokens of 64
        Arch(
            "flux1_dev",
            "FLUX.1-dev",
            "flux",
            "transformer",
            (("text_encoder", 77), ("text_encoder_2", 512)),
            512,
            latent_side=128,
        ),
    )
}


def read_config(path: Path) -> tuple[str, dict]:
    """``(class name, constructor kwargs)`` of a config file; keys starting with ``_`` are notes."""
    raw = json.loads(Path(path).read_text())
    return raw["_class_name"], {k: v for k, v in raw.items() if not k.startswith("_")}


def build_module(path: Path, device: str | torch.device = "meta") -> nn.Module:
    """A diffusers or transformers model from a config file, built on ``device``."""
    import diffusers
    import transformers

    name, kwargs = read_config(path)
    with torch.device(device):
        cls = getattr(diffusers, name, None)
        if isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin):
            return cls.from_config(kwargs)
        cls = getattr(transformers, name)
        return cls(cls.config_class(**kwargs))


@dataclass
class Built:
    """One backbone's modules (on the meta device by default); the denoiser is the policy."""

    arch: Arch
    denoiser: nn.Module
    text_encoders: list[nn.Module]
    vae: nn.Module | None
    lora: int  # LoRA rank on the denoiser (0: full fine-tune)


def build_arch(arch: Arch, *, lora: int = 0, root: Path = CONFIG_DIR, device="meta") -> Built:
    """Build ``arch`` from ``root/<key>/``; ``lora > 0`` adds the trainer's LoRA adapters
    (``bench.t2i.weights.add_lora``: attention projections, base frozen)."""
    folder = Path(root) / arch.key
    net = build_module(folder / f"{arch.denoiser}.json", device)
    if lora:
        from bench.t2i.weights import add_lora

        with torch.device(device):  # the adapters too: no storage on meta
            add_lora(net, lora, 0.0)
    texts = [
        build_module(folder / f"{stem}.json", device).eval().requires_grad_(False)
        for stem, _ in arch.text
    ]
    vae_file = folder / "vae.json"
    vae = (
        build_module(vae_file, device).eval().requires_grad_(False) if vae_file.is_file() else None
    )
    return Built(arch, net, texts, vae, lora)


# --------------------------------------------------------------------- calling the nets


def _device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


def denoise(built: Built, net: nn.Module, rows: int) -> torch.Tensor:
    """``net(x_t, t, c)`` on ``rows`` rows of random inputs of the backbone's training shapes,
    called as its adapter in ``bench/t2i/backbones.py`` calls it."""
    cfg, dev, a = net.config, _device(net), built.arch
    t = torch.zeros(rows, device=dev)
    if a.kind == "flux":  # packed latents, RoPE ids, the guidance embedding
        side = a.latent_side // 2
        h = torch.randn(rows, a.cond_tokens, cfg.joint_attention_dim, device=dev)
        return net(
            hidden_states=torch.randn(rows, side * side, cfg.in_channels, device=dev),
            encoder_hidden_states=h,
            pooled_projections=torch.randn(rows, cfg.pooled_projection_dim, device=dev),
            timestep=t,
            img_ids=torch.zeros(side * side, 3, device=dev),
            txt_ids=torch.zeros(a.cond_tokens, 3, device=dev),
            guidance=torch.full((rows,), 3.5, device=dev) if cfg.guidance_embeds else None,
        ).sample
    x = torch.randn(rows, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=dev)
    if a.kind == "sd":
        h = torch.randn(rows, a.cond_tokens, cfg.cross_attention_dim, device=dev)
        return net(x, t, encoder_hidden_states=h).sample
    if a.kind == "sdxl":
        h = torch.randn(rows, a.cond_tokens, cfg.cross_attention_dim, device=dev)
        n_ids = 6  # (H, W, crop top, crop left, target H, target W)
        pooled = cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(rows, pooled, device=dev),
            "time_ids": torch.randn(rows, n_ids, device=dev),
        }
        return net(x, t, encoder_hidden_states=h, added_cond_kwargs=added).sample
    if a.kind == "sd3":
        h = torch.randn(rows, a.cond_tokens, cfg.joint_attention_dim, device=dev)
        pooled = torch.randn(rows, cfg.pooled_projection_dim, device=dev)
        return net(
            hidden_states=x, timestep=t, encoder_hidden_states=h, pooled_projections=pooled
        ).sample
    if a.kind == "sana":
        h = torch.randn(rows, a.cond_tokens, cfg.caption_channels, device=dev)
        mask = torch.ones(rows, a.cond_tokens, device=dev)
        return net(x, encoder_hidden_states=h, encoder_attention_mask=mask, timestep=t).sample
    raise ValueError(f"unknown backbone kind {a.kind!r}")


@torch.no_grad()
def encode_text(built: Built, prompts: int) -> None:
    """Every text encoder of the backbone on ``prompts`` prompts padded to its length (Gemma
    with its attention mask, as the SANA adapter calls it; CLIP and T5 without)."""
    for enc, (_, tokens) in zip(built.text_encoders, built.arch.text, strict=True):
        ids = torch.zeros(prompts, tokens, dtype=torch.long, device=_device(enc))
        if built.arch.kind == "sana":
            enc(input_ids=ids, attention_mask=torch.ones_like(ids))
        else:
            enc(input_ids=ids)


def reference_forward(built: Built, rows: int) -> None:
    """The reference forward: no grad; with LoRA the base model (adapters off)."""
    from contextlib import nullcontext

    from bench.t2i.reference import adapters_disabled

    net = built.denoiser
    with torch.no_grad(), adapters_disabled(net) if built.lora else nullcontext():
        denoise(built, net, rows)


def policy_step(built: Built, rows: int) -> None:
    """The policy forward on ``rows`` rows and the backward of a scalar loss."""
    net = built.denoiser.train()
    denoise(built, net, rows).float().square().mean().backward()
    for p in net.parameters():
        p.grad = None


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` by ``torch.utils.flop_counter`` (SDPA on its math path, see above)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training micro-step, per preference pair."""

    text: int  # text encoders on the step's prompts (c; + c- for the CPP methods)
    reference: int  # reference forward, no grad
    policy: int  # policy forward + backward
    recompute: int  # the forward re-run in the backward under gradient checkpointing

    @property
    def denoiser(self) -> int:
        """Model FLOPs of the denoiser: what the 9/8 floor of ddspo/dpo is about."""
        return self.reference + self.policy

    @property
    def total(self) -> int:
        return self.text + self.reference + self.policy + self.recompute


def method_rows(method: str) -> tuple[int, int, int]:
    """``(prompts, reference rows, policy rows)`` per pair, from the method table."""
    spec = method_spec(method)
    ref = spec.ref_rows()
    return 1 + ("l_neg" in ref), len(ref), 2 if spec.preference else 1


def step_flops(
    built: Built, methods: Sequence[str] = METHODS, *, checkpointing: bool = False
) -> dict[str, StepFlops]:
    """Counted FLOPs per pair of each method's micro-step (one count per distinct row set)."""
    need = {m: method_rows(m) for m in methods}
    text = {p: count_flops(lambda p=p: encode_text(built, p)) for p, _, _ in need.values()}
    ref = {
        r: count_flops(lambda r=r: reference_forward(built, r)) for _, r, _ in need.values() if r
    }
    ref[0] = 0  # sft has no reference
    pol = {r: count_flops(lambda r=r: policy_step(built, r)) for _, _, r in need.values()}
    extra = dict.fromkeys(pol, 0)
    if checkpointing:
        built.denoiser.enable_gradient_checkpointing()
        try:
            extra = {r: count_flops(lambda r=r: policy_step(built, r)) - pol[r] for r in pol}
        finally:
            built.denoiser.disable_gradient_checkpointing()
    return {m: StepFlops(text[p], ref[r], pol[q], extra[q]) for m, (p, r, q) in need.items()}


# ---------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class Recipe:
    """A training recipe of the paper (``bench/t2i/configs/recipes.json``)."""

    arch: str
    lora: int  # LoRA rank; 0 = full fine-tune
    optimizer: str  # adamw | adafactor (the trainer's build_optimizer)
    dtype: str  # autocast compute dtype: fp32 | bf16 | fp16
    gradient_checkpointing: bool
    batch_size: int  # pairs per GPU per micro-step
    grad_accum: int
    gpus: int
    source: str = ""
    assumed: str = ""  # what the paper does not say and the table assumes
    fsdp: bool = False  # weights, grads and optimizer state sharded over the GPUs (computed)
    name: str = ""  # the recipe's key in recipes.json (default: the arch's)

    @property
    def pairs_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.gpus

    def describe(self) -> str:
        kind = f"LoRA r{self.lora}" if self.lora else "full"
        if self.fsdp:
            kind += f", FSDP x{self.gpus} (computed)"
        ckpt = ", grad ckpt" if self.gradient_checkpointing else ""
        return f"{kind}, {self.optimizer}, {self.dtype}{ckpt}"


def load_recipes(path: Path = CONFIG_DIR / "recipes.json") -> dict[str, Recipe]:
    """Recipes by key; a recipe's ``arch`` is its key unless it names one (several recipes
    of one model, e.g. FLUX.1-dev's LoRA and FSDP rows)."""
    raw = json.loads(Path(path).read_text())
    return {
        key: Recipe(
            **{"arch": key}
            | {k: x for k, x in v.items() if not k.startswith("_")}
            | {"name": key, "source": v.get("_source", ""), "assumed": v.get("_assumed", "")}
        )
        for key, v in raw.items()
        if not key.startswith("_")
    }


def _bytes(tensors: Iterable[torch.Tensor], dtype: torch.dtype | None = None) -> int:
    """Bytes of ``tensors``; floating ones counted as ``dtype`` when given (a planned cast)."""
    size = torch.finfo(dtype).bits // 8 if dtype is not None else None
    return sum(
        t.numel() * (size if size and t.is_floating_point() else t.element_size()) for t in tensors
    )


def _module_bytes(m: nn.Module, dtype: torch.dtype | None = None) -> int:
    return _bytes(m.parameters(), dtype) + _bytes(m.buffers(), dtype)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU of a recipe, activations excluded."""

    params: int  # denoiser parameters (count), LoRA adapters included
    trainable: int  # parameters that train (count)
    weights: int  # policy parameters and buffers, fp32
    grads: int  # fp32 gradients of the trainable parameters
    optimizer: int  # optimizer state after one step
    reference: int  # frozen reference copy; 0 with LoRA (adapters off)
    reference_sharded: int  # the same copy per GPU under --shard-reference shard (fsdp recipes)
    frozen: int  # text encoders + VAE
    base_cast: int  # LoRA: bytes saved if the frozen base were kept in the compute dtype

    def total(self, with_reference: bool = True, shard_reference: bool = False) -> int:
        ref = (self.reference_sharded if shard_reference else self.reference) * with_reference
        return self.weights + self.grads + self.optimizer + ref + self.frozen


def memory(built: Built, recipe: Recipe) -> Memory:
    """What the trainer allocates for ``recipe`` on each GPU, from the built meta modules."""
    from bench.t2i.config import TrainConfig, resolve
    from bench.t2i.reference import Reference
    from bench.t2i.step import build_optimizer

    net, dtype = built.denoiser, torch_dtype(recipe.dtype)
    trainable = [p for p in net.parameters() if p.requires_grad]
    cfg = resolve(TrainConfig(tiny=True, optimizer=recipe.optimizer, lr=1e-6))
    opt, _ = build_optimizer(cfg, trainable)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()  # on meta: allocates the state with its real shapes and dtypes, no storage
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    optimizer, grads = _bytes(state), _bytes(p.grad for p in trainable)
    for p in trainable:
        p.grad = None
    weights = _module_bytes(net)
    shard = (lambda n: -(-n // recipe.gpus)) if recipe.fsdp else (lambda n: n)  # rounded up
    weights, grads, optimizer = shard(weights), shard(grads), shard(optimizer)
    ref = Reference(None, net, lora=built.lora > 0, periodic=False, dtype=dtype)
    reference = 0 if built.lora else _module_bytes(ref.net)
    cast = None if dtype == torch.float32 else dtype
    base = [p for p in net.parameters() if not p.requires_grad]
    base_cast = _bytes(base) - _bytes(base, cast) if built.lora and cast else 0
    frozen = sum(_module_bytes(e, cast) for e in built.text_encoders)
    if built.vae is not None:
        upcast = built.vae.config.get("force_upcast", False)
        frozen += _module_bytes(built.vae, None if upcast else cast)
    return Memory(
        params=sum(p.numel() for p in net.parameters()),
        trainable=sum(p.numel() for p in trainable),
        weights=weights,
        grads=grads,
        optimizer=optimizer,
        reference=reference,
        reference_sharded=shard(reference),
        frozen=frozen,
        base_cast=base_cast,
    )


# ----------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Row:
    arch: Arch
    recipe: Recipe
    method: str
    flops: StepFlops
    dpo: StepFlops  # the same recipe's D-DPO step, for the ratios
    mem: Memory

    @property
    def step_seconds(self) -> float:
        """The recipe's effective batch on one H100 at :data:`UTILISATION` of its bf16 peak."""
        return self.recipe.pairs_per_step * self.flops.total / (UTILISATION * H100_BF16_DENSE)

    @property
    def gib(self) -> float:
        return self.mem.total(with_reference=self.method != "sft") / GIB


def compute_rows(
    keys: Sequence[str] = tuple(ARCHS),
    methods: Sequence[str] = METHODS,
    recipes: dict[str, Recipe] | None = None,
) -> list[Row]:
    """Build each backbone with its recipe's adapters, count FLOPs and memory."""
    recipes = recipes or load_recipes()
    rows = []
    for key in keys:
        arch = ARCHS[key]
        for recipe in (r for r in recipes.values() if r.arch == key):
            built = build_arch(arch, lora=recipe.lora)
            flops = step_flops(built, methods, checkpointing=recipe.gradient_checkpointing)
            dpo = (
                flops.get("dpo")
                or step_flops(built, ["dpo"], checkpointing=recipe.gradient_checkpointing)["dpo"]
            )
            mem = memory(built, recipe)
            rows += [Row(arch, recipe, m, flops[m], dpo, mem) for m in methods]
    return rows


def _tf(x: int) -> str:
    return f"{x / 1e12:.2f}"


def _gib(x: int) -> str:
    return f"{x / GIB:.1f}"


def _notes(rows: Sequence[Row]) -> list[str]:
    """Caveats that depend on the recipes in ``rows``, one markdown bullet each."""
    notes = [
        "- Text encoding is counted every micro-step, as the trainer's `encode_step` does; "
        "cached prompt embeddings would remove the text column.",
        "- Elementwise work (norms, activations, softmax, the optimizer) is not in the "
        f"count; the {UTILISATION:.0%} utilisation is meant to absorb it.",
    ]
    recipes = {(r.arch.key, r.recipe.name): (r.arch, r.recipe, r.mem) for r in rows}
    for arch, rc, mem in recipes.values():
        if rc.dtype == "fp32":
            notes.append(
                f"- {arch.label}: the recipe trains in fp32, which tensor cores run as TF32 at "
                "half the bf16 rate: double its times to run it as written."
            )
        if rc.lora and arch.kind == "flux":
            notes.append(
                f"- {arch.label}: LoRA on the trainer's targets: to_q, to_k, to_v, to_out.0 and "
                "add_q/k/v_proj, to_add_out of the 19 double-stream blocks, to_q/k/v of the 38 "
                "single-stream blocks."
            )
        if rc.fsdp:
            notes.append(
                f"- {arch.label} {rc.describe()}: weights, grads and AdamW state divided by "
                f"{rc.gpus} (`train_t2i.py --shard fsdp`), the text encoders whole on every GPU, "
                f"the bf16 reference copy too (`--shard-reference whole`: {_gib(mem.reference)} "
                f"GiB); with `--shard-reference shard` it takes {_gib(mem.reference_sharded)} "
                f"GiB, {_gib(mem.total(shard_reference=True))} GiB in all."
            )
        if rc.lora and arch.kind == "sd3":
            notes.append(
                f"- {arch.label}: LoRA on the trainer's targets: to_q, to_k, to_v, to_out.0 and "
                "the joint-attention add_q/k/v_proj, to_add_out (both streams), as the official "
                "DDSPO SD3 adapter."
            )
        if mem.base_cast:
            notes.append(
                f"- {arch.label}: the trainer keeps the frozen LoRA base in fp32 (fp32 master "
                f"weights); stored in {rc.dtype} it would take {_gib(mem.base_cast)} GiB less."
            )
        if rc.assumed:
            notes.append(f"- {arch.label}, assumed: {rc.assumed}.")
    return notes


def markdown(rows: Sequence[Row]) -> str:
    """Both tables (FLOPs and time per method; memory per recipe) as markdown."""
    out = [
        "Computed, not measured: FLOPs counted by `torch.utils.flop_counter` on the real "
        "configs built on the meta device (matmul, conv, attention; 2 per multiply-add); "
        f"time = pairs per step x FLOPs / ({UTILISATION:.0%} x {H100_BF16_DENSE / 1e12:.0f} "
        "TFLOP/s H100 dense bf16). Per pair: text encoding of the step's prompts, the "
        "reference forward, the policy forward+backward (+ the recompute of gradient "
        "checkpointing where the recipe uses it). `x dpo` = total / D-DPO's total; "
        "`x dpo denoiser` = (reference + policy fwd+bwd) / D-DPO's, no text, no recompute: "
        "the quantity whose floor is 9/8 = 1.125 for a full fine-tune.",
        "",
        "| model | recipe | method | text TF | reference TF | policy TF | recompute TF "
        "| total TF/pair | x dpo | x dpo denoiser | s/step, 1 H100 | GiB/GPU |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f, d = r.flops, r.dpo
        out.append(
            f"| {r.arch.label} | {r.recipe.describe()} | {r.method} | {_tf(f.text)} "
            f"| {_tf(f.reference)} | {_tf(f.policy)} | {_tf(f.recompute)} | {_tf(f.total)} "
            f"| {f.total / d.total:.3f} | {f.denoiser / d.denoiser:.3f} "
            f"| {r.step_seconds:.0f} | {r.gib:.1f} |"
        )
    out += ["", *_notes(rows)]
    out += [
        "",
        "Memory per GPU, GiB (activations excluded: they depend on the attention kernel, "
        "gradient checkpointing and the micro-batch; measure with `bench_step.py --device "
        "cuda`). Weights: the policy in fp32 (the trainer's master weights, LoRA adapters "
        "included) with its buffers; grads fp32; optimizer state after one real step of the "
        "trainer's optimizer on meta tensors; reference: a frozen copy in the compute dtype "
        "(full fine-tune) or none (LoRA: adapters off); frozen: text encoders in the compute "
        "dtype, VAE fp32 when its config says force_upcast. sft needs no reference.",
        "",
        "| model | recipe | params | trainable | weights | grads | optimizer | reference "
        "| text enc + VAE | total | total sft | pairs/step (GPUs) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    seen = set()
    for r in rows:
        if (r.arch.key, r.recipe.name) in seen:
            continue
        seen.add((r.arch.key, r.recipe.name))
        m, rc = r.mem, r.recipe
        out.append(
            f"| {r.arch.label} | {rc.describe()} | {m.params / 1e6:,.1f}M "
            f"| {m.trainable / 1e6:,.1f}M | {_gib(m.weights)} | {_gib(m.grads)} "
            f"| {_gib(m.optimizer)} | {_gib(m.reference)} | {_gib(m.frozen)} "
            f"| {_gib(m.total())} | {_gib(m.total(False))} | {rc.pairs_per_step} ({rc.gpus}) |"
        )
    return "\n".join(out) + "\n"
