"""The likelihood probe (`budget.probe_strength`, docs/budget.md "The likelihood probe"), checked by hand: what it
computes (the sampling probability of the reference answer, exactly as sampling records it), how a probe becomes
evidence, which candidates the plan probes and that its tokens are spent, and the config errors."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from marginal_rl.budget import policies
from marginal_rl.budget.allocator import Budget, Update
from marginal_rl.budget.policies import SampleLimits, budget_config
from marginal_rl.budget.policies.base import prompt_arrays
from marginal_rl.budget.state import BudgetState, PromptStats, fold_evidence, fold_probe
from marginal_rl.rollout.build import build_task
from marginal_rl.rollout.errors import TaskError
from marginal_rl.rollout.generator import answer_likelihood, sample
from marginal_rl.rollout.types import Trajectory, TrajectoryColumns
from marginal_rl.train.config import ConfigError, load_config
from marginal_rl.train.loop import check_probe

LIMITS = SampleLimits(prompts_per_step=2, group_size=2, min_group_size=2, max_group_size=2)  # 4 samples a step


def tiny_lm(vocab: int = 5) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, eos_token_id=0,
                      pad_token_id=0, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def test_the_probe_is_the_probability_sampling_records_for_the_answer():
    model, tok = tiny_lm(), SimpleNamespace(eos_token_id=0, pad_token_id=0)
    prompt, answer = [1, 2, 3], [4, 2, 0]  # two answer tokens, then EOS
    for temperature in (1.0, 0.7):
        rate = answer_likelihood(model, [prompt], [answer], temperature)[0]
        torch.manual_seed(1)
        samples = sample(model, tok, [prompt] * 4000, max_new_tokens=len(answer), temperature=temperature)
        hits = [s for s in samples if s.completion_ids == answer]
        # exact: the log-probabilities sampling records for the answer sum to the probe's
        assert hits and math.isclose(sum(hits[0].logprobs), math.log(rate), abs_tol=1e-4)
        # and the sampled frequency agrees within 4 standard errors
        freq = len(hits) / len(samples)
        assert abs(freq - rate) < 4 * math.sqrt(rate * (1 - rate) / len(samples)), (temperature, freq, rate)


def test_the_probe_does_not_depend_on_what_is_batched_with_it():
    model = tiny_lm()
    prompts, answers = [[1, 2], [1, 3, 4, 2, 3], [2]], [[3, 0], [4, 4, 1, 0], [0]]
    together = answer_likelihood(model, prompts, answers, 1.0)
    alone = [answer_likelihood(model, [p], [a], 1.0)[0] for p, a in zip(prompts, answers, strict=True)]
    assert np.allclose(together, alone, rtol=1e-5)
    with pytest.raises(ValueError, match="temperature > 0"):
        answer_likelihood(model, prompts, answers, 0.0)


def test_a_probe_is_evidence_worth_its_strength_and_fades_like_any():
    cfg = budget_config("marginal", drift_prior=0.1, drift_scale=1.0)  # evidence fades by exp(−0.1·Δv)
    state = BudgetState(version=3, tok_rollout=12.0, tok_verify=0.0, tok_update=12.0)
    state.prompts["old"] = PromptStats(3.0, 2.0, version=0, groups=1, tok_rollout=20.0)  # 3 pseudo-counts, old
    fold_probe(cfg, state, ["old", "new"], [0.25, 1.5], version=3, strength=16, step=5)
    old, new = state.prompts["old"], state.prompts["new"]
    assert (old.alpha, old.beta, old.version) == (1 + 16 * 0.25, 1 + 16 * 0.75, 3)  # replaces the weaker evidence
    assert (new.alpha, new.beta, new.groups) == (17.0, 1.0, 0)  # a rate is clipped to [0, 1]
    assert new.tok_rollout == 12.0 and old.tok_rollout == 20.0  # an unseen prompt starts at the averages
    # weak = the faded evidence is worth less than half a probe (8 of 16): unseen, or 16·exp(−0.1·Δv) < 8 (Δv ≥ 7)
    state.prompts["aged"] = PromptStats(9.0, 9.0, version=3 - 7)
    state.prompts["recent"] = PromptStats(9.0, 9.0, version=3 - 6)
    evidence = prompt_arrays(cfg, state, ["old", "unseen", "aged", "recent"]).evidence
    assert (evidence < 16 / 2).tolist() == [False, True, True, False]
    # a probed prompt's first group sets its own token lengths (it was given the averages)
    t = [Trajectory(f"t{k}", "new", "g", 0, 3, [0] * 4, [0] * 3, [1] * 3, [0.0] * 3, float(k), "eos") for k in (0, 1)]
    fold_evidence(cfg, state, TrajectoryColumns.of(t), np.ones(2, bool), 5, 3, None, 1)
    assert state.prompts["new"].tok_rollout == 7.0 and state.prompts["new"].alpha == 18.0


class FakeProbe:
    """Pass rates by prompt id; every prompt costs `tokens` tokens to probe. Records each call."""

    def __init__(self, rates: dict[str, float], tokens: int = 5):
        self.rates, self.tokens, self.calls = rates, tokens, []

    def __call__(self, ids):
        self.calls.append(list(ids))
        return [self.rates[i] for i in ids], [self.tokens] * len(ids)


def test_the_plan_probes_the_candidates_it_wants_and_replans_without_the_solved_and_the_hopeless():
    # posterior means (posterior: mean), fixed prices: unseen prompts tie at p = 0.5 and fill the 4 samples in order.
    # A probe worth 64 samples at rate 0 or 1 reads Beta(1, 65): its group of 2 is priced negative.
    cfg = budget_config("marginal", posterior="mean", probe_strength=64)
    rates = {"solved": 1.0, "hopeless": 0.0, "half": 0.5, "third": 0.3, "spare": 0.5}
    probe, budget = FakeProbe(rates), Budget(cfg, LIMITS)
    plan = budget.plan(list(rates), 0, np.random.default_rng(0), probe)
    # round 2 samples the next two in order, round 3 the unseen `spare` (p = 0.5 before its probe) over `third`
    # (probed at 0.3): each round probes what the last one's probes freed
    assert probe.calls == [["solved", "hopeless"], ["half", "third"], ["spare"]]
    samples = dict(zip(plan.prompt_ids, plan.samples.tolist(), strict=True))
    assert samples == {"solved": 0, "hopeless": 0, "half": 2, "third": 0, "spare": 2}
    assert plan.probed.all() and plan.probe_tokens == 5 * 5
    assert plan.pass_rate[2] == pytest.approx((1 + 32) / 66)  # the probed posterior the plan priced
    # the probe's tokens are spent: the ledger's `probe` use, the total and the controller's spend
    group = [Trajectory(f"t{k}", "half", "g", 0, 0, [0] * 4, [0] * 3, [1] * 3, [0.0] * 3, float(k), "eos")
             for k in (0, 1)]
    budget.settle(plan, TrajectoryColumns.of(group), 0, 0, lambda prices, reuse: Update(1, None), group)
    led = budget.ledger
    assert led.by_use["probe"] == 25 and led.probed == 5 and led.total_tokens == 2 * 7 + 2 * 7 + 25
    assert budget.state.last_spend == 2 * 7 + 2 * 7 + 25
    assert led.metrics()["ledger/tokens_probe"] == 25 and led.summary()["prompts_probed"] == 5
    # probed evidence is strong now: the next plan probes nothing it already knows
    again = budget.plan(["half", "third"], 1, np.random.default_rng(1), probe)
    assert len(probe.calls) == 3 and not again.probed.any() and again.probe_tokens == 0


def test_probe_rounds_bound_the_replanning_and_the_probe_tokens_come_off_a_token_budget():
    rates = {"solved": 1.0, "hopeless": 0.0, "half": 0.5, "third": 0.3}
    one = FakeProbe(rates)
    Budget(budget_config("marginal", posterior="mean", probe_strength=64, probe_rounds=1), LIMITS).plan(
        list(rates), 0, np.random.default_rng(0), one)
    assert one.calls == [["solved", "hopeless"]]
    # under a token budget the planner's cap is token_budget × slack minus what the probe spent: the first plan fits
    # one group in 100 tokens (`solved`, 60 expected tokens), its probe costs 60, and no group fits in the 40 left
    cfg = budget_config("marginal", posterior="mean", probe_strength=64, token_budget=100, budget_slack=1.0)
    plan = Budget(cfg, LIMITS).plan(list(rates), 0, np.random.default_rng(0), FakeProbe(rates, tokens=60))
    assert plan.probed.tolist() == [True, False, False, False] and plan.probe_tokens == 60
    assert not plan.samples.any()
    with pytest.raises(ValueError, match="pass the trainer's likelihood probe"):
        Budget(cfg, LIMITS).plan(list(rates), 0, np.random.default_rng(0))


def test_with_probe_refresh_every_the_plan_probes_what_it_samples_again_each_step():
    # The policy moved after step 0: `half` is solved at step 1. Under `weak` its step-0 probe (64 pseudo-counts at
    # 0.5) is still strong evidence and the plan samples it again; under `every` it is probed again, reads
    # Beta(1 + 64·0.95, 1 + 64·0.05) and loses its samples to `third`, probed in the second round.
    plans = {}
    for refresh in ("weak", "every"):
        cfg = budget_config("marginal", posterior="mean", probe_strength=64, probe_refresh=refresh)
        probe, budget = FakeProbe({"half": 0.5, "third": 0.3}), Budget(cfg, dataclasses.replace(LIMITS, prompts_per_step=1))
        first = budget.plan(["half", "third"], 0, np.random.default_rng(0), probe)
        assert probe.calls == [["half"]] and first.samples.tolist() == [2, 0]
        probe.rates["half"] = 0.95
        plans[refresh] = budget.plan(["half", "third"], 1, np.random.default_rng(1), probe), probe.calls[1:]
    weak, every = plans["weak"], plans["every"]
    assert weak[1] == [] and weak[0].samples.tolist() == [2, 0]
    assert every[1] == [["half"], ["third"]] and every[0].samples.tolist() == [0, 2]
    assert every[0].pass_rate[0] == pytest.approx((1 + 64 * 0.95) / 66) and every[0].probe_tokens == 2 * 5


def test_an_uncharged_probe_leaves_the_cap_and_the_controller_alone_and_the_ledger_still_counts_it():
    # the diagnostic (probe_charge: false): the same plan as above under a token budget of 100, whose probe of 60
    # tokens no longer crowds out the group of 60 expected tokens; the controller's spend is the group's alone
    rates = {"solved": 1.0, "hopeless": 0.0, "half": 0.5, "third": 0.3}
    cfg = budget_config("marginal", posterior="mean", probe_strength=64, token_budget=100, budget_slack=1.0,
                        probe_charge=False)
    budget = Budget(cfg, LIMITS)
    plan = budget.plan(list(rates), 0, np.random.default_rng(0), FakeProbe(rates, tokens=60))
    # one group fits a round: `solved` is probed and dropped, then `hopeless`, then `half` is probed and kept
    assert plan.probed.tolist() == [True, True, True, False] and plan.probe_tokens == 180
    assert plan.samples.tolist() == [0, 0, 2, 0]
    group = [Trajectory(f"t{k}", "half", "g", 0, 0, [0] * 4, [0] * 3, [1] * 3, [0.0] * 3, float(k), "eos")
             for k in (0, 1)]
    budget.settle(plan, TrajectoryColumns.of(group), 0, 0, lambda prices, reuse: Update(1, None), group)
    assert budget.state.last_spend == 2 * 7 + 2 * 7 and budget.ledger.by_use["probe"] == 180
    assert budget.ledger.total_tokens == 2 * 7 + 2 * 7 + 180


def test_pooled_probes_by_hand():
    # pool_probes: a probe's 16 pseudo-counts at r = 0.75 (12 successes, 4 failures) go into its family's probe counts
    cfg = budget_config("marginal", posterior="mean", probe_strength=16, pool_strength=4, pool_probes=True,
                        drift_prior=0.1, drift_scale=1.0)
    family_of = {"a1": "f", "a2": "f", "b": "g"}
    state = BudgetState(family_of=family_of, tok_rollout=12.0, tok_verify=0.0, tok_update=12.0)
    fold_probe(cfg, state, ["a1"], [0.75], version=0, strength=16, step=0, pool=True)
    assert state.family_probes == {"f": [12.0, 4.0, 0]} and state.families == {}
    arrays = prompt_arrays(cfg, state, ["a1", "a2", "b"], cfg.pool_strength)
    # a2, unseen: the family's μ = (12 + 1)/(16 + 2), worth 4 samples; a1 leaves its own probe out (μ = 1/2) and
    # keeps its own evidence; b's family has no evidence: the global prior
    assert arrays.alpha.tolist() == pytest.approx([2 + 12, 4 * 13 / 18, 1])
    assert arrays.beta.tolist() == pytest.approx([2 + 4, 4 * 5 / 18, 1])
    # without pool_probes the same probe leaves the family's prior empty: a2 reads the global prior
    plain = budget_config("marginal", posterior="mean", probe_strength=16, pool_strength=4)
    assert prompt_arrays(plain, state, ["a2"], 4).alpha.tolist() == [1.0]
    # the counts fade with the drift like a group's: a probe two versions later keeps exp(−0.2) of the first
    fold_probe(cfg, state, ["a2"], [0.5], version=2, strength=16, step=1, pool=True)
    keep = math.exp(-0.2)
    assert state.family_probes["f"] == pytest.approx([12 * keep + 8, 4 * keep + 8, 2])
    restored = BudgetState.from_state_dict(json.loads(json.dumps(state.state_dict())))
    assert restored.family_probes == state.family_probes


def test_with_pooled_probes_a_solved_family_stops_being_probed_prompt_by_prompt():
    # Each step offers 4 new prompts of an `easy` family (probed at 0.97) and 4 of a `mid` one (0.5), interleaved;
    # 2 groups of 2 a step, posterior means. Without pool_probes every unseen prompt reads Beta(1, 1): each step the
    # plan takes easy, mid, probes both, drops the easy one, takes the next easy one, probes and drops it, then takes
    # a mid one (2 easy probes a step). With it the first easy probe puts the family's unseen prompts at
    # μ = (16·0.97 + 1)/(16 + 2) ≈ 0.92, worth 4 samples, and no easy prompt is probed again
    easy, mid = [f"easy{i}" for i in range(12)], [f"mid{i}" for i in range(12)]
    rates = {**dict.fromkeys(easy, 0.97), **dict.fromkeys(mid, 0.5)}
    family_of = {**dict.fromkeys(easy, "easy"), **dict.fromkeys(mid, "mid")}
    calls = {}
    for pool in (False, True):
        cfg = budget_config("marginal", posterior="mean", probe_strength=16, pool_strength=4, pool_probes=pool)
        budget, probe = Budget(cfg, LIMITS, families=family_of), FakeProbe(rates)
        for step in range(3):
            offered = [c for pair in zip(easy[4 * step:4 * step + 4], mid[4 * step:4 * step + 4], strict=True)
                       for c in pair]
            plan = budget.plan(offered, step, np.random.default_rng(step), probe)
            assert sorted(c for c, n in zip(plan.prompt_ids, plan.samples, strict=True) if n) == [
                f"mid{4 * step}", f"mid{4 * step + 1}"]  # both plans end on two mid prompts
        calls[pool] = probe.calls
    assert calls[False] == [["easy0", "mid0"], ["easy1"], ["mid1"], ["easy4", "mid4"], ["easy5"], ["mid5"],
                            ["easy8", "mid8"], ["easy9"], ["mid9"]]
    assert calls[True] == [["easy0", "mid0"], ["mid1"], ["mid4", "mid5"], ["mid8", "mid9"]]


def test_probe_keys_are_checked():
    with pytest.raises(ValueError, match="probe_strength: expected a number >= 0"):
        budget_config("marginal", probe_strength=-1)
    with pytest.raises(ValueError, match="probe_rounds: expected an integer >= 1"):
        budget_config("marginal", probe_rounds=0, probe_strength=16)
    with pytest.raises(ValueError, match="probe_rounds: read only with the likelihood probe on"):
        budget_config("marginal", probe_rounds=2)
    with pytest.raises(ValueError, match="probe_refresh: read only with the likelihood probe on"):
        budget_config("marginal", probe_refresh="every")
    with pytest.raises(ValueError, match="probe_charge: read only with the likelihood probe on"):
        budget_config("marginal", probe_charge=False)
    with pytest.raises(ValueError, match=r"probe_refresh: expected one of \['weak', 'every'\], got 'always'"):
        budget_config("marginal", probe_refresh="always", probe_strength=16)
    with pytest.raises(ConfigError, match="read only by budget.policy=marginal"):
        load_config([], ["budget.policy=none", "budget.probe_strength=16"])
    for keys in ({"pool_strength": 4}, {"probe_strength": 16}):
        with pytest.raises(ValueError, match="pool_probes: .*set both budget.pool_strength > 0 and budget.probe"):
            budget_config("marginal", pool_probes=True, **keys)


def test_the_probe_needs_a_one_turn_task_with_reference_answers_and_untruncated_sampling():
    strings = ["task.name=dataset", "task.dataset=examples/bench_strings/train.jsonl",
               "task.reward_funcs=[examples.rewards.exact_match]", "budget.policy=marginal", "budget.probe_strength=16"]
    cfg = load_config([], strings)
    with pytest.raises(ConfigError, match="2700 of 2700 training prompts have no reference answer.*task.answer_column"):
        check_probe(cfg, build_task(cfg.task, cfg.rollout))
    cfg = load_config([], strings + ["task.answer_column=answer"])
    task = build_task(cfg.task, cfg.rollout)
    assert check_probe(cfg, task)
    assert task.train[0].answer == "ccggkk"  # the row's `answer`, not its demonstration `completion` ("ccggkk.")
    with pytest.raises(TaskError, match="task.answer_column=.nope. needs a non-empty string"):
        bad = load_config([], strings + ["task.answer_column=nope"])
        build_task(bad.task, bad.rollout)
    cfg = load_config([], ["budget.policy=marginal", "budget.probe_strength=16", "rollout.top_p=0.9"])
    with pytest.raises(ConfigError, match="rollout.top_p=0.9 truncates it"):
        check_probe(cfg, build_task(cfg.task, cfg.rollout))
    cfg = load_config([], ["task.name=fix_test", "budget.policy=marginal", "budget.probe_strength=16"])
    with pytest.raises(ConfigError, match="runs multi-turn episodes"):
        check_probe(cfg, build_task(cfg.task, cfg.rollout))


@pytest.mark.parametrize("keys", [dict(pool_strength=4, pool_probes=True, family_half_samples=64),
                                  dict(pool_strength=4), dict(prompt_half_samples=8), dict()])
def test_the_probing_plan_is_the_plan_a_fresh_read_of_the_probed_state_gives(keys):
    # Between its rounds the probing plan re-reads only the probed prompts' own evidence and lays the family prior
    # over every row again; its last plan must be, field for field, the plan the state it leaves gives when read
    # afresh (every prompt's arrays from the state, at the step's cap less the probe's tokens)
    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(40)]
    family_of = {pid: f"f{i % 3}" for i, pid in enumerate(ids) if i % 5}  # every fifth prompt without a family
    rates = dict(zip(ids, rng.random(40).round(2).tolist(), strict=True))
    cfg = budget_config("marginal", posterior="expected", probe_strength=16, probe_refresh="every", **keys)
    limits = SampleLimits(prompts_per_step=4, group_size=4, min_group_size=2, max_group_size=8)
    budget = Budget(cfg, limits, families=family_of)
    for step in range(4):  # some evidence first: the plans read a mix of sampled, probed and unseen prompts
        offered = [ids[i] for i in rng.choice(40, size=24, replace=False)]
        probe = FakeProbe(rates)
        plan = budget.plan(offered, step, np.random.default_rng(step), probe)
        assert len(probe.calls) >= 1
        fresh = policies.plan_prompts(cfg, budget.state, offered, step, np.random.default_rng(step),
                                      dataclasses.replace(limits, reserved_tokens=plan.probe_tokens))
        for field in ("samples", "pass_rate", "gain", "cost", "price", "informative", "tokens", "reason_code"):
            assert np.array_equal(getattr(plan, field), getattr(fresh, field)), (step, field)
        trajs = [Trajectory(f"t{step}-{pid}-{k}", pid, f"g{step}-{pid}", step, step, [0] * 4, [0] * 3, [1] * 3,
                            [0.0] * 3, float(rng.random() < rates[pid]), "eos")
                 for pid, n in zip(plan.prompt_ids, plan.samples.tolist(), strict=True) for k in range(n)]
        budget.settle(plan, TrajectoryColumns.of(trajs), step, step, lambda prices, reuse, s=step: Update(s + 1, 0.01))
