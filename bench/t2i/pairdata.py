"""The preference-pair dataset format: writer (shards) and reader (:class:`PairDataset`).

A dataset is a directory::

    DIR/info.json          {"format": "minddspo-pairs", "version": 2, "backbone", "latent_shape",
                            "latent_dtype", "variant", "perturb", "task", "prompts_file",
                            "num_pairs", "num_shards", "shard_size", "seed", "steps",
                            "guidance", "resolution", "llm_fallbacks", ...}
    DIR/metadata.jsonl     one JSON object per pair, in index order:
                           {"index", "prompt", "neg_prompt", "shard", "row", "variant", "seed"}
                           + "partner" (index of the other prompt) for not_paired/rand_positive
                           + "pos_prompt" (= c+, the partner's prompt) for rand_positive
                           + "llm_fallback" (bool) when perturb == "llm"
    DIR/shards/shard-00000.safetensors
                           "x0_w", "x0_l": (N, C, h, w) VAE latents (already scaled by the
                           VAE's scaling factor), float16 by default or float32.
                           The header's metadata also holds the shard's records and build
                           parameters, so a shard file is complete on its own: it is written to
                           a temporary name and renamed, and ``metadata.jsonl`` / ``info.json``
                           are merged from the shard headers at the end. The header's
                           ``sha256`` is that of the tensor data (every byte after the
                           header), computed when the shard is written.

Version 2 (every shard has its ``sha256``) is what the writers make; version 1 datasets
(written before shards had one) are read without it. :class:`PairDataset` checks every shard
on open: its checksum and that its latents are finite.

``neg_prompt`` is always ``c-``, the degraded original prompt. The *loser's conditioning
prompt* for the CPP methods (SPEC §5) is ``c-`` for ``paired`` / ``not_paired`` and ``c+``
(``pos_prompt``) for ``rand_positive``; :class:`PairDataset` returns that one as
``neg_prompt`` so the trainer does not need to know the variant.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load, save
from torch import Tensor
from torch.utils.data import Dataset

from bench.t2i.errors import UsageError
from bench.t2i.outdir import write_text_atomic

FORMAT = "minddspo-pairs"
VERSION = 2  # 2: every shard's header carries the sha256 of its tensor data
READS_VERSIONS = (1, 2)
CHECKSUM_KEY = "sha256"
VARIANTS = ("paired", "not_paired", "rand_positive")
RECORD_KEYS = ("index", "prompt", "neg_prompt", "shard", "row", "variant", "seed")
LATENT_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def shard_path(root: str | Path, k: int) -> Path:
    return Path(root) / "shards" / shard_name(k)


def loser_prompt(record: dict) -> str:
    """The prompt the reference is conditioned on for the loser (SPEC §5)."""
    if record.get("variant") == "rand_positive":
        return record["pos_prompt"]
    return record["neg_prompt"]


# ---------------------------------------------------------------------------- writer


def write_shard(
    root: str | Path,
    k: int,
    x0_w: Tensor,
    x0_l: Tensor,
    records: list[dict],
    params: dict | None = None,
    dtype: str = "float16",
    skipped: list[int] | None = None,
) -> Path:
    """Write shard ``k`` atomically (temporary file, then ``os.replace``), byte-reproducibly.

    ``skipped``: prompt indices of this shard left out (their degraded prompt equals the
    prompt, so winner and loser would be the same pair); kept in the header for info.json.
    """
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"latent dtype must be one of {tuple(LATENT_DTYPES)}, got {dtype!r}")
    if x0_w.shape != x0_l.shape or x0_w.shape[0] != len(records):
        raise ValueError(
            f"shard {k}: x0_w {tuple(x0_w.shape)}, x0_l {tuple(x0_l.shape)}, {len(records)} records"
        )
    path = shard_path(root, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tensors = {
        "x0_w": x0_w.detach().to("cpu", LATENT_DTYPES[dtype]).contiguous(),
        "x0_l": x0_l.detach().to("cpu", LATENT_DTYPES[dtype]).contiguous(),
    }
    meta = {"records": json.dumps(records), "params": json.dumps(params or {}, sort_keys=True)}
    if skipped:
        meta["skipped"] = json.dumps(sorted(skipped))
    tmp.write_bytes(sealed_shard(tensors, meta))
    os.replace(tmp, path)
    return path


def sealed_shard(tensors: dict[str, Tensor], meta: dict[str, str]) -> bytes:
    """The shard file's bytes: canonical safetensors whose header metadata also holds the
    sha256 of the tensor data (:data:`CHECKSUM_KEY`)."""
    data = _data_bytes(canonical_safetensors(save(tensors, metadata=meta)))
    blob = canonical_safetensors(save(tensors, metadata={**meta, CHECKSUM_KEY: _sha256(data)}))
    if _data_bytes(blob) != data:  # the data does not depend on the header
        raise RuntimeError("safetensors wrote different tensor bytes for the same tensors")
    return blob


def _data_bytes(blob: bytes) -> memoryview:
    return memoryview(blob)[8 + int.from_bytes(blob[:8], "little") :]


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header keys sorted.

    safetensors writes the header from a hash map, so two saves of identical tensors and
    metadata can differ in key order (and so in bytes); sorting makes a shard a pure
    function of its content. Same keys and values, so the same length: the padding and
    the data offsets are unchanged.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(text) > n:  # cannot happen for a header safetensors wrote compactly; be safe
        return blob
    return blob[:8] + text + b" " * (n - len(text)) + blob[8 + n :]


def shard_skipped(path: str | Path) -> list[int]:
    """Prompt indices a shard left out (see :func:`write_shard`)."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("skipped", "[]"))


