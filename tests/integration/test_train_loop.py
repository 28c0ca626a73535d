"""The real loop for a few steps on a tiny model built from a config, on CPU, offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from marginal_rl.rollout.build import build_task
from marginal_rl.train.config import ConfigError, load_config
from marginal_rl.train.loop import train
from tests.conftest import tiny_overrides


def _run(tmp_path: Path, cache: str, extra: list[str]) -> tuple[dict, Path]:
    out = tmp_path / "run"
    cfg = load_config([], tiny_overrides(cache, str(out)) + extra)
    return train(cfg, build_task(cfg.task, cfg.rollout)), out


@pytest.mark.parametrize("policy", ["none", "zero_var"])
def test_grpo_steps_update_every_parameter_and_ledger_adds_up(tmp_path, policy_cache, policy):
    summary, out = _run(tmp_path, policy_cache, [f"budget.policy={policy}", "train.max_steps=3", "train.lr=1e-3"])

    # loss finite, steps recorded
    assert summary["steps"] == 3 and summary["world_size"] == 1 and summary["policy"] == policy
    assert math.isfinite(summary["final_eval_reward"])

    # every trainable parameter moved away from the starting policy
    start_dir = next(Path(policy_cache).glob("tiny-*"))
    start = AutoModelForCausalLM.from_pretrained(start_dir)
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    for (name, p0), (_, p1) in zip(start.named_parameters(), final.named_parameters(), strict=True):
        assert not torch.equal(p0, p1), f"{name} did not move"

    # the store loads with pandas and datasets, and its sums are the summary's token totals
    df = pd.read_parquet(out / "trajectories")
    ds = datasets.load_dataset("parquet", data_dir=str(out / "trajectories"), split="train")
    assert len(ds) == len(df) > 0
    required = {"traj_id", "prompt_id", "group_id", "step", "behavior_version", "reward", "advantage", "tokens_prompt",
                "tokens_completion", "gain", "cost", "risk", "price", "fate"}
    assert required <= set(df.columns)
    assert df.traj_id.is_unique
    assert summary["tokens"]["rollout"] == int(df.tokens_rollout.sum())
    assert summary["tokens"]["train"] == int(df.tokens_train.sum())
    assert summary["tokens"]["total"] == int(df.tokens_rollout.sum() + df.tokens_train.sum())
    assert json.loads((out / "summary.json").read_text())["tokens"] == summary["tokens"]
    assert (out / "config.yaml").is_file()

    if policy == "zero_var":  # no trained trajectory sits in a group whose rewards are all equal
        trained = df[df.fate == "trained"]
        assert (trained.groupby("group_id").reward.nunique() > 1).all()
        assert (df[df.fate == "zero_signal"].tokens_train == 0).all()


def test_step_with_nothing_to_train_is_skipped(tmp_path, policy_cache):
    # A reward that is always 0: every group has zero variance, zero_var filters all of them, no step has data.
    out = tmp_path / "run"
    cfg = load_config([], tiny_overrides(policy_cache, str(out)) + ["budget.policy=zero_var", "train.max_steps=2"])
    task = build_task(cfg.task, cfg.rollout)
    task.reward = lambda prompts, completions: [0.0] * len(completions)
    summary = train(cfg, task)
    df = pd.read_parquet(out / "trajectories")
    assert summary["steps"] == 2 and len(df) == 2 * 8 * 4
    assert set(df.fate) == {"zero_signal"}
    assert summary["tokens"]["train"] == 0 == int(df.tokens_train.sum())
    start = AutoModelForCausalLM.from_pretrained(next(Path(policy_cache).glob("tiny-*")))
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert all(torch.equal(a, b) for a, b in zip(start.parameters(), final.parameters(), strict=True))


def test_python_api_trains_a_dataset_task_with_a_callable_reward(tmp_path, policy_cache):
    import marginal_rl as mrl

    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "completion": str(a + b)} for a in range(8) for b in range(8)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    batches = []

    def exact(prompts, completions, answer, **columns):  # TRL's signature, given as a callable, not a dotted path
        batches.append(len(completions))
        return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]

    out = tmp_path / "run"
    cfg = mrl.load_config([], [f"output_dir={out}", f"model.cache_dir={policy_cache}/dataset", "model.hidden_size=32",
                               "model.warm_start_steps=20", "task.name=dataset", f"task.dataset={tmp_path / 'data.jsonl'}",
                               "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=4",
                               "rollout.eval_samples=1", "train.max_steps=2", "train.eval_every=0",
                               "log.report_to=none", "log.progress=false"])
    summary = mrl.fit(cfg, reward_funcs=[exact])
    assert summary["steps"] == 2 and math.isfinite(summary["final_eval_reward"])
    df = pd.read_parquet(out / "trajectories")
    # every completion was scored by the callable: 2 steps × 4 prompts × 2 samples, and two evals (start, end) of the
    # 6 held-out rows (10 % of 64), each sampled once and once greedily
    assert len(df) == 16 and sum(batches) == 16 + 2 * (6 + 6)
    assert set(df.reward) <= {0.0, 1.0}


def test_a_token_budget_ends_the_run_at_the_first_step_past_it_and_evals_follow_the_token_schedule(tmp_path,
                                                                                                    policy_cache):
    summary, out = _run(tmp_path, policy_cache, ["budget.policy=none", "train.max_steps=0", "train.max_tokens=3000",
                                                 "train.eval_every_tokens=1000"])
    totals = [m["ledger/tokens_total"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert totals[-1] >= 3000 > totals[-2]  # the first step past the budget is the last
    assert summary["steps"] == len(totals) and summary["max_tokens"] == 3000
    assert summary["tokens"]["total"] == totals[-1]
    evals = summary["eval_history"]
    # an eval at the start, after the first step past each multiple of 1000 tokens, and at the end
    crossings = [t for prev, t in zip([0, *totals], totals, strict=False) if t // 1000 > prev // 1000]
    assert [e["tokens"] for e in evals] == [0, *crossings]


def test_a_dataset_without_families_pools_by_clusters(tmp_path, policy_cache):
    # two templates and no family column: with budget.pool_clusters the budget pools them as two clusters (their
    # evidence sums under cluster-0 and cluster-1 in the saved state), and the run directory lists the clusters
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "completion": str(a + b)} for a in range(6) for b in range(6)]
    rows += [{"prompt": f"rev {w}=", "answer": w[::-1], "completion": w[::-1]} for w in ("abc", "bca", "cab", "acb", "bac", "cba", "xyz")]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "rev zyx=", "answer": "xyz"}))
    out = tmp_path / "run"
    common = [f"output_dir={out}", f"model.cache_dir={policy_cache}/dataset", "model.hidden_size=32",
              "model.warm_start_steps=20", "task.name=dataset", f"task.dataset={tmp_path / 'train.jsonl'}",
              f"task.eval_dataset={tmp_path / 'eval.jsonl'}", "task.reward_funcs=[examples.rewards.exact_match]",
              "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=4",
              "rollout.eval_samples=1", "train.max_steps=2", "train.save_every=2", "train.eval_every=0",
              "log.report_to=none", "log.progress=false", "budget.policy=marginal", "budget.pool_strength=4",
              "budget.pool_clusters=4"]
    # every row has an answer, so grouped by that column every prompt has a family: stopped before the model loads
    labelled = load_config([], [*common, "task.group_column=answer", f"output_dir={tmp_path / 'labelled'}"])
    with pytest.raises(ConfigError, match="nothing to cluster .*task.group_column: ''"):
        train(labelled, build_task(labelled.task, labelled.rollout))
    cfg = load_config([], common)
    assert train(cfg, build_task(cfg.task, cfg.rollout))["steps"] == 2
    assert json.loads((out / "budget_clusters.json").read_text()) == [
        {"cluster": "cluster-0", "prompts": 36, "first": "0+0="}, {"cluster": "cluster-1", "prompts": 7, "first": "rev abc="}]
    state = json.loads(next((out / "checkpoints").glob("*/state.json")).read_text())
    assert state["budget"]["families"] and set(state["budget"]["families"]) <= {"cluster-0", "cluster-1"}
