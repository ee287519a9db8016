"""The T2I library: backbones, pair data, the training step, config, distributed helpers,
reference, checkpoints and weights, prompts, scorers. It imports :mod:`minddspo` and never
a command (``bench/*.py``); the tiny test models (:mod:`bench.t2i.tiny`) are imported only
by tests and ``--tiny`` code paths."""
