"""The TRL peer arm (`marginal-rl train-trl`): two GRPOTrainer steps on the tiny test policy, offline, on CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~25 s of TRL training and eval on 2 busy cores, plus the tiny policy build when run alone
def test_trl_peer_writes_a_summary_like_ours(tmp_path, policy_cache):
    out = tmp_path / "trl"
    from marginal_rl.cli import main

    assert main(["train-trl", *tiny_overrides(policy_cache, str(out)), "train.max_steps=2", "train.lr=1e-3"]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 1
    assert summary["policy"] == "trl_grpo" and summary["algo"] == "grpo"
    for key in ("initial_eval_reward", "final_eval_reward", "final_eval_reward_greedy", "best_eval_reward"):
        assert math.isfinite(summary[key]) and 0.0 <= summary[key] <= 1.0
    assert "target_reward" in summary and "tokens_to_target" in summary and summary["wall_seconds"] > 0

    tokens = summary["tokens"]
    assert tokens["total"] == tokens["rollout"] + tokens["train"] > 0
    assert tokens["train"] == tokens["rollout"]  # every sample trained once (num_iterations = 1)
    # our ledger counts the same prompt + completion tokens that TRL counts as generated
    assert tokens["rollout"] == summary["trl"]["num_input_tokens_seen"]

    # eval at the start and the end (eval_every = 0), with the tokens spent so far
    history = summary["eval_history"]
    assert [e["step"] for e in history] == [0, 2]
    assert history[0]["tokens"] == 0 and history[-1]["tokens"] == tokens["total"]
    assert all("eval/reward" in e and "eval/reward_greedy" in e for e in history)
    assert (out / "config.yaml").is_file() and (out / "final").is_dir()


def test_trl_peer_bad_config_exits_2(tmp_path):
    res = subprocess.run([sys.executable, "-m", "marginal_rl", "train-trl", f"output_dir={tmp_path}", "train.max_step=2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "train.max_steps" in res.stderr
