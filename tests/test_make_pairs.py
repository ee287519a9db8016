"""Pair-dataset builder and reader: variants, determinism, resume, validation, CLI, LLM path."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from bench.make_pairs import main
from bench.t2i.backbones import prompt_generator
from bench.t2i.pairdata import (
    CHECKSUM_KEY,
    PairDataset,
    canonical_safetensors,
    collate_pairs,
    finalize,
    read_shard_header,
    sealed_shard,
    shard_path,
)
from bench.t2i.pairs import _stream, build_pairs, partner_index
from bench.t2i.prompts import read_prompts
from bench.t2i.tiny import tiny_backbone
from minddspo.perturb import random_removal

PROMPTS = [
    "a red fox in the snow",
    "a bowl of ramen with an egg",
    "an astronaut riding a horse",
    "a lighthouse on a cliff at night",
    "two cats on a windowsill",
]
KW = dict(steps=2, shard_size=2, batch_size=2, progress=False, latent_dtype="float32")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd():
    return tiny_backbone("sd")


@pytest.fixture(scope="module")
def built(sd, tmp_path_factory):
    """One dataset per variant, built once for the module."""
    out = {}
    for v in ("paired", "not_paired", "rand_positive"):
        out[v] = build_pairs(sd, PROMPTS, tmp_path_factory.mktemp(v), variant=v, **KW)
    return out


def _same_shard(a, b) -> bool:
    """Equal tensors and header metadata (the header's byte order is not fixed)."""
    ta, tb = load_file(str(a)), load_file(str(b))
    same = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    return same and read_shard_header(a) == read_shard_header(b)


def _latents(path):
    ds = PairDataset(path)
    return torch.stack([ds[i]["x0_w"] for i in range(len(ds))]), torch.stack(
        [ds[i]["x0_l"] for i in range(len(ds))]
    )


@pytest.mark.parametrize("variant", ["paired", "not_paired", "rand_positive"])
def test_variants(sd, built, variant):
    ds = PairDataset(built[variant], backbone="sd", latent_shape=(4, 16, 16))
    assert len(ds) == len(PROMPTS) and ds.variant == variant
    assert ds.info["num_shards"] == 3 and ds.info["latent_dtype"] == "float32"
    recs = [json.loads(ln) for ln in (built[variant] / "metadata.jsonl").read_text().splitlines()]
    for i, (item, rec) in enumerate(zip((ds[i] for i in range(len(ds))), recs, strict=True)):
        assert item["prompt"] == PROMPTS[i] and rec["index"] == i
        # c- is the per-index random removal of the prompt (SPEC §5)
        assert rec["neg_prompt"] == random_removal(PROMPTS[i], _stream(0, i, 1))
        assert set(rec["neg_prompt"].split()) <= set(PROMPTS[i].split())
        if variant == "rand_positive":
            assert item["neg_prompt"] == PROMPTS[rec["partner"]] == rec["pos_prompt"]
        else:
            assert item["neg_prompt"] == rec["neg_prompt"]
        if variant != "paired":
            assert rec["partner"] == partner_index(0, i, len(PROMPTS)) != i
    xw, xl = _latents(built[variant])
    # winners are the same images in every variant
    torch.testing.assert_close(xw, _latents(built["paired"])[0], rtol=1e-4, atol=1e-4)
    if variant == "paired":
        # loser = sample from c- with the winner's initial noise
        i = 3
        ref = sd.generate([recs[i]["neg_prompt"]], [prompt_generator(0, i)], steps=2)
        torch.testing.assert_close(xl[i : i + 1], ref, rtol=1e-4, atol=1e-4)
    else:
        # loser = the winner image of the partner prompt
        partners = torch.tensor([r["partner"] for r in recs])
        torch.testing.assert_close(xl, xw[partners], rtol=1e-4, atol=1e-4)
    batch = collate_pairs([ds[0], ds[1], ds[2]])
    assert batch["x0_w"].shape == (3, 4, 16, 16) and batch["x0_l"].dtype == torch.float32
    assert batch["prompt"] == PROMPTS[:3] and len(batch["neg_prompt"]) == 3
    assert batch["index"].tolist() == [0, 1, 2]


def test_deterministic_and_resumable(sd, built, tmp_path, monkeypatch):
    out = tmp_path / "again"
    build_pairs(sd, PROMPTS, out, variant="paired", **KW)
    for k in range(3):  # bit-identical to the module's build
        assert _same_shard(shard_path(out, k), shard_path(built["paired"], k))
    assert (out / "metadata.jsonl").read_text() == (built["paired"] / "metadata.jsonl").read_text()
    calls = []
    real = type(sd).generate
    monkeypatch.setattr(
        type(sd), "generate", lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    )
    mtimes = {k: shard_path(out, k).stat().st_mtime_ns for k in range(3)}
    build_pairs(sd, PROMPTS, out, variant="paired", **KW)  # everything done: nothing to generate
    assert calls == [] and mtimes == {k: shard_path(out, k).stat().st_mtime_ns for k in range(3)}
    shard_path(out, 1).unlink()
    (out / "metadata.jsonl").unlink()
    build_pairs(sd, PROMPTS, out, variant="paired", **KW)  # only the missing shard
    assert len(calls) == 1
    assert shard_path(out, 0).stat().st_mtime_ns == mtimes[0]
    assert _same_shard(shard_path(out, 1), shard_path(built["paired"], 1))
    assert len(PairDataset(out)) == 5
    with pytest.raises(ValueError, match="different settings"):
        build_pairs(sd, PROMPTS, out, variant="paired", **{**KW, "steps": 3})
    with pytest.raises(ValueError, match="different prompts"):
        build_pairs(sd, PROMPTS[::-1], out, variant="paired", **KW)


def test_build_pairs_bad_input(sd, tmp_path):
    with pytest.raises(ValueError, match="variant"):
        build_pairs(sd, PROMPTS, tmp_path, variant="nope")
    with pytest.raises(ValueError, match="at least 2 prompts"):
        build_pairs(sd, PROMPTS[:1], tmp_path, variant="not_paired")
    with pytest.raises(ValueError, match="--llm"):
        build_pairs(sd, PROMPTS, tmp_path, perturb="llm")
    with pytest.raises(ValueError, match="no prompts"):
        build_pairs(sd, [], tmp_path)


def test_pair_dataset_validation(built, tmp_path):
    src = built["paired"]
    with pytest.raises(ValueError, match="not found"):
        PairDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty dataset directory"):
        PairDataset(tmp_path / "empty")

    def copy(name):
        d = tmp_path / name
        shutil.copytree(src, d)
        return d

    d = copy("nometa")
    (d / "metadata.jsonl").unlink()
    with pytest.raises(ValueError, match=r"metadata\.jsonl: missing"):
        PairDataset(d)
    d = copy("count")  # a pair dropped from metadata.jsonl: the intact shard still holds it
    lines = (d / "metadata.jsonl").read_text().splitlines()
    (d / "metadata.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(
        ValueError, match=r"count/metadata.jsonl: lists 0 pairs in shard-00002.safetensors, which"
    ):
        PairDataset(d)
    d = copy("shape")  # a foreign file in place of a shard: no checksum
    bad = {"x0_w": torch.zeros(2, 4, 8, 8), "x0_l": torch.zeros(2, 4, 8, 8)}
    save_file(bad, str(shard_path(d, 0)))
    with pytest.raises(ValueError, match=r"shard-00000.safetensors: no sha256 in its header"):
        PairDataset(d)
    d = copy("gone")
    shard_path(d, 1).unlink()
    with pytest.raises(ValueError, match="shard-00001.safetensors: missing shard file"):
        PairDataset(d)
    d = copy("garbage")
    shard_path(d, 1).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable shard"):
        PairDataset(d)
    with pytest.raises(ValueError, match="built for backbone 'sd', not 'sana'"):
        PairDataset(src, backbone="sana")
    with pytest.raises(ValueError, match="latent shape"):
        PairDataset(src, latent_shape=(4, 32, 32))


def rewrite_shard(path, edit=None, seal=True):
    """Rewrite a shard with ``edit(tensors)`` applied, with a fresh checksum (``seal``) or
    none (as version 1 wrote it)."""
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != CHECKSUM_KEY}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit is not None:
        edit(tensors)
    blob = sealed_shard(tensors, meta) if seal else canonical_safetensors(save(tensors, meta))
    path.write_bytes(blob)


