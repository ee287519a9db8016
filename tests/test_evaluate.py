"""bench/evaluate.py and bench/t2i/scorers.py on tiny random CLIP models built from configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sample_records import write_sample_record  # noqa: E402

from bench.evaluate import load_image, main, read_prompts, render_markdown  # noqa: E402
from bench.t2i.cli import UsageError  # noqa: E402
from bench.t2i.scorers import mean_sem, win_rate  # noqa: E402
from bench.t2i.tiny import save_tiny_clip  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LONG = "a lighthouse at dusk, oil painting, dramatic clouds, highly detailed"  # > 32 tokens
PROMPTS = ["a red cube", "two cats on a sofa", LONG, "an owl", "blue sky"]


def build_tiny_clip(path: Path, seed: int = 0, logit_scale: float | None = None) -> Path:
    """A random CLIPModel + offline CLIPTokenizer + CLIPImageProcessor saved as a local dir
    (the same tiny scorers ``evaluate.py --tiny`` builds in memory)."""
    return save_tiny_clip(path, seed=seed, logit_scale=logit_scale)


def write_pngs(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return {
        "clip": build_tiny_clip(root / "clip", seed=0),
        "pick": build_tiny_clip(root / "pick", seed=1, logit_scale=50.0),
    }


@pytest.fixture()
def workspace(tmp_path):
    """prompts.txt + a sample.py-style output dir with base, ft and an exact copy of base."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    samples = tmp_path / "samples"
    write_pngs(samples / "base", len(PROMPTS), seed=0)
    write_pngs(samples / "ft", len(PROMPTS), seed=1)
    for model in ("base", "ft"):
        write_sample_record(samples / model, PROMPTS)
    shutil.copytree(samples / "base", samples / "copy")
    return tmp_path, prompts, samples


