"""`marginal` (seed paper, arXiv 2605.01214): the full price, before and after rollout, under the price controller.

Before rollout: price the next sample of every candidate, G(n) − G(n−1) against C(n) − C(n−1) (budget/pricing.py),
from its drift-faded posterior (posterior=thompson: at a pass rate drawn from it, which keeps unseen and long-unseen
prompts, whose posteriors are wide, from starving; `mean`: at its mean; `expected`: the gain and the chance of a
signal averaged over it, so a wide posterior is worth its expectation, not its luckiest draw among many), and hand
samples out greedily to the highest price per token until the step's limits (planner_limits) are spent or no price
is positive. Groups get min_group_size..max_group_size samples. With family_half_samples N0 a candidate's gain is
weighted by N0/(N0 + N_f), N_f its family's faded sample count (family_weight: a log utility per family).

After rollout: train on a trajectory when its price is positive. Zero-variance groups are zero_signal; a trajectory
whose price is not positive only because of staleness is dropped_stale, any other dropped_price; a group whose
admitted subset would carry no signal (< 2 members or equal rewards, as the trainer recomputes advantages over
admitted members) is dropped_price as a whole.

Controller (token_budget > 0): spend = rollout tokens + training tokens of the trained trajectories, then
κ-scale ← κ-scale·exp(rate·(spend/budget − 1)): the per-token price is the dual variable of the step's budget.
With pace=run the budget is the run's (token_budget tokens per step on average): the update's step size decays as
rate/√steps, so κ settles on one price for the whole run (equimarginal across steps: a step whose samples are worth
little buys few at that price), and the planner may spend what earlier steps left unspent (token_budget × steps −
spent so far) on top of its per-step cap. With discover_price, a plan that is empty at the current price lowers κ at
once to the price at which it spends the budget (clearing_scale). Priced reuse (reuse_buffer, budget/reuse.py) is
priced by the same rules; the Budget reserves its update tokens from the planner's cap.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from marginal_rl.budget import kernels
from marginal_rl.budget.config import BudgetConfig
from marginal_rl.budget.policies.base import (
    FamilyRows,
    Policy,
    PromptArrays,
    SampleLimits,
    TrajectoryArrays,
    family_counts,
    family_rows,
    family_weight,
    group_tables,
    make_plan,
    pool_prior,
    prior_strength,
    prompt_arrays,
    smallest_group,
)
from marginal_rl.budget.pricing import (
    EPS,
    PriceComponents,
    allocate_greedy,
    consistent_admission,
    controller_step,
    pilot_group_economics,
)
from marginal_rl.budget.records import (
    BUDGET,
    DROPPED_PRICE,
    DROPPED_STALE,
    PRICE,
    TRAINED,
    ZERO_SIGNAL,
    PromptPlan,
)
from marginal_rl.budget.state import BudgetState, fold_probe

POSTERIORS = ("thompson", "mean", "expected")
PROBE_REFRESH = ("weak", "every")
DISPERSION_SOURCES = ("groups", "probes")


@dataclass
class MarginalConfig(BudgetConfig):
    policy = "marginal"
    posterior: str = field(
        default="thompson", metadata={"help": f"how a prompt's pass-rate posterior enters its price before rollout: "
                                              f"{' | '.join(POSTERIORS)} (a draw from it: exploration; its mean; the "
                                              f"expectation of the group's gain and chance of a signal over it: "
                                              f"docs/budget.md, \"Exploration\")"},
    )
    pool_strength: float = field(
        default=0.0, metadata={"help": "pooled evidence: a prompt's prior is its task family's pass rate (from the "
                                       "family's other prompts) worth this many samples, instead of Beta(prior_alpha, "
                                       "prior_beta); 0 = off (docs/budget.md, \"Pooled evidence\")"},
    )
    pool_clusters: int = field(
        default=0, metadata={"help": "with pool_strength or family_half_samples: prompts without a task family (a "
                                     "dataset with no task.group_column) are grouped into at most this many clusters "
                                     "of their surface template, which then act as their families; 0 = off "
                                     "(docs/budget.md, \"Clusters\")"},
    )
    pool_probes: bool = field(
        default=False, metadata={"help": "with pool_strength and probe_strength: a family's pooled pass rate counts "
                                         "the likelihood probe's pass rates too (each worth probe_strength samples), "
                                         "not only the groups sampled, so a family the probe finds solved (or "
                                         "hopeless) stops being probed prompt by prompt (docs/budget.md, \"Pooled "
                                         "probes\")"},
    )
    pool_dispersion: bool = field(
        default=False, metadata={"help": "with pool_strength: empirical Bayes, each family's prior strength is "
                                         "estimated from how much its groups agree (the intra-class correlation of "
                                         "their rewards), pool_strength only the guess it starts from: a family "
                                         "whose prompts are each solved or not gets a weak prior, one whose prompts "
                                         "all sit near its rate a strong one (docs/budget.md, \"Family dispersion\")"},
    )
    dispersion_source: str = field(
        default="groups", metadata={"help": f"with pool_dispersion: where each family's spread is measured: "
                                            f"{' | '.join(DISPERSION_SOURCES)} (the agreement within the groups the "
                                            f"plan sampled, which its choice of prompts biases; the spread of the "
                                            f"likelihood probe's pass rates, which needs probe_strength) "
                                            f"(docs/budget.md, \"Family dispersion\")"},
    )
    family_half_samples: float = field(
        default=0.0, metadata={"help": "family balance: a sample of a family already sampled N_f times (faded by the "
                                       "drift) is worth N0/(N0 + N_f) of its gain before rollout, N0 this value (a log "
                                       "utility per task family: diminishing returns across a family's prompts); 0 = "
                                       "off (docs/budget.md, \"Family balance\")"},
    )
    prompt_half_samples: float = field(
        default=0.0, metadata={"help": "revisit balance: a sample of a prompt already sampled N_p times (faded by the "
                                       "drift) is worth N0/(N0 + N_p) of its gain before rollout, N0 this value (a "
                                       "log utility per prompt: diminishing returns across steps); 0 = off "
                                       "(docs/budget.md, \"Revisit balance\")"},
    )
    token_budget: int = field(
        default=0, metadata={"help": "tokens per step (rollout + training); > 0 makes the κ scale a dual variable "
                                     "that the controller adjusts, 0 = fixed prices"},
    )
    budget_slack: float = field(
        default=1.5, metadata={"help": "with token_budget: the planner never plans more than this multiple of the "
                                       "budget in one step"},
    )
    max_samples_per_step: int = field(
        default=0, metadata={"help": "with token_budget: the planner never plans more than this many samples in one "
                                     "step; 0 = budget_slack × prompts_per_step × group_size"},
    )
    pace: str = field(
        default="step", metadata={"help": "with token_budget: `step` (each step's spend is driven to token_budget) or "
                                          "`run` (token_budget is the run's average: one price for the run, step "
                                          "size rate/√t, a cheap step's tokens saved for later ones; docs/budget.md)"},
    )
    reuse_buffer: int = field(
        default=0, metadata={"help": "priced reuse: keep up to this many trajectories already trained on and train "
                                     "on them again while their price (gain depreciated at the drift measured on "
                                     "them, cost = update tokens only) stays positive; 0 = off (docs/budget.md, \"Priced reuse\")"},
    )
    probe_strength: float = field(
        default=0.0, metadata={"help": "likelihood probe: before sampling a candidate the plan wants whose evidence "
                                       "is worth less than half a probe, score the policy's probability of its "
                                       "reference answer (one forward pass, no decoding; its tokens are spent) and "
                                       "take it as a pass-rate estimate worth this many samples; 0 = off "
                                       "(docs/budget.md, \"The likelihood probe\")"},
    )
    probe_refresh: str = field(
        default="weak", metadata={"help": f"with probe_strength: which candidates the plan samples are probed: "
                                          f"{' | '.join(PROBE_REFRESH)} (those whose evidence is worth less than half "
                                          f"a probe; every one, every step: its posterior is the current policy's "
                                          f"probe, not one that lags the training; docs/budget.md)"},
    )
    probe_charge: bool = field(
        default=True, metadata={"help": "with probe_strength: false is a diagnostic, not a method: the probe's tokens "
                                        "neither come off the step's cap nor count in the controller's spend (the "
                                        "ledger still records them, use `probe`), to measure what the pass rates "
                                        "would buy if they were free; never for a comparison at matched compute"},
    )
    probe_rounds: int = field(
        default=4, metadata={"help": "with probe_strength: plan-probe-replan rounds per step (a probe can free "
                                     "samples for candidates that were not probed yet)"},
    )
    pilot_samples: int = field(
        default=0, metadata={"help": "pilot then commit: draw this many samples of each planned group first, then "
                                     "price the rest of every group on what its pilot showed (a mixed pilot "
                                     "already carries a signal; an all-pass or all-fail one makes more samples worth "
                                     "less) and hand out the step's remaining tokens again; 0 = off "
                                     "(docs/budget.md, \"Pilot then commit\")"},
    )
    discover_price: bool = field(
        default=False, metadata={"help": "with token_budget: a step whose plan is empty at the current price lowers "
                                         "κ at once to the price at which its plan spends token_budget (bisection), "
                                         "instead of wasting steps while the controller walks down (docs/budget.md)"},
    )
    controller_rate: float = field(
        default=0.3, metadata={"help": "with token_budget: step size of the multiplicative dual update κ ← "
                                       "κ·exp(rate·(spend/budget − 1))"},
    )
    kappa_scale_min: float = field(
        default=1e-3, metadata={"help": "with token_budget: lower bound of the controller's κ multiplier"}
    )
    kappa_scale_max: float = field(
        default=1e3, metadata={"help": "with token_budget: upper bound of the controller's κ multiplier"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.posterior not in POSTERIORS:
            raise ValueError(f"posterior: expected one of {list(POSTERIORS)}, got {self.posterior!r}")
        if self.max_samples_per_step < 0:
            raise ValueError(f"max_samples_per_step: expected an integer >= 0 (0 = budget_slack × samples per step), "
                             f"got {self.max_samples_per_step}")
        if not self.pool_strength >= 0:
            raise ValueError(f"pool_strength: expected a number >= 0 (0 = off), got {self.pool_strength}")
        if self.pool_clusters < 0:
            raise ValueError(f"pool_clusters: expected an integer >= 0 (clusters; 0 = off), got {self.pool_clusters}")
        if self.pool_clusters and not (self.pool_strength > 0 or self.family_half_samples > 0):
            raise ValueError("pool_clusters: the clusters stand in for task families, which only the pooled evidence "
                             "and family balance read; set budget.pool_strength or budget.family_half_samples > 0")
        if self.pool_dispersion and not self.pool_strength > 0:
            raise ValueError("pool_dispersion: estimates the strength of the family prior, which is off; set "
                             "budget.pool_strength > 0 (its guess)")
        if self.dispersion_source not in DISPERSION_SOURCES:
            raise ValueError(f"dispersion_source: expected one of {list(DISPERSION_SOURCES)}, got "
                             f"{self.dispersion_source!r}")
        if self.dispersion_source != "groups" and not self.pool_dispersion:
            raise ValueError("dispersion_source: read only with budget.pool_dispersion: true")
        if self.dispersion_source == "probes" and not self.probe_strength > 0:
            raise ValueError("dispersion_source: probes measures each family's spread from the likelihood probe's pass "
                             "rates, which is off; set budget.probe_strength > 0")
        if not self.family_half_samples >= 0:
            raise ValueError(f"family_half_samples: expected a number >= 0 (samples; 0 = off), got "
                             f"{self.family_half_samples}")
        if not self.prompt_half_samples >= 0:
            raise ValueError(f"prompt_half_samples: expected a number >= 0 (samples; 0 = off), got "
                             f"{self.prompt_half_samples}")
        if self.reuse_buffer < 0:
            raise ValueError(f"reuse_buffer: expected an integer >= 0 (trajectories; 0 = off), got {self.reuse_buffer}")
        if not self.probe_strength >= 0:
            raise ValueError(f"probe_strength: expected a number >= 0 (samples a probe is worth; 0 = off), got "
                             f"{self.probe_strength}")
        if self.probe_rounds < 1:
            raise ValueError(f"probe_rounds: expected an integer >= 1, got {self.probe_rounds}")
        if self.probe_refresh not in PROBE_REFRESH:
            raise ValueError(f"probe_refresh: expected one of {list(PROBE_REFRESH)}, got {self.probe_refresh!r}")
        if self.pool_probes and not (self.pool_strength > 0 and self.probe_strength > 0):
            raise ValueError("pool_probes: pools the likelihood probe's pass rates into the family prior; set both "
                             "budget.pool_strength > 0 and budget.probe_strength > 0")
        for key in ("probe_rounds", "probe_refresh", "probe_charge"):
            if self.probe_strength == 0 and getattr(self, key) != getattr(MarginalConfig, key):
                raise ValueError(f"{key}: read only with the likelihood probe on; set budget.probe_strength > 0")
        if self.pilot_samples < 0:
            raise ValueError(f"pilot_samples: expected an integer >= 0 (samples; 0 = off), got {self.pilot_samples}")
        if self.token_budget < 0:
            raise ValueError(f"token_budget: expected an integer >= 0 (0 = fixed prices), got {self.token_budget}")
        if not self.controller_rate >= 0:
            raise ValueError(f"controller_rate: expected a number >= 0, got {self.controller_rate}")
        if not self.kappa_scale_min > 0:
            raise ValueError(f"kappa_scale_min: expected a number > 0, got {self.kappa_scale_min}")
        if self.kappa_scale_max < self.kappa_scale_min:
            raise ValueError(f"kappa_scale_max: expected a number >= kappa_scale_min ({self.kappa_scale_min}), "
                             f"got {self.kappa_scale_max}")
        if self.pace not in ("step", "run"):
            raise ValueError(f"pace: expected 'step' or 'run', got {self.pace!r}")
        if self.discover_price and self.token_budget <= 0:
            raise ValueError("discover_price: true finds the price at which a plan spends token_budget; set "
                             "budget.token_budget")
        if self.pace == "run" and self.token_budget <= 0:
            raise ValueError("pace: run paces the run's spend at token_budget tokens per step; set budget.token_budget")
        if not self.budget_slack >= 1:
            raise ValueError(f"budget_slack: expected a number >= 1, got {self.budget_slack}")


def planner_limits(cfg: MarginalConfig, limits: SampleLimits, credit: float = 0.0) -> tuple[float, float]:
    """(max samples, max expected tokens) the planner may allocate in one step: samples_per_step under fixed prices;
    with a token budget, token_budget × budget_slack tokens (plus, with pace=run, the `credit` earlier steps left
    unspent; minus the update tokens the step's reuse has committed, limits.reserved_tokens) and max_samples_per_step
    samples (0: samples_per_step × budget_slack)."""
    if cfg.token_budget <= 0:
        return limits.samples_per_step, math.inf
    tokens = cfg.token_budget * cfg.budget_slack + (max(credit, 0.0) if cfg.pace == "run" else 0.0)
    return (cfg.max_samples_per_step or limits.samples_per_step * cfg.budget_slack,
            max(tokens - limits.reserved_tokens, 0.0))


def run_credit(cfg: MarginalConfig, state: BudgetState) -> float:
    """Tokens the run is under its pace (token_budget × steps so far − spent so far); negative when over."""
    return cfg.token_budget * state.step - state.spent_total


def plan_marginal(cfg: MarginalConfig, state: BudgetState, candidates: Sequence[str], step: int,
                  rng: np.random.Generator, limits: SampleLimits) -> PromptPlan:
    """The marginal policy's plan (module docstring): allocate_marginal's samples, priced."""
    return allocate_marginal(cfg, state, candidates, rng, limits)[1]()


def allocate_marginal(cfg: MarginalConfig, state: BudgetState, candidates: Sequence[str], rng: np.random.Generator,
                      limits: SampleLimits, arrays: PromptArrays | None = None, weight: np.ndarray | None = None,
                      ) -> tuple[np.ndarray, Callable[[], PromptPlan]]:
    """The marginal plan's samples per candidate (P,), and a function that prices them into the PromptPlan (the
    likelihood probe's rounds read only the samples of all but their last plan). `arrays`: the candidates'
    prompt_arrays, `weight`: their family_weight at family_half_samples, when the caller has them (the probe's
    replans recompute only what a probe moved)."""
    arrays = prompt_arrays(cfg, state, candidates, cfg.pool_strength) if arrays is None else arrays
    p_mean = arrays.mean
    p = rng.beta(arrays.alpha, arrays.beta) if cfg.posterior == "thompson" and len(candidates) else p_mean
    max_n = limits.max_group_size
    informative, gain, cost, tokens = group_tables(cfg, state, p, arrays, max_n + 1, expected=cfg.posterior == "expected")
    if cfg.family_half_samples > 0:  # the same weight for every group size: it scales G(n), not its shape in n
        if weight is None:
            weight = family_weight(cfg, state, candidates, cfg.family_half_samples)
        gain = gain * weight[:, None]
    if cfg.prompt_half_samples > 0:  # likewise per prompt: N0/(N0 + N_p), N_p its faded samples so far
        gain = gain * (cfg.prompt_half_samples / (cfg.prompt_half_samples + arrays.seen))[:, None]
    max_samples, max_tokens = planner_limits(cfg, limits, run_credit(cfg, state))

    rows = np.arange(len(candidates))

    def allocate(costs: np.ndarray) -> np.ndarray:
        return allocate_greedy(gain, costs, tokens, limits.min_group_size, max_n, max_samples=max_samples,
                               max_tokens=max_tokens)

    samples = allocate(cost)
    if cfg.discover_price and len(candidates) and not samples.any():
        unit = cost / state.kappa_scale  # the costs are linear in the κ multiplier; the gains do not depend on it
        scale = clearing_scale(lambda m: float(tokens[rows, allocate(unit * m)].sum()), cfg.token_budget,
                               cfg.kappa_scale_min, state.kappa_scale)
        state.kappa_scale, cost = scale, unit * scale  # price discovery: the controller goes on from here
        samples = allocate(cost)

    def plan() -> PromptPlan:
        at = smallest_group(samples, limits, max_n)
        # a skipped prompt: no group size it could enter with has a positive price, or the step's limits were spent
        priced = (gain[:, limits.min_group_size:] > cost[:, limits.min_group_size:]).any(axis=1)
        return make_plan(candidates, samples, p_mean, p, informative[rows, at], gain[rows, at], cost[rows, at],
                         tokens[rows, at], np.where(priced, BUDGET, PRICE))

    return samples, plan


Probe = Callable[[Sequence[str]], tuple[Sequence[float], Sequence[int]]]
"""The likelihood probe: prompt ids -> (each one's pass rate as the policy's probability of its reference answer,
the tokens each probe processed)."""


def _family_books(cfg: MarginalConfig, state: BudgetState, candidates: Sequence[str],
                  ) -> tuple[FamilyRows | None, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """The candidates' family_rows and their family_counts from state.families, read once for both the pooled prior
    (pool_strength) and the family weight (family_half_samples); (None, None) when neither is on."""
    if cfg.pool_strength <= 0 and cfg.family_half_samples <= 0:
        return None, None
    families = family_rows(state, candidates)
    return families, family_counts(cfg, state, families)


def plan_probing(cfg: MarginalConfig, state: BudgetState, candidates: Sequence[str], step: int,
                 rng: np.random.Generator, limits: SampleLimits, probe: Probe) -> tuple[PromptPlan, float]:
    """The likelihood probe's plan (probe_strength m > 0): plan, probe the candidates it samples whose own evidence
    is worth less than half a probe (< m/2 faded pseudo-counts: every unseen prompt; with probe_refresh=every, each
    one it samples, once a step), fold the probes in
    (fold_probe), plan again with their tokens taken off the step's cap; probe_rounds times at most. Returns the plan
    (with `probed` and `probe_tokens`) and the seconds spent inside `probe`. Between rounds only the probed
    candidates' own evidence changes (the probe touches nothing else), so only their rows are read again; the
    family prior (pool_strength), which with pool_probes the probes move, is laid over every row afresh from the
    families' counts, and the candidates' families are looked up once."""
    # the probes change neither the candidates' families nor the families' group counts: both are read once
    families, groups = _family_books(cfg, state, candidates)
    weight = (family_weight(cfg, state, families, cfg.family_half_samples, groups) if cfg.family_half_samples > 0
              else None)
    own = prompt_arrays(cfg, state, candidates)  # each prompt's own evidence, on the global prior
    # the families' prior strengths read the group books alone, which the probes leave as they are: read once too
    strength = prior_strength(cfg, state, families, cfg.pool_strength, groups) if cfg.pool_strength > 0 else None

    def pool(own: PromptArrays) -> PromptArrays:
        return (pool_prior(cfg, state, own, families, cfg.pool_strength, groups, strength) if cfg.pool_strength > 0
                else own)

    arrays = pool(own)
    samples, plan = allocate_marginal(cfg, state, candidates, rng, limits, arrays, weight)
    eligible = (arrays.evidence < cfg.probe_strength / 2 if cfg.probe_refresh == "weak"
                else np.ones(len(candidates), bool))  # which candidates may be probed, once a step
    probed, spent, probe_s = np.zeros(len(candidates), dtype=bool), 0, 0.0
    for _ in range(cfg.probe_rounds):
        ask = ((samples > 0) & eligible & ~probed).nonzero()[0]
        if not len(ask):
            break
        ids = [candidates[i] for i in ask]
        t0 = time.perf_counter()
        rates, tokens = probe(ids)
        probe_s += time.perf_counter() - t0
        fold_probe(cfg, state, ids, rates, state.version, cfg.probe_strength, step, pool=cfg.pool_probes)
        used = sum(tokens)  # the probes' token counts
        probed[ask], spent = True, spent + int(used)
        if cfg.probe_charge:
            limits = dataclasses.replace(limits, reserved_tokens=limits.reserved_tokens + float(used))
        # the probe replaced the probed prompts' own evidence, and nothing else of any prompt's; with pool_probes it
        # also moved their families' counts, which the pooling reads afresh for every row
        own = PromptArrays(*(a.copy() for a in own))
        for a, r in zip(own, prompt_arrays(cfg, state, ids), strict=True):
            a[ask] = r
        arrays = pool(own)
        samples, plan = allocate_marginal(cfg, state, candidates, rng, limits, arrays, weight)
    return dataclasses.replace(plan(), probed=probed, probe_tokens=spent), probe_s


def plan_top_up(cfg: MarginalConfig, state: BudgetState, plan: PromptPlan, pilot: np.ndarray, reward_sum: np.ndarray,
                flat: np.ndarray, rng: np.random.Generator, limits: SampleLimits, committed: float) -> PromptPlan:
    """Pilot then commit (pilot_samples > 0): `plan`'s groups have drawn their first `pilot` samples (P,), with
    rewards summing to `reward_sum` and all equal where `flat`. Each piloted group's posterior takes its pilot in
    (not the state's: settle folds the whole group once), the rest of the group is priced on it
    (pricing.pilot_group_economics: G and T of the whole group, given the pilot; C and T of the samples beyond it),
    and the step's limits, less the `committed` tokens (the pilots' rollout tokens, the probe's when charged) and the
    pilots' own samples, are handed out again, one sample at a time to the highest price per token. Returns the plan
    with the groups' final sizes (`pilot` recorded), priced at them; candidates without a pilot are left as they
    were."""
    rows = (pilot > 0).nonzero()[0]
    samples = np.asarray(plan.samples).copy()
    if not len(rows):
        return dataclasses.replace(plan, pilot=np.asarray(pilot, dtype=np.int64))
    ids = [plan.prompt_ids[i] for i in rows]
    families, groups = _family_books(cfg, state, ids)
    arrays = prompt_arrays(cfg, state, ids)
    if cfg.pool_strength > 0:
        arrays = pool_prior(cfg, state, arrays, families, cfg.pool_strength, groups)
    k, s = pilot[rows].astype(float), reward_sum[rows].astype(float)
    alpha, beta = arrays.alpha + s, arrays.beta + k - s
    if cfg.posterior == "thompson":
        p = rng.beta(alpha, beta)
        alpha, beta = p, 1.0 - p  # an exact p, as its mean
    exact = cfg.posterior != "expected"
    extra = np.arange(limits.max_group_size)[None, :]  # m = 0..max_n − 1 more samples (a pilot has at least one)
    informative, gain, cost, tokens = pilot_group_economics(
        alpha, beta, k, s, flat[rows], limits.max_group_size, arrays.tok_rollout, arrays.tok_verify, arrays.tok_update,
        value=cfg.value, n0=cfg.gain_half_samples, kappa_rollout=cfg.kappa_rollout, kappa_verify=cfg.kappa_verify,
        kappa_update=cfg.kappa_update, kappa_scale=state.kappa_scale, exact=exact)
    weight = np.ones(len(rows))
    if cfg.family_half_samples > 0:
        weight = weight * family_weight(cfg, state, families, cfg.family_half_samples, groups)
    if cfg.prompt_half_samples > 0:
        weight = weight * cfg.prompt_half_samples / (cfg.prompt_half_samples + arrays.seen)
    gain = gain * weight[:, None]
    # a group may not grow past max_group_size: those sizes are priced out
    gain = np.where(k[:, None] + extra > limits.max_group_size, -1e18, gain)
    max_samples, max_tokens = planner_limits(cfg, limits, run_credit(cfg, state))
    pilot_update = informative[:, 0] * k * arrays.tok_update  # the mixed pilots train: their update is committed
    more = allocate_greedy(gain - gain[:, :1], cost, tokens, 1, limits.max_group_size - 1,
                           max_samples=max_samples - k.sum(),
                           max_tokens=max(max_tokens - committed - float(pilot_update.sum()), 0.0))
    at = np.arange(len(rows))
    samples[rows] = pilot[rows] + more
    # the record prices each group whole, as an unpiloted one: the pilot's own tokens and cost included
    pilot_tokens = k * (arrays.tok_rollout + arrays.tok_verify) + pilot_update
    pilot_cost = state.kappa_scale * (cfg.kappa_rollout * k * arrays.tok_rollout + cfg.kappa_verify * k
                                      * arrays.tok_verify + cfg.kappa_update * pilot_update)
    fields = {name: np.asarray(getattr(plan, name), dtype=float).copy() for name in
              ("gain", "cost", "price", "informative", "tokens")}
    fields["gain"][rows] = gain[at, more]
    fields["cost"][rows] = pilot_cost + cost[at, more]
    fields["price"][rows] = fields["gain"][rows] - fields["cost"][rows]
    fields["informative"][rows] = informative[at, more]
    fields["tokens"][rows] = pilot_tokens + tokens[at, more]
    return dataclasses.replace(plan, samples=samples, pilot=np.asarray(pilot, dtype=np.int64), **fields)


def clearing_scale(planned: Callable[[float], float], budget: float, lo: float, hi: float, iters: int = 10) -> float:
    """The highest κ multiplier in [lo, hi] at which the plan's expected tokens `planned(m)` (falling in m) reach
    `budget`, or, when the plan's other limits keep it below the budget even at `lo`, reach what it plans at `lo`:
    bisection on log m (`iters` halvings: within ln(hi/lo)/2^iters in log m). `hi` when nothing is planned even at
    `lo`. What an empty plan's price jumps to."""
    target = min(budget, planned(lo))
    if target <= 0:
        return hi
    log_lo, log_hi = math.log(lo), math.log(hi)
    for _ in range(iters):
        mid = 0.5 * (log_lo + log_hi)
        log_lo, log_hi = (mid, log_hi) if planned(math.exp(mid)) >= target else (log_lo, mid)
    return math.exp(log_lo)


def fates_marginal(cfg: MarginalConfig, arrays: TrajectoryArrays, comp: PriceComponents) -> np.ndarray:
    """Trained when the price is positive and the group's admitted members still differ (consistent_admission);
    else dropped for the price, or for staleness when the price before depreciation was positive; a zero-variance
    group's are zero_signal. Compiled when numba is installed (kernels.marginal_fates): the same fates."""
    kernel = kernels.marginal_fates()
    if kernel is not None:
        plain = kernels.plain
        return kernel(plain(comp.price), plain(comp.gain_fresh), plain(comp.cost), plain(comp.risk_variance),
                      plain(arrays.reward), plain(arrays.group, np.int64), plain(comp.zero_var, np.bool_), EPS,
                      TRAINED, ZERO_SIGNAL, DROPPED_PRICE, DROPPED_STALE)
    fresh_price = comp.gain_fresh - comp.cost - comp.risk_variance
    admit = consistent_admission(comp.price > 0, arrays.reward, arrays.group)
    fates = np.where(fresh_price > 0, DROPPED_STALE, DROPPED_PRICE).astype(np.int8)
    fates[(comp.price > 0) & ~admit] = DROPPED_PRICE
    fates[admit] = TRAINED
    fates[comp.zero_var] = ZERO_SIGNAL
    return fates


def control_price(cfg: MarginalConfig, state: BudgetState) -> None:
    """The dual update after each step. pace=step: κ ← κ·exp(rate·(spend/budget − 1)), every step driven to the
    budget. pace=run: the same update with the step size rate/√steps (Robbins-Monro), so κ settles on one price for
    the run at which the expected step spends the budget, instead of answering each step's own spend."""
    if cfg.token_budget <= 0:
        return
    rate = cfg.controller_rate / math.sqrt(max(state.step, 1)) if cfg.pace == "run" else cfg.controller_rate
    state.kappa_scale = controller_step(state.kappa_scale, state.last_spend, cfg.token_budget, rate,
                                        cfg.kappa_scale_min, cfg.kappa_scale_max)


POLICY = Policy(MarginalConfig, plan=plan_marginal, fates=fates_marginal, chooses=True, control=control_price)
