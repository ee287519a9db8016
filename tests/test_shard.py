"""``--shard fsdp`` (FSDP2, bench/t2i/sharding.py): the same training as DDP, sharded
checkpoints that resume on another number of ranks, final/ in the usual layout, the flags
it refuses, and a DCP checkpoint that is never unpickled beyond its metadata records.

The parity runs use ``--adam-eps 1e-5`` and a small ``--beta``: FSDP2 sums a few gradients
in another order than DDP (float rounding, ~1e-8 relative), and at step 1 AdamW divides
each gradient by its own size, so with a tiny eps an element whose gradient is rounding
noise moves by +-lr either way; beta then scales the weights' difference into the loss."""

import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from t2i_helpers import one_line, pairs_cache, snapshot

from bench import train_t2i
from bench.t2i.checkpoint import STATE_FILE, find_resume, latest_checkpoint, load_state
from bench.t2i.sharding import DCP_DIR, TensorsOnlyPlanner, read_metadata_safely
from bench.t2i.tiny import tiny_backbone
from bench.t2i.weights import LORA_STATE, param_digest

REPO = Path(__file__).resolve().parents[1]
PARITY = ["--batch-size", "2", "--no-progress", "--beta", "200", "--lr", "1e-4", "--adam-eps", "1e-5"]  # fmt: skip


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return pairs_cache(tmp_path_factory)


def launch(nproc: int, *args: str, timeout: int = 480) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = ["timeout", "-s", "KILL", str(timeout), sys.executable, "-m", "torch.distributed.run",
           "--standalone", f"--nproc_per_node={nproc}", str(REPO / "bench" / "train_t2i.py"),
           *args]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*procs: subprocess.Popen) -> list[str]:
    """Wait for every launch; each must succeed. Returns their stdout + stderr."""
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=540)  # the launch kills itself at 480 s
        assert p.returncode == 0, out[-3000:] + err[-3000:]
        outs.append(out + err)
    return outs


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in records(out) if "end" not in r]


def assert_close(a: dict, b: dict, rel: float) -> None:
    """Same tensors by name, each within ``rel`` of the largest entry of ``a``'s."""
    assert a.keys() == b.keys()
    scale = max(x.abs().max().item() for x in a.values())
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= rel * scale, (worst, scale)


def unet_of(run: Path) -> dict:
    return load_file(run / "final" / "unet" / "diffusion_pytorch_model.safetensors")


# ------------------------------------------------------------------------------ parity


