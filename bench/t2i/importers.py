"""Import preference pairs made elsewhere into our pair format (:mod:`bench.t2i.pairdata`).

The result is an ordinary pair dataset: ``train_t2i.py --data OUT`` trains on it unchanged.
Both importers write shards atomically and skip finished shards on a rerun (a shard made
with other settings or from another source is an error), then merge the shard headers
with :func:`bench.t2i.pairdata.finalize`, exactly as ``make_pairs`` does.

* :func:`import_ddspo` -- the official DDSPO layout::

      DIR/metadata.jsonl              one JSON object per pair; field names (defaults):
                                      id ("id"), prompt ("prompt", else "caption"),
                                      degraded prompt c- ("neg_prompt"), latent file
                                      names ("pos_file", "neg_file"; relative to
                                      DIR/latents, as the official loader reads them)
      DIR/latents/<pos_file>          winner latent x0_w (sampled from c)
      DIR/latents/<neg_file>          loser latent x0_l (sampled from c-)

  A line without ``pos_file``/``neg_file`` names its files ``<id>.safetensors`` and
  ``<id>_neg.safetensors``. Named files must stay inside DIR/latents (no absolute path, no
  ``..``). Each latent file holds one tensor (or the one named by ``latent_key``) of shape
  ``(C, h, w)`` or ``(1, C, h, w)``. Latents are copied, no VAE runs; they must already be
  scaled by the VAE's scaling factor as ours are (else pass ``latent_scale``, e.g. 0.18215
  for SD-1.x). They are stored in the source's precision unless ``latent_dtype`` says
  otherwise (float16 when every source latent is float16, else float32). Records get
  ``variant: "paired"`` (loser conditioned on c-).

* :func:`import_pickapic` -- human-preference image pairs in the Pick-a-Pic schema
  (``caption``, ``jpg_0``, ``jpg_1`` JPEG bytes, ``label_0``: 1 = image 0 preferred,
  0 = image 1 preferred, 0.5 = tie, dropped) from local parquet / arrow files, a folder of
  them, or a ``datasets.save_to_disk`` directory (read with pyarrow, so ``datasets`` itself
  is not needed). Images are decoded with Pillow, resized (shorter side, bilinear, as
  Diffusion-DPO does) and center-cropped to the resolution, and VAE-encoded in batches.

  Human pairs have no degraded prompt: ``neg_prompt`` is the caption itself and the
  dataset's variant is ``"human"``. How the trainer uses that: Diffusion-DPO and DSPO
  condition winner and loser on the prompt only, so they train on these pairs exactly as
  in their papers. The CPP methods (``dspo_cpp``, ``ddspo``) condition the reference's
  loser target on ``neg_prompt``; with ``neg_prompt == prompt`` that reduces to the
  plain reference -- the pairs train, but without the contrastive-prompt signal.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from bench.t2i.errors import UsageError
from bench.t2i.pairdata import LATENT_DTYPES, finalize, read_shard_header, shard_path, write_shard

# field-name defaults of the DDSPO layout's metadata.jsonl
DDSPO_ID_KEY = "id"
DDSPO_PROMPT_KEYS = ("prompt", "caption")
DDSPO_NEG_KEY = "neg_prompt"
DDSPO_FILE_KEYS = ("pos_file", "neg_file")  # the official loader's latent file names
NEG_SUFFIX = "_neg"
# Pick-a-Pic column names
PICKAPIC_COLUMNS = {"caption": "caption", "jpg_0": "jpg_0", "jpg_1": "jpg_1", "label_0": "label_0"}
TABLE_SUFFIXES = (".parquet", ".arrow")


# ---------------------------------------------------------------------------- common


def _check_common(shard_size: int, batch_size: int, latent_dtype: str) -> None:
    if shard_size < 1 or batch_size < 1:
        raise UsageError("shard_size and batch_size must be >= 1")
    if latent_dtype not in LATENT_DTYPES:
        raise UsageError(
            f"latent dtype must be one of {tuple(LATENT_DTYPES)}, got {latent_dtype!r}"
        )


def _todo_shards(out: Path, params: dict, num_shards: int, prompts: Sequence[str]) -> list[int]:
    """Shards still to write; a finished shard from other settings or data is an error."""
    want = json.loads(json.dumps(params, sort_keys=True))
    todo = []
    for k in range(num_shards):
        path = shard_path(out, k)
        if not path.is_file():
            todo.append(k)
            continue
        try:
            _, recs, old = read_shard_header(path)
        except Exception:
            raise UsageError(f"{path}: unreadable shard; delete it and rerun") from None
        if old != want:
            raise UsageError(f"{path}: made with different settings; use a fresh --out directory")
        if any(r["index"] >= len(prompts) or prompts[r["index"]] != r["prompt"] for r in recs):
            raise UsageError(f"{path}: made from different data; use a fresh --out directory")
    return todo


def _bar(progress: bool, total: int, desc: str):
    if not progress or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="pair")


# ------------------------------------------------------------------------------ DDSPO


def read_ddspo_metadata(
    src: str | Path,
    *,
    id_key: str = DDSPO_ID_KEY,
    prompt_keys: Sequence[str] = DDSPO_PROMPT_KEYS,
    neg_key: str = DDSPO_NEG_KEY,
) -> list[dict]:
    """``[{"id", "prompt", "neg_prompt", "files"}]`` from ``src/metadata.jsonl``, in file
    order; ``files`` is the line's ``(pos_file, neg_file)`` or None when it names none."""
    meta = Path(src) / "metadata.jsonl"
    if not Path(src).is_dir():
        raise UsageError(f"{src}: not a directory")
    if not meta.is_file():
        raise UsageError(f"{meta}: missing (not a DDSPO dataset directory)")
    rows, seen = [], set()
    for lineno, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise UsageError(f"{meta}:{lineno}: invalid JSON") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{meta}:{lineno}: not a JSON object")
        if id_key not in obj:
            raise UsageError(f"{meta}:{lineno}: missing id field {id_key!r}")
        pkey = next((k for k in prompt_keys if k in obj), None)
        if pkey is None:
            raise UsageError(f"{meta}:{lineno}: missing prompt field (one of {list(prompt_keys)})")
        if neg_key not in obj:
            raise UsageError(f"{meta}:{lineno}: missing perturbed-prompt field {neg_key!r}")
        pid = str(obj[id_key])
        files = _named_files(meta, lineno, obj)
        if files is None and (not pid or "/" in pid or "\\" in pid or pid.startswith(".")):
            raise UsageError(f"{meta}:{lineno}: id {pid!r} is not a plain file name")
        if pid in seen:
            raise UsageError(f"{meta}:{lineno}: duplicate id {pid!r}")
        seen.add(pid)
        rows.append(
            {"id": pid, "prompt": str(obj[pkey]), "neg_prompt": str(obj[neg_key]), "files": files}
        )
    if not rows:
        raise UsageError(f"{meta}: no pairs")
    return rows


