"""The loop's features end to end on a tiny model: every budget policy, PPO, stale rollouts, numerical guards,
exact resume, and that every logged metric key is documented."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from marginal_rl.rollout.build import build_task
from marginal_rl.train import loop
from marginal_rl.train.config import load_config
from marginal_rl.train.logger import NoOpLogger
from marginal_rl.train.loop import TRL_METRIC_NAMES
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


class RecordingLogger(NoOpLogger):
    def __init__(self):
        self.keys: set[str] = set()

    def log(self, metrics, step):
        self.keys |= set(metrics)

    def log_histograms(self, values, step):
        self.keys |= set(values)


def _cfg(tmp_path: Path, cache: str, extra: list[str], name: str = "run"):
    return load_config([], tiny_overrides(cache, str(tmp_path / name)) + extra)


def _run(cfg):
    return loop.train(cfg, build_task(cfg.task, cfg.rollout))


def _documented_keys() -> str:
    return (ROOT / "docs" / "metrics.md").read_text()


def _recorded_run(tmp_path: Path, cache: str, extra: list[str], monkeypatch) -> tuple[Path, dict, set[str]]:
    """A run whose logged metric keys are recorded: its directory, its summary and the keys in docs/metrics.md's
    form that it logged without documenting them."""
    rec = RecordingLogger()
    monkeypatch.setattr(loop, "build_logger", lambda cfg, acc, out: rec)
    cfg = _cfg(tmp_path, cache, extra)
    summary, documented = _run(cfg), _documented_keys()
    return Path(cfg.output_dir), summary, {k for k in rec.keys if f"`{k}`" not in documented}


@pytest.mark.parametrize("policy", ["max_var", "prior", "marginal"])
def test_every_policy_runs_and_every_logged_key_is_documented(tmp_path, policy_cache, policy, monkeypatch):
    rec = RecordingLogger()
    monkeypatch.setattr(loop, "build_logger", lambda cfg, acc, out: rec)
    cfg = _cfg(tmp_path, policy_cache, [f"budget.policy={policy}", "train.max_steps=3", "train.eval_every=2"])
    summary = _run(cfg)
    df = pd.read_parquet(Path(cfg.output_dir) / "trajectories")
    assert summary["tokens"]["total"] == int(df.tokens_rollout.sum() + df.tokens_train.sum())
    if policy == "marginal":
        trained = df[df.fate == "trained"]
        assert (trained.price > 0).all()
        assert (trained.groupby("group_id").reward.nunique() > 1).all()
    prompts = pd.read_parquet(Path(cfg.output_dir) / "prompts")
    assert {"prompt_id", "samples", "pass_rate", "gain", "cost", "price", "fate", "reason"} <= set(prompts.columns)
    assert set(prompts.reason[prompts.samples == 0]) <= {"history", "pool_full", "price", "budget"}
    assert (prompts.reason[prompts.samples > 0] == "").all()
    assert (df["rewards/exact_match"] == df.reward).all()  # arith has one reward function
    # TRL's names for what both compute (kl only with a KL term)
    assert {n.replace("<func>", "exact_match") for n in TRL_METRIC_NAMES if n != "kl"} <= rec.keys
    doc = _documented_keys()
    for key in rec.keys:
        generic = re.sub(r"/(copy|add1|add21|add2|add3|mul2)$", "/<family>", key)
        generic = re.sub(r"/finish_(eos|length|submit|defer|turns)$", "/finish_<reason>", generic)
        generic = re.sub(r"^rewards/[^/]+/(mean|std)$", r"rewards/<func>/\1", generic)
        assert f"`{generic}`" in doc or f"`{key}`" in doc, f"{key} is logged but not documented in docs/metrics.md"


def test_ppo_trains_value_head(tmp_path, policy_cache):
    cfg = _cfg(tmp_path, policy_cache, ["algo.name=ppo", "budget.policy=none", "train.max_steps=2", "train.lr=1e-3"])
    summary = _run(cfg)
    assert summary["algo"] == "ppo" and math.isfinite(summary["final_eval_reward"])


def test_stale_rollouts_lag_and_are_corrected(tmp_path, policy_cache, monkeypatch):
    logged = []

    class Keep(NoOpLogger):
        def log(self, metrics, step):
            logged.append(metrics)

    monkeypatch.setattr(loop, "build_logger", lambda cfg, acc, out: Keep())
    cfg = _cfg(tmp_path, policy_cache, ["rollout.max_staleness=2", "budget.policy=none", "train.max_steps=6",
                                        "train.lr=1e-3", "algo.is_level=sequence"])
    _run(cfg)
    df = pd.read_parquet(Path(cfg.output_dir) / "trajectories")
    # versions advance one per step; a snapshot is used for up to 2 further versions, then refreshed
    lag = df.groupby("step").behavior_version.first()
    assert list(lag) == [0, 0, 0, 3, 3, 3]
    stale_kl = [m["train/behaviour_kl"] for m in logged if "train/behaviour_kl" in m]
    assert stale_kl[0] < 1e-5 < max(stale_kl)  # on-policy at first, then measurably off-policy


def test_priced_reuse_trains_again_ledgers_it_and_documents_its_keys(tmp_path, policy_cache, monkeypatch):
    out, summary, undocumented = _recorded_run(tmp_path, policy_cache, [
        "budget.policy=marginal", "budget.reuse_buffer=64", "train.max_steps=4", "budget.token_budget=1500",
        "budget.drift_scale=10"], monkeypatch)
    df, reuse = pd.read_parquet(out / "trajectories"), pd.read_parquet(out / "reuse")
    tokens = summary["tokens"]
    assert df.traj_id.is_unique and tokens["rollout"] == int(df.tokens_rollout.sum())  # sampled once, ledgered once
    assert tokens["reuse"] == int(reuse.tokens_reuse.sum()) > 0
    assert tokens["total"] == tokens["rollout"] + tokens["train"] + tokens["reuse"]
    assert summary["ledger"]["trajectories_reused"] == int((reuse.fate == "trained").sum())
    again = reuse[reuse.fate == "trained"]
    assert (again.price > 0).all() and (again.staleness >= 1).all() and again.uses.max() >= 2
    assert set(reuse.traj_id) <= set(df[df.fate == "trained"].traj_id)  # only what was trained on is reused
    # a trajectory's `uses` counts its first training and each reuse so far
    last = reuse[reuse.fate == "trained"].groupby("traj_id").uses.max()
    assert (last == 1 + reuse[reuse.fate == "trained"].groupby("traj_id").size()).all()
    assert {k for k in undocumented if "reuse" in k} == set()


def test_the_likelihood_probe_spends_its_tokens_and_the_prompt_store_records_it(tmp_path, policy_cache, monkeypatch):
    # enough rounds that every candidate the step-0 plan ends up sampling has been probed
    out, summary, undocumented = _recorded_run(tmp_path, policy_cache, [
        "budget.policy=marginal", "budget.probe_strength=16", "budget.probe_rounds=64", "budget.token_budget=600",
        "train.max_steps=3"], monkeypatch)
    prompts, tokens = pd.read_parquet(out / "prompts"), summary["tokens"]
    assert tokens["probe"] > 0 and tokens["total"] == tokens["rollout"] + tokens["train"] + tokens["probe"]
    assert summary["ledger"]["prompts_probed"] == int(prompts.probed.sum())
    first = prompts[prompts.step == 0]
    assert first[first.samples > 0].probed.all()  # at step 0 nothing is known: every prompt sampled was probed
    # a probe scores prompt + answer + EOS: the arith prompts' answers are a few tokens, their prompts ~6
    assert 4 <= tokens["probe"] / summary["ledger"]["prompts_probed"] <= 16
    assert {k for k in undocumented if "probe" in k} == set()


def test_pilot_then_commit_draws_each_group_in_two_parts_and_trains_it_as_one(tmp_path, policy_cache, monkeypatch):
    out, summary, undocumented = _recorded_run(tmp_path, policy_cache, [
        "budget.policy=marginal", "budget.pilot_samples=2", "budget.token_budget=600", "train.max_steps=4"],
        monkeypatch)
    prompts, df = pd.read_parquet(out / "prompts"), pd.read_parquet(out / "trajectories")
    sampled = prompts[prompts.samples > 0]
    assert (sampled.pilot == sampled.samples.clip(upper=2)).all()  # every group's pilot: its first 2 samples
    assert (sampled.samples > sampled.pilot).any()  # and some were grown after it
    assert ((prompts.samples == 0) == (prompts.pilot == 0)).all()
    # one group per prompt and step, of the size the plan records, each sample drawn and ledgered once
    groups = df.groupby(["step", "prompt_id"]).agg(n=("traj_id", "size"), ids=("group_id", "nunique"))
    assert (groups.ids == 1).all() and df.traj_id.is_unique
    assert groups.n.to_dict() == sampled.set_index(["step", "prompt_id"]).samples.to_dict()
    assert summary["tokens"]["rollout"] == int(df.tokens_rollout.sum())
    assert {k for k in undocumented if "pilot" in k} == set()


def test_nonfinite_rewards_stop_the_run_with_a_clear_error_and_keep_the_store(tmp_path, policy_cache):
    cfg = _cfg(tmp_path, policy_cache, ["budget.policy=none", "train.max_steps=10", "train.max_nonfinite=2"])
    task = build_task(cfg.task, cfg.rollout)
    task.reward = lambda prompts, completions: [float("nan")] * len(completions)
    with pytest.raises(FloatingPointError, match="2 non-finite losses or gradients in a row"):
        loop.train(cfg, task)
    assert len(list((Path(cfg.output_dir) / "trajectories").glob("step-*.parquet"))) == 2


@pytest.mark.parametrize("stale", [[], ["rollout.max_staleness=2"], ["budget.reuse_buffer=64", "budget.drift_scale=10"],
                                   ["budget.probe_strength=16", "budget.token_budget=600", "budget.pool_strength=4",
                                    "budget.pool_probes=true"], ["budget.pilot_samples=2", "budget.token_budget=600"]],
                         ids=["on_policy", "stale_rollouts", "priced_reuse", "likelihood_probe_pooled", "pilot"])
def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path, policy_cache, stale):
    # with max_staleness=2 the step-2 checkpoint falls while rollouts still sample from version 0: the lagging
    # snapshot must come back from the checkpoint, not be re-synced to version 2
    common = [*stale, "budget.policy=marginal", "train.max_steps=4", "train.save_every=2", "train.lr=1e-3"]
    full = _cfg(tmp_path, policy_cache, common, "full")
    _run(full)
    part = _cfg(tmp_path, policy_cache, common[:-1] + ["train.lr=1e-3", "train.max_steps=2"], "resumed")
    _run(part)
    resumed = _cfg(tmp_path, policy_cache, common + ["train.resume_from=latest"], "resumed")
    _run(resumed)
    a = pd.read_parquet(Path(full.output_dir) / "trajectories").drop(columns=["actions"])
    b = pd.read_parquet(Path(resumed.output_dir) / "trajectories").drop(columns=["actions"])
    pd.testing.assert_frame_equal(a, b)
    if "budget.reuse_buffer=64" in stale:  # the buffer came back from the checkpoint: the same reuse
        reuse = pd.read_parquet(Path(full.output_dir) / "reuse")
        assert (reuse.uses > 1).any() and (reuse.step >= 2).any()
        pd.testing.assert_frame_equal(reuse, pd.read_parquet(Path(resumed.output_dir) / "reuse"))
    if "budget.probe_strength=16" in stale:  # the probed posteriors and the family's probe counts came back: the
        # same probes after the resume
        probes = pd.read_parquet(Path(full.output_dir) / "prompts")
        assert probes[probes.step >= 2].probed.any()
        pd.testing.assert_frame_equal(probes, pd.read_parquet(Path(resumed.output_dir) / "prompts"))
    wa = load_file(Path(full.output_dir) / "final" / "model.safetensors")
    wb = load_file(Path(resumed.output_dir) / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_async_rollouts_run_ahead_deterministically_and_resume_exactly(tmp_path, policy_cache, monkeypatch):
    logged = []

    class Keep(NoOpLogger):
        def log(self, metrics, step):
            if "rollout/sampled_ahead" in metrics:
                logged.append((step, metrics["rollout/sampled_ahead"]))

    monkeypatch.setattr(loop, "build_logger", lambda cfg, acc, out: Keep())
    common = ["rollout.max_staleness=2", "rollout.async_rollout=true", "budget.policy=marginal", "train.max_steps=5",
              "train.save_every=3", "train.lr=1e-3"]
    _run(_cfg(tmp_path, policy_cache, common, "a"))
    # step 0 has nothing before it; step 3 follows a checkpoint, which nothing is started across
    assert logged == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 0.0), (5, 1.0)]
    df = pd.read_parquet(tmp_path / "a" / "trajectories")
    ahead = df[df.step.isin([1, 2, 4])]
    assert (ahead.groupby("step").behavior_version.first() < [1, 2, 4]).all()  # sampled before the step's update
    _run(_cfg(tmp_path, policy_cache, common, "b"))
    _run(_cfg(tmp_path, policy_cache, common + ["train.max_steps=3"], "c"))
    _run(_cfg(tmp_path, policy_cache, common + ["train.resume_from=latest"], "c"))
    for other in ("b", "c"):  # a second run, and a run resumed from step 3, reproduce the first exactly
        pd.testing.assert_frame_equal(df.drop(columns=["actions"]),
                                      pd.read_parquet(tmp_path / other / "trajectories").drop(columns=["actions"]))
        wa, wb = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("a", other))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_with_kl_to_the_adapter_free_reference(tmp_path, policy_cache):
    cfg = _cfg(tmp_path, policy_cache, ["model.lora_r=4", "algo.kl_coef=0.1", "budget.policy=none",
                                        "train.max_steps=2", "train.lr=1e-2"])
    summary = _run(cfg)
    assert math.isfinite(summary["final_eval_reward"])
    assert (Path(cfg.output_dir) / "final" / "adapter_model.safetensors").is_file()  # only the adapter is saved