def test_shards_are_checksummed_and_finite(built, tmp_path):
    d = tmp_path / "flip"
    shutil.copytree(built["paired"], d)
    assert json.loads((d / "info.json").read_text())["version"] == 2
    f = shard_path(d, 1)
    with safe_open(str(f), framework="pt") as sf:
        assert len(sf.metadata()[CHECKSUM_KEY]) == 64
    blob = bytearray(f.read_bytes())
    blob[-40] ^= 0x10  # one bit of one latent value
    f.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"flip/shards/shard-00001.safetensors: checksum mismatch"):
        PairDataset(d)
    rewrite_shard(f, lambda t: t["x0_l"][1, 2].fill_(float("nan")))  # checksum made to fit
    with pytest.raises(
        ValueError,
        match=r"shard-00001.safetensors: x0_l row 1 holds non-finite values \(NaN or inf\)",
    ):
        PairDataset(d)
    rewrite_shard(f, lambda t: t["x0_l"][1, 2].fill_(0.0))
    assert len(PairDataset(d)) == 5
    rewrite_shard(f, lambda t: t.update(x0_w=t["x0_w"].bfloat16()))
    with pytest.raises(ValueError, match=r"shard-00001.safetensors: x0_w is torch.bfloat16, not"):
        PairDataset(d)
    rewrite_shard(f, lambda t: t.update(x0_w=t["x0_w"].float().flatten(1)))
    with pytest.raises(
        ValueError, match=r"shard-00001.safetensors: x0_w has shape \(2, 1024\), not \(N, C, h, w\)"
    ):
        PairDataset(d)