def _named_files(meta: Path, lineno: int, obj: dict) -> tuple[str, str] | None:
    """The line's ``(pos_file, neg_file)``, each a relative path without ``..``; None when
    it names neither."""
    given = [k for k in DDSPO_FILE_KEYS if k in obj]
    if not given:
        return None
    if len(given) == 1:
        raise UsageError(
            f"{meta}:{lineno}: {given[0]!r} without {DDSPO_FILE_KEYS[given[0] == 'pos_file']!r}"
        )
    names = []
    for k in DDSPO_FILE_KEYS:
        v = obj[k]
        parts = PurePosixPath(v.replace("\\", "/")).parts if isinstance(v, str) else ()
        if not parts or v.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise UsageError(
                f"{meta}:{lineno}: {k} {v!r} is not a file name inside the latents folder"
            )
        names.append(v)
    return names[0], names[1]


def _latent_names(r: dict, neg_suffix: str) -> tuple[str, str]:
    """A metadata row's winner and loser latent file names, relative to the latents folder."""
    if r["files"] is not None:
        return r["files"]
    return f"{r['id']}.safetensors", f"{r['id']}{neg_suffix}.safetensors"


def _source_dtype(paths: Sequence[Path], key: str | None) -> str:
    """``float16`` when every latent of ``paths`` is stored as float16, else ``float32``
    (read from the safetensors headers only)."""
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                names = [key] if key is not None and key in f.keys() else list(f.keys())
                if any(f.get_slice(n).get_dtype() != "F16" for n in names):
                    return "float32"
        except Exception:  # unreadable: _load_latent reports it with the file's name
            return "float32"
    return "float16"


