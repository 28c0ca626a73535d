"""What the budget remembers between steps, and how a step's evidence is folded into it. Plain data: saved and
restored with the checkpoint.

Posteriors: each group adds Σr pseudo-successes and Σ(1 − r) pseudo-failures (rewards clipped to [0, 1]: the exact
Beta update for 0/1 rewards, its mean-matching analogue for graded ones), after the prompt's old evidence has faded
by exp(−δ·Δv/drift_scale) for the Δv versions since it was gathered. The same counts are summed per task family
(pooled evidence, read by the marginal policy with `budget.pool_strength > 0`; docs/budget.md), and with
`budget.pool_dispersion` each group's passing pairs too (how much the family's prompts differ), or with
`budget.dispersion_source: probes` the likelihood probe's pass rates and their squares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from marginal_rl.budget.config import BudgetConfig
from marginal_rl.budget.pricing import fade_posterior
from marginal_rl.rollout.types import TrajectoryColumns

_INT64_MIN = int(np.iinfo(np.int64).min)  # (np.iinfo is slow to build: a step's budget reads it once)


@dataclass(slots=True)
class PromptStats:
    """What the budget knows about one prompt. alpha/beta: Beta pseudo-counts as of policy version `version`."""

    alpha: float
    beta: float
    version: int = 0
    last_step: int = -1
    groups: int = 0  # groups seen
    zero_var_streak: int = 0  # consecutive groups whose rewards were all equal
    tok_rollout: float = 0.0  # moving average per sample: prefill + decode + observation (verify excluded)
    tok_verify: float = 0.0  # ... verification tokens
    tok_update: float = 0.0  # ... training tokens if trained (prompt + completion, × epochs)
    seen: float = 0.0  # samples drawn of it, faded by the drift like its evidence, as of `version`


@dataclass
class BudgetState:
    """Everything the budget remembers between steps."""

    step: int = 0
    version: int = 0  # current policy version at the last fold
    drift: float | None = None  # EMA of measured per-version drift δ (nats/token); None = not measured yet
    reuse_drift: float | None = None  # ... measured on the reused trajectories trained on (priced reuse)
    kappa_scale: float = 1.0  # controller multiplier on every κ (the budget's dual variable); 1 under fixed prices
    last_spend: float = 0.0  # tokens spent in the last step (rollout + training), as the controller saw them
    spent_total: float = 0.0  # ... in every step so far (pace=run: the credit a step may spend)
    tok_rollout: float | None = None  # moving averages over all prompts, for unseen ones
    tok_verify: float | None = None
    tok_update: float | None = None
    prompts: dict[str, PromptStats] = field(default_factory=dict)
    # pooled evidence: family -> [successes, failures, version] summed over its prompts' groups (faded like a
    # prompt's), and the task's prompt -> family map (task data, set by the Budget, not saved)
    families: dict[str, list[float]] = field(default_factory=dict)
    # ... and the likelihood probe's pseudo-counts, the same way (budget.pool_probes)
    family_probes: dict[str, list[float]] = field(default_factory=dict)
    # ... and family -> [passing ordered pairs within a group, pairs, version] (budget.pool_dispersion: how much the
    # family's prompts differ, pricing.family_strength), faded the same way
    family_pairs: dict[str, list[float]] = field(default_factory=dict)
    # ... or, with budget.dispersion_source: probes, from the probe's pass rates r: family -> [Σ r, Σ (1 − r),
    # version] and family -> [Σ r², probes, version], faded the same way
    family_probe_rates: dict[str, list[float]] = field(default_factory=dict)
    family_probe_squares: dict[str, list[float]] = field(default_factory=dict)
    family_of: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"step": self.step, "version": self.version, "drift": self.drift, "reuse_drift": self.reuse_drift,
                "kappa_scale": self.kappa_scale,
                "last_spend": self.last_spend, "spent_total": self.spent_total, "tok_rollout": self.tok_rollout,
                "tok_verify": self.tok_verify, "tok_update": self.tok_update, "prompts": {k: asdict(v) for k, v in self.prompts.items()},
                "families": {k: list(v) for k, v in self.families.items()},
                "family_probes": {k: list(v) for k, v in self.family_probes.items()},
                "family_pairs": {k: list(v) for k, v in self.family_pairs.items()},
                "family_probe_rates": {k: list(v) for k, v in self.family_probe_rates.items()},
                "family_probe_squares": {k: list(v) for k, v in self.family_probe_squares.items()}, "extra": self.extra}

    @classmethod
    def from_state_dict(cls, d: dict) -> BudgetState:
        return cls(step=d["step"], version=d.get("version", 0), drift=d.get("drift"), reuse_drift=d.get("reuse_drift"),
                   kappa_scale=d.get("kappa_scale", 1.0), last_spend=d.get("last_spend", 0.0),
                   spent_total=d.get("spent_total", 0.0),
                   tok_rollout=d.get("tok_rollout"), tok_verify=d.get("tok_verify"), tok_update=d.get("tok_update"),
                   prompts={k: PromptStats(**v) for k, v in d.get("prompts", {}).items()},
                   families={k: list(v) for k, v in d.get("families", {}).items()},
                   family_probes={k: list(v) for k, v in d.get("family_probes", {}).items()},
                   family_pairs={k: list(v) for k, v in d.get("family_pairs", {}).items()},
                   family_probe_rates={k: list(v) for k, v in d.get("family_probe_rates", {}).items()},
                   family_probe_squares={k: list(v) for k, v in d.get("family_probe_squares", {}).items()},
                   extra=d.get("extra", {}))


def dispersion_source(cfg: BudgetConfig) -> str | None:
    """Where the families' spread is measured (budget.pool_dispersion): "groups", "probes", or None when off."""
    return getattr(cfg, "dispersion_source", "groups") if getattr(cfg, "pool_dispersion", False) else None


