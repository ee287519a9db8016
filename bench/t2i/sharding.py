"""FSDP2 sharding of the trainer's denoiser (``--shard fsdp``), on torch's own engine.

* :func:`shard_module`: ``torch.distributed.fsdp.fully_shard`` on every block of the
  denoiser (a UNet's down/mid/up blocks, a transformer's blocks), then on the root. Each rank
  keeps 1/world of every parameter, gradient and optimizer state; a block's weights are
  gathered for its forward and backward and freed after. On CUDA with ``--dtype bf16``
  the gathered weights are bf16 and gradients are reduced in fp32
  (:func:`mixed_precision`); elsewhere everything stays fp32.
* :func:`meta_copy` keeps an empty (meta-device) twin of the unsharded module, which
  :func:`full_module` fills on rank 0 with the gathered full weights: ``final/`` is then
  written by the same code as an unsharded run.
* Checkpoints: ``torch.distributed.checkpoint`` (DCP) writes every rank's shards into one
  folder and reads them back into any number of ranks (it reshards). DCP's stock reader
  unpickles the folder's ``.metadata`` file with plain ``pickle`` and loads non-tensor
  items with ``torch.load(weights_only=False)``: both would run code from a crafted
  checkpoint. :class:`SafeReader` reads ``.metadata`` with an unpickler that builds only
  DCP's own metadata records and a few plain torch types (anything else is refused before
  it is built), and :class:`TensorsOnlyPlanner` refuses non-tensor items: the trainer puts
  only tensors into DCP (plain data goes to ``trainer_state.pt``, read ``weights_only``).
  Tensor data itself DCP reads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

#: the denoiser's block containers: each entry of these is sharded on its own
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")
SINGLE_BLOCKS = ("mid_block",)


def blocks(module: nn.Module) -> Iterator[nn.Module]:
    """The denoiser's blocks, in order: what :func:`shard_module` shards one by one."""
    for name in BLOCK_LISTS:
        yield from getattr(module, name, None) or ()
    for name in SINGLE_BLOCKS:
        block = getattr(module, name, None)
        if isinstance(block, nn.Module):
            yield block


def mixed_precision(device: torch.device, dtype: torch.dtype):
    """bf16 gathered weights, fp32 gradient reduction: on CUDA with a low-precision compute
    dtype only (None elsewhere: fp32 throughout, the CPU gloo path)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda" or dtype == torch.float32:
        return None
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard_module(module: nn.Module, mp_policy=None) -> nn.Module:
    """``fully_shard`` every block, then the root (in place; returns ``module``). Every
    level reshards after its forward, the root too: a forward under ``no_grad`` (the
    reference) leaves no gathered weights behind."""
    from torch.distributed.fsdp import fully_shard

    kw = {"reshard_after_forward": True}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for block in blocks(module):
        fully_shard(block, **kw)
    fully_shard(module, **kw)
    return module


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of the (not yet sharded) ``module`` whose parameters live on the meta device
    (no memory); buffers are copied. :func:`full_module` fills it."""
    memo = {
        id(p): nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
        for p in module.parameters()
    }
    return copy.deepcopy(module, memo)


def full_state(module: nn.Module, *, all_ranks: bool = False) -> dict:
    """The full (unsharded) state dict: on rank 0 only, on the CPU (``{}`` elsewhere), or
    with ``all_ranks`` on every rank, on its device. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks)
    return get_model_state_dict(module, options=opts)


def full_module(skeleton: nn.Module, sharded: nn.Module) -> nn.Module | None:
    """``skeleton`` (:func:`meta_copy`) holding ``sharded``'s full weights, on rank 0 (CPU,
    fp32); None on the other ranks. A collective."""
    state = full_state(sharded)
    if dist.get_rank() != 0:
        return None
    skeleton.load_state_dict(state, strict=True, assign=True)
    left = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if left:  # an internal bug: the full state dict missed a parameter
        raise RuntimeError(f"parameters not gathered for final/: {left[:3]}")
    return skeleton


def local_tensors(tensors) -> list[torch.Tensor]:
    """Each DTensor's local shard (plain tensors as they are)."""
    from torch.distributed.tensor import DTensor

    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