def _load_latent(path: Path, pid: str, key: str | None) -> Tensor:
    if not path.is_file():
        raise UsageError(f"{path}: missing latent file for id {pid!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if key is None:
                if len(keys) != 1:
                    raise UsageError(
                        f"{path}: holds tensors {keys}; name the latent with --latent-key"
                    )
                name = keys[0]
            elif key not in keys:
                raise UsageError(f"{path}: no tensor {key!r} (has {keys})")
            else:
                name = key
            t = f.get_tensor(name)
    except ValueError:
        raise
    except Exception as e:
        raise UsageError(f"{path}: unreadable latent file ({type(e).__name__})") from None
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3:
        raise UsageError(f"{path}: latent shape {tuple(t.shape)}, expected (C, h, w)")
    if not t.is_floating_point():
        raise UsageError(f"{path}: latent dtype {t.dtype} is not floating point")
    return t.float()


def import_ddspo(
    src: str | Path,
    out_dir: str | Path,
    *,
    backbone: str = "sd",
    id_key: str = DDSPO_ID_KEY,
    prompt_keys: Sequence[str] = DDSPO_PROMPT_KEYS,
    neg_key: str = DDSPO_NEG_KEY,
    latents_dir: str = "latents",
    neg_suffix: str = NEG_SUFFIX,
    latent_key: str | None = None,
    latent_scale: float = 1.0,
    shard_size: int = 64,
    latent_dtype: str | None = None,
    progress: bool = True,
) -> Path:
    """Copy a DDSPO-layout dataset (module docstring) into our format at ``out_dir``.

    ``backbone`` is recorded in info.json (the trainer refuses latents of another VAE);
    every latent file must exist and all must share one shape (else a one-line
    ``UsageError`` naming the file and id). ``latent_dtype`` None: the source's precision.
    """
    if latent_dtype is not None:
        _check_common(shard_size, 1, latent_dtype)
    if not math.isfinite(latent_scale) or latent_scale <= 0:
        raise UsageError(f"latent scale must be a positive number, got {latent_scale}")
    src = Path(src)
    rows = read_ddspo_metadata(src, id_key=id_key, prompt_keys=prompt_keys, neg_key=neg_key)
    lat_root = src / latents_dir

    def pair(r: dict) -> tuple[Tensor, Tensor]:
        pos, neg = _latent_names(r, neg_suffix)
        w = _load_latent(lat_root / pos, r["id"], latent_key)
        lo = _load_latent(lat_root / neg, r["id"], latent_key)
        return w, lo

    _check_ddspo_files(src, lat_root, rows, neg_suffix)
    if latent_dtype is None:  # keep the source's precision
        names = [lat_root / n for r in rows for n in _latent_names(r, neg_suffix)]
        latent_dtype = _source_dtype(names, latent_key)
    _check_common(shard_size, 1, latent_dtype)
    shape = tuple(pair(rows[0])[0].shape)
    params = dict(
        source="ddspo",
        source_dir=str(src.resolve()),
        backbone=backbone,
        latent_shape=list(shape),
        latent_dtype=latent_dtype,
        latent_scale=latent_scale,
        variant="paired",
        shard_size=shard_size,
        num_prompts=len(rows),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(rows)
    num_shards = (n + shard_size - 1) // shard_size
    todo = _todo_shards(out, params, num_shards, [r["prompt"] for r in rows])
    bar = _bar(progress, sum(min(shard_size, n - k * shard_size) for k in todo), "import ddspo")
    for k in todo:
        recs, xw, xl = [], [], []
        for row, i in enumerate(range(k * shard_size, min((k + 1) * shard_size, n))):
            r = rows[i]
            w, lo = pair(r)
            _check_ddspo_shapes(lat_root, r, neg_suffix, (w, lo), shape)
            xw.append(w * latent_scale)
            xl.append(lo * latent_scale)
            recs.append(
                dict(index=i, prompt=r["prompt"], neg_prompt=r["neg_prompt"], shard=k,
                     row=row, variant="paired", seed=0, source_id=r["id"])
            )  # fmt: skip
            if bar is not None:
                bar.update(1)
        write_shard(out, k, torch.stack(xw), torch.stack(xl), recs, params, latent_dtype)
    if bar is not None:
        bar.close()
    finalize(out, dict(params, task="alignment", perturb="ddspo-import"), num_shards)
    return out


def _check_ddspo_files(src: Path, lat_root: Path, rows: list[dict], neg_suffix: str) -> None:
    """Every file a row names lies inside the latents folder and exists: a missing one fails
    before anything is written."""
    for r in rows:
        for key, name in zip(DDSPO_FILE_KEYS, r["files"] or (), strict=False):
            _inside(lat_root, name, src / "metadata.jsonl", f"{key} of id {r['id']!r}")
        for name in _latent_names(r, neg_suffix):
            if not (lat_root / name).is_file():
                raise UsageError(f"{lat_root / name}: missing latent file for id {r['id']!r}")


def _check_ddspo_shapes(
    lat_root: Path, r: dict, neg_suffix: str, latents: tuple[Tensor, Tensor], shape: tuple
) -> None:
    """A row's two latents have the first row's shape (else a line naming the file)."""
    for name, t in zip(_latent_names(r, neg_suffix), latents, strict=True):
        if tuple(t.shape) != shape:
            raise UsageError(
                f"{lat_root / name}: latent shape "
                f"{tuple(t.shape)} for id {r['id']!r}, expected {shape} (as the first)"
            )


# -------------------------------------------------------------------------- Pick-a-Pic


def table_files(src: str | Path, split: str = "train") -> list[Path]:
    """The arrow/parquet files of ``src``: one file, a folder of them (sorted, recursive),
    or a ``datasets.save_to_disk`` directory (its ``state.json`` order; for a saved
    ``DatasetDict``, the ``split`` subdirectory)."""
    src = Path(src)
    if src.is_file():
        if src.suffix not in TABLE_SUFFIXES:
            raise UsageError(f"{src}: not a .parquet or .arrow file")
        return [src]
    if not src.is_dir():
        raise UsageError(f"{src}: no such file or directory")
    if (src / "dataset_dict.json").is_file():
        try:
            splits = json.loads((src / "dataset_dict.json").read_text()).get("splits", [])
        except ValueError:
            raise UsageError(f"{src / 'dataset_dict.json'}: invalid JSON") from None
        if split not in splits:
            raise UsageError(f"{src}: no split {split!r} (has {splits}); choose one with --split")
        return table_files(_inside(src, split, src / "dataset_dict.json", "split"), split)
    if (src / "state.json").is_file():
        try:
            files = [
                d["filename"] for d in json.loads((src / "state.json").read_text())["_data_files"]
            ]
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"{src / 'state.json'}: not a datasets save_to_disk state") from None
        return [_inside(src, f, src / "state.json", "_data_files entry") for f in files]
    files = sorted(p for p in src.rglob("*") if p.suffix in TABLE_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(f"{src}: no .parquet or .arrow files")
    return files


def _inside(folder: Path, name: Any, source: Path, what: str) -> Path:
    """``folder / name`` for a name read from the file ``source``; UsageError unless it is a
    relative path that stays inside ``folder`` (links resolved)."""
    if not isinstance(name, str) or not name:
        raise UsageError(f"{source}: {what} {name!r} is not a file name")
    path = folder / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(folder.resolve()):
        raise UsageError(f"{source}: {what} {name!r} is outside {folder}")
    return path


@dataclass
class _Table:
    path: Path
    columns: list[str]

    def batches(self, columns: list[str], batch_rows: int = 256) -> Iterator[Any]:
        """pyarrow RecordBatches of ``columns``, in row order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.path.suffix == ".parquet":
            yield from pq.ParquetFile(self.path).iter_batches(
                batch_size=batch_rows, columns=columns
            )
            return
        _, batches = _open_ipc(self.path)
        for b in batches:
            yield pa.RecordBatch.from_arrays([b.column(c) for c in columns], names=columns)


def _open_ipc(path: Path) -> tuple[Any, Iterator[Any]]:
    """``(schema, record batches)`` of an Arrow IPC file (file or stream format: datasets'
    ``save_to_disk`` writes the stream format)."""
    import pyarrow as pa

    try:
        f = pa.ipc.open_file(pa.memory_map(str(path)))
        return f.schema, (f.get_batch(i) for i in range(f.num_record_batches))
    except pa.ArrowInvalid:
        r = pa.ipc.open_stream(pa.memory_map(str(path)))
        return r.schema, iter(r)


def _open_table(path: Path) -> _Table:
    import pyarrow as pa  # the import extra; missing: one line naming it (minddspo.extras)
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UsageError(f"{path}: missing data file")
    try:
        if path.suffix == ".parquet":
            schema = pq.ParquetFile(path).schema_arrow
        else:
            schema = _open_ipc(path)[0]
    except (pa.ArrowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path}: unreadable table ({first})") from None
    return _Table(path, list(schema.names))


def _image_bytes(v: Any) -> bytes | None:
    if isinstance(v, dict):  # a datasets Image feature: {"bytes", "path"}
        v = v.get("bytes")
    return v if isinstance(v, bytes | bytearray | memoryview) else None


def load_image(data: bytes, resolution: int) -> Tensor:
    """JPEG/PNG bytes -> ``(3, R, R)`` float32 in [-1, 1]: RGB, shorter side resized to
    ``resolution`` (bilinear), center crop (Diffusion-DPO's preprocessing, without flips)."""
    from PIL import Image

    with Image.open(io.BytesIO(bytes(data))) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0)


def scan_pickapic(
    files: Sequence[Path], columns: dict[str, str] | None = None
) -> tuple[list[_Table], list[tuple[int, int, str, bool]], dict]:
    """Check the columns and read captions and labels (no image bytes).

    Returns the tables, the kept pairs as ``(file index, row, caption, image-0-wins)`` and
    counts ``{"rows", "ties", "unlabeled"}``.
    """
    cols = {**PICKAPIC_COLUMNS, **(columns or {})}
    tables = [_open_table(Path(f)) for f in files]
    pairs, counts = [], {"rows": 0, "ties": 0, "unlabeled": 0}
    for fi, t in enumerate(tables):
        missing = [c for c in cols.values() if c not in t.columns]
        if missing:
            raise UsageError(f"{t.path}: missing column(s) {missing} (has {t.columns})")
        row = 0
        for b in t.batches([cols["caption"], cols["label_0"]], 4096):
            caps = b.column(0).to_pylist()
            labels = b.column(1).to_pylist()
            for cap, lab in zip(caps, labels, strict=True):
                counts["rows"] += 1
                if lab is None or (isinstance(lab, float) and math.isnan(lab)):
                    counts["unlabeled"] += 1
                elif not 0 <= float(lab) <= 1:
                    raise UsageError(
                        f"{t.path}: row {row}: {cols['label_0']} = {lab}, expected 0, 0.5 or 1"
                    )
                elif float(lab) == 0.5:
                    counts["ties"] += 1
                else:
                    if cap is None:
                        raise UsageError(f"{t.path}: row {row}: empty {cols['caption']}")
                    pairs.append((fi, row, str(cap), float(lab) >= 0.5))
                row += 1
    return tables, pairs, counts


def import_pickapic(
    src: str | Path,
    out_dir: str | Path,
    encode: Callable[[Tensor], Tensor],
    *,
    backbone: str,
    latent_shape: Sequence[int],
    resolution: int,
    split: str = "train",
    columns: dict[str, str] | None = None,
    shard_size: int = 64,
    batch_size: int = 8,
    latent_dtype: str = "float16",
    max_pairs: int | None = None,
    progress: bool = True,
) -> Path:
    """VAE-encode Pick-a-Pic-schema pairs (module docstring) into our format at ``out_dir``.

    ``encode`` maps pixels ``(B, 3, R, R)`` in [-1, 1] to scaled latents of
    ``latent_shape`` (:meth:`bench.t2i.backbones.Backbone.encode_images`); ``batch_size`` counts
    pairs per call (2 * batch_size images). Ties (``label_0 == 0.5``) and rows without a
    label are dropped and counted in info.json. ``columns`` renames the schema's columns
    (keys ``caption``, ``jpg_0``, ``jpg_1``, ``label_0``).
    """
    _check_common(shard_size, batch_size, latent_dtype)
    cols = {**PICKAPIC_COLUMNS, **(columns or {})}
    files, tables, pairs, counts = _pickapic_pairs(src, split, cols, max_pairs)
    params = dict(
        source="pickapic",
        source_files=[str(Path(f).resolve()) for f in files],
        backbone=backbone,
        latent_shape=list(latent_shape),
        latent_dtype=latent_dtype,
        resolution=resolution,
        variant="human",
        shard_size=shard_size,
        num_prompts=len(pairs),
        columns=cols,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(pairs)
    num_shards = (n + shard_size - 1) // shard_size
    todo = _todo_shards(out, params, num_shards, [p[2] for p in pairs])
    bar = _bar(progress, sum(min(shard_size, n - k * shard_size) for k in todo), "import pickapic")
    want = {k: range(k * shard_size, min((k + 1) * shard_size, n)) for k in todo}
    images: dict[int, tuple[bytes, bytes]] = {}
    done_upto = 0  # shards in `todo` are written as soon as all their images are read

    def flush(k: int) -> None:
        idx = list(want[k])
        xw, xl = [], []
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            w, lo = _encode_pairs(
                chunk, pairs, images, files, cols, resolution, encode, latent_shape
            )
            xw.append(w)
            xl.append(lo)
            if bar is not None:
                bar.update(len(chunk))
        recs = _pickapic_records(k, idx, pairs, files)
        for i in idx:
            images.pop(i)
        write_shard(out, k, torch.cat(xw), torch.cat(xl), recs, params, latent_dtype)

    # read image bytes only of the pairs of unfinished shards
    for got in _pair_image_bytes(tables, _rows_needed(todo, want, pairs), cols):
        images.update(got)
        while done_upto < len(todo) and all(i in images for i in want[todo[done_upto]]):
            flush(todo[done_upto])
            done_upto += 1
    if done_upto < len(todo):  # a file shrank between the scan and the read
        i = next(i for i in want[todo[done_upto]] if i not in images)
        raise UsageError(f"{files[pairs[i][0]]}: rows changed while reading; rerun")
    if bar is not None:
        bar.close()
    info = dict(params, task="alignment", perturb="none (human preference)", dropped=counts)
    finalize(out, info, num_shards)
    return out


def _pickapic_pairs(
    src: str | Path, split: str, cols: dict[str, str], max_pairs: int | None
) -> tuple[list[Path], list[_Table], list[tuple[int, int, str, bool]], dict]:
    """The split's files, their tables, the kept pairs (the first ``max_pairs``) and the
    counts of :func:`scan_pickapic`; none kept is a one-line ``UsageError``."""
    files = table_files(src, split)
    tables, pairs, counts = scan_pickapic(files, cols)
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    if not pairs:
        raise UsageError(
            f"{src}: no preference pairs (all {counts['rows']} rows ties or unlabeled)"
        )
    return files, tables, pairs, counts


def _rows_needed(
    todo: list[int], want: dict[int, range], pairs: list[tuple[int, int, str, bool]]
) -> dict[int, dict[int, int]]:
    """Which pair index each (file, row) of the shards in ``todo`` feeds."""
    need: dict[int, dict[int, int]] = {}
    for k in todo:
        for i in want[k]:
            fi, row = pairs[i][:2]
            need.setdefault(fi, {})[row] = i
    return need


def _pair_image_bytes(
    tables: list[_Table], need: dict[int, dict[int, int]], cols: dict[str, str]
) -> Iterator[dict[int, tuple[Any, Any]]]:
    """The two images' bytes of the needed rows, by pair index, one table batch at a time
    (batches without a needed row are skipped)."""
    for fi in sorted(need):
        rows = need[fi]
        r0 = 0
        for b in tables[fi].batches([cols["jpg_0"], cols["jpg_1"]]):
            lo_row, hi_row = r0, r0 + b.num_rows
            r0 = hi_row
            hit = [r for r in range(lo_row, hi_row) if r in rows]
            if not hit:
                continue
            c0, c1 = b.column(0), b.column(1)
            yield {rows[r]: (c0[r - lo_row].as_py(), c1[r - lo_row].as_py()) for r in hit}


def _encode_pairs(
    chunk: list[int],
    pairs: list[tuple[int, int, str, bool]],
    images: dict[int, tuple[Any, Any]],
    files: Sequence[Path],
    cols: dict[str, str],
    resolution: int,
    encode: Callable[[Tensor], Tensor],
    latent_shape: Sequence[int],
) -> tuple[Tensor, Tensor]:
    """The winners' and the losers' latents of the pairs in ``chunk``, in one encoder call
    (latents of another shape than ``latent_shape``: a one-line ``UsageError``)."""
    pix = []
    for side in (0, 1):  # winners first, then losers
        for i in chunk:
            fi, frow, _, first_wins = pairs[i]
            j = side if first_wins else 1 - side  # which image: 0 or 1
            col = cols[f"jpg_{j}"]
            pix.append(_decode(images[i][j], resolution, files[fi], frow, col))
    lat = encode(torch.stack(pix)).detach().float().cpu()
    if tuple(lat.shape[1:]) != tuple(latent_shape):
        raise UsageError(
            f"encoder gave latents {tuple(lat.shape[1:])}, expected {tuple(latent_shape)}"
        )
    return lat.chunk(2)


def _pickapic_records(
    k: int, idx: list[int], pairs: list[tuple[int, int, str, bool]], files: Sequence[Path]
) -> list[dict]:
    """The records of shard ``k`` (pairs ``idx``)."""
    recs = []
    for row, i in enumerate(idx):
        fi, frow, cap, _ = pairs[i]
        recs.append(
            dict(index=i, prompt=cap, neg_prompt=cap, shard=k, row=row, variant="human",
                 seed=0, source_file=files[fi].name, source_row=frow)
        )  # fmt: skip
    return recs


def _decode(v: Any, resolution: int, path: Path, row: int, col: str) -> Tensor:
    data = _image_bytes(v)
    if data is None:
        raise UsageError(f"{path}: row {row}: {col} holds no image bytes")
    try:
        return load_image(data, resolution)
    except Exception as e:
        raise UsageError(
            f"{path}: row {row}: {col} is not a readable image ({type(e).__name__})"
        ) from None
