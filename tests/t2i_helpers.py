"""Shared expectations of the T2I trainer tests."""

import math
from pathlib import Path

#: the logistic losses (dpo, ddspo) at step 1, where the policy equals the reference: s = 0
LOG2 = math.log(2.0)
#: how far from log 2 step 1 may land on any CPU. The policy and the reference run the same
#: weights in batches of different sizes, whose conv/matmul kernels round differently on some
#: CPUs (forced AVX2 here: predictions ~1e-10 apart); beta (up to 16000) scales that into the
#: logit s, and the loss is log 2 - s/2. A reference that is not the base is off by far more.
LOG2_TOL = 1e-4


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders)."""
    if not root.exists():
        return {}
    if root.is_file():
        return {".": root.read_bytes()}
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def one_line(capsys) -> str:
    """The one line a command wrote on stderr (fails on more or fewer)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def pairs_cache(tmp_path_factory, cache: dict | None = None):
    """``get(backbone)``: 8 demo pairs (two shards) built with that tiny backbone, once per
    ``cache`` (the trainer refuses a dataset whose info.json names another backbone)."""
    from bench.t2i.pairs import build_pairs
    from bench.t2i.prompts import DEMO_PROMPTS
    from bench.t2i.tiny import tiny_backbone

    cache = {} if cache is None else cache

    def get(backbone: str) -> Path:
        if backbone not in cache:
            out = tmp_path_factory.mktemp(f"pairs-{backbone}")
            build_pairs(tiny_backbone(backbone), DEMO_PROMPTS[:8], out, steps=2, shard_size=4,
                        progress=False)  # fmt: skip
            cache[backbone] = out
        return cache[backbone]

    return get