def test_only_a_verifying_reader_reads_the_shards_in_full(built, tmp_path, monkeypatch):
    """verify=False (the ranks other than 0) reads shard headers only: a changed latent
    passes it, a cut header does not; the verifying reader names the changed shard."""
    d = tmp_path / "flip"
    shutil.copytree(built["paired"], d)
    f = shard_path(d, 1)
    blob = bytearray(f.read_bytes())
    blob[-40] ^= 0x10
    f.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"shard-00001.safetensors: checksum mismatch"):
        PairDataset(d)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read {self}"))
    assert len(PairDataset(d, verify=False)) == 5
    monkeypatch.undo()
    f.write_bytes(bytes(blob[:6]))
    with pytest.raises(ValueError, match=r"shard-00001.safetensors: unreadable shard"):
        PairDataset(d, verify=False)


def test_version_1_datasets_read_without_checksums(built, tmp_path):
    """Datasets written before shards had a checksum: read (finite latents still checked);
    a shard without one in a version 2 dataset is refused."""
    d = tmp_path / "v1"
    shutil.copytree(built["paired"], d)
    for k in range(3):
        rewrite_shard(shard_path(d, k), seal=False)
    with pytest.raises(ValueError, match=r"shard-00000.safetensors: no sha256 in its header"):
        PairDataset(d)
    info = json.loads((d / "info.json").read_text())
    (d / "info.json").write_text(json.dumps({**info, "version": 1}))
    a, b = _latents(built["paired"]), _latents(d)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    rewrite_shard(shard_path(d, 2), lambda t: t["x0_w"][0, 0, 0, 0].fill_(float("inf")), False)
    with pytest.raises(ValueError, match=r"shard-00002.safetensors: x0_w row 0 holds non-finite"):
        PairDataset(d)
    # a build finished over such shards stays version 1
    extras = {k: v for k, v in info.items() if k not in ("format", "version")}
    finalize(d, extras, 3)
    assert json.loads((d / "info.json").read_text())["version"] == 1


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("latent_shape", [4, 8, 8], "latent_shape [4, 8, 8], but shard-00000.safetensors "
         "(checksum intact) holds x0_w of shape (2, 4, 16, 16)"),
        ("latent_shape", "4x16x16", "latent_shape must be [C, h, w], got '4x16x16'"),
        ("num_shards", 5, "num_shards 5, but shard-00003.safetensors does not exist and "
         "metadata.jsonl lists no pair in it"),
        ("num_shards", 2, "num_shards 2, but metadata.jsonl lists pairs in shard-00002.safetensors"),
        ("num_shards", "3", "num_shards must be a count, got '3'"),
        ("num_pairs", 7, "num_pairs 7, but metadata.jsonl and the shards hold 5"),
        ("version", 3, "version 3; this program reads versions 1, 2"),
    ],
)  # fmt: skip
def test_a_bad_info_json_is_named(built, tmp_path, field, value, message):
    """Intact shards are not blamed for what info.json gets wrong."""
    d = tmp_path / "info"
    shutil.copytree(built["paired"], d)
    info = json.loads((d / "info.json").read_text())
    (d / "info.json").write_text(json.dumps({**info, field: value}))
    with pytest.raises(ValueError) as e:
        PairDataset(d)
    assert str(e.value) == f"{d / 'info.json'}: {message}"