@pytest.mark.timeout(900)
def test_fsdp_equals_ddp_on_tiny_sd_and_final_loads_in_the_pipeline(pairs, tmp_path):
    """Full fine-tune, 2 micro-steps a step, a periodic reference kept whole (its update
    gathers the sharded policy): losses and final weights as DDP's within 1e-5."""
    flags = ["--tiny", "sd", "--data", str(pairs("sd")), "--method", "dpo", "--grad-accum", "2",
             "--ref-update", "periodic", "--ref-tau", "2", "--max-steps", "2", *PARITY,
             "--batch-size", "1"]  # fmt: skip
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    finish(launch(2, *flags, "--out", str(ddp)), launch(2, *flags, "--out", str(fsdp), "--shard", "fsdp"))  # fmt: skip
    a, b = losses(ddp), losses(fsdp)
    assert len(a) == len(b) == 2 and a[1] != a[0]  # the loss moved off log 2
    assert b == pytest.approx(a, rel=1e-5)
    assert [r.get("ref_updated") for r in records(fsdp)][:2] == [None, True]
    assert_close(unet_of(ddp), unet_of(fsdp), rel=1e-5)
    # checkpoint: rank shards in dcp/ (their metadata reads safely), no whole-model copy
    ckpt = latest_checkpoint(fsdp / "checkpoints")
    assert ckpt.name == "step-000002" and not (ckpt / "unet").exists()
    assert sorted(p.name for p in (ckpt / DCP_DIR).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # fmt: skip
    read_metadata_safely(ckpt / DCP_DIR)
    assert load_state(ckpt)["world"] == 2 and "state" not in load_state(ckpt)["optimizer"]
    # final/: the diffusers layout, loadable by the pipeline, the logged digest
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(fsdp / "final", local_files_only=True)
    assert records(fsdp)[-1]["param_sha256"] == [param_digest(pipe.unet)]
    assert_close(unet_of(fsdp), pipe.unet.state_dict(), rel=0.0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fsdp_equals_ddp_on_tiny_flux_lora(pairs, tmp_path):
    flags = ["--tiny", "flux", "--data", str(pairs("flux")), "--method", "ddspo", "--lora", "4",
             "--max-steps", "2", *PARITY, "--lr", "1e-3"]  # fmt: skip
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    finish(launch(2, *flags, "--out", str(ddp)), launch(2, *flags, "--out", str(fsdp), "--shard", "fsdp"))  # fmt: skip
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-5) and losses(ddp)[1] != losses(ddp)[0]
    lora_ddp, lora_fsdp = (load_file(r / "final" / LORA_STATE) for r in (ddp, fsdp))
    assert_close(lora_ddp, lora_fsdp, rel=1e-5)
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**tiny_backbone("flux").components)
    pipe.load_lora_weights(fsdp / "final")  # diffusers' own loader reads final/
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "ddspo", "--rand-cond-prompts", "EXTRA", "--rand-cond-schedule", "constant",
         "--rand-cond-kept", "forward", "--timestep-sampler", "logit_normal"],
        ["--method", "dspo_cpp", "--lora", "2", "--ref-update", "periodic", "--ref-tau", "1",
         "--timestep-weight", "lambda", "--grad-accum", "2", "--batch-size", "1"],
        ["--method", "dspo", "--ref-update", "periodic", "--ref-tau", "1",
         "--shard-reference", "shard", "--timestep-sampler", "geometric"],
        ["--method", "sft", "--gradient-checkpointing"],
    ],
    ids=["ddspo-randcond", "dspo_cpp-lora-periodic", "dspo-sharded-reference", "sft-ckpt"],
)  # fmt: skip
def test_one_process_fsdp_trains_as_unsharded(pairs, tmp_path, flags):
    """One process (a group of one): the FSDP2 code paths (sharded parameters, swapped
    LoRA reference by copy, sharded reference copy, rand-cond rows, samplers, gradient
    checkpointing) give the unsharded run's losses and weights."""
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"prompt": "a green tree", "neg_prompts": ["a tree"]}) + "\n")
    flags = [str(extra) if f == "EXTRA" else f for f in flags]
    if "--shard-reference" in flags:
        plain = [f for f in flags if f not in ("--shard-reference", "shard")]
    else:
        plain = flags
    base = ["--tiny", "--data", str(pairs("sd")), "--no-progress", "--batch-size", "2",
            "--max-steps", "2", "--beta", "200", "--lr", "1e-4", "--adam-eps", "1e-5"]  # fmt: skip
    a, b = tmp_path / "plain", tmp_path / "fsdp"
    assert train_t2i.main([*base, *plain, "--out", str(a)]) == 0
    assert train_t2i.main([*base, *flags, "--out", str(b), "--shard", "fsdp"]) == 0
    assert losses(b) == pytest.approx(losses(a), rel=1e-5) and losses(a)[0] != losses(a)[1]
    if "--lora" in flags:
        assert_close(*(load_file(r / "final" / LORA_STATE) for r in (a, b)), rel=1e-5)
    else:
        assert_close(unet_of(a), unet_of(b), rel=1e-5)


# ------------------------------------------------------------------------------ resume


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fsdp_resumes_on_two_and_on_one_rank(pairs, tmp_path):
    """An FSDP2 run cut after step 1 and resumed on 2 ranks ends as the uninterrupted run,
    bit for bit (model, optimizer, sharded periodic reference). Resumed on 1 rank (DCP
    reshards; 2 micro-steps keep the pairs per step) it ends as the uninterrupted run up to
    float rounding: each pair's noise is keyed by its place in the data stream, not by the
    rank. The same from a 1-rank cut resumed on 2 ranks."""
    flags = ["--tiny", "sd", "--data", str(pairs("sd")), "--method", "dpo", "--shard", "fsdp",
             "--ref-update", "periodic", "--ref-tau", "2", "--shard-reference", "shard",
             *PARITY]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    finish(launch(2, *flags, "--out", str(whole), "--max-steps", "3", "--ckpt-every", "1", "--keep-last", "3"))  # fmt: skip
    step1 = whole / "checkpoints" / "step-000001"
    before = snapshot(step1)
    finish(launch(2, *flags, "--out", str(cut), "--max-steps", "3", "--resume", str(step1)))
    assert losses(cut) == losses(whole)[1:]
    assert_close(unet_of(whole), unet_of(cut), rel=0.0)
    # 2 -> 1: two more steps on one rank, as 2 micro-steps of 2 pairs
    one = tmp_path / "one"
    finish(launch(1, *flags, "--out", str(one), "--max-steps", "3", "--grad-accum", "2",
                  "--resume", str(step1)))  # fmt: skip
    assert load_state(latest_checkpoint(one / "checkpoints"))["world"] == 1
    assert losses(one) == pytest.approx(losses(whole)[1:], rel=1e-5)
    assert_close(unet_of(whole), unet_of(one), rel=1e-5)
    # 1 -> 2: a 1-rank run cut after step 1, two more steps on 2 ranks
    single, back = tmp_path / "single", tmp_path / "back"
    finish(launch(1, *flags, "--out", str(single), "--max-steps", "1", "--grad-accum", "2"))
    finish(launch(2, *flags, "--out", str(back), "--max-steps", "3",
                  "--resume", str(single / "checkpoints" / "step-000001")))  # fmt: skip
    assert losses(back) == pytest.approx(losses(whole)[1:], rel=1e-5)
    assert_close(unet_of(whole), unet_of(back), rel=1e-5)
    assert snapshot(step1) == before  # resuming never writes into the checkpoint read


