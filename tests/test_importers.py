"""Importers (bench/import_pairs.py): DDSPO layout and Pick-a-Pic schema into our pair format."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from bench import train_t2i  # noqa: E402
from bench.import_pairs import main  # noqa: E402
from bench.t2i.backbones import Backbone  # noqa: E402
from bench.t2i.importers import import_pickapic, load_image  # noqa: E402
from bench.t2i.pairdata import PairDataset, shard_path  # noqa: E402
from bench.t2i.tiny import tiny_backbone  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
RES = 32  # the tiny SD backbone's resolution: latents (4, 16, 16)


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _rand_img(rng, h=RES, w=RES) -> bytes:
    return _jpeg(rng.integers(0, 256, (h, w, 3)))


WHITE = _jpeg(np.full((RES, RES, 3), 255))
BLACK = _jpeg(np.zeros((RES, RES, 3)))


def _rows():
    rng = np.random.default_rng(0)
    rows = [
        ("white wins", WHITE, BLACK, 1.0),
        ("black wins", WHITE, BLACK, 0.0),
        ("a tie", _rand_img(rng), _rand_img(rng), 0.5),
        ("wide image, first wins", _rand_img(rng, 40, 56), _rand_img(rng), 1.0),
        ("second wins", _rand_img(rng), _rand_img(rng), 0.0),
        ("first wins", _rand_img(rng), _rand_img(rng), 1.0),
    ]
    return [dict(zip(("caption", "jpg_0", "jpg_1", "label_0"), r, strict=True)) for r in rows]


def _table(rows, drop=()):
    cols = {k: [r[k] for r in rows] for k in ("caption", "jpg_0", "jpg_1", "label_0")}
    types = {"caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(),
             "label_0": pa.float64()}  # fmt: skip
    return pa.table({k: pa.array(v, types[k]) for k, v in cols.items() if k not in drop})


@pytest.fixture(scope="module")
def sd():
    return tiny_backbone("sd")


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory):
    """A folder of two parquet files, 6 rows, one tie."""
    src = tmp_path_factory.mktemp("pickapic")
    rows = _rows()
    pq.write_table(_table(rows[:3]), src / "train-0.parquet")
    pq.write_table(_table(rows[3:]), src / "train-1.parquet")
    return src, rows


@pytest.fixture(scope="module")
def imported(pickapic, tmp_path_factory):
    out = tmp_path_factory.mktemp("pap-out") / "pairs"
    argv = ["--from", "pickapic", str(pickapic[0]), "--tiny", "sd", "--out", str(out)]
    argv += ["--shard-size", "2", "--batch-size", "2", "--latent-dtype", "float32", "--no-progress"]
    assert main(argv) == 0
    return out, argv


def test_pickapic_import(sd, pickapic, imported):
    _, rows = pickapic
    out, _ = imported
    ds = PairDataset(out, backbone="sd", latent_shape=(4, 16, 16))
    kept = [r for r in rows if r["label_0"] != 0.5]
    assert len(ds) == 5 and ds.info["num_shards"] == 3  # the tie is dropped
    assert ds.variant == "human" and ds.info["dropped"] == {"rows": 6, "ties": 1, "unlabeled": 0}
    for i, r in enumerate(kept):
        item = ds[i]
        assert item["prompt"] == item["neg_prompt"] == r["caption"]
        win, lose = (r["jpg_0"], r["jpg_1"]) if r["label_0"] == 1 else (r["jpg_1"], r["jpg_0"])
        ref = sd.encode_images(torch.stack([load_image(win, RES), load_image(lose, RES)]))
        torch.testing.assert_close(item["x0_w"], ref[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(item["x0_l"], ref[1], rtol=1e-4, atol=1e-4)
    # the preferred image is x0_w: white first when label_0 = 1, black first when 0
    white = sd.encode_images(torch.ones(1, 3, RES, RES))[0]
    black = sd.encode_images(-torch.ones(1, 3, RES, RES))[0]
    assert (white - black).abs().mean() > 1e-2
    for i, (w, lo) in enumerate(((white, black), (black, white))):
        assert (ds[i]["x0_w"] - w).abs().mean() < (ds[i]["x0_w"] - lo).abs().mean()
        assert (ds[i]["x0_l"] - lo).abs().mean() < (ds[i]["x0_l"] - w).abs().mean()


def test_pickapic_resume(imported, monkeypatch, capsys):
    out, argv = imported
    mtimes = [shard_path(out, k).stat().st_mtime_ns for k in range(3)]

    def fail(self, images):
        raise AssertionError("encoder called for a finished shard")

    monkeypatch.setattr(Backbone, "encode_images", fail)
    assert main(argv) == 0  # all shards done: nothing encoded
    assert mtimes == [shard_path(out, k).stat().st_mtime_ns for k in range(3)]
    before = PairDataset(out)[2]["x0_w"].clone()
    shard_path(out, 1).unlink()
    (out / "metadata.jsonl").unlink()
    calls = []
    monkeypatch.undo()
    real = Backbone.encode_images
    monkeypatch.setattr(
        Backbone, "encode_images", lambda self, x: calls.append(len(x)) or real(self, x)
    )
    assert main(argv) == 0  # only shard 1 (2 pairs, one batch of 4 images)
    assert calls == [4] and shard_path(out, 0).stat().st_mtime_ns == mtimes[0]
    torch.testing.assert_close(PairDataset(out)[2]["x0_w"], before)
    assert "wrote 5 pairs" in capsys.readouterr().out
    # another resolution into the same directory is refused
    assert main([*argv, "--resolution", "64"]) == 2
    assert "different settings" in capsys.readouterr().err


def test_train_on_imported(imported, tmp_path):
    out, _ = imported
    argv = ["--tiny", "--data", str(out), "--out", str(tmp_path / "run"), "--no-progress"]
    assert train_t2i.main([*argv, "--batch-size", "2", "--max-steps", "2"]) == 0
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2]


def test_save_to_disk_layout(pickapic, tmp_path):
    """A datasets.save_to_disk directory (Arrow stream files + state.json), read with pyarrow."""
    _, rows = pickapic
    d = tmp_path / "saved" / "train"
    d.mkdir(parents=True)
    table = _table(rows)
    with pa.ipc.new_stream(str(d / "data-00000-of-00001.arrow"), table.schema) as w:
        w.write_table(table)
    (d / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    (tmp_path / "saved" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))

    def encode(x):  # a cheap deterministic stand-in for the VAE: 2x2 mean pooling
        return torch.nn.functional.avg_pool2d(x, 2)

    out = import_pickapic(tmp_path / "saved", tmp_path / "out", encode, backbone="sd",
                          latent_shape=(3, 16, 16), resolution=RES, progress=False,
                          latent_dtype="float32")  # fmt: skip
    ds = PairDataset(out)
    assert len(ds) == 5 and [ds[i]["prompt"] for i in range(2)] == ["white wins", "black wins"]
    assert ds[0]["x0_w"].min() > 0.9 and ds[0]["x0_l"].max() < -0.9  # white won
    assert ds[1]["x0_w"].max() < -0.9 and ds[1]["x0_l"].min() > 0.9  # black won


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_pickapic_bad_input(pickapic, tmp_path, capsys):
    _, rows = pickapic
    bad = tmp_path / "bad.parquet"
    pq.write_table(_table(rows, drop=("label_0",)), bad)
    argv = ["--tiny", "sd", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(["--from", "pickapic", str(bad), *argv]) == 2
    err = _err(capsys)
    assert "missing column" in err and "label_0" in err and "bad.parquet" in err
    assert main(["--from", "pickapic", str(tmp_path / "nope"), *argv]) == 2
    assert "no such file" in _err(capsys)
    assert main(["--from", "pickapic", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "--pretrained" in _err(capsys)
    assert main(["--from", "flickr", str(bad), *argv]) == 2
    assert "unknown kind" in _err(capsys)


@pytest.mark.parametrize("entry", ["../../outside.parquet", "ABS", "sub/../../outside.parquet"])
def test_save_to_disk_state_stays_in_its_folder(pickapic, tmp_path, capsys, entry):
    """A state.json naming a file outside its folder is refused before anything is read,
    one line naming state.json and the entry; nothing is written."""
    _, rows = pickapic
    outside = tmp_path / "outside.parquet"  # a readable table: reading it would succeed
    pq.write_table(_table(rows), outside)
    entry = str(outside) if entry == "ABS" else entry
    d = tmp_path / "saved" / "train"
    d.mkdir(parents=True)
    (d / "sub").mkdir()
    state = {"_data_files": [{"filename": "ok.arrow"}, {"filename": entry}]}
    (d / "state.json").write_text(json.dumps(state))
    (tmp_path / "saved" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    out = tmp_path / "o"
    argv = ["--from", "pickapic", str(tmp_path / "saved"), "--tiny", "sd", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 2
    assert _err(capsys) == f"error: {d / 'state.json'}: _data_files entry {entry!r} is outside {d}"
    assert not out.exists()


def test_save_to_disk_split_stays_in_its_folder(pickapic, tmp_path, capsys):
    src = tmp_path / "saved"
    src.mkdir()
    pq.write_table(_table(pickapic[1]), tmp_path / "x.parquet")
    (src / "dataset_dict.json").write_text(json.dumps({"splits": ["train", ".."]}))
    argv = ["--from", "pickapic", str(src), "--split", "..", "--tiny", "sd", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert _err(capsys) == f"error: {src / 'dataset_dict.json'}: split '..' is outside {src}"
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ DDSPO


def _ddspo(root, n=5, keys=("id", "prompt", "neg_prompt")):
    g = torch.Generator().manual_seed(0)
    (root / "latents").mkdir(parents=True)
    lat = {}
    lines = []
    for i in range(n):
        pid = f"{i:04d}"
        w, lo = torch.randn(4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
        save_file({"latent": w}, str(root / "latents" / f"{pid}.safetensors"))
        save_file({"latent": lo}, str(root / "latents" / f"{pid}_neg.safetensors"))
        lat[pid] = (w, lo[0])
        pkey = "caption" if i == 2 and keys[1] == "prompt" else keys[1]  # the fallback field
        lines.append({keys[0]: pid, pkey: f"prompt {i}", keys[2]: f"neg {i}", "extra": 1})
    (root / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lat


def test_ddspo_import(tmp_path, capsys):
    src, out = tmp_path / "ddspo", tmp_path / "out"
    lat = _ddspo(src)
    argv = ["--from", "ddspo", str(src), "--out", str(out), "--backbone", "sd"]
    argv += ["--shard-size", "2", "--latent-dtype", "float32", "--no-progress"]
    assert main(argv) == 0
    ds = PairDataset(out, backbone="sd", latent_shape=(4, 16, 16))
    assert len(ds) == 5 and ds.variant == "paired" and ds.info["num_shards"] == 3
    for i, (pid, (w, lo)) in enumerate(sorted(lat.items())):
        item = ds[i]
        assert item["prompt"] == f"prompt {i}" and item["neg_prompt"] == f"neg {i}"
        assert torch.equal(item["x0_w"], w) and torch.equal(item["x0_l"], lo)
        assert ds.records[i]["source_id"] == pid
    # resume: nothing rewritten
    mtimes = [shard_path(out, k).stat().st_mtime_ns for k in range(3)]
    assert main(argv) == 0
    assert mtimes == [shard_path(out, k).stat().st_mtime_ns for k in range(3)]
    capsys.readouterr()
    # configurable field names
    src2 = tmp_path / "ddspo2"
    _ddspo(src2, n=2, keys=("uid", "text", "perturbed"))
    argv2 = ["--from", "ddspo", str(src2), "--out", str(tmp_path / "out2"), "--no-progress"]
    assert main(argv2) == 2
    assert "missing id field 'id'" in _err(capsys)
    argv2 += ["--id-key", "uid", "--prompt-key", "text", "--neg-key", "perturbed"]
    assert main(argv2) == 0
    assert PairDataset(tmp_path / "out2")[1]["neg_prompt"] == "neg 1"


def test_bare_tiny_before_the_source_path(tmp_path, capsys):
    """``--tiny`` followed by a token that names no backbone leaves it to ``--from``: a bare
    ``--tiny`` (sd), not an invalid choice; a backbone name after it is still its value."""
    src, out = tmp_path / "ddspo", tmp_path / "out"
    _ddspo(src, n=2)
    assert main(["--from", "ddspo", "--tiny", str(src), "--out", str(out), "--no-progress"]) == 0
    assert PairDataset(out).info["backbone"] == "sd" and len(PairDataset(out)) == 2
    argv = ["--from", "ddspo", str(src), "--tiny", "sd3", "--out", str(tmp_path / "o2")]
    assert main([*argv, "--no-progress"]) == 0
    assert PairDataset(tmp_path / "o2").info["backbone"] == "sd3"


def test_ddspo_bad_input(tmp_path, capsys):
    src = tmp_path / "ddspo"
    _ddspo(src, n=3)
    (src / "latents" / "0001_neg.safetensors").unlink()
    argv = ["--from", "ddspo", str(src), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    err = _err(capsys)
    assert "missing latent file" in err and "'0001'" in err and "0001_neg.safetensors" in err
    assert not (tmp_path / "out" / "info.json").exists()
    assert main(["--from", "ddspo", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "metadata.jsonl: missing" in _err(capsys)
    save_file({"latent": torch.zeros(4, 8, 8)}, str(src / "latents" / "0001_neg.safetensors"))
    assert main(argv) == 2
    assert "latent shape (4, 8, 8) for id '0001'" in _err(capsys)


def _official_pairs(src):
    """The official loader (ddspo/data.py), transcribed: each metadata line's ``pos_file``
    and ``neg_file`` under ``latents/``, key ``"latent"``."""
    from safetensors.torch import load_file

    out = []
    for line in (src / "metadata.jsonl").read_text().splitlines():
        item = json.loads(line)
        w = load_file(str(src / "latents" / item["pos_file"]))["latent"]
        lo = load_file(str(src / "latents" / item["neg_file"]))["latent"]
        prompt = item.get("prompt", item.get("caption"))  # _ddspo writes one caption
        out.append((prompt, w.reshape(w.shape[-3:]), lo.reshape(lo.shape[-3:])))
    return out


def test_ddspo_import_reads_the_named_files_in_the_source_dtype(tmp_path, capsys):
    """pos_file/neg_file name the latents (here: names unrelated to the ids, and a pair
    whose names are the other way round from the id convention); fp32 latents stay fp32."""
    src = tmp_path / "ddspo"
    _ddspo(src, n=3)
    lines = [json.loads(x) for x in (src / "metadata.jsonl").read_text().splitlines()]
    (src / "latents" / "sub").mkdir()
    for i, x in enumerate(lines):
        pos, neg = f"{x['id']}.safetensors", f"{x['id']}_neg.safetensors"
        if i == 1:  # the winner is the file the id convention calls the loser's
            pos, neg = neg, pos
        (src / "latents" / pos).rename(src / "latents" / "sub" / f"w{i}.st")
        (src / "latents" / neg).rename(src / "latents" / f"l{i}.st")
        x.update(pos_file=f"sub/w{i}.st", neg_file=f"l{i}.st")
    (src / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert main(["--from", "ddspo", str(src), "--out", str(out), "--no-progress"]) == 0
    ds = PairDataset(out)
    assert ds.info["latent_dtype"] == "float32"
    for i, (prompt, w, lo) in enumerate(_official_pairs(src)):
        assert ds[i]["prompt"] == prompt
        assert torch.equal(ds[i]["x0_w"], w) and torch.equal(ds[i]["x0_l"], lo)  # bit for bit
    # fp16 sources stay fp16; --latent-dtype still chooses
    for f in (src / "latents").rglob("*.st"):
        save_file({"latent": torch.randn(4, 16, 16).half()}, str(f))
    assert main(["--from", "ddspo", str(src), "--out", str(tmp_path / "h"), "--no-progress"]) == 0
    assert PairDataset(tmp_path / "h").info["latent_dtype"] == "float16"
    argv = ["--from", "ddspo", str(src), "--no-progress", "--latent-dtype", "fp32"]
    assert main([*argv, "--out", str(tmp_path / "f")]) == 0
    assert PairDataset(tmp_path / "f").info["latent_dtype"] == "float32"


@pytest.mark.parametrize(
    "pos_file, culprit",
    [("../escape.st", "pos_file '../escape.st' is not a file name inside the latents folder"),
     ("/abs/w.st", "pos_file '/abs/w.st' is not a file name inside the latents folder"),
     ("gone.st", "gone.st: missing latent file for id '0000'"),
     (None, "'neg_file' without 'pos_file'")],
)  # fmt: skip
def test_ddspo_named_files_refused(tmp_path, capsys, pos_file, culprit):
    src = tmp_path / "ddspo"
    _ddspo(src, n=2)
    (tmp_path / "escape.st").write_bytes((src / "latents" / "0000.safetensors").read_bytes())
    lines = [json.loads(x) for x in (src / "metadata.jsonl").read_text().splitlines()]
    lines[0]["neg_file"] = "0000_neg.safetensors"
    if pos_file is not None:
        lines[0]["pos_file"] = pos_file
    (src / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert main(["--from", "ddspo", str(src), "--out", str(out), "--no-progress"]) == 2
    err = _err(capsys)
    assert culprit in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("key", ["pos_file", "neg_file"])
def test_ddspo_named_file_linked_outside_is_refused(tmp_path, capsys, key):
    """A name that stays inside the latents folder as text but is a link out of it."""
    src = tmp_path / "ddspo"
    _ddspo(src, n=2)
    (tmp_path / "secret.st").write_bytes((src / "latents" / "0000.safetensors").read_bytes())
    (src / "latents" / "link.st").symlink_to(tmp_path / "secret.st")
    lines = [json.loads(x) for x in (src / "metadata.jsonl").read_text().splitlines()]
    lines[1].update(pos_file="0001.safetensors", neg_file="0001_neg.safetensors")
    lines[1][key] = "link.st"
    (src / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert main(["--from", "ddspo", str(src), "--out", str(out), "--no-progress"]) == 2
    assert _err(capsys) == (
        f"error: {src / 'metadata.jsonl'}: {key} of id '0001' 'link.st' is outside "
        f"{src / 'latents'}"
    )
    assert not out.exists() or not any(out.iterdir())


def test_train_on_ddspo_import(tmp_path):
    src, out = tmp_path / "ddspo", tmp_path / "out"
    _ddspo(src, n=4)
    assert main(["--from", "ddspo", str(src), "--out", str(out), "--no-progress"]) == 0
    argv = ["--tiny", "--data", str(out), "--out", str(tmp_path / "run"), "--no-progress"]
    assert train_t2i.main([*argv, "--batch-size", "2", "--max-steps", "2"]) == 0
