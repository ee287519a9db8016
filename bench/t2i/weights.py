"""Weights I/O of the trainer: LoRA set-up, checkpoint contents, parameter digests.

Full fine-tuning saves the denoiser with diffusers' ``save_pretrained`` (safetensors) under
``unet/`` or ``transformer/``; LoRA saves ``lora/`` holding diffusers' LoRA file (for
``pipe.load_lora_weights``) and the raw trainable tensors (for an exact ``--resume``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.t2i.checkpoint import FILES_KEY, STATE_FILE, file_sizes, safetensors_problem
from bench.t2i.errors import UsageError
from bench.t2i.provenance import write_base
from bench.t2i.reference import Reference, trainable_state

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attention projections (UNet and SANA)
#: the text stream's projections of joint (MMDiT) attention, targeted where the network has
#: them (SD3), as the official DDSPO SD3 adapter and diffusers' SD3 LoRA script do
JOINT_LORA_TARGETS = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
LORA_STATE = "lora_state.safetensors"  # exact trainable tensors, for --resume
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file (load_lora_weights)


def lora_targets(net: torch.nn.Module) -> list[str]:
    """:data:`LORA_TARGETS`, plus the :data:`JOINT_LORA_TARGETS` that ``net`` has."""
    names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    joint = [t for t in JOINT_LORA_TARGETS if any(n.rsplit(".", 1)[-1] == t for n in names)]
    return LORA_TARGETS + joint


#: ``--lora-init``: peft's ``init_lora_weights`` of each name; B starts at zero in both.
#: gaussian: A ~ N(0, 1/rank^2) (diffusers' DPO example, the official DDSPO SD3/SANA adapters);
#: kaiming: A Kaiming-uniform, peft's default (the official DD-CPP pair, train_lora_target.py)
LORA_INITS = {"gaussian": "gaussian", "kaiming": True}


def add_lora(
    net: torch.nn.Module,
    rank: int,
    alpha: float | None,
    targets: list[str] | None = None,
    init: str = "gaussian",
) -> None:
    """peft LoRA through diffusers' adapter API on ``targets`` (default :func:`lora_targets`),
    initialised as ``init`` (:data:`LORA_INITS`); only the adapters train. A target no
    module of ``net`` has is a ``UsageError``."""
    from peft import LoraConfig

    if init not in LORA_INITS:
        raise UsageError(f"--lora-init must be one of {', '.join(LORA_INITS)}, got {init!r}")
    if targets is not None:  # any dotted suffix of a module name (to_q, to_out.0, ff.net.2)
        parts = [n.split(".") for n, _ in net.named_modules()]
        names = {".".join(p[i:]) for p in parts for i in range(len(p))}
        missing = [t for t in targets if t not in names]
        if missing or not targets:
            raise UsageError(
                f"--lora-targets: no module named {missing or targets} in the denoiser"
            )
    net.requires_grad_(False)
    net.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha or rank,
            init_lora_weights=LORA_INITS[init],
            target_modules=list(targets) if targets is not None else lora_targets(net),
        )
    )


def save_policy(backbone, policy: torch.nn.Module, out: Path, lora: bool) -> None:
    """Weights in diffusers layout: ``unet/`` or ``transformer/``, or ``lora/`` for LoRA."""
    if not lora:
        policy.save_pretrained(out / backbone.denoiser_subfolder, safe_serialization=True)
        return
    save_lora(backbone, policy, out / "lora")


def save_lora(backbone, policy: torch.nn.Module, out: Path) -> None:
    """``pytorch_lora_weights.safetensors`` (diffusers' format, for ``pipe.load_lora_weights``)
    plus the raw trainable tensors (:data:`LORA_STATE`, for an exact ``--resume``)."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {n: p.detach().contiguous() for n, p in trainable_state(policy).items()}, out / LORA_STATE
    )
    peft_layers = get_peft_model_state_dict(policy)
    layers = convert_state_dict_to_diffusers(peft_layers)
    if any(".lora_A." in k for k in layers):
        # the legacy names cover to_q/k/v/out only; diffusers' loader picks the format from
        # the first key, so a mixed file (SD3's joint-attention targets) loses keys: keep
        # peft's names throughout, as diffusers' own SD3 LoRA script writes them
        layers = peft_layers
    layers = fold_lora_scale(layers, policy)
    pipeline = getattr(diffusers, backbone.pipeline_class)
    pipeline.save_lora_weights(out, **{f"{backbone.denoiser_subfolder}_lora_layers": layers})


def fold_lora_scale(layers: dict[str, torch.Tensor], policy: torch.nn.Module) -> dict:
    """Multiply the up (B) matrices by ``alpha / rank``, so the file means the trained network
    at scale 1.

    diffusers' LoRA file holds no alpha: ``load_lora_weights`` (and ``sample.py``) rebuild the
    adapters with ``alpha = rank``, so a LoRA trained with ``--lora-alpha`` != rank came back
    at the wrong scale. With the scale folded into B, ``B' A = (alpha / r) B A`` is the
    trained update under any loader. (The raw tensors for ``--resume`` stay unfolded.)
    """
    cfg = policy.peft_config["default"]
    scale = float(cfg.lora_alpha) / float(cfg.r)
    if scale == 1.0:
        return layers
    up = (".lora.up.", ".lora_B.")
    folded = {k: (v * scale if any(u in k for u in up) else v) for k, v in layers.items()}
    if not any(any(u in k for u in up) for k in layers):
        raise ValueError("no LoRA up/B matrices found to fold the alpha/rank scale into")
    return folded