def current_drift(cfg: BudgetConfig, state: BudgetState) -> float:
    """δ: the measured drift EMA, or the configured prior until the trainer has measured one."""
    return cfg.drift_prior if state.drift is None else state.drift


def reuse_drift(cfg: BudgetConfig, state: BudgetState) -> float:
    """δ for the reuse buffer: the drift measured on reused trajectories, or the policy's drift until one is."""
    return current_drift(cfg, state) if state.reuse_drift is None else state.reuse_drift


def _ema(old: float | None, new: float, weight: float) -> float:
    return new if old is None else weight * old + (1.0 - weight) * new


def fold_reuse_drift(cfg: BudgetConfig, state: BudgetState, drift_kl: float | None) -> None:
    """The trainer's per-version KL(behaviour ‖ current) on the reused trajectories it trained on, into its EMA."""
    if drift_kl is not None and math.isfinite(drift_kl):
        state.reuse_drift = _ema(state.reuse_drift, max(float(drift_kl), 0.0), cfg.ema)


def unseen_lengths(cfg: BudgetConfig, state: BudgetState) -> tuple[float, float, float]:
    """Expected (rollout, verify, update) tokens per sample of a prompt never sampled: the averages over all prompts,
    or `prior_tokens` before anything has been seen."""
    return (cfg.prior_tokens if state.tok_rollout is None else state.tok_rollout,
            0.0 if state.tok_verify is None else state.tok_verify,
            cfg.prior_tokens if state.tok_update is None else state.tok_update)


def add_family_counts(book: dict[str, list[float]], family: str, successes: float, failures: float, version: int,
                      drift: float, drift_scale: float) -> None:
    """Add evidence gathered at `version` to a family's [successes, failures, version], its old counts faded to it."""
    fs = book.setdefault(family, [0.0, 0.0, version])
    keep = math.exp(-drift * max(version - fs[2], 0) / drift_scale)
    fs[0], fs[1], fs[2] = fs[0] * keep + successes, fs[1] * keep + failures, max(version, fs[2])


def fold_probe(cfg: BudgetConfig, state: BudgetState, prompt_ids: Sequence[str], rates: Sequence[float],
               version: int, strength: float, step: int, pool: bool = False) -> None:
    """The likelihood probe's pass rates (the policy at `version`), each as `strength` samples of evidence: the
    prompt's posterior becomes Beta(prior_alpha + m·r, prior_beta + m·(1 − r)) at that version. It replaces the
    prompt's own faded evidence, which was older (and, unless probe_refresh=every, weaker: PromptArrays.evidence);
    group evidence then adds to it and both fade with the drift as before. With `pool` (budget.pool_probes) the same
    pseudo-counts are added to the prompt's family's probe counts (state.family_probes), which the pooled prior reads
    next to its groups'. With budget.dispersion_source: probes each rate r and r² are added to its family's
    state.family_probe_rates ([r, 1 − r]) and state.family_probe_squares ([r², 1]), from which the family's spread is
    estimated (policies/base.py: prior_strength)."""
    moments = dispersion_source(cfg) == "probes"
    drift = current_drift(cfg, state)
    for pid, rate in zip(prompt_ids, rates, strict=True):
        r = min(max(float(rate), 0.0), 1.0)
        s = state.prompts.get(pid)
        if s is None:
            s = state.prompts[pid] = PromptStats(0.0, 0.0, version, step, 0, 0, *unseen_lengths(cfg, state))
        s.alpha, s.beta = cfg.prior_alpha + strength * r, cfg.prior_beta + strength * (1.0 - r)
        s.seen *= math.exp(-drift * max(version - s.version, 0) / cfg.drift_scale)  # to `version`
        s.version = max(version, s.version)
        family = state.family_of.get(pid) if pool or moments else None
        if family and pool:
            add_family_counts(state.family_probes, family, strength * r, strength * (1.0 - r), version, drift,
                              cfg.drift_scale)
        if family and moments:
            add_family_counts(state.family_probe_rates, family, r, 1.0 - r, version, drift, cfg.drift_scale)
            add_family_counts(state.family_probe_squares, family, r * r, 1.0, version, drift, cfg.drift_scale)


