"""Deterministic data order: the indices of a micro-batch are a pure function of the step.

Each epoch is a fresh permutation of the dataset (seeded by ``seed`` and the epoch), laid
out as one long stream; micro-step ``m`` of step ``k`` on rank ``r`` takes the next
``batch`` positions of its slot, exactly as a ``DistributedSampler`` with ``set_epoch``
would shard an epoch across ranks. Because nothing is stateful, ``--resume`` continues the
data order bit for bit with no sampler state to save.

A pair's place in that stream (its *position*) also keys its random draws (timestep,
noise, prompt dropping, random-condition swaps: :func:`row_generators`), so a run reads the
same pairs with the same noise whatever its number of ranks, batch size and accumulation,
as long as the pairs per optimizer step stay the same.
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


def batch_positions(*, step: int, micro: int, accum: int, rank: int, world: int, batch: int):
    """Stream positions of one rank's micro-batch: ``range`` of length ``batch``. Step ``k``
    covers positions ``[k P, (k + 1) P)`` with ``P = batch * accum * world`` pairs per step,
    however they are split into ranks and micro-steps."""
    start = ((step * accum + micro) * world + rank) * batch
    return range(start, start + batch)


def batch_indices(n: int, *, seed: int, positions) -> list[int]:
    """Dataset indices of the stream ``positions`` (:func:`batch_positions`)."""
    return [_epoch_perm(n, seed, epoch)[i] for epoch, i in (divmod(pos, n) for pos in positions)]


def row_generators(seed: int, positions) -> list[torch.Generator]:
    """One CPU generator per stream position: every random draw of that pair's row comes
    from it, in a fixed order. torch seeds its CPU generator with 32 bits, so position ``p``
    gets ``(h(seed) + p) mod 2**32`` (``h`` a fixed 32-bit hash of the run's seed): no two
    rows of a run share a stream before 2**32 pairs."""
    base = int.from_bytes(hashlib.sha256(f"minddspo-rows:{seed}".encode()).digest()[:4], "big")
    return [torch.Generator().manual_seed((base + pos) % 2**32) for pos in positions]


def dataset_fingerprint(root: str | Path) -> str:
    """sha256 of a pair dataset's ``info.json`` and ``metadata.jsonl``: the same pairs in the
    same order whatever folder the dataset was copied to (``--resume`` compares it)."""
    h = hashlib.sha256()
    for name in ("info.json", "metadata.jsonl"):
        h.update((Path(root) / name).read_bytes())
    return h.hexdigest()
