"""The benchmark statistics (marginal_rl.stats), checked on numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from marginal_rl.stats import censor, mean_interval, paired_ratio, reward_auc, tokens_to_gain


def test_censor_counts_a_run_that_never_got_there_as_the_whole_budget():
    assert censor([120.0, None, math.inf, 900.0], budget=500).tolist() == [120, 500, 500, 500]


def test_paired_ratio_is_the_geometric_mean_with_a_seed_bootstrap():
    # per-seed ratios 2 and 1: geometric mean sqrt(2); resampling two seeds gives means of the logs of 0, ln2/2 or
    # ln2 (probabilities 1/4, 1/2, 1/4), so the 95 % interval is [1, 2]
    ratio, lo, hi = paired_ratio([200, 100], [100, 100], n_boot=20_000)
    assert ratio == pytest.approx(math.sqrt(2))
    assert (lo, hi) == (pytest.approx(1.0), pytest.approx(2.0))
    same = paired_ratio([300, 300, 300], [100, 100, 100])
    assert same == pytest.approx((3.0, 3.0, 3.0))  # no spread, no interval
    assert paired_ratio([100, 400], [200, 100])[0] == pytest.approx(math.sqrt(0.5 * 4))
    with pytest.raises(ValueError, match="equal-length"):
        paired_ratio([1, 2], [1])
    with pytest.raises(ValueError, match="> 0"):
        paired_ratio([0, 2], [1, 1])


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    values = np.array([0.1, 0.2, 0.3, 0.4])
    mean, lo, hi = mean_interval(values)
    assert mean == pytest.approx(0.25) and lo < 0.25 < hi and 0.1 <= lo and hi <= 0.4
    assert mean_interval(values) == (mean, lo, hi)  # the same resamples every time


def test_reward_auc_by_hand():
    tokens, rewards = [0, 50, 100], [0.3, 0.35, 0.4]
    # trapezoids: 50·0.325 + 50·0.375 = 35 over 100 tokens
    assert reward_auc(tokens, rewards, budget=100) == pytest.approx(0.35)
    # cut at 75: the curve is 0.375 there; 16.25 + 25·0.3625 = 25.3125 over 75
    assert reward_auc(tokens, rewards, budget=75) == pytest.approx(25.3125 / 75)
    # past the last eval the curve holds 0.4: (35 + 100·0.4) / 200
    assert reward_auc(tokens, rewards, budget=200) == pytest.approx(0.375)
    with pytest.raises(ValueError, match="must not decrease"):
        reward_auc([0, 50, 40], rewards, budget=100)


def test_tokens_to_gain_is_the_first_eval_at_the_start_plus_delta():
    tokens, rewards = [0, 100, 200, 300], [0.30, 0.36, 0.33, 0.41]
    assert tokens_to_gain(tokens, rewards, 0.05) == 100  # 0.36 >= 0.35; a later dip does not matter
    assert tokens_to_gain(tokens, rewards, 0.1) == 300
    assert tokens_to_gain(tokens, rewards, 0.2) is None
    assert tokens_to_gain(tokens, rewards, 0.0) == 0  # the start itself
    with pytest.raises(ValueError, match="matching non-empty"):
        tokens_to_gain([0, 1], [0.3], 0.05)
