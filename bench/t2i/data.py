"""Deterministic data order: the indices of a micro-batch are a pure function of the step.

Each epoch is a fresh permutation of the dataset (seeded by ``seed`` and the epoch), laid
out as one long stream; micro-step ``m`` of step ``k`` on rank ``r`` takes the next
``batch`` positions of its slot, exactly as a ``DistributedSampler`` with ``set_epoch``
would shard an epoch across ranks. Because nothing is stateful, ``--resume`` continues the
data order bit for bit with no sampler state to save.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=4)
def _epoch_perm(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(
    n: int, *, seed: int, step: int, micro: int, accum: int, rank: int, world: int, batch: int
) -> list[int]:
    """Dataset indices of one rank's micro-batch. Shape comment: ``len == batch``."""
    start = ((step * accum + micro) * world + rank) * batch
    out = []
    for pos in range(start, start + batch):
        epoch, i = divmod(pos, n)
        out.append(_epoch_perm(n, seed, epoch)[i])
    return out


def dataset_fingerprint(root: str | Path) -> str:
    """sha256 of a pair dataset's ``info.json`` and ``metadata.jsonl``: the same pairs in the
    same order whatever folder the dataset was copied to (``--resume`` compares it)."""
    h = hashlib.sha256()
    for name in ("info.json", "metadata.jsonl"):
        h.update((Path(root) / name).read_bytes())
    return h.hexdigest()
