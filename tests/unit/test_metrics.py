"""The metrics logged under TRL's names: the names are TRL GRPOTrainer's own (its installed source), and the rollout
figures by hand."""

from __future__ import annotations

import inspect
import math
import re

import pytest

from marginal_rl.rollout.types import Trajectory, TrajectoryColumns
from marginal_rl.train.loop import TRL_METRIC_NAMES, trl_rollout_metrics

trl = pytest.importorskip("trl")


def test_names_are_trl_grpo_trainers():
    from trl.trainer import grpo_trainer

    source = inspect.getsource(grpo_trainer)
    logged = set(re.findall(r'_metrics\[mode\]\["([^"]+)"\]', source))
    logged |= {re.sub(r"\{reward_func_name\}", "<func>", n) for n in re.findall(r'_metrics\[mode\]\[f"([^"]+)"\]', source)}
    assert set(TRL_METRIC_NAMES) <= logged, set(TRL_METRIC_NAMES) - logged


def _traj(group: str, rewards: dict, n_completion: int, finish: str = "eos") -> Trajectory:
    return Trajectory(traj_id=f"{group}-{n_completion}", prompt_id=group, group_id=group, step=0, behavior_version=0,
                      prompt_ids=[1] * 3, completion_ids=[2] * n_completion, completion_mask=[1] * n_completion,
                      behavior_logprobs=[0.0] * n_completion, reward=sum(v for v in rewards.values() if v == v),
                      finish_reason=finish, rewards=rewards)


def test_rollout_metrics_by_hand():
    # group a: rewards 1, 0 (f: 1, 0; g: 0.5, NaN); group b: 1, 1 (flat). Lengths 2, 4, 6, 8; one cut at the limit.
    trajs = [_traj("a", {"f": 1.0, "g": 0.5}, 2), _traj("a", {"f": 0.0, "g": math.nan}, 4),
             _traj("b", {"f": 1.0, "g": 0.0}, 6, "length"), _traj("b", {"f": 1.0, "g": 0.0}, 8)]
    m = trl_rollout_metrics(trajs, TrajectoryColumns.of(trajs), tokens_seen=1234)
    # combined rewards 1.5, 0, 1, 1: mean .875, unbiased std √(((.625)² + (.875)² + 2·(.125)²)/3) = .62915
    assert m["reward"] == pytest.approx(0.875) and m["reward_std"] == pytest.approx(0.629153, abs=1e-6)
    assert m["rewards/f/mean"] == pytest.approx(0.75) and m["rewards/f/std"] == pytest.approx(0.5)
    # g: .5, 0, 0 (the NaN left out): mean 1/6, unbiased std √((1/9 + 1/36 + 1/36)/2) = √(1/12) = .288675
    assert m["rewards/g/mean"] == pytest.approx(1 / 6) and m["rewards/g/std"] == pytest.approx(0.288675, abs=1e-6)
    assert m["frac_reward_zero_std"] == 0.5  # group b's two trajectories
    assert (m["completions/mean_length"], m["completions/min_length"], m["completions/max_length"]) == (5, 2, 8)
    assert m["completions/clipped_ratio"] == 0.25 and m["num_tokens"] == 1234
