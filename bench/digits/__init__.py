"""Digits: "Table 1 on a laptop", an end-to-end text-to-image preference benchmark.

Real data (scikit-learn's 1,797 handwritten 8 x 8 digits, shipped with the package), scenes
of up to four digits with template captions in GenEval's categories (single object, two
objects, counting, position), a tiny Stable Diffusion trained on them with 30 % wrong
captions (cached by its config), Rand-removal preference pairs, fine-tunes with ``sft``,
``dpo``, ``dspo``, ``dspo_cpp`` and ``ddspo``, held-out evaluation prompts, and an exact
scorer (DigitEval: a classifier of real digits reading each slot).

Run: ``python -m bench.digits --seeds 3 --out runs/digits`` (resumable; needs the optional
``scikit-learn`` dependency). The project's own commands (``bench/make_pairs.py``,
``bench/train_t2i.py``, ``bench/sample.py``) do the work as subprocesses.

The base model: VAE 300 steps; UNet + text encoder 1500 steps (batch 64, lr 1e-3, cosine)
then a warm restart of 1200 steps at lr 5e-4 (added after a sanity check of the base on
*training-pool* prompts with a dev seed showed it under-trained: 3 % right). The base is
cached under ``OUT/cache/base-<config hash>``, DigitEval under ``OUT/cache/scorer-v2-<epochs>``
(its arrays in ``scorer.npz`` and ``scorer.json``; nothing in the cache is unpickled).

Hyperparameters, fixed by rule before any evaluation seed was run (no search):

* every method keeps the trainer's paper defaults: beta 8000 (dpo; dspo's logit scale),
  16000 (ddspo; dspo_cpp's logit scale), DSPO's outside beta 0.001, no empty prompts;
* learning rate = the trainer's default (the paper's beta / 2.048e8; 1e-5 for sft) times
  base_lr / 1e-4, i.e. the paper's ratio of fine-tune lr to SD-1.x's pre-training lr 1e-4,
  carried over to this base model (pre-trained at 1e-3): dpo/dspo 3.9e-4,
  ddspo/dspo_cpp 7.8e-4, sft 1e-4;
* schedule as the paper: linear warmup over the whole run (the paper warms up for 100
  steps and trains 100), from lr / steps at the first step (``--warmup-from 1``, the
  setting the published numbers were made with), 64 steps of 16 pairs = two passes over 512 Rand-removal pairs;
* sampling: 10 DDIM steps (CPU budget) and CFG 7.5 (the SD-1.x setting) for both the pairs
  and the evaluation; seeds for pairs and samples are offset from the evaluation seed so
  that no two stages share noise.
"""
