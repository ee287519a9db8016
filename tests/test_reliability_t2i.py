"""Reliability of the T2I commands (train_t2i, sample, evaluate): bad state is refused with one
line, and nothing is lost or half-written. Each test injects one fault, then checks the exit
code, the one stderr line, and the files on disk (unchanged where nothing may change)."""

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from sample_records import write_sample_record
from t2i_helpers import one_line, snapshot

from bench import evaluate, sample, train_t2i
from bench.t2i import outdir, pairdata, tiny, weights
from bench.t2i.checkpoint import STATE_FILE, checkpoint_problem, latest_checkpoint
from bench.t2i.config import RESUME_MAY_CHANGE, epilog
from bench.t2i.pairs import build_pairs
from bench.t2i.prompts import DEMO_PROMPTS
from bench.t2i.tiny import tiny_backbone

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    build_pairs(tiny_backbone("sd"), DEMO_PROMPTS[:8], out, steps=2, shard_size=4, progress=False)
    return out


def relabel(data: Path, dst: Path, **info) -> Path:
    """A copy of the dataset whose info.json says otherwise (e.g. another backbone)."""
    shutil.copytree(data, dst)
    meta = json.loads((dst / "info.json").read_text())
    (dst / "info.json").write_text(json.dumps({**meta, **info}, indent=2))
    return dst


