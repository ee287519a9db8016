"""The digits benchmark (bench/digits): scenes, captions, DigitEval, resume, smoke run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn")

from bench.digits import experiment, scenes, scorer  # noqa: E402
from bench.digits.__main__ import main  # noqa: E402
from bench.digits.scenes import BLANK, Prompt  # noqa: E402
from bench.digits.util import MARKER  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    return scenes.load_digits_split()


@pytest.fixture(scope="module")
def fitted(digits):
    return scorer.train_scorer(digits, max_iter=60)


# ------------------------------------------------------------------------ scenes


def test_compose_puts_each_digit_in_its_named_slot(digits):
    rng = np.random.default_rng(0)
    img = scenes.compose({1: 7, 2: 3}, digits.test_x, digits.test_y, rng)
    crops = scenes.slots_of(img[None])[0]
    sevens = digits.test_x[digits.test_y == 7]
    threes = digits.test_x[digits.test_y == 3]
    assert any(np.array_equal(crops[1], s) for s in sevens)  # top right holds a real 7
    assert any(np.array_equal(crops[2], t) for t in threes)  # bottom left holds a real 3
    assert not crops[0].any() and not crops[3].any()  # the other slots are empty


@pytest.mark.parametrize(
    "prompt, right, wrong",
    [
        (Prompt("position", (4,), 1), [BLANK, 4, BLANK, BLANK], [4, BLANK, BLANK, BLANK]),
        (Prompt("two", (3, 7), "left"), [BLANK, BLANK, 3, 7], [BLANK, BLANK, 7, 3]),
        (Prompt("two", (3, 7), "above"), [BLANK, 3, BLANK, 7], [3, 7, BLANK, BLANK]),
        (Prompt("counting", (5,), 3), [5, 5, BLANK, 5], [5, 5, 5, 5]),
        (Prompt("single", (9,)), [BLANK, BLANK, 9, BLANK], [BLANK, 8, BLANK, BLANK]),
    ],
)
def test_prompt_rules_are_exact(prompt, right, wrong):
    assert prompt.check(right)
    assert not prompt.check(wrong)


def test_every_layout_satisfies_its_prompt():
    rng = np.random.default_rng(1)
    for kind in scenes.KINDS:
        for p in scenes.all_prompts(kind):
            layout = p.layout(rng)
            labels = [layout.get(s, BLANK) for s in range(4)]
            assert p.check(labels), (p, labels)


def test_texts_name_the_slots_in_order():
    assert Prompt("position", (2,), 2).text() == "a 2 at the bottom left"
    assert Prompt("two", (1, 6), "left").text() == "a 1 left of a 6"
    assert Prompt("counting", (8,), 3).text() == "three 8s"


def test_held_out_combinations_never_reach_training():
    pool = scenes.train_pool()
    evals = scenes.eval_prompts(10)
    assert not any(scenes.held_out(p) for p in pool)
    assert all(scenes.held_out(p) for p in evals if p.kind != "single")
    assert {p.kind for p in evals} == set(scenes.KINDS)


def test_caption_corruption_rate_and_kind():
    rng = np.random.default_rng(2)
    prompts = scenes.sample_train_prompts(6000, rng)
    texts, wrong = scenes.captions(prompts, 0.3, rng)
    assert abs(wrong.mean() - 0.3) < 0.025
    truth = [p.text() for p in prompts]
    assert all((t != g) == w for t, g, w in zip(texts, truth, wrong, strict=True))
    clean, _ = scenes.captions(prompts, 0.0, rng)
    assert clean == truth
    with pytest.raises(ValueError):
        scenes.captions(prompts, 1.5, rng)


def test_tokenizer_keeps_caption_words_whole():
    from bench.digits.model import build_tokenizer

    tok = build_tokenizer()
    for w in scenes.WORDS:
        assert tok.tokenize(w) == [w + "</w>"]
    assert tok.tokenize("a 3 above a 7") == ["a</w>", "3</w>", "above</w>", "a</w>", "7</w>"]


# ------------------------------------------------------------------------ DigitEval


def test_scorer_reads_real_composed_scenes(digits, fitted):
    assert fitted.test_accuracy > 0.9
    rng = np.random.default_rng(3)
    prompts = scenes.eval_prompts(10)
    imgs = scenes.make_scenes(prompts, digits.test_x, digits.test_y, rng)
    res = scorer.score_images(fitted, prompts, imgs, imgs)
    assert res["overall"] >= 0.8
    # the same scenes judged against prompts with the digits swapped mostly fail
    swapped = [Prompt(p.kind, p.digits[::-1], p.where) for p in prompts if p.kind == "two"]
    two_imgs = imgs[[i for i, p in enumerate(prompts) if p.kind == "two"]]
    assert scorer.score_images(fitted, swapped, two_imgs, two_imgs)["overall"] <= 0.2


def test_scorer_sees_blank_and_position(digits, fitted):
    i = int(np.flatnonzero(digits.test_y == 3)[0])
    img = np.zeros((1, 16, 16), np.float32)
    img[0, 8:, 8:] = digits.test_x[i]
    labels, _ = fitted.read(img)
    assert labels[0, :3].tolist() == [BLANK] * 3
    assert Prompt("position", (3,), 3).check(labels[0].tolist()) == (labels[0, 3] == 3)
    assert not Prompt("position", (3,), 0).check(labels[0].tolist())


def test_saved_scorer_scores_as_the_fitted_classifier(digits, tmp_path):
    """Written as arrays + JSON and read back without pickle, DigitEval gives the fitted
    scikit-learn model's probabilities and labels bit for bit (float32 scenes as the
    benchmark reads them, and float64 input)."""
    clf = scorer.fit_classifier(digits, seed=1, max_iter=5)
    scorer.save_scorer(scorer.Scorer.from_classifier(clf, 0.25), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [scorer.SCORER_INFO, scorer.SCORER_FILE]
    loaded = scorer.load_scorer(tmp_path)
    assert loaded.test_accuracy == 0.25
    rng = np.random.default_rng(5)
    imgs = scenes.make_scenes(scenes.eval_prompts(3), digits.test_x, digits.test_y, rng)
    crops = scenes.slots_of(imgs.astype(np.float32)).reshape(-1, 8, 8)
    noise = rng.uniform(0, 1, (50, 8, 8))
    for x in (crops, noise):
        expected = clf.predict_proba(x.reshape(len(x), -1))
        assert np.array_equal(loaded.proba(x), expected)
    labels, conf = loaded.read(imgs.astype(np.float32))
    assert np.array_equal(labels.ravel(), clf.predict(crops.reshape(len(crops), -1)))
    assert np.array_equal(conf.ravel(), clf.predict_proba(crops.reshape(len(crops), -1)).max(1))


def test_scorer_file_shapes_are_checked(digits, tmp_path):
    clf = scorer.fit_classifier(digits, seed=1, max_iter=1)
    sc = scorer.Scorer.from_classifier(clf, 0.5)
    scorer.save_scorer(
        scorer.Scorer(sc.coefs[::-1], sc.intercepts[::-1], sc.classes, 0.5), tmp_path
    )
    with pytest.raises(ValueError, match="scorer.npz: layer shapes .* do not chain to 11 classes"):
        scorer.load_scorer(tmp_path)


def test_old_pickled_scorer_in_the_cache_is_never_read(
    digits, fitted, tmp_path, monkeypatch, touch_on_unpickle
):
    """A cache of the pickled format before: the scorer is fitted again, and scoring reads
    the new files only."""
    import pickle

    cfg = experiment.preset("smoke")
    runner = experiment.Runner(cfg, tmp_path / "out", tmp_path / "cache", progress=False)
    marker, old = tmp_path / "MARKER", tmp_path / "cache" / f"scorer-{cfg.scorer_iters}"
    old.mkdir(parents=True)
    (old / "scorer.pkl").write_bytes(pickle.dumps(touch_on_unpickle(marker)))
    (old / MARKER).write_text(json.dumps({"test_accuracy": 0.5}))
    monkeypatch.setattr(scorer, "train_scorer", lambda *a, **k: fitted)
    assert runner.scorer_stage()["test_accuracy"] == fitted.test_accuracy
    sdir = tmp_path / "out" / "seed-0"
    for m in ("base", *cfg.methods):  # blank samples: every slot read as BLANK
        folder = sdir / "samples" / "images" / m
        folder.mkdir(parents=True)
        for i in range(len(runner.eval_prompts)):
            Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / f"{i:05d}.png")
    runner.score_stage(sdir, 0)
    assert not marker.exists()
    res = json.loads((sdir / "scores" / "scores.json").read_text())
    assert res["base"]["labels"] == [[BLANK] * 4] * len(runner.eval_prompts)
    assert res["real"]["overall"] > 0.5


def test_frechet_is_zero_for_identical_and_grows_with_shift():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(500, 3))
    assert scorer.frechet(a, a) == pytest.approx(0.0, abs=1e-6)
    assert scorer.frechet(a, a + 2.0) == pytest.approx(12.0, rel=0.05)


# ------------------------------------------------------------------------ driver


def test_resume_skips_done_stages_and_redoes_half_written(tmp_path):
    runner = experiment.Runner.__new__(experiment.Runner)
    calls = []

    def fn(path):
        calls.append(path)
        (path / "x").write_text("1")
        return {"n": len(calls)}

    first = runner.stage(tmp_path / "s", fn, "s")
    again = runner.stage(tmp_path / "s", fn, "s")
    assert len(calls) == 1 and again["n"] == first["n"] == 1
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "junk").write_text("half")  # interrupted: no marker
    runner.stage(tmp_path / "t", fn, "t")
    assert len(calls) == 2 and not (tmp_path / "t" / "junk").exists()
    assert (tmp_path / "t" / MARKER).is_file()


def test_lr_rule_keeps_the_paper_ratio():
    cfg = experiment.preset("full")
    assert cfg.lr("dpo") == pytest.approx(8000 / 2.048e8 * 10)
    assert cfg.lr("ddspo") == pytest.approx(2 * cfg.lr("dpo"))
    assert cfg.lr("sft") == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "argv",
    [["--seeds", "0"], ["--methods", "dpo,nope"], ["--threads", "0"], ["--methods", ","]],
)
def test_bad_input_is_one_line_exit_2(argv, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


@pytest.mark.parametrize(
    "argv, msg",
    [(["--methods", ""], "--methods is empty"),  # not "every method"
     (["--methods", " , "], "--methods is empty"),
     (["--first-seed", "-1"], "--first-seed must be >= 0, got -1")],  # seed--1/ folders
)  # fmt: skip
def test_empty_methods_and_negative_seeds_are_refused(argv, msg, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"error: {msg}\n"
    assert not (tmp_path / "run").exists()


def test_smoke_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bench.digits", "--preset", "smoke", "--methods", "ddspo"]
    cmd += ["--seeds", "1", "--out", str(out), "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["table"]) == {"real", "base", "ddspo"}
    assert res["table"]["real"]["overall"]["mean"] > 0.5  # real scenes are read right
    assert len(res["per_seed"]["0"]["ddspo"]["correct"]) == 8
    assert (out / "grid.png").stat().st_size > 0
    assert "| DDSPO |" in (out / "table1.md").read_text()
    for stage in ("pairs", "train/ddspo", "samples", "scores"):
        assert (out / "seed-0" / stage / MARKER).is_file()
