"""bench/bench_step.py: the tiny step benchmark ends with the ddspo/dpo ratio; make_pairs'
sampling with batched vs unbatched CFG is timed side by side before it."""

import re

import pytest
import torch

from bench import bench_step
from minddspo.sampling import guided

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_step_tiny_prints_ratio_last(capsys):
    rc = bench_step.main(["--tiny", "--batch", "2", "--reps", "1", "--warmup", "0",
                          "--methods", "dpo,ddspo,sft", "--sampling-reps", "0"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert re.fullmatch(r"ratio ddspo/dpo: \d+\.\d+", lines[-1]), lines[-1]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:-1]}
    assert set(rows) == {"dpo", "ddspo", "sft"}
    # sft saves half the activations of the pairwise methods (winners only)
    assert float(rows["sft"][1]) < float(rows["dpo"][1]) == float(rows["ddspo"][1])


def test_bench_step_tiny_times_batched_and_unbatched_cfg_first(capsys):
    rc = bench_step.main(["--tiny", "--batch", "1", "--reps", "1", "--warmup", "0",
                          "--methods", "dpo,ddspo", "--sampling-reps", "1",
                          "--sampling-steps", "2"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert lines[0].startswith("# make_pairs") and "2 images per sampler call" in lines[0]
    rate = {ln.split()[0]: float(ln.split()[1]) for ln in lines[2:4]}
    assert set(rate) == {"batched", "unbatched"} and min(rate.values()) > 0
    m = re.fullmatch(r"ratio batched/unbatched: (\d+\.\d+) \(max \|x0_w .*\| = (\S+)\)", lines[4])
    assert m and float(m[2]) < 1e-4  # the same images either way
    assert lines[-1].startswith("ratio ddspo/dpo: ")


def test_unbatched_cfg_runs_two_forwards_and_matches_batched():
    calls = []

    def forward(x, t, c):  # a toy "network": conditioning shifts the output
        calls.append(x.shape[0])
        return x * 2 + c

    x, t = torch.randn(3, 4), torch.zeros(3)
    cond, uncond = torch.ones(3, 1), torch.zeros(3, 1)
    cat = lambda u, c: torch.cat([u, c])
    batched = guided(forward, cond, uncond, 7.5, cat)(x, t)
    assert calls == [6]
    unbatched = bench_step.guided_unbatched(forward, cond, uncond, 7.5, cat)(x, t)
    assert calls == [6, 3, 3]
    torch.testing.assert_close(unbatched, batched)
