"""The reference model f_ref: frozen, or periodically refreshed (Kang et al.; SPEC §4).

* Full fine-tuning: a separate copy of the denoiser, ``eval()``, no grad, in the compute
  dtype; never wrapped in DDP.
* LoRA: no second copy. The frozen reference is the same network with its adapters
  switched off (the base model). A *periodic* reference keeps its own copy of the LoRA
  tensors only, swapped into the adapter parameters (pointer swap, no copy) for the
  reference forward; it starts equal to the freshly initialised adapters, whose
  ``lora_B = 0`` makes it the base model, as in the frozen case.

Under ``--shard fsdp`` (:meth:`Reference.after_sharding`) the policy's parameters are FSDP2
shards whose storage FSDP owns: the periodic LoRA tensors are then copied in and out
instead of pointer-swapped, and the full fine-tune's copy is sharded too or kept whole
(``--shard-reference``).

The reference forward must run *before* the policy forward of a step: the swap would
otherwise alter weights that the policy's autograd graph has saved.

The divergence probe (:class:`DivergenceProbe`) fixes a few winner samples, timesteps and
noises at start-up and evaluates the *initial* model on them once; the initial model is
never kept in memory (with LoRA it would be the base with adapters off anyway).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from minddspo.refupdate import divergence_estimate

LORA_REF_FILE = "lora_reference.safetensors"


def trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """The parameters that train (all of them, or just the LoRA ones), by name."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def adapters_disabled(module: nn.Module):
    module.disable_adapters()
    try:
        yield
    finally:
        module.enable_adapters()


@contextlib.contextmanager
def swapped_params(module: nn.Module, tensors: dict[str, Tensor]):
    """Temporarily point the named parameters at ``tensors`` (no copy)."""
    params = dict(module.named_parameters())
    saved = {n: params[n].data for n in tensors}
    try:
        for n, x in tensors.items():
            params[n].data = x
        yield
    finally:
        for n, x in saved.items():
            params[n].data = x


@contextlib.contextmanager
def copied_params(module: nn.Module, tensors: dict[str, Tensor]):
    """Temporarily give the named parameters the values of ``tensors`` (copied in, and the
    old values copied back): for parameters whose storage is not theirs to re-point."""
    params = dict(module.named_parameters())
    saved = {n: params[n].detach().clone() for n in tensors}
    try:
        with torch.no_grad():
            for n, x in tensors.items():
                params[n].copy_(x)
        yield
    finally:
        with torch.no_grad():
            for n, x in saved.items():
                params[n].copy_(x)


class Reference:
    """``forward(x_t, t, cond)`` of the reference, with copy and checkpoint support."""

    def __init__(
        self,
        backbone,
        policy: nn.Module,
        *,
        lora: bool,
        periodic: bool,
        dtype: torch.dtype = torch.float32,
    ):
        self.backbone = backbone
        self.lora = lora
        self.policy = policy  # the unwrapped trainable module
        self.lora_state: dict[str, Tensor] | None = None
        self.sharded_policy = False  # after_sharding(): FSDP2 shards
        self.full_policy_state = None  # after_sharding(): the policy's full weights, gathered
        if lora:
            self.net = policy
            if periodic:
                self.lora_state = {
                    n: p.detach().clone() for n, p in trainable_state(policy).items()
                }
        else:
            self.net = copy.deepcopy(policy).eval().requires_grad_(False)
            nn.Module.to(self.net, dtype)  # (diffusers' own .to() warns about fp32-kept modules)

    @torch.no_grad()
    def forward(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        if not self.lora:
            return self.backbone.forward(self.net, x_t, t, cond)
        swap = copied_params if self.sharded_policy else swapped_params
        ctx = (
            adapters_disabled(self.net)
            if self.lora_state is None
            else swap(self.net, self.lora_state)
        )
        with ctx:
            return self.backbone.forward(self.net, x_t, t, cond)

    __call__ = forward

    def after_sharding(self, shard_copy=None, full_state=None) -> None:
        """The policy has just been sharded (FSDP2). LoRA: the periodic tensors are taken
        again from the sharded adapters (the same values). Full fine-tune: ``shard_copy(net)``
        shards the copy too; without it the copy stays whole on every rank and each update
        gathers the policy's full weights with ``full_state(policy)`` (a collective)."""
        self.sharded_policy = True
        if self.lora:
            if self.lora_state is not None:
                self.lora_state = {
                    n: p.detach().clone() for n, p in trainable_state(self.policy).items()
                }
        elif shard_copy is not None:
            shard_copy(self.net)
        else:
            self.full_policy_state = full_state

    @torch.no_grad()
    def copy_from_policy(self) -> None:
        """Policy weights -> reference (the periodic update)."""
        if self.lora:
            assert self.lora_state is not None, "a frozen LoRA reference is never updated"
            for n, p in trainable_state(self.policy).items():
                self.lora_state[n].copy_(p)
        elif self.full_policy_state is not None:  # a whole copy of a sharded policy
            self.net.load_state_dict(self.full_policy_state(self.policy))
        else:  # both whole, or both sharded alike (shard by shard)
            self.net.load_state_dict(self.policy.state_dict())

    def state_tensors(self) -> dict[str, Tensor]:
        """What a sharded checkpoint keeps of a periodic reference (live tensors: a DCP
        load fills them in place)."""
        return dict(self.lora_state) if self.lora else self.net.state_dict()

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """The inverse of :meth:`state_tensors` (a no-op for tensors loaded in place)."""
        if self.lora:
            for n, x in tensors.items():
                if x is not self.lora_state[n]:
                    self.lora_state[n].copy_(x)
        else:
            self.net.load_state_dict(tensors)

    def save(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        if self.lora:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_file(
                {n: x.contiguous() for n, x in self.lora_state.items()}, out_dir / LORA_REF_FILE
            )
        else:
            self.net.save_pretrained(out_dir, safe_serialization=True)

    @torch.no_grad()
    def load(self, in_dir: Path) -> None:
        in_dir = Path(in_dir)
        if self.lora:
            for n, x in load_file(in_dir / LORA_REF_FILE).items():
                self.lora_state[n].copy_(x)
        else:
            loaded = type(self.net).from_pretrained(in_dir, local_files_only=True)
            self.net.load_state_dict(loaded.state_dict())


class DivergenceProbe:
    """Fixed noised winner samples and the initial model's predictions on them."""

    def __init__(self, backbone, x0: Tensor, cond, reference: Reference, seed: int, autocast):
        gen = torch.Generator().manual_seed(seed + 7919)  # its own stream: data order unaffected
        n = x0.shape[0]
        t = backbone.sample_t(n, gen, "uniform").to(x0.device)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
        self.backbone, self.cond, self.t, self.autocast = backbone, cond, t, autocast
        self.x_t = backbone.noise(x0, noise, t)
        with autocast():
            self.init_pred = reference(self.x_t, t, cond).float()

    def __call__(self, reference: Reference) -> float:
        with self.autocast():
            pred = reference(self.x_t, self.t, self.cond)
        return float(divergence_estimate(pred.float(), self.init_pred))
