"""Digits: "Table 1 on a laptop", an end-to-end text-to-image preference benchmark in the
paper's regime.

Real data (scikit-learn's 1,797 handwritten 8 x 8 digits, shipped with the package), scenes
of up to three digits drawn at an ink level on a background level, captions in GenEval's
categories (single object, two objects, counting, position) followed by detail phrases
("a 3 and a 7, faint ink, dark grey background"), a tiny Stable Diffusion trained on them,
Rand-removal preference pairs, fine-tunes with ``sft``, ``dpo``, ``dspo``, ``dspo_cpp`` and
``ddspo``, held-out evaluation prompts, and an exact scorer (DigitEval: a classifier of real
digits reading each slot, and the image's ink and background levels).

Run: ``python -m bench.digits --seeds 3 --jobs 2 --out runs/digits`` (resumable; needs the
optional ``scikit-learn`` dependency). The project's own commands (``bench/make_pairs.py``,
``bench/train_t2i.py``, ``bench/sample.py``) do the work as subprocesses.

How it is made a fair test of the methods (every choice fixed before the evaluation seeds):

* **The base resembles SD-1.4 on GenEval**: near-perfect on single digits, partial on two
  objects and counting, weaker on position. 20 % of its training captions have wrong content
  (so it follows prompts only partly) and each detail phrase is named half of the time (so
  a Rand-removed prompt is still in its distribution). Constant lr after a warm-up and an EMA
  of the weights: the base of ``unet_steps=N`` is the training's snapshot at step N, and N
  was chosen as the first snapshot in the target regime on the dev prompts.
* **Pairs carry a preference and it is measured**: captions are long enough that removing
  40-70 % of the words removes detail as well as content; every pair set is scored by
  DigitEval before training (winner right, loser right, both ways, blanks, per category)
  and its margin is printed with the results.
* **The paper's regime, scaled**: one pass over the pairs in 100 steps (the paper: 100 steps
  of 2048 pairs; here 64 pairs per step, the CPU budget), a linear warm-up over the run as
  the paper, and the paper's lr rule (beta / 2.048e8 at 2048 pairs, SFT 1e-5) scaled
  linearly to 64 pairs and by the base's pre-training lr over SD-1.x's (1e-3 / 1e-4).
* **The same tuning budget for every method, on dev data only**: lr x {1/4, 1, 4} x two betas
  for each preference method (DSPO and DSPO+CPP: the outside beta 0.01 / 0.05; at the
  official 0.001 they are numerically SFT at the same lr), lr x {1/4, 1, 4} for SFT; dev
  prompts disjoint from the evaluation prompts, dev seeds; the rule: the highest dev accuracy
  whose blank share is at most the base's + 5 points. The guidance scale is chosen once, as
  the base's best on the dev prompts, and used for the pairs and every evaluation.
* **Controls**: D-DPO on pairs ranked by DigitEval (two samples of the same prompt, the
  right one wins: the known-good setting; the run is flagged invalid unless it beats the
  base on every seed), SFT on real scenes, and a test that a fine-tune at lr -> 0 samples
  exactly the base's images.
* **What "helps" means** is printed with the table (:data:`report.HELPS`).

The base is cached under ``OUT/cache/base-<config hash>``, DigitEval under
``OUT/cache/scorer-v3-<epochs>`` (arrays in ``scorer.npz`` and ``scorer.json``; nothing in
the cache is unpickled).
"""