def read_shard_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], list[dict], dict]:
    """``(tensor shapes, records, params)`` of a shard, reading only its header."""
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        meta = f.metadata() or {}
    return shapes, json.loads(meta.get("records", "[]")), json.loads(meta.get("params", "{}"))


def finalize(root: str | Path, info: dict, num_shards: int) -> Path:
    """Merge the shard headers into ``metadata.jsonl`` and write ``info.json`` (atomically)."""
    root = Path(root)
    records: list[dict] = []
    sealed = True
    for k in range(num_shards):
        path = shard_path(root, k)
        if not path.is_file():
            raise UsageError(f"{path}: missing shard; rerun make_pairs to finish the dataset")
        records.extend(read_shard_header(path)[1])
        with safe_open(str(path), framework="pt") as f:
            sealed = sealed and CHECKSUM_KEY in (f.metadata() or {})
    records.sort(key=lambda r: r["index"])
    write_text_atomic(root / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    # a build resumed over shards of version 1 (no checksum) stays version 1
    version = VERSION if sealed else 1
    info = {"format": FORMAT, "version": version, **info, "num_pairs": len(records)}
    info["num_shards"] = num_shards
    write_text_atomic(root / "info.json", json.dumps(info, indent=2) + "\n")
    return root


# ---------------------------------------------------------------------------- reader


class PairDataset(Dataset):
    """Preference pairs ``(x0_w, x0_l, prompt, neg_prompt)`` from a dataset directory.

    Validates the whole directory on open and raises a one-line ``UsageError`` naming the
    offending file. With ``verify`` every shard is read in full once, on open (checksum,
    finite latents): about one read of the dataset's bytes; without it only the shards'
    headers are read (the other ranks of a distributed run, which agree on rank 0's
    verdict). Latents are returned as float32; the last ``cache_shards`` shards read are
    kept in memory.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        backbone: str | None = None,
        latent_shape: tuple[int, ...] | None = None,
        cache_shards: int = 4,
        verify: bool = True,
    ):
        self.root = root = Path(path)
        self.verify = verify
        if not root.is_dir():
            raise UsageError(f"{root}: dataset directory not found")
        if not any(root.iterdir()):
            raise UsageError(
                f"{root}: empty dataset directory (build one with bench/make_pairs.py)"
            )
        info_file, meta_file = root / "info.json", root / "metadata.jsonl"
        for f in (info_file, meta_file):
            if not f.is_file():
                raise UsageError(f"{f}: missing (not a finished make_pairs dataset)")
        try:
            self.info: dict[str, Any] = json.loads(info_file.read_text())
        except ValueError as e:
            raise UsageError(f"{info_file}: invalid JSON ({e})") from None
        if not isinstance(self.info, dict) or self.info.get("format") != FORMAT:
            raise UsageError(f"{info_file}: not a {FORMAT} info file")
        version = self.info.get("version")
        if version not in READS_VERSIONS or isinstance(version, bool):
            raise UsageError(
                f"{info_file}: version {version!r}; this program reads versions "
                f"{', '.join(map(str, READS_VERSIONS))}"
            )
        self.sealed = version >= 2  # every shard carries its checksum
        shape = self.info.get("latent_shape")
        if not (isinstance(shape, list) and len(shape) == 3 and all(_count(n, 1) for n in shape)):
            raise UsageError(f"{info_file}: latent_shape must be [C, h, w], got {shape!r}")
        self.latent_shape = shape = tuple(shape)
        for key in ("num_shards", "num_pairs"):
            if self.info.get(key) is not None and not _count(self.info[key], 0):
                raise UsageError(f"{info_file}: {key} must be a count, got {self.info[key]!r}")
        self.records = self._read_records(meta_file)
        if not self.records:
            raise UsageError(f"{meta_file}: no pairs")
        if latent_shape is not None and tuple(latent_shape) != shape:
            raise UsageError(
                f"{info_file}: latent shape {shape}, but the model needs {tuple(latent_shape)}"
            )
        if backbone is not None and self.info.get("backbone") != backbone:
            raise UsageError(
                f"{info_file}: built for backbone {self.info.get('backbone')!r}, not {backbone!r}"
            )
        self._check_shards()
        self._cache: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self._cache_size = max(1, cache_shards)

    @property
    def variant(self) -> str:
        return self.info.get("variant", "paired")

    @staticmethod
    def _read_records(meta_file: Path) -> list[dict]:
        records = []
        for lineno, line in enumerate(meta_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise UsageError(f"{meta_file}:{lineno}: invalid JSON") from None
            missing = [k for k in RECORD_KEYS if k not in rec]
            if missing:
                raise UsageError(f"{meta_file}:{lineno}: missing keys {missing}")
            if rec["variant"] == "rand_positive" and "pos_prompt" not in rec:
                raise UsageError(f"{meta_file}:{lineno}: rand_positive record without pos_prompt")
            records.append(rec)
        return records

    def _check_shards(self) -> None:
        """Every shard: readable, its checksum (version 2), finite latents, then its shapes
        against info.json and its rows against metadata.jsonl. An intact shard that
        disagrees with either file names that file."""
        info_file, meta_file = self.root / "info.json", self.root / "metadata.jsonl"
        num_shards = self.info.get("num_shards")
        rows: dict[int, list[int]] = {k: [] for k in range(num_shards or 0)}
        for lineno, rec in enumerate(self.records, 1):
            k = rec["shard"]
            if not _count(k, 0) or not _count(rec["row"], 0):
                raise UsageError(f"{meta_file}: pair {lineno}: shard and row must be counts")
            if num_shards is not None and k >= num_shards:
                raise UsageError(
                    f"{info_file}: num_shards {num_shards}, but {meta_file.name} lists pairs in "
                    f"{shard_name(k)}"
                )
            rows.setdefault(k, []).append(rec["row"])
        total = 0
        for k, rs in sorted(rows.items()):
            path = shard_path(self.root, k)
            if not path.is_file():
                if not rs:
                    raise UsageError(
                        f"{info_file}: num_shards {num_shards}, but {path.name} does not exist "
                        f"and {meta_file.name} lists no pair in it"
                    )
                raise UsageError(f"{path}: missing shard file")
            shapes = self._verify_shard(path) if self.verify else self._header_shapes(path)
            for key in ("x0_w", "x0_l"):
                got = shapes[key]
                if tuple(got[1:]) != self.latent_shape:
                    raise UsageError(
                        f"{info_file}: latent_shape {list(self.latent_shape)}, but {path.name}"
                        f"{' (checksum intact)' if self.sealed else ''} holds {key} of shape {got}"
                    )
                if got[0] != len(rs):
                    raise UsageError(
                        f"{meta_file}: lists {len(rs)} pairs in {path.name}, which holds "
                        f"{got[0]} latents"
                    )
            if sorted(rs) != list(range(len(rs))):
                raise UsageError(f"{meta_file}: rows of {path.name} are not 0..{len(rs) - 1}")
            total += len(rs)
        n_info = self.info.get("num_pairs")
        if n_info is not None and n_info != total:
            raise UsageError(
                f"{info_file}: num_pairs {n_info}, but {meta_file.name} and the shards hold {total}"
            )

    @staticmethod
    def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
        """The shard's tensor shapes from its header alone; UsageError naming it when the
        header is unreadable or lacks x0_w or x0_l."""
        try:
            shapes = read_shard_header(path)[0]
        except Exception as e:  # a truncated or foreign file
            raise UsageError(f"{path}: unreadable shard ({type(e).__name__})") from None
        for key in ("x0_w", "x0_l"):
            if key not in shapes:
                raise UsageError(f"{path}: no tensor {key!r}")
        return shapes

    def _verify_shard(self, path: Path) -> dict[str, tuple[int, ...]]:
        """Read the whole shard once: UsageError naming it unless it is readable, holds
        x0_w and x0_l, matches its checksum, and its latents are finite. Its shapes."""
        try:
            blob = path.read_bytes()
            tensors = load(blob)
            n = int.from_bytes(blob[:8], "little")
            meta = json.loads(blob[8 : 8 + n]).get("__metadata__") or {}
        except Exception as e:  # a truncated or foreign file
            raise UsageError(f"{path}: unreadable shard ({type(e).__name__})") from None
        for key in ("x0_w", "x0_l"):
            if key not in tensors:
                raise UsageError(f"{path}: no tensor {key!r}")
        digest = meta.get(CHECKSUM_KEY)
        if digest is None and self.sealed:
            raise UsageError(
                f"{path}: no {CHECKSUM_KEY} in its header (not written with this dataset); "
                "rebuild the dataset"
            )
        if digest is not None and digest != _sha256(_data_bytes(blob)):
            raise UsageError(
                f"{path}: checksum mismatch (the file changed after it was written); "
                "rebuild the dataset"
            )
        for key in ("x0_w", "x0_l"):
            x = tensors[key]
            if x.dtype not in LATENT_DTYPES.values():
                raise UsageError(f"{path}: {key} is {x.dtype}, not one of {tuple(LATENT_DTYPES)}")
            if x.dim() != 4:
                raise UsageError(f"{path}: {key} has shape {tuple(x.shape)}, not (N, C, h, w)")
            finite = np.isfinite(x.numpy())  # numpy's check: several times torch's on float16
            if not finite.all():
                row = int(np.flatnonzero(~finite.reshape(len(x), -1).all(1))[0])
                raise UsageError(f"{path}: {key} row {row} holds non-finite values (NaN or inf)")
        return {key: tuple(t.shape) for key, t in tensors.items()}

    def _shard(self, k: int) -> dict[str, Tensor]:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        with safe_open(str(shard_path(self.root, k)), framework="pt") as f:
            data = {key: f.get_tensor(key) for key in ("x0_w", "x0_l")}
        self._cache[k] = data
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return data

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        data = self._shard(int(rec["shard"]))
        r = int(rec["row"])
        return {
            "x0_w": data["x0_w"][r].float(),  # (C, h, w)
            "x0_l": data["x0_l"][r].float(),  # (C, h, w)
            "prompt": rec["prompt"],
            "neg_prompt": loser_prompt(rec),
            "index": int(rec["index"]),
        }


def _count(x: Any, least: int) -> bool:
    """Is ``x`` an int (not a bool) >= ``least``?"""
    return isinstance(x, int) and not isinstance(x, bool) and x >= least


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack latents to ``(B, C, h, w)``; prompts stay lists of strings."""
    return {
        "x0_w": torch.stack([it["x0_w"] for it in items]),
        "x0_l": torch.stack([it["x0_l"] for it in items]),
        "prompt": [it["prompt"] for it in items],
        "neg_prompt": [it["neg_prompt"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }
