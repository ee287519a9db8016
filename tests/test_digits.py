"""The digits benchmark (bench/digits): scenes, captions, DigitEval, pair sets, the report's
statistics and rules, resume, the base's snapshots, a smoke run and the lr -> 0 control."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sklearn")

from bench.digits import experiment, model, pairsets, report, scenes, scorer  # noqa: E402
from bench.digits.__main__ import main  # noqa: E402
from bench.digits.scenes import BLANK, Prompt  # noqa: E402
from bench.digits.util import MARKER  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def digits():
    return scenes.load_digits_split()


@pytest.fixture(scope="module")
def fitted(digits):
    return scorer.train_scorer(digits, max_iter=60)


# ------------------------------------------------------------------------ scenes


@pytest.mark.parametrize("ink, bg", [("bright", "black"), ("faint", "grey"), ("dim", "dark grey")])
def test_compose_draws_each_digit_in_its_slot_at_the_named_levels(digits, ink, bg):
    rng = np.random.default_rng(0)
    level, back = scenes.INKS[ink], scenes.BACKGROUNDS[bg]
    img = scenes.compose({1: 7, 2: 3}, digits.test_x, digits.test_y, rng, level, back)
    crops = scenes.slots_of(img[None])[0]
    raw = (crops - back) / ((1 - back) * level)  # undo the levels
    sevens, threes = digits.test_x[digits.test_y == 7], digits.test_x[digits.test_y == 3]
    assert min(np.abs(raw[1] - s).max() for s in sevens) < 1e-5  # top right: a real 7
    assert min(np.abs(raw[2] - t).max() for t in threes) < 1e-5  # bottom left: a real 3
    assert np.allclose(crops[0], back) and np.allclose(crops[3], back)  # empty: background


@pytest.mark.parametrize(
    "prompt, right, wrong",
    [
        (Prompt("two", (3, 7)), [7, BLANK, BLANK, 3], [3, BLANK, 3, BLANK]),
        (Prompt("position", (3, 7), "left"), [BLANK, BLANK, 3, 7], [BLANK, BLANK, 7, 3]),
        (Prompt("position", (3, 7), "above"), [BLANK, 3, BLANK, 7], [3, 7, BLANK, BLANK]),
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
        for p in scenes.all_contents(kind):
            for _ in range(3):
                layout = p.layout(rng)
                labels = [layout.get(s, BLANK) for s in range(4)]
                assert p.check(labels), (p, labels)


def test_every_prompt_is_whole_words_within_the_token_limit():
    """The longest captions fit the text encoder untruncated, every caption word is one
    token, and Rand-removal has detail words to remove besides the content."""
    tok = model.build_tokenizer()
    for w in scenes.WORDS:
        assert tok.tokenize(w) == [w + "</w>"]
    for p in scenes.eval_prompts(40):
        ids = tok(p.text()).input_ids
        assert len(ids) <= model.MAX_TOKENS, p.text()
        assert len(p.text().split()) >= len(p.content().split()) + 4


def test_held_out_contents_never_reach_training_and_dev_is_disjoint_from_eval():
    pool = scenes.train_pool()
    evals, dev = scenes.eval_prompts(40), scenes.eval_prompts(40, dev=True)
    assert not any(scenes.held_out(p) for p in pool)
    for ps in (evals, dev):
        assert all(scenes.held_out(p) for p in ps if p.kind != "single")
        assert [p.kind for p in ps] == [k for k in scenes.KINDS for _ in range(40)]
        assert all(p.ink and p.background for p in ps)  # full details
    assert not {p.text() for p in evals} & {p.text() for p in dev}
    # "a 3 and a 7" and "a 7 and a 3" are held out together
    assert all(scenes.held_out(Prompt("two", p.digits[::-1])) for p in evals if p.kind == "two")


def test_caption_corruption_changes_the_content_and_keeps_the_details():
    rng = np.random.default_rng(2)
    prompts = scenes.sample_train_prompts(6000, rng, detail=0.5)
    named = np.mean(
        [p.ink is not None for p in prompts] + [p.background is not None for p in prompts]
    )
    assert abs(named - 0.5) < 0.03
    texts, wrong = scenes.captions(prompts, 0.3, rng)
    assert abs(wrong.mean() - 0.3) < 0.025
    for p, t, w in zip(prompts, texts, wrong, strict=True):
        assert (t != p.text()) == w
        if w:  # the same details, another content
            bad = scenes.corrupt(p, np.random.default_rng(0))
            assert (bad.ink, bad.background) == (p.ink, p.background)
            assert bad.content() != p.content()
    with pytest.raises(ValueError):
        scenes.captions(prompts, 1.5, rng)


# ------------------------------------------------------------------------ DigitEval


def test_scorer_reads_real_scenes_at_every_ink_and_background(digits, fitted):
    assert fitted.test_accuracy > 0.9
    rng = np.random.default_rng(3)
    prompts = scenes.eval_prompts(20)
    imgs = scenes.make_scenes(prompts, digits.test_x, digits.test_y, rng)
    res = scorer.score_images(fitted, prompts, imgs, imgs)
    assert res["overall"] >= 0.8 and res["blank"] == 0.0
    assert res["details"] >= 0.95
    # the same scenes against the reversed relation (position) mostly fail
    idx = [i for i, p in enumerate(prompts) if p.kind == "position"]
    rev = [Prompt("position", prompts[i].digits[::-1], prompts[i].where) for i in idx]
    assert scorer.score_images(fitted, rev, imgs[idx], imgs[idx])["overall"] <= 0.2


def test_scorer_sees_blank_slots_on_any_background(digits, fitted):
    i = int(np.flatnonzero(digits.test_y == 3)[0])
    for bg in scenes.BACKGROUNDS.values():
        img = np.full((1, 16, 16), bg, np.float32)
        img[0, 8:, 8:] = bg + (1 - bg) * 0.45 * digits.test_x[i]  # a faint 3, bottom right
        labels, _ = fitted.read(img)
        assert labels[0, :3].tolist() == [BLANK] * 3
        assert Prompt("position", (3, 5), "above").check([BLANK, 5, BLANK, 3]) is False
    empty = np.full((2, 16, 16), 0.4, np.float32)
    assert (fitted.read(empty)[0] == BLANK).all()


def test_saved_scorer_scores_as_the_fitted_classifier(digits, tmp_path):
    """Written as arrays + JSON and read back without pickle, DigitEval gives the fitted
    scikit-learn model's probabilities and labels bit for bit (scenes on black at full ink
    are read as they are)."""
    clf = scorer.fit_classifier(digits, seed=1, max_iter=5)
    scorer.save_scorer(scorer.Scorer.from_classifier(clf, 0.25), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [scorer.SCORER_INFO, scorer.SCORER_FILE]
    loaded = scorer.load_scorer(tmp_path)
    assert loaded.test_accuracy == 0.25
    rng = np.random.default_rng(5)
    ps = [p.with_details("bright", "black") for p in scenes.eval_prompts(3)]
    imgs = scenes.make_scenes(ps, digits.test_x, digits.test_y, rng)
    crops = scenes.slots_of(imgs).reshape(-1, 8, 8)
    for x in (crops, rng.uniform(0, 1, (50, 8, 8))):
        assert np.array_equal(loaded.proba(x), clf.predict_proba(x.reshape(len(x), -1)))
    labels, conf = loaded.read(imgs)
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
    folder = tmp_path / "images" / "base"
    folder.mkdir(parents=True)
    for i in range(len(runner.eval_prompts)):  # blank samples: every slot read as BLANK
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / f"{i:05d}.png")
    res = runner.score(tmp_path / "images", runner.eval_prompts, ["base"], 0)
    assert not marker.exists()
    assert res["base"]["labels"] == [[BLANK] * 4] * len(runner.eval_prompts)
    assert res["base"]["blank"] == 1.0 and res["real"]["overall"] > 0.5


def test_frechet_is_zero_for_identical_and_grows_with_shift():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(500, 3))
    assert scorer.frechet(a, a) == pytest.approx(0.0, abs=1e-6)
    assert scorer.frechet(a, a + 2.0) == pytest.approx(12.0, rel=0.05)


# ------------------------------------------------------------------------ pair sets


def test_rank_makes_the_right_sample_the_winner():
    a_right = np.array([True, False, True, False])
    b_right = np.array([False, True, True, False])
    xa, xb = torch.arange(4.0).view(4, 1, 1, 1), 10 + torch.arange(4.0).view(4, 1, 1, 1)
    keep, win, lose = pairsets.rank(a_right, b_right, xa, xb)
    assert keep.tolist() == [0, 1]  # both right / both wrong: no pair
    assert win.flatten().tolist() == [0.0, 11.0] and lose.flatten().tolist() == [10.0, 1.0]
    keep2, win2, lose2 = pairsets.rank(b_right, a_right, xb, xa)  # sides swapped: same pairs
    assert torch.equal(win2, win) and torch.equal(lose2, lose)


def test_quality_table_counts_and_margin():
    ps = [Prompt("single", (1,))] * 4 + [Prompt("two", (1, 2))] * 2
    w = np.array([1, 1, 1, 0, 1, 0], bool)
    lo = np.array([0, 0, 1, 1, 0, 0], bool)
    blank = np.array([0, 0, 0, 1, 0, 0], bool)
    q = pairsets.quality_table(ps, w, lo, blank, ~blank)
    assert q["single"]["winner_right_loser_wrong"] == 0.5
    assert q["single"]["loser_right_winner_wrong"] == 0.25
    assert q["single"]["margin"] == pytest.approx(25.0)
    assert q["all"]["n"] == 6 and q["all"]["margin"] == pytest.approx(100 * (3 - 1) / 6)
    assert q["all"]["winner_blank"] == pytest.approx(1 / 6)
    assert q["all"]["loser_blank"] == pytest.approx(5 / 6)
    swapped = pairsets.quality_table(ps, lo, w, blank, ~blank)  # loser and winner swapped
    assert swapped["all"]["margin"] == pytest.approx(-q["all"]["margin"])


# ------------------------------------------------------------------------ report rules


def test_sign_test_exact_values():
    assert report.sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert report.sign_test(2, 8) == report.sign_test(8, 2)
    assert report.sign_test(0, 0) == 1.0 and report.sign_test(5, 5) == 1.0
    assert report.sign_test(20, 0) < 1e-5


def _row(overall, blank=0.1, fid=1.0, correct=None):
    e = {"overall": {"mean": overall}, "blank": {"mean": blank}, "fid": {"mean": fid}}
    return {**e, "correct": correct}


def test_helps_needs_every_condition():
    base = _row(0.4)
    good = {**_row(0.5), "vs_base": {"p": 0.01, "wins": 30, "losses": 10, "seeds_better": 3}}
    assert report.helps(good, base, 3)
    for change in (
        {"vs_base": {**good["vs_base"], "p": 0.2}},
        {"vs_base": {**good["vs_base"], "wins": 10, "losses": 30}},
        {"vs_base": {**good["vs_base"], "seeds_better": 1}},
        {"fid": {"mean": 1.3}},
        {"blank": {"mean": 0.16}},
    ):
        assert not report.helps({**good, **change}, base, 3), change


def test_paired_counts_prompt_wins_over_seeds():
    scores = {
        0: {"a": {"correct": [1, 1, 0, 0]}, "b": {"correct": [0, 1, 0, 1]}},
        1: {"a": {"correct": [1, 0, 1, 1]}, "b": {"correct": [0, 0, 1, 1]}},
    }
    r = report.paired(scores, "a", "b")
    assert (r["wins"], r["losses"], r["seeds_better"]) == (2, 1, 1)
    assert report.paired(scores, "b", "a")["wins"] == 1


def test_selection_rule_blanks_then_accuracy_then_grid_order():
    rows = [
        {"name": "a", "overall": 0.5, "blank": 0.30},
        {"name": "b", "overall": 0.4, "blank": 0.10},
        {"name": "c", "overall": 0.4, "blank": 0.12},
    ]
    assert experiment.select(rows, base_blank=0.1, slack=0.05)["name"] == "b"  # a: too blank
    assert experiment.select(rows, base_blank=0.3, slack=0.05)["name"] == "a"
    flagged = experiment.select(rows, base_blank=0.0, slack=0.05)
    assert flagged["name"] == "a" and not flagged["qualified"]


def test_lr_rule_scales_with_pairs_and_base_lr_and_every_method_gets_the_same_grid():
    cfg = experiment.preset("full")
    double = experiment.RunConfig(pairs_per_step=2 * cfg.pairs_per_step)
    slower = experiment.RunConfig(base=model.BaseConfig(unet_lr=cfg.base.unet_lr / 2))
    for m in cfg.methods:
        assert double.rule_lr(m) == pytest.approx(2 * cfg.rule_lr(m))
        assert slower.rule_lr(m) == pytest.approx(cfg.rule_lr(m) / 2)
    assert cfg.rule_lr("ddspo") == pytest.approx(2 * cfg.rule_lr("dpo"))
    sizes = {m: len(cfg.grid(m)) for m in cfg.methods if m != "sft"}
    assert len(set(sizes.values())) == 1, sizes
    lrs = {round(s["lr"] / cfg.rule_lr("dpo"), 6) for s in cfg.grid("dpo")}
    assert lrs == set(cfg.lr_mults)


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


def test_base_snapshot_at_step_n_is_the_base_trained_for_n_steps(digits, tmp_path):
    """The lr does not depend on the step count, so a snapshot is a shorter run's base."""
    tiny = dict(n_scenes=64, vae_steps=2, batch_size=8)
    long_cfg = model.BaseConfig(unet_steps=5, **tiny)
    model.train_base(long_cfg, digits, tmp_path / "long", False, (3,), tmp_path / "snaps")
    model.train_base(model.BaseConfig(unet_steps=3, **tiny), digits, tmp_path / "short", False)
    from safetensors.torch import load_file

    def weights(folder):
        return load_file(next((folder / "pipeline" / "unet").glob("*.safetensors")))

    snap, short, long_ = (weights(tmp_path / f) for f in ("snaps/step-3", "short", "long"))
    assert snap.keys() == short.keys()
    assert all(torch.equal(snap[k], short[k]) for k in snap)
    assert not all(torch.equal(snap[k], long_[k]) for k in snap)


