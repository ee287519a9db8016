"""Metrics of generated class-conditional samples against the ground-truth ring (float64).

* ``class_accuracy``: share of samples whose nearest GT mode is their own class.
* ``sw``: sliced 2-Wasserstein distance to a GT sample of the same class, mean over classes.
* ``neighbour_confusion``: share of samples whose nearest mode is a *neighbouring* class.
* ``overlap``: Bhattacharyya coefficient of Gaussians fitted to neighbouring classes'
  samples, mean over the K neighbour pairs (0 = disjoint, 1 = identical).
* ``separation``: distance of neighbouring fitted centres over their pooled RMS spread
  ``sqrt((tr S_a + tr S_b) / 2)``, mean over neighbour pairs.
* ``centre_shift``: ``|mean of class-c samples - mu_c|``, mean over classes;
  ``radial_shift``: signed ``|mean_c| - radius`` (> 0: away from the origin), mean over classes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .data import ToyConfig, class_labels, generator, gt_means, sample_gt

SUMMARY_KEYS = (
    "class_accuracy",
    "sw",
    "neighbour_confusion",
    "overlap",
    "separation",
    "centre_shift",
    "radial_shift",
)


def nearest_mode(x: Tensor, means: Tensor) -> Tensor:
    return torch.cdist(x.double(), means.double()).argmin(1)


def _directions(n_proj: int) -> Tensor:
    ang = math.pi * torch.arange(n_proj, dtype=torch.float64) / n_proj
    return torch.stack([ang.cos(), ang.sin()], 1)  # (P, 2)


def _sorted_projections(x: Tensor, n_proj: int) -> Tensor:
    """``x (..., n, 2)`` projected on the directions and sorted along ``n``: ``(..., n, P)``."""
    return (x.double() @ _directions(n_proj).T).sort(-2).values


def _sw(qa: Tensor, qb: Tensor) -> float:
    return float((qa - qb).pow(2).mean().sqrt())


def sliced_wasserstein(a: Tensor, b: Tensor, n_proj: int = 64, n_quantiles: int = 128) -> float:
    """SW2 between two 2D point sets on fixed, evenly spaced directions.

    Equal sizes: exact (sorted projections matched one to one); otherwise the two
    empirical quantile functions are compared on ``n_quantiles`` levels.
    """
    if len(a) == len(b):
        return _sw(_sorted_projections(a, n_proj), _sorted_projections(b, n_proj))
    dirs = _directions(n_proj)
    pa, pb = a.double() @ dirs.T, b.double() @ dirs.T  # (n, P)
    q = (torch.arange(n_quantiles, dtype=torch.float64) + 0.5) / n_quantiles
    return _sw(torch.quantile(pa, q, dim=0), torch.quantile(pb, q, dim=0))


def _gauss(x: Tensor) -> tuple[Tensor, Tensor]:
    mu = x.mean(0)
    d = x - mu
    cov = d.T @ d / max(len(x) - 1, 1) + 1e-9 * torch.eye(2, dtype=x.dtype)
    return mu, cov


def bhattacharyya(mu1: Tensor, s1: Tensor, mu2: Tensor, s2: Tensor) -> float:
    s = (s1 + s2) / 2
    d = (mu1 - mu2).unsqueeze(1)
    db = (d.T @ torch.linalg.solve(s, d)).squeeze() / 8 + 0.5 * torch.log(
        torch.det(s) / torch.sqrt(torch.det(s1) * torch.det(s2))
    )
    return float(torch.exp(-db))


def gt_eval_set(cfg: ToyConfig, n_per_class: int) -> tuple[Tensor, Tensor]:
    """A fixed GT sample (the same for every run) to measure distances against."""
    labels = class_labels(cfg, n_per_class)
    return sample_gt(
        cfg, labels, generator("gt-eval", n_per_class, *cfg.to_dict().values())
    ), labels


def compute_metrics(
    x: Tensor, labels: Tensor, cfg: ToyConfig, gt: tuple[Tensor, Tensor] | None = None
) -> dict:
    """All metrics of samples ``x (n, 2)`` generated with conditions ``labels (n,)``."""
    return compute_metrics_many(x.unsqueeze(0), labels, cfg, gt)[0]


def compute_metrics_many(
    xs: Tensor, labels: Tensor, cfg: ToyConfig, gt: tuple[Tensor, Tensor] | None = None
) -> list[dict]:
    """:func:`compute_metrics` of every run ``xs[r] (n, 2)`` (same labels), with the GT side
    of the sliced Wasserstein distance and the projections' sort done once for all runs
    (the same numbers as one call per run)."""
    K = cfg.num_classes
    xs = xs.double()
    if gt is None:
        gt = gt_eval_set(cfg, max(1, xs.shape[1] // K))
    gx, gl = gt[0].double(), gt[1]
    sw_per_class = []  # (R,) per class
    for c in range(K):
        xc, gc = xs[:, labels == c], gx[gl == c]
        if xc.shape[1] == len(gc):
            qa, qb = _sorted_projections(xc, 64), _sorted_projections(gc, 64)
            sw_per_class.append([_sw(qa[r], qb) for r in range(len(xs))])
        else:
            sw_per_class.append([sliced_wasserstein(xc[r], gc) for r in range(len(xs))])
    return [_metrics(x, labels, cfg, [sw[r] for sw in sw_per_class]) for r, x in enumerate(xs)]


def _metrics(x: Tensor, labels: Tensor, cfg: ToyConfig, per_sw: list[float]) -> dict:
    K, means = cfg.num_classes, gt_means(cfg).double()
    near = nearest_mode(x, means)
    per_acc, per_conf, per_shift, per_rad, fits = [], [], [], [], []
    for c in range(K):
        sel = labels == c
        xc, nc = x[sel], near[sel]
        per_acc.append(float((nc == c).double().mean()))
        nb = torch.tensor([(c - 1) % K, (c + 1) % K])
        per_conf.append(float(torch.isin(nc, nb).double().mean()))
        mu, cov = _gauss(xc)
        fits.append((mu, cov))
        per_shift.append(float((mu - means[c]).norm()))
        per_rad.append(float(mu.norm() - cfg.radius))
    overlap, sep = [], []
    pairs = [(c, (c + 1) % K) for c in range(K)] if K > 2 else [(0, 1)] if K == 2 else []
    for a, b in pairs:
        (ma, sa), (mb, sb) = fits[a], fits[b]
        overlap.append(bhattacharyya(ma, sa, mb, sb))
        sep.append(float((ma - mb).norm() / math.sqrt((torch.trace(sa) + torch.trace(sb)) / 2)))

    def mean(v: list[float]) -> float:
        return sum(v) / len(v) if v else float("nan")

    return {
        "class_accuracy": float((near == labels).double().mean()),
        "sw": mean(per_sw),
        "neighbour_confusion": float(
            torch.isin(near - labels, torch.tensor([1, -1, K - 1, 1 - K])).double().mean()
        ),
        "overlap": mean(overlap),
        "separation": mean(sep),
        "centre_shift": mean(per_shift),
        "radial_shift": mean(per_rad),
        "per_class": {
            "class_accuracy": per_acc,
            "neighbour_confusion": per_conf,
            "sw": per_sw,
            "centre_shift": per_shift,
            "radial_shift": per_rad,
        },
    }