# ------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shard", "fsdp", "--device", "cuda", "--dtype", "fp16"],
         "error: --shard fsdp runs --dtype bf16 or fp32, not fp16"),
        (["--shard", "fsdp", "--optimizer", "adafactor"],
         "error: --shard fsdp supports --optimizer adamw only, not adafactor"),
        (["--shard", "fsdp", "--validation-every", "2"],
         "error: --validation-every is not available with --shard fsdp (sample final/ with "
         "bench/sample.py instead)"),
        (["--shard-reference", "shard"], "error: --shard-reference applies with --shard fsdp only"),
        (["--shard", "fsdp", "--method", "sft", "--sft-branch", "pair", "--lora", "2"],
         "error: --shard fsdp trains one network, not --sft-branch pair"),
    ],
    ids=["fp16", "adafactor", "validation", "shard-reference-without-fsdp", "sft-pair"],
)  # fmt: skip
def test_fsdp_refuses_what_it_cannot_do(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert train_t2i.main(["--tiny", "--out", str(out), "--no-progress", *flags]) == 2
    assert one_line(capsys) == message
    assert not out.exists()


def test_a_ddp_checkpoint_is_not_resumed_sharded(pairs, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--tiny", "--data", str(pairs("sd")), "--out", str(out), "--no-progress",
            "--batch-size", "2", "--method", "sft", "--max-steps", "1"]  # fmt: skip
    assert train_t2i.main(argv) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert train_t2i.main([*argv, "--max-steps", "2", "--resume", "latest", "--shard", "fsdp"]) == 2
    ckpt = out / "checkpoints" / "step-000001"
    assert one_line(capsys) == (
        f"error: --resume {ckpt}: the config differs from the checkpoint's in --shard 'ddp' -> "
        "'fsdp' (see --help for what may change on resume)"
    )
    assert snapshot(out) == before


def test_a_full_disk_while_ranks_write_shards_leaves_the_last_checkpoint(pairs, tmp_path, capsys, monkeypatch):  # fmt: skip
    """One process (a group of one), step 2's shards fail to write: one line, exit 2, the
    staging folder gone, step 1 intact; --resume latest then finishes the run."""
    out, calls = tmp_path / "run", []
    real = train_t2i.save_sharded

    def save_sharded(state, folder):
        calls.append(folder)
        real(state, folder)  # the shards are written, then the disk is full
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_t2i, "save_sharded", save_sharded)
    argv = ["--tiny", "--data", str(pairs("sd")), "--out", str(out), "--no-progress",
            "--batch-size", "2", "--method", "dpo", "--lora", "2", "--shard", "fsdp",
            "--max-steps", "3", "--ckpt-every", "1"]  # fmt: skip
    assert train_t2i.main(argv) == 2
    assert one_line(capsys) == (
        f"error: no space left on device while writing {out}/checkpoints/step-000002"
    )
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]  # no .tmp-*, no step 2
    assert find_resume("latest", root)[0] == root / "step-000001"
    monkeypatch.undo()
    assert train_t2i.main([*argv, "--resume", "latest"]) == 0
    assert [r["step"] for r in records(out) if "end" not in r] == [1, 2, 3]


# ------------------------------------------------------------------ never unpickled


class _Payload:
    """Unpickling this runs ``open(path, "w")``: what a crafted checkpoint could do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_dcp_metadata_naming_anything_else_is_refused_unbuilt(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step-000002"
    (ckpt / DCP_DIR).mkdir(parents=True)
    torch.save({"optimizer": {}, "files": {}}, ckpt / STATE_FILE)
    marker = tmp_path / "pwned"
    (ckpt / DCP_DIR / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(pickle.UnpicklingError, match=r"names (io|builtins)\.open: refused"):
        read_metadata_safely(ckpt / DCP_DIR)
    with pytest.raises(
        ValueError, match=r"damaged checkpoint: dcp/.metadata unreadable or refused"
    ):
        find_resume(str(ckpt), ckpt.parent)
    assert not marker.exists()
    planner = TensorsOnlyPlanner()  # DCP's own would torch.load(weights_only=False) bytes
    with pytest.raises(pickle.UnpicklingError, match="non-tensor item"):
        planner.load_bytes(type("Item", (), {"dest_index": type("I", (), {"fqn": "x"})})(), None)