@torch.no_grad()
def all_finite_sharded(params) -> bool:
    """Are all ranks' shards of ``params`` free of inf and NaN? A collective."""
    flags = [torch.isfinite(p).all() for p in local_tensors(params) if p.numel()]
    ok = torch.stack(flags).all() if flags else torch.tensor(True)
    ok = ok.to(torch.int32).reshape(1).cpu()
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def as_float(x) -> float:
    """A scalar tensor (or DTensor: its full value) as a Python float."""
    from torch.distributed.tensor import DTensor

    if isinstance(x, DTensor):
        x = x.full_tensor()
    return float(x)


# ------------------------------------------------------------------------ checkpoints

DCP_DIR = "dcp"  # in a checkpoint folder: the sharded model, optimizer and reference state


def model_state(module: nn.Module, *, trainable_only: bool) -> dict:
    """``module``'s sharded state dict (DTensor values), for DCP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        module, options=StateDictOptions(ignore_frozen_params=trainable_only)
    )


def optimizer_state(module: nn.Module, optimizer) -> dict:
    """``{"state": {fqn: {name: tensor}}, "param_groups": [...]}`` keyed by parameter
    names (the optimizer's state is created if it has none yet: DCP loads into it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer)


def set_states(module: nn.Module, optimizer, model: dict, optim: dict, *, trainable_only: bool):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    set_model_state_dict(module, model, options=opts)
    set_optimizer_state_dict(module, optimizer, optim)


def save_sharded(state: dict, folder: Path) -> None:
    """Every rank writes its shards of ``state`` (tensors only) into ``folder``. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    _tensors_only(state)
    dcp.save(state, storage_writer=FileSystemWriter(str(folder)))


def load_sharded(state: dict, folder: Path) -> None:
    """Fill ``state``'s tensors (in place) from the DCP folder, resharded to this world.
    A collective. Nothing in the folder is unpickled beyond DCP's metadata records."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, storage_reader=SafeReader(str(folder)), planner=TensorsOnlyPlanner())


def _tensors_only(state, where: str = "") -> None:
    if isinstance(state, dict):
        for k, v in state.items():
            _tensors_only(v, f"{where}.{k}" if where else str(k))
    elif not isinstance(state, torch.Tensor):  # an internal bug: plain data goes elsewhere
        raise TypeError(f"not a tensor in the sharded checkpoint state: {where}")


#: the globals a DCP ``.metadata`` pickle may name: DCP's metadata records, and the torch
#: and standard types inside them. Anything else is refused before it is built.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
    )
} | {
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a layout by its name, from torch's own table
    ("torch", "Size"),
    ("pathlib", "PosixPath"),  # the checkpoint id
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}
_DTYPES = {
    str(d).removeprefix("torch.") for d in vars(torch).values() if isinstance(d, torch.dtype)
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and name in _DTYPES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata names {module}.{name}: refused")


class SafeReader:  # built lazily: importing DCP is slow and the DDP path never needs it
    def __new__(cls, path: str):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import StorageMeta

        class _SafeReader(FileSystemReader):
            """DCP's file reader, its ``.metadata`` read by :class:`_MetadataUnpickler`."""

            def read_metadata(self, *args, **kwargs):
                path = self._get_metadata_path(kwargs.get("rank"))
                with self.fs.create_stream(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
                return metadata

        return _SafeReader(path)


class TensorsOnlyPlanner:
    def __new__(cls):
        from torch.distributed.checkpoint import DefaultLoadPlanner

        class _Planner(DefaultLoadPlanner):
            """DCP's planner, except that a non-tensor item (which it would load with
            ``torch.load(weights_only=False)``) is refused."""

            def load_bytes(self, read_item, value):
                raise pickle.UnpicklingError(
                    f"non-tensor item {read_item.dest_index.fqn} in the checkpoint: refused"
                )

        return _Planner()


def read_metadata_safely(folder: Path):
    """The DCP folder's metadata, read as :class:`SafeReader` reads it (a damaged or crafted
    file raises)."""
    with open(Path(folder) / ".metadata", "rb") as f:
        return _MetadataUnpickler(f).load()
