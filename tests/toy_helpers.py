"""Tiny toy set-ups shared by the toy tests (kept out of conftest to stay local)."""

from __future__ import annotations

import torch

from toy2d.data import ToyConfig
from toy2d.model import MLPConfig, init_params
from toy2d.train import RefConfig, ScheduleConfig, ToySetup, cache_dir, cache_key

TINY = ToySetup(
    toy=ToyConfig(n_train_per_class=40),
    mlp=MLPConfig(hidden=16, temb=8, cemb=8, num_train_timesteps=20),
    schedule=ScheduleConfig(num_train_timesteps=20, beta_end=0.4),
    ref=RefConfig(steps=20, batch=32),
)


def fake_cached_reference(setup: ToySetup, seed: int) -> None:
    """Put a random-init 'reference' in the cache so CLI tests skip reference training."""
    from safetensors.torch import save_file

    p = init_params(setup.mlp, [torch.Generator().manual_seed(seed)])
    cache_dir().mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v[0].contiguous() for k, v in p.items()},
        str(cache_dir() / f"{cache_key(setup, seed)}.safetensors"),
    )


# Fast path vs autograd oracle. The two run different kernels (fused ``baddbmm`` vs ``bmm`` +
# add, hand-written vs autograd backward), so which float32 rounding each element gets
# depends on the CPU's vector width and the BLAS kernel it picks: bit-identical on one CPU
# (the AVX-512 machine the toy was tuned on), a few ulps apart on another. The tolerances are
# in float32 ulps of a tensor's largest magnitude; measured maxima at forced AVX2 and at
# ``default`` dispatch (no vector kernels, MKL at SSE4.2), with a 4x margin or more:
#   one forward / backward / reference training / sampling / pair generation: <= 3.6 ulps
#   a 7-step fine-tune of every method (Adam amplifies a gradient's last bit):  <= 14 ulps
F32_EPS = torch.finfo(torch.float32).eps
ONE_PASS_ULPS = 16
FINETUNE_ULPS = 64


def max_ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want|`` in float32 ulps of ``max |want|`` (integer tensors: 0 when
    equal, else infinite)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    if not want.is_floating_point():
        return 0.0 if torch.equal(got, want) else float("inf")
    scale = want.abs().max().double().item()
    diff = (got.double() - want.double()).abs().max().item()
    return diff / (scale * F32_EPS) if scale > 0 else (0.0 if diff == 0 else float("inf"))


def assert_close_f32(got, want, ulps: float) -> None:
    """Tensors, or dicts of tensors with the same keys, equal to within ``ulps`` float32 ulps
    of each tensor's largest magnitude (see :data:`ONE_PASS_ULPS`)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            d = max_ulps(got[k], want[k])
            assert d <= ulps, f"{k}: {d:.1f} ulps apart (tolerance {ulps})"
    else:
        d = max_ulps(got, want)
        assert d <= ulps, f"{d:.1f} ulps apart (tolerance {ulps})"


def printed_close(got: str, want: str, rtol: float = 1e-4) -> bool:
    """Two numbers as a CSV prints them (``%.6g``, ``%.4g``; ``;``- and ``:``-separated
    lists of them) agree to one unit of the last printed digit plus ``rtol``; integers
    (steps, counts) and text exactly. ``rtol``: a loss's logit is beta (up to 800) times a
    difference of squared errors, so an ulp there is ~1e-5 of the loss (measured 2.2e-5)."""
    from decimal import Decimal, InvalidOperation

    if got == want:
        return True
    a, b = got.replace(":", ";").split(";"), want.replace(":", ";").split(";")
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.lstrip("-").isdigit() and y.lstrip("-").isdigit():  # steps, counts: exact
            if x != y:
                return False
            continue
        try:
            dx, dy = Decimal(x), Decimal(y)
        except InvalidOperation:
            return False
        unit = max(10.0 ** dx.as_tuple().exponent, 10.0 ** dy.as_tuple().exponent)
        if abs(float(dx) - float(dy)) > unit + rtol * abs(float(dy)):
            return False
    return True