@pytest.mark.parametrize(
    "argv",
    [["--seeds", "0"], ["--methods", "dpo,nope"], ["--threads", "0"], ["--jobs", "0"],
     ["--methods", ","]],
)  # fmt: skip
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


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "run"
    cmd = [sys.executable, "-m", "bench.digits", "--preset", "smoke", "--methods", "ddspo"]
    cmd += ["--seeds", "1", "--out", str(out), "--no-progress", "--jobs", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_smoke_end_to_end(smoke):
    res = json.loads((smoke / "results.json").read_text())
    assert set(res["table"]) == {"real", "base", "ddspo", "sft_real"}
    assert res["table"]["real"]["overall"]["mean"] > 0.5  # real scenes are read right
    assert len(res["per_seed"]["0"]["ddspo"]["correct"]) == 8
    assert [r["guidance"] for r in res["guidance"]["rows"]] == [2.0, 5.0]
    assert res["guidance"]["guidance"] in (2.0, 5.0)
    assert len(res["tuning"]["grid"]["ddspo"]) == 2 and res["tuning"]["chosen"]["ddspo"]
    assert set(res["sets"]["quality"]) == {*scenes.KINDS, "all"} - {
        k for k in scenes.KINDS if not any(res["sets"]["quality"].get(k, {}).values())
    }
    for f in ("grid.png", "accuracy.png"):
        assert (smoke / f).stat().st_size > 0
    md = (smoke / "table1.md").read_text()
    for text in ("| DDSPO |", "Control: SFT on real scenes", "Margin", "(chosen)", "Helps?"):
        assert text in md
    for stage in ("guidance", "pairs", "sets", "selection", "seed-0/train/ddspo",
                  "seed-0/train/sft_real", "seed-0/samples"):  # fmt: skip
        assert (smoke / stage / MARKER).is_file(), stage


def test_a_fine_tune_at_lr_to_zero_samples_as_the_base(smoke, tmp_path):
    """The evaluation path is sound: a fine-tune whose steps are too small to move a weight
    samples exactly the base's images."""
    pipe = next((smoke / "cache").glob("base-*/pipeline"))
    run = [sys.executable, str(ROOT / "bench" / "train_t2i.py"), "--pretrained", str(pipe)]
    run += ["--data", str(smoke / "pairs" / "data"), "--method", "dpo", "--lr", "1e-30"]
    run += ["--out", str(tmp_path / "ft"), "--max-steps", "2", "--batch-size", "2", "--no-progress"]
    proc = subprocess.run(run, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (tmp_path / "p.txt").write_text("a 3 and a 7, faint ink, grey background\ntwo 4s\n")
    cmd = [sys.executable, str(ROOT / "bench" / "sample.py"), "--pretrained", str(pipe)]
    cmd += ["--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "s"), "--steps", "3"]
    cmd += ["--checkpoint", f"zero={tmp_path / 'ft' / 'final'}", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for i in range(2):
        base = np.asarray(Image.open(tmp_path / "s" / "base" / f"{i:05d}.png"))
        zero = np.asarray(Image.open(tmp_path / "s" / "zero" / f"{i:05d}.png"))
        assert np.array_equal(base, zero)


def test_shipped_base_is_used_only_for_its_config_and_only_intact(tmp_path, capsys):
    cfg = model.BaseConfig()
    (tmp_path / "pipeline" / "unet").mkdir(parents=True)
    (tmp_path / "pipeline" / "unet" / "w.safetensors").write_bytes(b"weights")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    model.write_manifest(tmp_path, cfg, {"train_seconds": 1.0}, "python -m bench.digits")
    pipe, stats = model.shipped_base(cfg, tmp_path)
    assert pipe == tmp_path / "pipeline" and stats == {"train_seconds": 1.0}
    assert model.shipped_base(model.BaseConfig(unet_steps=7), tmp_path) is None  # another one
    (tmp_path / "pipeline" / "unet" / "w.safetensors").write_bytes(b"weightz")
    with pytest.raises(model.ShippedBaseError, match=r"unet/w.safetensors: missing or changed"):
        model.shipped_base(cfg, tmp_path)
    (tmp_path / "pipeline" / "unet" / "w.safetensors").unlink()
    with pytest.raises(model.ShippedBaseError, match=r"w.safetensors: missing or changed"):
        model.shipped_base(cfg, tmp_path)