def find_lora(path: str | Path) -> Path | None:
    """The folder holding :data:`LORA_FILE` at ``path`` (directly or under ``lora/``), or None."""
    path = Path(path)
    for d in (path, path / "lora"):
        if (d / LORA_FILE).is_file():
            return d
    return None


def check_weight_files(files: list[Path], where: str | Path) -> None:
    """A one-line ``UsageError`` naming the first of ``files`` (safetensors) that cannot be
    read: empty, truncated (its header does not cover the file) or not safetensors at all;
    also when ``files`` is empty. Reads the headers only."""
    if not files:
        raise UsageError(f"{where}: no .safetensors weights file")
    for f in files:
        reason = safetensors_problem(f)
        if reason is not None:
            raise UsageError(f"{f}: unreadable weights ({f.stat().st_size} bytes; {reason})")


def check_denoiser_files(path: str | Path, subfolder: str) -> None:
    """:func:`check_weight_files` for the checkpoint at ``path``: its LoRA file (``path`` or
    ``path/lora``), else the safetensors of its denoiser folder (``path/<subfolder>`` or
    ``path``). Folders holding only ``.bin`` weights are left to diffusers."""
    lora = find_lora(path)
    if lora is not None:
        check_weight_files([lora / LORA_FILE], lora)
        return
    path = Path(path)
    d = path / subfolder if (path / subfolder / "config.json").is_file() else path
    files = sorted(d.glob("*.safetensors"))
    if files or not any(d.glob("*.bin")):
        check_weight_files(files, d)


def denoiser_with_lora(base: torch.nn.Module, lora_dir: str | Path, prefix: str):
    """A copy of ``base`` with the diffusers-format LoRA in ``lora_dir`` loaded (at scale 1).

    ``base`` itself is untouched; adapters it already carries (a LoRA policy being trained)
    are removed from the copy first, so the result is the base network plus this LoRA."""
    import copy

    net = copy.deepcopy(base)
    if getattr(net, "peft_config", None):
        net.unload_lora()
    net.load_lora_adapter(
        str(lora_dir), weight_name=LORA_FILE, prefix=prefix, adapter_name="checkpoint"
    )
    return net


def save_final_pipeline(
    backbone, policy: torch.nn.Module, pretrained: str | Path, out: Path
) -> None:
    """``final/`` of a full fine-tune from ``--pretrained``: every component except the
    denoiser is copied byte for byte from the pretrained directory (so a bf16 run does not
    re-save the text encoders in bf16, and tokenizers keep every file), then the trained
    denoiser is written in its fp32 master weights, and the scheduler as trained (a
    ``--prediction-type`` override must reach the sampler)."""
    import shutil

    src, out = Path(pretrained), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    skip = {backbone.denoiser_subfolder, "scheduler"}
    for entry in src.iterdir():
        if entry.name in skip or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / entry.name)
        else:
            shutil.copy2(entry, out / entry.name)
    policy.save_pretrained(out / backbone.denoiser_subfolder, safe_serialization=True)
    backbone.components["scheduler"].save_pretrained(out / "scheduler")


#: ``final/pipeline_call.json``: the pipeline ``__call__`` arguments that reproduce our samples
PIPELINE_CALL_FILE = "pipeline_call.json"


def write_pipeline_call(backbone, out: Path) -> Path | None:
    """``out/pipeline_call.json`` when the diffusers pipeline's call defaults differ from the
    backbone's training and sampling settings (SD3: ``max_sequence_length``), else nothing."""
    kwargs = backbone.pipeline_call_kwargs()
    if not kwargs:
        return None
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    note = {
        "pipeline": backbone.pipeline_class,
        "call_kwargs": kwargs,
        "note": f"trained with these settings: call the pipeline with {args} (its defaults "
        "differ) to sample what bench/sample.py samples",
    }
    path = Path(out) / PIPELINE_CALL_FILE
    path.write_text(json.dumps(note, indent=2) + "\n")
    return path


def write_checkpoint(
    d: Path,
    *,
    backbone,
    policies: dict[str, torch.nn.Module],
    lora: bool,
    reference: Reference | None,
    trainer_state: dict,
    base: dict | None = None,
) -> None:
    """Fill checkpoint directory ``d`` (a temporary one, renamed when complete) with each
    trained network of ``policies`` under ``d / side`` (side ``""``: ``d`` itself; none: the
    weights are in ``d/dcp/`` already, a sharded run's, :mod:`bench.t2i.sharding`); ``base``
    (:func:`bench.t2i.provenance.base_record`) goes to ``base.json``."""
    for side, policy in policies.items():
        save_policy(backbone, policy, d / side, lora)
    if base is not None:
        write_base(d, base)
    if reference is not None:  # a periodically updated reference is state too
        reference.save(d / "reference")
    # written last, with the size of every file above: marks the checkpoint complete and
    # lets a resume tell a truncated checkpoint from an intact one
    torch.save({**trainer_state, FILES_KEY: file_sizes(d)}, d / STATE_FILE)


@torch.no_grad()
def load_policy(backbone, policy: torch.nn.Module, ckpt: Path, lora: bool) -> None:
    if lora:
        params = trainable_state(policy)
        for n, x in load_file(ckpt / "lora" / LORA_STATE).items():
            params[n].copy_(x)
    else:
        policy.load_state_dict(backbone.load_denoiser(ckpt).state_dict())


@torch.no_grad()
def all_finite(params) -> bool:
    """Are all tensors in ``params`` free of inf and NaN? (one device sync)"""
    flags = [torch.isfinite(p).all() for p in params]
    return bool(torch.stack(flags).all()) if flags else True


def param_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes: equal on all ranks iff DDP kept them in sync."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()