def fold_evidence(cfg: BudgetConfig, state: BudgetState, cols: TrajectoryColumns, trained: np.ndarray, step: int,
                  current_version: int, drift_kl: float | None, num_iterations: int, reuse_tokens: float = 0.0,
                  probe_tokens: float = 0.0) -> None:
    """Fold one step into `state`: the drift measurement, each group's rewards into its prompt's posterior, token
    lengths, and the step's spend (rollout tokens + training tokens of the `trained` (N,) trajectories + the update
    tokens of the reused ones, `reuse_tokens`; their evidence was folded in when they were sampled; + the likelihood
    probe's tokens, `probe_tokens`).

    `drift_kl` is the trainer's measurement of how far the policy moved per version (mean per-token KL between the
    behaviour and current policy on this step's samples, divided by the version gap); None when not measured."""
    if len(trained) != len(cols):
        raise ValueError(f"fold_evidence: {len(trained)} decisions for {len(cols)} trajectories")
    if drift_kl is not None and math.isfinite(drift_kl):
        state.drift = _ema(state.drift, max(float(drift_kl), 0.0), cfg.ema)
    drift = current_drift(cfg, state)
    # per group (G,), in first-seen order; bincount sums each group's members in order, as a Python sum would
    num_groups, group, lengths = cols.num_groups, cols.group, cols.tokens_rollout
    count = cols.group_size
    length_sum = np.bincount(group, weights=lengths, minlength=num_groups)
    verify_mean = np.bincount(group, weights=cols.tokens_verify, minlength=num_groups) / count
    clipped = cols.reward.clip(0.0, 1.0)
    successes = np.bincount(group, weights=clipped, minlength=num_groups)
    # pool_dispersion: each group's passing ordered pairs, s² − Σr² (s(s − 1) for 0/1 rewards), for family_pairs
    pairs = (successes * successes - np.bincount(group, weights=clipped * clipped, minlength=num_groups)).tolist() \
        if dispersion_source(cfg) == "groups" else None
    versions = np.full(num_groups, _INT64_MIN)
    np.maximum.at(versions, group, cols.behavior_version)
    per_group = zip(cols.group_prompt_ids, count.tolist(), successes.tolist(),
                    (length_sum / count - verify_mean).tolist(), verify_mean.tolist(),
                    (length_sum * num_iterations / count).tolist(), versions.tolist(), cols.group_flat.tolist(),
                    strict=True)
    w, prior_a, prior_b, prompts = cfg.ema, cfg.prior_alpha, cfg.prior_beta, state.prompts
    for g, (pid, n, succ, tok_r, tok_v, tok_u, version, flat) in enumerate(per_group):  # EMAs as _ema, written out
        s = prompts.get(pid)
        if s is None:
            s = prompts[pid] = PromptStats(prior_a, prior_b, version, step, 0, 0, tok_r, tok_v, tok_u)
        factor = math.exp(-drift * max(version - s.version, 0) / cfg.drift_scale)
        a, b = fade_posterior(s.alpha, s.beta, prior_a, prior_b, factor)
        s.alpha, s.beta, s.seen = a + succ, b + (n - succ), s.seen * factor + n
        s.version, s.last_step, s.groups = max(version, s.version), step, s.groups + 1
        s.zero_var_streak = s.zero_var_streak + 1 if flat else 0
        family = state.family_of.get(pid)
        if family:
            add_family_counts(state.families, family, succ, n - succ, version, drift, cfg.drift_scale)
            if pairs is not None:
                add_family_counts(state.family_pairs, family, pairs[g], n * (n - 1), version, drift, cfg.drift_scale)
        if s.groups > 1:
            s.tok_rollout = w * s.tok_rollout + (1.0 - w) * tok_r
            s.tok_verify = w * s.tok_verify + (1.0 - w) * tok_v
            s.tok_update = w * s.tok_update + (1.0 - w) * tok_u
        else:  # its first group (a prompt the likelihood probe met first was given the averages)
            s.tok_rollout, s.tok_verify, s.tok_update = tok_r, tok_v, tok_u
        if state.tok_rollout is None:
            state.tok_rollout, state.tok_verify, state.tok_update = tok_r, tok_v, tok_u
        else:
            state.tok_rollout = w * state.tok_rollout + (1.0 - w) * tok_r
            state.tok_verify = w * state.tok_verify + (1.0 - w) * tok_v
            state.tok_update = w * state.tok_update + (1.0 - w) * tok_u
    state.last_spend = float(lengths.sum() + lengths[trained].sum() * num_iterations + reuse_tokens
                             + probe_tokens)
    state.spent_total += state.last_spend
    state.version = max(state.version, current_version)
    state.step = step + 1