@pytest.fixture(scope="module")
def run1(data, tmp_path_factory) -> Path:
    """A finished 2-step dpo run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("run1") / "run"
    assert train(data, out, "--method", "dpo", "--max-steps", "2", "--ckpt-every", "1") == 0
    return out


def train(data: Path, out: Path, *flags: str) -> int:
    argv = ["--tiny", "--data", str(data), "--out", str(out), "--no-progress", "--batch-size", "2"]
    return train_t2i.main([*argv, *flags])


def steps_logged(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "end" not in r]


# ------------------------------------------------------------------- silent damage


def test_out_holding_a_run_is_refused(data, run1, capsys):
    before = snapshot(run1)
    capsys.readouterr()
    assert train(data, run1, "--method", "ddspo", "--max-steps", "1") == 2
    line = one_line(capsys)
    assert "holds a run; pass --resume to continue it or choose another --out" in line
    assert snapshot(run1) == before


@pytest.mark.parametrize(
    "flags",
    [
        ["--lr", "inf"], ["--lr", "nan"], ["--beta", "nan"], ["--beta", "inf"],
        ["--method", "dspo", "--beta-logit", "nan"], ["--max-grad-norm", "-1"],
        ["--adam-beta2", "1"], ["--adam-eps", "0"], ["--weight-decay", "nan"],
        ["--method", "ddspo", "--target-guidance", "inf"], ["--timestep-gamma", "0"],
        ["--lora-alpha", "-1"], ["--lr", "1e300"], ["--config", "NAN_JSON"],
    ],
)  # fmt: skip
def test_hyperparameters_validated_up_front(data, tmp_path, capsys, flags):
    if flags == ["--config", "NAN_JSON"]:  # JSON accepts NaN too
        (tmp_path / "c.json").write_text('{"lr": NaN}')
        flags = ["--config", str(tmp_path / "c.json")]
    out = tmp_path / "out"
    assert train(data, out, "--max-steps", "1", *flags) == 2
    line = one_line(capsys)
    assert line.startswith("error: --") and ("finite" in line or "must be" in line), line
    assert not out.exists()


def test_nonfinite_parameters_are_never_saved(data, tmp_path, capsys, monkeypatch):
    """An optimizer step that leaves an inf in the weights although loss and gradient were
    finite: the run stops at that step, naming it, and saves nothing after it."""
    real, calls = torch.amp.GradScaler.step, []

    def step(self, optimizer, *a, **k):  # the trainer's optimizer step goes through here
        out = real(self, optimizer, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.amp.GradScaler, "step", step)
    out = tmp_path / "run"
    assert train(data, out, "--method", "dpo", "--max-steps", "3", "--ckpt-every", "1") == 1
    line = one_line(capsys)
    assert line.startswith("error: step 2: ") and "non-finite" in line, line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    assert not (out / "final").exists()
    assert steps_logged(out) == [1]


@pytest.mark.parametrize(
    "flags,field",
    [
        (["--method", "ddspo"], "--method 'dpo' -> 'ddspo'"),
        (["--beta", "5000"], "--beta 8000.0 -> 5000.0"),
        (["--seed", "1"], "--seed 0 -> 1"),
        (["--lora", "4"], "--lora 0 -> 4"),
        (["--timestep-sampler", "geometric"], "--timestep-sampler"),
        (["--independent-noise"], "--independent-noise"),
        (["--grad-accum", "2"], "pairs per step"),
        (["OTHER_DATA"], "--data"),
        (["--backbone", "sdxl", "XL_DATA"], "--backbone 'sd' -> 'sdxl'"),
    ],
    ids=["method", "beta", "seed", "lora", "sampler", "noise", "batch", "data", "backbone"],
)
def test_resume_must_match_the_checkpoint(data, run1, tmp_path, capsys, flags, field):
    if flags[-1] == "OTHER_DATA":  # the same pairs, built with another seed
        data, flags = relabel(data, tmp_path / "d", seed=1), flags[:-1]
    elif flags[-1] == "XL_DATA":  # the backbone must not give a traceback
        data, flags = relabel(data, tmp_path / "d", backbone="sdxl"), flags[:-1]
    before = snapshot(run1)
    capsys.readouterr()
    assert train(data, run1, "--method", "dpo", "--max-steps", "3", "--resume", "latest",
                 *flags) == 2  # fmt: skip
    line = one_line(capsys)
    assert line.startswith("error: --resume ") and "differs from the checkpoint's" in line
    assert field in line, line
    assert snapshot(run1) == before


def test_resume_may_change_the_listed_fields(data, run1, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for p in run1.rglob("*"):  # a private copy of the run
        dst = out / p.relative_to(run1)
        dst.mkdir(parents=True) if p.is_dir() else dst.write_bytes(p.read_bytes())
    # more steps, other checkpointing and logging, and 1 x 2 pairs per step instead of 2 x 1
    assert train(data, out, "--method", "dpo", "--resume", "latest", "--max-steps", "3",
                 "--ckpt-every", "3", "--keep-last", "1", "--log-every", "1",
                 "--batch-size", "1", "--grad-accum", "2") == 0  # fmt: skip
    assert steps_logged(out) == [1, 2, 3]
    text = epilog()  # the --help epilog lists what may change
    for name in RESUME_MAY_CHANGE:
        assert "--" + name.replace("_", "-") in text.split("May change on resume:")[1]
    with pytest.raises(SystemExit):
        train_t2i.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps the epilog
    assert "May change on resume: --out, --resume, --max-steps" in help_text


def _flip_fp16_values(shard: Path, n: int) -> None:
    """Flip one high bit in each of ``n`` float16 latents, as a failing disk or copy would."""
    blob = bytearray(shard.read_bytes())
    start = 8 + int.from_bytes(blob[:8], "little")
    for i in range(n):
        blob[start + 2 * (7 * i) + 1] ^= 0x20  # an exponent bit: the values stay finite
    shard.write_bytes(bytes(blob))


@pytest.mark.parametrize("damage", ["bit flips", "NaN, checksum fixed"])
def test_damaged_shard_stops_before_step_1(data, tmp_path, capsys, damage):
    """A shard whose bytes changed, or that holds a NaN latent (its checksum made to fit),
    is refused on open: one line naming it, exit 2, nothing trained or written."""
    d = tmp_path / "data"
    shutil.copytree(data, d)
    shard = d / "shards" / "shard-00001.safetensors"
    if damage == "bit flips":
        _flip_fp16_values(shard, 200)
        needle = "checksum mismatch"
    else:
        with safe_open(str(shard), framework="pt") as f:
            meta = {k: v for k, v in f.metadata().items() if k != pairdata.CHECKSUM_KEY}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors["x0_w"][3, 0, 5, 5] = float("nan")
        shard.write_bytes(pairdata.sealed_shard(tensors, meta))
        needle = "x0_w row 3 holds non-finite values"
    out = tmp_path / "run"
    capsys.readouterr()
    assert train(d, out, "--method", "dpo", "--max-steps", "2", "--ckpt-every", "1") == 2
    line = one_line(capsys)
    assert line.startswith(f"error: {shard}: ") and needle in line, line
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_data_built_for_another_backbone(data, tmp_path, capsys):
    xl = relabel(data, tmp_path / "xl", backbone="sdxl")
    out = tmp_path / "run"
    assert train(xl, out, "--method", "dpo", "--max-steps", "1") == 2
    assert "was built for the sdxl backbone, not sd" in one_line(capsys)
    assert not out.exists()


# ---------------------------------------------------- one line, exit 2, nothing written


def write_samples(root: Path, n: int = 2) -> Path:
    """A sample.py-style folder: base/00000.png.. and prompts.txt."""
    (root / "base").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "base" / f"{i:05d}.png")
    (root / "prompts.txt").write_text("\n".join(DEMO_PROMPTS[:n]) + "\n")
    write_sample_record(root / "base", DEMO_PROMPTS[:n])
    return root


def _read_only(folder: Path):
    raise OSError(errno.EROFS, "Read-only file system", str(folder))


@pytest.mark.parametrize("fault", ["file", "read-only"])
@pytest.mark.parametrize("command", ["train", "sample", "evaluate"])
def test_out_is_a_file_or_read_only(data, tmp_path, capsys, monkeypatch, command, fault):
    out = tmp_path / "out"
    if fault == "file":
        out.write_text("precious")
    else:  # root ignores permission bits: fail the writability probe itself
        monkeypatch.setattr(outdir, "_probe", _read_only)
    # evaluate must refuse before scoring (scoring first would lose the work)
    monkeypatch.setattr(tiny, "tiny_scorer", lambda *a: pytest.fail("scored before checks"))
    if command == "train":
        rc = train(data, out, "--method", "dpo", "--max-steps", "1")
    elif command == "sample":
        rc = sample.main(["--tiny", "sd", "--out", str(out), "--steps", "1", "--max-prompts", "1",
                          "--no-progress"])  # fmt: skip
    else:
        images = write_samples(tmp_path / "samples")
        rc = evaluate.main(["--images", str(images), "--tiny", "--out", str(out), "--no-progress"])
    assert rc == 2
    line = one_line(capsys)
    assert str(out) in line and ("is a file" if fault == "file" else "Read-only") in line, line
    assert (out.read_text() == "precious") if fault == "file" else not out.exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_truncated_newest_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(data, out, "--method", "dpo", "--max-steps", "3", "--ckpt-every", "1",
                 "--keep-last", "3") == 0  # fmt: skip
    newest = out / "checkpoints" / "step-000003"
    f = newest / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a copy cut short
    capsys.readouterr()
    # named explicitly: refused, one line
    assert train(data, out, "--method", "dpo", "--max-steps", "4", "--resume", str(newest)) == 2
    assert "damaged checkpoint" in one_line(capsys)
    # latest: the newest intact one, said on stderr
    assert train(data, out, "--method", "dpo", "--max-steps", "4", "--resume", "latest") == 0
    line = one_line(capsys)
    assert line.startswith("warning: ") and "step-000003 is damaged" in line
    assert line.endswith("resuming from " + str(out / "checkpoints" / "step-000002"))
    assert steps_logged(out) == [1, 2, 3, 4]
    assert checkpoint_problem(latest_checkpoint(out / "checkpoints"))[1] is None


def test_crafted_trainer_state_is_never_unpickled(data, run1, tmp_path, capsys, touch_on_unpickle):
    """A trainer_state.pt that would run code when unpickled is passed over like a damaged
    checkpoint: the run resumes from the intact one before it, as the straight run did."""
    out, marker = tmp_path / "run", tmp_path / "MARKER"
    shutil.copytree(run1, out)
    bad = out / "checkpoints" / "step-000002" / STATE_FILE
    torch.save({**torch.load(bad, weights_only=True), "counters": touch_on_unpickle(marker)}, bad)
    capsys.readouterr()
    assert train(data, out, "--method", "dpo", "--max-steps", "2", "--resume", "latest") == 0
    captured = capsys.readouterr()
    assert not marker.exists()
    [line] = captured.err.strip().splitlines()
    intact = bad.parent.with_name("step-000001")
    assert line.startswith(f"warning: {bad.parent} is damaged ({STATE_FILE} refused (it needs ")
    assert "posix.system" in line and line.endswith(f"resuming from {intact}")
    assert f"resumed from {intact} at step 1" in captured.out
    assert steps_logged(out) == [1, 2]
    # step 2 trained again and checkpointed: the same weights and state as the straight run
    straight = run1 / "checkpoints" / "step-000002"
    assert snapshot(bad.parent / "unet") == snapshot(straight / "unet")
    mine, theirs = (torch.load(f, weights_only=True) for f in (bad, straight / STATE_FILE))
    assert mine["counters"] == theirs["counters"]
    assert mine["scheduler"] == theirs["scheduler"]


def _fail_second(kind: str, monkeypatch):
    """Make the second checkpoint's writer hit a full disk, as safetensors or torch.save
    report it (neither raises a plain OSError)."""
    from safetensors import SafetensorError

    calls = []
    if kind == "safetensors":
        real = weights.save_policy

        def save_policy(backbone, policy, out, lora):
            calls.append(out)
            real(backbone, policy, out, lora)
            if len(calls) == 2:
                raise SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)"
                )

        monkeypatch.setattr(weights, "save_policy", save_policy)
    else:
        real = torch.save

        def save(obj, f, *a, **k):
            if str(f).endswith(STATE_FILE):
                calls.append(f)
                if len(calls) == 2:
                    Path(f).write_bytes(b"PK\x03\x04 torn")
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
            return real(obj, f, *a, **k)

        monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("kind", ["safetensors", "torch.save"])
def test_full_disk(data, tmp_path, capsys, monkeypatch, kind):
    out = tmp_path / "run"
    _fail_second(kind, monkeypatch)
    assert train(data, out, "--method", "dpo", "--max-steps", "3", "--ckpt-every", "1") == 2
    line = one_line(capsys)
    assert line == f"error: no space left on device while writing {out}/checkpoints/step-000002"
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]  # no .tmp-*, no step 2
    assert checkpoint_problem(root / "step-000001")[1] is None
    monkeypatch.undo()
    assert train(data, out, "--method", "dpo", "--max-steps", "3", "--ckpt-every", "1",
                 "--resume", "latest") == 0  # fmt: skip
    assert steps_logged(out) == [1, 2, 3]


def kill_at_step(monkeypatch, signum: int, step: int) -> None:
    """Deliver ``signum`` to this process while step ``step`` draws its noise."""
    real, calls = train_t2i.draw_noise, []

    def draw_noise(*a, **k):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real(*a, **k)

    monkeypatch.setattr(train_t2i, "draw_noise", draw_noise)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_interrupt(data, tmp_path, capsys, monkeypatch, signum):
    out = tmp_path / "run"
    handler = signal.getsignal(signum)
    kill_at_step(monkeypatch, signum, 6)  # during step 6: steps 1-5 done, checkpoint at 4
    rc = train(data, out, "--method", "dpo", "--max-steps", "9", "--ckpt-every", "2")
    assert rc == 128 + signum
    line = one_line(capsys)
    assert (
        line
        == "interrupted at step 5; resume with --resume latest (newest checkpoint: step-000004)"
    )
    assert signal.getsignal(signum) is handler  # the handler is put back
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]
    assert checkpoint_problem(root / "step-000004")[1] is None
    assert steps_logged(out) == [1, 2, 3, 4, 5]


def test_resume_truncates_the_log_and_removes_stale_tmp(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    kill_at_step(monkeypatch, signal.SIGTERM, 4)  # steps 1-3 logged, checkpoint at 2
    assert train(data, out, "--method", "dpo", "--max-steps", "4", "--ckpt-every", "2") == 143
    monkeypatch.undo()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss"')  # a line torn by kill -9
    stale = [out / "checkpoints" / ".tmp-step-000004", out / ".tmp-final"]  # kill -9 leftovers
    for d in stale:
        (d / "unet").mkdir(parents=True)
    assert train(data, out, "--method", "dpo", "--max-steps", "4", "--resume", "latest") == 0
    assert steps_logged(out) == [1, 2, 3, 4]  # step 3 once: cut back to step 2, then relogged
    assert not any(d.exists() for d in stale)
    assert not list(out.glob(".tmp-*")) and not list((out / "checkpoints").glob(".tmp-*"))


def test_a_checkpoint_of_the_per_rank_noise_trainer_resumes_with_a_warning(data, tmp_path, capsys):
    """Checkpoints written before the per-pair noise keys hold one RNG state per rank and
    may lack "world": they resume (world from the RNG list), saying the noise differs."""
    out = tmp_path / "run"
    assert train(data, out, "--method", "dpo", "--max-steps", "1") == 0
    f = latest_checkpoint(out / "checkpoints") / STATE_FILE
    state = torch.load(f, weights_only=True)
    del state["world"]
    state["rng"] = [{"python": 0}]  # as one rank of the older trainer wrote it (abridged)
    torch.save(state, f)
    capsys.readouterr()
    assert train(data, out, "--method", "dpo", "--max-steps", "2", "--resume", "latest") == 0
    err = capsys.readouterr().err
    assert "was written by an older trainer whose noise came from per-rank streams" in err


def test_a_resume_may_split_the_same_pairs_differently(data, tmp_path, capsys):
    """Each pair's draws are keyed by its place in the data stream, so a run cut after step
    1 and resumed as 1 pair x 2 micro-steps (as on another number of ranks) trains on the
    same pairs with the same noise: it ends as the straight 2-pair run, up to float
    rounding (a small lr and a larger Adam epsilon keep Adam from blowing rounding-level
    gradients up to lr-sized steps). Another number of pairs per step is refused."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    flags = ("--method", "dpo", "--beta", "200", "--lr", "1e-4", "--adam-eps", "1e-5")
    assert train(data, straight, *flags, "--max-steps", "3") == 0
    assert train(data, cut, *flags, "--max-steps", "1") == 0
    capsys.readouterr()
    assert train(data, cut, *flags, "--max-steps", "3", "--resume", "latest",
                 "--batch-size", "1", "--grad-accum", "2") == 0  # fmt: skip
    capsys.readouterr()
    f = "final/unet/diffusion_pytorch_model.safetensors"
    a, b, base = load_file(straight / f), load_file(cut / f), tiny_backbone("sd").denoiser
    moved = max((a[k] - v).abs().max().item() for k, v in base.state_dict().items() if k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(v.abs().max().item() for v in a.values())
    assert moved > 1e-4 and worst <= 1e-2 * moved and worst <= 1e-5 * scale, (worst, moved)
    # 1 pair x 1 micro-step x 1 rank: not the same pairs per step
    ckpt = latest_checkpoint(cut / "checkpoints")
    assert train(data, tmp_path / "b", *flags, "--max-steps", "4", "--batch-size", "1",
                 "--resume", str(ckpt)) == 2  # fmt: skip
    assert "pairs per step (--batch-size x --grad-accum x ranks) 2 -> 1" in one_line(capsys)


# ------------------------------------------------------------------------- sample.py


def _foreign_checkpoint(kind: str, root: Path) -> Path:
    name = {"sdxl-full": "sdxl", "sdxl-lora": "sdxl", "sana-lora": "sana"}[kind]
    bb = tiny_backbone(name)
    if kind.endswith("full"):
        bb.denoiser.save_pretrained(root / "ckpt" / "unet")
    else:
        weights.add_lora(bb.denoiser, 4, 4)
        weights.save_lora(bb, bb.denoiser, root / "ckpt" / "lora")
    return root / "ckpt"


@pytest.mark.parametrize("kind", ["sdxl-full", "sdxl-lora", "sana-lora"])
def test_sample_checkpoint_of_another_backbone(tmp_path, capsys, kind):
    ckpt = _foreign_checkpoint(kind, tmp_path)
    out = tmp_path / "samples"
    assert sample.main(["--tiny", "sd", "--checkpoint", f"x={ckpt}", "--out", str(out),
                        "--steps", "1", "--max-prompts", "1", "--no-progress"]) == 2  # fmt: skip
    line = one_line(capsys)
    assert line.startswith(f"error: {ckpt}: not a checkpoint of this sd model ("), line
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_sample_failure_midway_leaves_out_as_it_was(tmp_path, capsys, monkeypatch):
    """A checkpoint that fails while sampling (after base images exist): OUT untouched."""
    ckpt = tmp_path / "ft"
    tiny_backbone("sd").denoiser.save_pretrained(ckpt)
    out = tmp_path / "samples"
    assert sample.main(["--tiny", "sd", "--checkpoint", f"old={ckpt}", "--out", str(out),
                        "--steps", "1", "--max-prompts", "1", "--no-progress"]) == 0  # fmt: skip
    before = snapshot(out)

    def broken(backbone, path):
        raise RuntimeError("size mismatch for conv_in.weight\nmore lines")

    monkeypatch.setattr(sample, "load_checkpoint", broken)
    assert sample.main(["--tiny", "sd", "--checkpoint", f"ft={ckpt}", "--out", str(out),
                        "--steps", "1", "--max-prompts", "1", "--no-progress"]) == 2  # fmt: skip
    line = one_line(capsys)
    assert line == f"error: checkpoint ft={ckpt} failed to sample: size mismatch for conv_in.weight"
    assert snapshot(out) == before and not list(tmp_path.glob(".tmp-*"))
    monkeypatch.undo()
    assert sample.main(["--tiny", "sd", "--checkpoint", f"ft={ckpt}", "--out", str(out),
                        "--steps", "1", "--max-prompts", "1", "--no-progress"]) == 0  # fmt: skip
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert names == ["base", "base/00000.png", "base/sample.json", "ft", "ft/00000.png",
                     "ft/sample.json", "grid.png", "old", "old/00000.png", "old/sample.json",
                     "prompts.txt"]  # fmt: skip


# ------------------------------------------------------------------------- smaller


def test_evaluate_tiny_scorers(tmp_path, capsys):
    """The README's evaluate example without downloaded weights: `--tiny` scorers."""
    images = write_samples(tmp_path / "samples", n=3)
    (images / "ft").mkdir()
    for f in (images / "base").iterdir():
        (images / "ft" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "eval"
    assert evaluate.main(["--images", str(images), "--tiny", "--out", str(out),
                          "--no-progress", "--device", "auto"]) == 0  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert set(res["scorers"]) == {"clip", "pickscore"} and res["n_prompts"] == 3
    assert res["models"]["ft"]["win_rate"] == {"clip": 0.5, "pickscore": 0.5}  # same images
    assert evaluate.main(["--images", str(images), "--tiny", "--clip", str(tmp_path)]) == 2


def test_gitignore_covers_readme_outputs():
    lines = (REPO / ".gitignore").read_text().split()
    for folder in ("samples-tiny", "eval", "weights"):
        assert f"/{folder}/" in lines or f"{folder}/" in lines