def test_shard_header_holds_records(built):
    shapes, recs, params = read_shard_header(shard_path(built["paired"], 0))
    assert shapes["x0_w"] == (2, 4, 16, 16) and [r["index"] for r in recs] == [0, 1]
    assert params["variant"] == "paired" and params["steps"] == 2


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a cat"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_a_non_utf8_prompts_file_is_named_with_its_byte_offset(tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes("a cat\na dog \u00e9\n".encode() + b"caf\xe9 au lait\n")  # latin-1 on line 3
    out = tmp_path / "ds"
    assert main(["--tiny", "sd", "--prompts", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"error: {bad}: not UTF-8 text (byte offset 18, line 3: invalid continuation byte)\n"
    )
    assert not out.exists()


def test_a_runaway_prompt_is_cut_with_one_warning(tmp_path, capsys):
    from bench.t2i.prompts import MAX_PROMPT_CHARS

    f = tmp_path / "p.txt"
    long_a, long_b = "a" * (MAX_PROMPT_CHARS + 5), "b " * MAX_PROMPT_CHARS
    f.write_text(f"a cat\n\n{long_a}\n{long_b}\n{'c' * MAX_PROMPT_CHARS}\n")
    got = read_prompts(f)
    assert got == ["a cat", "a" * MAX_PROMPT_CHARS, long_b[:MAX_PROMPT_CHARS].strip(),
                   "c" * MAX_PROMPT_CHARS]  # fmt: skip
    err = capsys.readouterr().err
    assert err == (
        f"warning: {f}:3: prompt of {MAX_PROMPT_CHARS + 5} characters cut to {MAX_PROMPT_CHARS}"
        " (and 1 more); the text encoders read at most 300 tokens of it\n"
    )
    f.write_text('{"prompt": "x"}\n\n{"prompt": "' + long_a + '"}\n')
    j = f.rename(tmp_path / "p.jsonl")
    assert read_prompts(j) == ["x", "a" * MAX_PROMPT_CHARS]
    assert f"{j}:3: prompt of" in capsys.readouterr().err


def test_cli_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "ds"
    argv = ["--tiny", "sana", "--out", str(out), "--steps", "1", "--max-prompts", "3"]
    assert main([*argv, "--shard-size", "2", "--no-progress", "--variant", "rand_positive"]) == 0
    ds = PairDataset(out, backbone="sana")
    assert len(ds) == 3 and ds.info["latent_dtype"] == "float16"
    assert "wrote 3 pairs" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--prompts", "/no/such/file.txt"], "prompts file not found"),
        (["--perturb", "llm"], "--llm DIR"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, argv, msg):
    assert main(["--tiny", "sd", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_pretrained_not_a_pipeline(tmp_path, capsys):
    assert (
        main(["--pretrained", str(tmp_path), "--prompts", __file__, "--out", str(tmp_path / "o")])
        == 2
    )
    assert "not a diffusers pipeline" in capsys.readouterr().err


def test_llm_perturb_falls_back_and_counts(tmp_path, capsys):
    """A tiny random causal LM answers noise: every prompt falls back to random_removal."""
    from bench.t2i.llm import LocalLM
    from bench.t2i.tiny import save_tiny_causal_lm

    llm = LocalLM(save_tiny_causal_lm(tmp_path / "lm"), max_new_tokens=4)
    assert "<|start_header_id|>system" in llm.build_prompt(
        "a cat"
    )  # no chat template: Llama-3 layout
    sana = tiny_backbone("sana")
    out = build_pairs(
        sana, PROMPTS[:3], tmp_path / "ds", perturb="llm", llm=llm, steps=1, progress=False
    )
    ds = PairDataset(out)
    assert ds.info["llm_fallbacks"] == 3 and ds.info["perturb"] == "llm"
    recs = [json.loads(ln) for ln in (out / "metadata.jsonl").read_text().splitlines()]
    assert all(r["llm_fallback"] for r in recs)
    for i, r in enumerate(recs):
        assert r["neg_prompt"] == random_removal(PROMPTS[i], _stream(0, i, 1))
    assert "3 of 3 prompts fell back" in capsys.readouterr().out


@pytest.mark.timeout(240)
def test_torchrun_two_ranks_match_single_process(tmp_path):
    """Two ranks split the shards; the merged dataset equals a one-process build."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = [
        "--tiny",
        "sana",
        "--steps",
        "1",
        "--max-prompts",
        "4",
        "--shard-size",
        "1",
        "--batch-size",
        "1",
    ]
    common += ["--no-progress", "--latent-dtype", "float32"]
    cmd = ["timeout", "-s", "KILL", "200", sys.executable, "-m", "torch.distributed.run"]
    cmd += [
        "--standalone",
        "--nproc_per_node=2",
        "bench/make_pairs.py",
        "--out",
        str(tmp_path / "two"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    r = subprocess.run(cmd + common, cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert main(["--out", str(tmp_path / "one"), *common]) == 0
    a, b = PairDataset(tmp_path / "two"), PairDataset(tmp_path / "one")
    assert a.records == b.records
    for i in range(4):
        assert torch.equal(a[i]["x0_w"], b[i]["x0_w"]) and torch.equal(a[i]["x0_l"], b[i]["x0_l"])


def test_shards_are_byte_identical_for_the_same_inputs(sd, built, tmp_path):
    again = build_pairs(sd, PROMPTS, tmp_path / "again", variant="paired", **KW)
    for k in range(3):
        a, b = shard_path(built["paired"], k), shard_path(again, k)
        assert a.read_bytes() == b.read_bytes(), k
    # the header is canonical (sorted keys), whatever order safetensors chose
    blob = shard_path(again, 0).read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    assert list(header) == sorted(header)
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_canonical_header_keeps_the_content():
    from safetensors.torch import load, save

    from bench.t2i.pairdata import canonical_safetensors

    t = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(1, dtype=torch.float16)}
    blob = save(t, metadata={"z": "1", "records": "[]", "params": "{}"})
    canon = canonical_safetensors(blob)
    assert len(canon) == len(blob)
    back = load(canon)
    assert back.keys() == t.keys() and all(torch.equal(back[k], t[k]) for k in t)
    assert canonical_safetensors(canon) == canon


@pytest.mark.parametrize("variant", ["paired", "not_paired"])
def test_prompts_that_cannot_be_degraded_are_skipped_and_recorded(sd, tmp_path, capsys, variant):
    prompts = ["a red fox in the snow", "🐱🐶", "cat", "two cats on a windowsill", "sunset"]
    out = build_pairs(sd, prompts, tmp_path / "d", variant=variant, **KW)
    info = json.loads((out / "info.json").read_text())
    assert info["skipped_identical_neg"] == {"count": 3, "indices": [1, 2, 4]}
    assert info["num_pairs"] == 2 and info["num_prompts"] == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "skipped 3 of 5 prompts whose degraded prompt equals the prompt "
        "(one word or emoji only; index 1, 2, 4); recorded in info.json"
    ]
    ds = PairDataset(out)
    assert len(ds) == 2
    kept = [ds[i] for i in range(len(ds))]
    assert [r["prompt"] for r in kept] == [prompts[0], prompts[3]]
    assert all(r["neg_prompt"] != r["prompt"] for r in kept)
    # shard 2 (index 4 alone) holds no pair at all
    assert read_shard_header(shard_path(out, 2))[0]["x0_w"][0] == 0
    # a rerun resumes from the finished shards and gives the same info
    build_pairs(sd, prompts, tmp_path / "d", variant=variant, **KW)
    assert json.loads((out / "info.json").read_text()) == info


def test_rand_positive_keeps_one_word_prompts(sd, tmp_path):
    """rand_positive never uses c- (its loser target is f_ref(x_t^l, c+)): nothing is void."""
    prompts = ["cat", "a red fox in the snow", "dog"]
    out = build_pairs(sd, prompts, tmp_path / "d", variant="rand_positive", **KW)
    info = json.loads((out / "info.json").read_text())
    assert info["skipped_identical_neg"] == {"count": 0, "indices": []}
    assert info["num_pairs"] == 3
