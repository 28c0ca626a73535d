"""The benchmark's statistics, as pure functions: tokens to a target with censoring, paired ratios with a bootstrap
interval, and the area under eval reward against tokens (docs/benchmarks.md, "How the figures are computed").

    capped = censor([120_000, None, 80_000], budget=400_000)      # None: never reached -> the budget
    ratio, lo, hi = paired_ratio(base=[...], method=[...])          # geometric mean of base/method per seed, 95 % CI
    area = reward_auc(tokens=[0, 5e4, 1e5], rewards=[0.3, 0.35, 0.4], budget=1e5)   # mean eval reward over the budget
    first = tokens_to_gain(tokens=[0, 5e4, 1e5], rewards=[0.3, 0.35, 0.4], delta=0.05)  # 5e4: start + 0.05 reached
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def censor(tokens_to_target: Sequence[float | None], budget: float) -> np.ndarray:
    """Tokens to target with a run that never reached it counted as the whole budget: a lower bound on what it would
    have needed, so a ratio against it understates the gap to the side that did not get there."""
    return np.array([budget if t is None or not math.isfinite(t) else min(float(t), budget) for t in tokens_to_target])


def paired_ratio(base: Sequence[float], method: Sequence[float], *, n_boot: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """(geometric mean of base_i / method_i over the paired seeds i, and its percentile bootstrap interval at `level`,
    resampling seeds with replacement). > 1: `method` needed fewer tokens. Both sequences must be censored already."""
    b, m = np.asarray(base, dtype=float), np.asarray(method, dtype=float)
    if b.shape != m.shape or b.ndim != 1 or len(b) == 0:
        raise ValueError(f"paired_ratio: expected two equal-length 1-d sequences, got shapes {b.shape} and {m.shape}")
    if not ((b > 0).all() and (m > 0).all()):
        raise ValueError("paired_ratio: tokens must be > 0")
    logs = np.log(b / m)
    rng = np.random.default_rng(seed)
    boot = logs[rng.integers(0, len(logs), size=(n_boot, len(logs)))].mean(axis=1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(np.exp(logs.mean())), float(np.exp(lo)), float(np.exp(hi))


def censored_paired_ratio(base: Sequence[float | None], mine: Sequence[float | None],
                          budget: float) -> tuple[int, float, float, float]:
    """(seeds used, geometric mean of base / mine tokens to a target, its 95 % interval), both censored at the
    budget; a seed whose start is already at the target (0 tokens), or where neither run reached it, says nothing and
    is left out. NaN figures when no seed is left."""
    b, m = censor(base, budget), censor(mine, budget)
    informative = (b > 0) & (m > 0) & ((b < budget) | (m < budget))
    return (int(informative.sum()),
            *(paired_ratio(b[informative], m[informative]) if informative.any() else (math.nan,) * 3))


def mean_interval(values: Sequence[float], *, n_boot: int = 10_000, level: float = 0.95,
                  seed: int = 0) -> tuple[float, float, float]:
    """(mean, and its percentile bootstrap interval over resampled seeds)."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError("mean_interval: expected a non-empty 1-d sequence")
    boot = v[np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


def reward_auc(tokens: Sequence[float], rewards: Sequence[float], budget: float) -> float:
    """The mean eval reward over [0, budget] tokens: the area under the piecewise-linear curve through the eval
    points, divided by the budget. Threshold-free. Past the last eval point the curve holds its last value (a run
    stops at the first step past the budget, so its last eval is at or just past it)."""
    x, y = np.asarray(tokens, dtype=float), np.asarray(rewards, dtype=float)
    if len(x) == 0 or x.shape != y.shape or not budget > 0:
        raise ValueError("reward_auc: expected matching non-empty tokens and rewards and a budget > 0")
    if np.any(np.diff(x) < 0):
        raise ValueError("reward_auc: tokens must not decrease")
    grid_x = np.concatenate([x[x < budget], [budget]])
    grid_y = np.interp(grid_x, x, y)  # np.interp holds the end values outside [x0, xn]
    if grid_x[0] > 0:  # the first eval is at 0 tokens in every run; hold its value otherwise
        grid_x, grid_y = np.concatenate([[0.0], grid_x]), np.concatenate([[grid_y[0]], grid_y])
    return float(np.sum((grid_x[1:] - grid_x[:-1]) * (grid_y[1:] + grid_y[:-1]) / 2) / budget)


def tokens_to_gain(tokens: Sequence[float], rewards: Sequence[float], delta: float) -> float | None:
    """Tokens at the first eval whose reward reaches the first eval's (the run's start) + `delta`; None if none does.
    The relative target of the ledger (tokens_to_delta), for any delta after the run."""
    if len(tokens) == 0 or len(tokens) != len(rewards):
        raise ValueError("tokens_to_gain: expected matching non-empty tokens and rewards")
    level = rewards[0] + delta
    return next((float(t) for t, r in zip(tokens, rewards, strict=True) if r >= level), None)