def run_main(capsys, *argv):
    rc = main([*map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------- aggregation


def test_mean_sem_and_win_rate_hand_computed():
    mean, sem = mean_sem([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert sem == pytest.approx(math.sqrt(5.0 / 3.0) / 2.0)  # std(ddof=1)=sqrt(5/3), n=4
    assert math.isnan(mean_sem([7.0])[1])
    # wins 1>0 and 4>1, tie 2==2 counts half, loss 3<5 -> 2.5 / 4
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 1]) == 0.625
    assert win_rate([1, 1], [1, 1]) == 0.5
    with pytest.raises(ValueError):
        win_rate([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        mean_sem([])


def test_render_markdown_table():
    summary = {
        "base": {"scores": {"clip": {"mean": 26.951, "sem": 0.1234, "n": 3}}},
        "ddspo": {
            "scores": {"clip": {"mean": 27.46, "sem": 0.2, "n": 3}},
            "win_rate": {"clip": 2 / 3},
        },
    }
    lines = render_markdown(summary, "base").splitlines()
    assert lines[0] == "| model | CLIP score ↑ | win vs base: CLIP score |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| base | 26.95 ± 0.12 | — |"
    assert lines[3] == "| ddspo | 27.46 ± 0.20 | 66.7% |"
    assert "3 prompts" in lines[5]
    # without a base there are no win-rate columns
    assert "win" not in render_markdown({"ft": summary["ddspo"]}, "base").splitlines()[0]


def test_read_prompts_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text(" a cat \n\nthe dog\n\n")  # blank lines skipped, as bench/sample.py does
    assert read_prompts(txt) == ["a cat", "the dog"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a cat", "id": 3}\n{"prompt": "the dog"}\n')
    assert read_prompts(jl) == ["a cat", "the dog"]
    jl.write_text('{"prompt": "a cat"}\n{"caption": "the dog"}\n')
    with pytest.raises(UsageError, match="p.jsonl:2"):
        read_prompts(jl)


# ---------------------------------------------------------------------- end to end


def test_evaluate_end_to_end(capsys, clip_dirs, workspace):
    tmp, prompts, samples = workspace
    out = tmp / "eval"
    rc, stdout, err = run_main(
        capsys,
        "--prompts", prompts, "--images", samples, "--device", "cpu", "--batch-size", 2,
        "--clip", clip_dirs["clip"], "--pickscore", clip_dirs["pick"], "--hps", clip_dirs["clip"],
        "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text() == stdout
    assert list(res["models"]) == ["base", "copy", "ft"]  # base first
    assert res["base"] == "base" and res["n_prompts"] == len(PROMPTS)
    assert set(res["scorers"]) == {"clip", "pickscore", "hps"}
    for m, entry in res["models"].items():
        for k in ("clip", "pickscore", "hps"):
            x = res["per_prompt"][m][k]
            assert len(x) == len(PROMPTS)
            mean, sem = mean_sem(x)
            assert entry["scores"][k]["mean"] == pytest.approx(mean)
            assert entry["scores"][k]["sem"] == pytest.approx(sem)
        if m == "base":
            assert "win_rate" not in entry
        else:
            for k, rate in entry["win_rate"].items():
                assert 0.0 <= rate <= 1.0
                assert rate == win_rate(res["per_prompt"][m][k], res["per_prompt"]["base"][k])
    # identical images tie on every prompt -> exactly one half
    assert res["models"]["copy"]["win_rate"] == {"clip": 0.5, "pickscore": 0.5, "hps": 0.5}
    # CLIP score = 100 * max(cos, 0) and HPS = 100 * cos come from the same model here
    clip, hps = (np.array(res["per_prompt"]["ft"][k]) for k in ("clip", "hps"))
    np.testing.assert_allclose(clip, np.maximum(hps, 0.0), rtol=1e-6, atol=1e-6)
    assert "| ft |" in stdout and "win vs base: PickScore" in stdout


def test_pickscore_matches_clip_logits(capsys, clip_dirs, workspace):
    """Oracle: PickScore = diag of CLIPModel's own logits_per_image (logit_scale.exp() * cos)."""
    from transformers import CLIPModel, CLIPProcessor

    tmp, prompts, samples = workspace
    weights_only = tmp / "pick_weights"  # like PickScore_v1: no tokenizer / image processor
    weights_only.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(clip_dirs["pick"] / f, weights_only / f)
    args = ["--prompts", prompts, "--model", f"ft={samples / 'ft'}", "--device", "cpu",
            "--pickscore", weights_only, "--out", tmp / "eval"]  # fmt: skip
    rc, _, err = run_main(capsys, *args)
    assert rc == 2 and "no tokenizer" in err and str(weights_only) in err
    assert "--pickscore-processor DIR" in err
    rc, _, err = run_main(capsys, *args, "--pickscore-processor", clip_dirs["pick"])
    assert rc == 0, err
    res = json.loads((tmp / "eval" / "results.json").read_text())
    assert res["base"] is None and "win_rate" not in res["models"]["ft"]  # single model
    model = CLIPModel.from_pretrained(clip_dirs["pick"], local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(clip_dirs["pick"], local_files_only=True)
    images = [Image.open(samples / "ft" / f"{i:05d}.png").convert("RGB") for i in range(5)]
    inputs = proc(text=PROMPTS, images=images, padding=True, truncation=True, max_length=32,
                  return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.diagonal().numpy()
    np.testing.assert_allclose(res["per_prompt"]["ft"]["pickscore"], expected, rtol=1e-4, atol=1e-4)
    assert abs(expected).max() <= 50.0 + 1e-4  # the learned scale (50 here) is used, not 100


@pytest.mark.timeout(180)
def test_cli_subprocess(clip_dirs, workspace):
    tmp, prompts, samples = workspace
    env = {**os.environ, "PYTHONPATH": ""}  # the script must find bench/ on its own
    where = subprocess.run([sys.executable, "-c", "import bench; print(bench.__file__)"],
                           cwd="/", env=env, capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert where == str(REPO / "bench" / "__init__.py"), (
        f"the installed package is not this checkout ({where or 'not installed'}): run "
        "`pip install -e .` here (the README's install)"
    )
    cmd = ["timeout", "-s", "KILL", "150", sys.executable, "bench/evaluate.py",
           "--prompts", str(prompts), "--images", str(samples), "--clip", str(clip_dirs["clip"]),
           "--device", "cpu", "--out", str(tmp / "cli")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp / "cli" / "results.json").read_text())
    assert set(res["models"]["ft"]["win_rate"]) == {"clip"}
    assert "| base |" in proc.stdout


# ---------------------------------------------------------------------- bad input


def _break_missing(tmp, prompts, samples):
    (samples / "ft" / "00003.png").unlink()
    return "00003.png", "expected exactly 5"


def _break_extra(tmp, prompts, samples):
    shutil.copy(samples / "ft" / "00000.png", samples / "ft" / "00005.png")
    return "00005.png", "expected exactly 5"


def _break_out_of_step(tmp, prompts, samples):
    prompts.write_text("\n".join(PROMPTS[:4]) + "\n")  # one prompt fewer than images
    return "00004.png", "expected exactly 4"


def _break_corrupt(tmp, prompts, samples):
    (samples / "ft" / "00002.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return str(samples / "ft" / "00002.png"), "corrupt"


def _break_truncated(tmp, prompts, samples):
    f = samples / "base" / "00001.png"
    f.write_bytes(f.read_bytes()[:60])
    return str(f), "corrupt"


def _break_no_scorer_dir(tmp, prompts, samples):
    return str(tmp / "nowhere"), "--clip"


def _break_not_clip(tmp, prompts, samples):
    (tmp / "nowhere").mkdir()
    (tmp / "nowhere" / "config.json").write_text('{"model_type": "bert"}')
    return str(tmp / "nowhere"), "not a CLIP model"


def _break_prompt_file(tmp, prompts, samples):
    prompts.unlink()
    return str(prompts), "not found"


def _break_sample_prompts_differ(tmp, prompts, samples):
    changed = [*PROMPTS[:2], "something else", *PROMPTS[3:]]
    (samples / "prompts.txt").write_text("\n".join(changed) + "\n")  # what sample.py used
    return str(samples / "prompts.txt"), "prompt index 2"


def _break_no_base(tmp, prompts, samples):
    (samples / "base").rename(samples / "sdxl")
    return "'base'", "--base"


BREAKS = [_break_missing, _break_extra, _break_out_of_step, _break_corrupt, _break_truncated,
          _break_no_scorer_dir, _break_not_clip, _break_prompt_file, _break_sample_prompts_differ,
          _break_no_base]  # fmt: skip


@pytest.mark.parametrize("brk", BREAKS, ids=lambda f: f.__name__[7:])
def test_bad_input_exits_2_naming_the_file(capsys, clip_dirs, workspace, brk):
    tmp, prompts, samples = workspace
    needle, hint = brk(tmp, prompts, samples)
    broken_scorer = brk in (_break_no_scorer_dir, _break_not_clip)
    clip = tmp / "nowhere" if broken_scorer else clip_dirs["clip"]
    rc, out, err = run_main(capsys, "--prompts", prompts, "--images", samples, "--clip", clip)
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("evaluate.py: error:")
    assert needle in err and hint in err


def test_prompts_default_to_the_sample_dirs_prompts_txt(capsys, clip_dirs, workspace):
    tmp, prompts, samples = workspace
    shutil.copy(prompts, samples / "prompts.txt")  # bench/sample.py writes this
    rc, _, err = run_main(
        capsys, "--images", samples, "--clip", clip_dirs["clip"], "--out", tmp / "eval"
    )
    assert rc == 0, err
    res = json.loads((tmp / "eval" / "results.json").read_text())
    assert res["prompts"] == str(samples / "prompts.txt") and res["n_prompts"] == len(PROMPTS)
    (samples / "prompts.txt").unlink()
    rc, _, err = run_main(capsys, "--images", samples, "--clip", clip_dirs["clip"])
    assert rc == 2 and "--prompts FILE is required" in err


def test_no_scorer_and_bad_model_spec(capsys, workspace):
    tmp, prompts, samples = workspace
    rc, _, err = run_main(capsys, "--prompts", prompts, "--images", samples)
    assert rc == 2 and "no scorer" in err
    rc, _, err = run_main(capsys, "--prompts", prompts, "--model", "ft", "--clip", tmp)
    assert rc == 2 and "NAME=DIR" in err


def test_load_image_names_the_file(tmp_path):
    bad = tmp_path / "00000.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(UsageError, match="00000.png"):
        load_image(bad)


def test_a_missing_images_folder_is_named_not_the_prompts(capsys, tmp_path):
    # the README chain's evaluate step run before sample.py: blame --images, not --prompts
    missing = tmp_path / "samples-tiny"
    rc, out, err = run_main(capsys, "--images", missing, "--tiny", "--out", tmp_path / "eval")
    assert rc == 2 and out == ""
    assert err == f"evaluate.py: error: --images folder not found: {missing}\n"
    assert not (tmp_path / "eval").exists()
