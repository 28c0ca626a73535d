"""What every allocation policy is made of, and the pricing they share.

A policy is one record (Policy): its config class (the keys it reads), how it plans before rollout, how it sets
each trajectory's fate after it, whether it chooses among a larger candidate pool, and an optional controller run
after each step's evidence. Every policy records the same price components, so arms can be compared; only the rules
differ. Everything here is pure: columns and numbers in, columns out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import NamedTuple

import numpy as np

from marginal_rl.budget import kernels
from marginal_rl.budget.config import BudgetConfig
from marginal_rl.budget.pricing import (
    DISPERSION_GUESS_PROBES,
    PriceComponents,
    depreciation,
    fade_posterior,
    family_strength,
    group_economics,
    price_arrays,
    risk_factor,
)
from marginal_rl.budget.records import POOL_FULL, SAMPLED, PromptPlan
from marginal_rl.budget.state import BudgetState, current_drift, dispersion_source, unseen_lengths
from marginal_rl.rollout.types import TrajectoryColumns


@dataclass(frozen=True)
class SampleLimits:
    """What one step may spend on rollouts, from the rollout config."""

    prompts_per_step: int  # prompts a uniform policy samples
    group_size: int  # samples per prompt for a uniform policy
    min_group_size: int  # a priced policy gives an admitted prompt at least this many samples...
    max_group_size: int  # ...and at most this many
    reserved_tokens: float = 0.0  # tokens the step has committed before sampling (priced reuse's update tokens)

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


# ------------------------------------------------------------------------------------------------ before rollout


class PromptArrays(NamedTuple):
    """Per candidate prompt, (P,) each: the drift-faded posterior, expected tokens per sample by use, and the number
    of zero-variance groups in a row."""

    alpha: np.ndarray
    beta: np.ndarray
    tok_rollout: np.ndarray
    tok_verify: np.ndarray
    tok_update: np.ndarray
    streak: np.ndarray
    evidence: np.ndarray  # the prompt's own pseudo-counts above the prior, faded (pooling not included)
    seen: np.ndarray  # samples drawn of the prompt, faded like its evidence (a probe's pseudo-counts not included)

    @property
    def mean(self) -> np.ndarray:
        """(P,) posterior mean pass rate."""
        return self.alpha / (self.alpha + self.beta)


_STATS = attrgetter("alpha", "beta", "version", "zero_var_streak", "tok_rollout", "tok_verify", "tok_update", "seen")


def prompt_arrays(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str],
                  pool_strength: float = 0.0, families: FamilyRows | None = None) -> PromptArrays:
    """What the budget knows about each candidate, its evidence faded to the current version. With `pool_strength`
    m > 0 a prompt's prior is its family's (pool_prior) instead of Beta(prior_alpha, prior_beta). `families`: the
    candidates' family_rows, when the caller has them."""
    num = len(candidates)
    # an unseen prompt reads as the prior, gathered at the current version (so nothing fades), with the average lengths
    unseen = (cfg.prior_alpha, cfg.prior_beta, state.version, 0, *unseen_lengths(cfg, state), 0.0)
    rows = [unseen if s is None else _STATS(s) for s in map(state.prompts.get, candidates)]
    # (8, P), a contiguous row each (what the kernels read without a copy)
    table = np.ascontiguousarray(np.fromiter(chain.from_iterable(rows), dtype=float, count=8 * num).reshape(num, 8).T)
    alpha, beta, version, streak, tr, tv, tu, seen = table
    factor = np.exp(-current_drift(cfg, state) * np.maximum(state.version - version, 0) / cfg.drift_scale)
    alpha, beta = fade_posterior(alpha, beta, cfg.prior_alpha, cfg.prior_beta, factor)
    evidence = alpha + beta - cfg.prior_alpha - cfg.prior_beta
    arrays = PromptArrays(alpha, beta, tr, tv, tu, streak, evidence, seen * factor)
    if pool_strength > 0:
        arrays = pool_prior(cfg, state, arrays, family_rows(state, candidates) if families is None else families,
                            pool_strength)
    return arrays


def prior_strength(cfg: BudgetConfig, state: BudgetState, families: FamilyRows, m: float,
                   groups: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(P,) the strength of each candidate's family prior: m, or with budget.pool_dispersion its family's own
    (pricing.family_strength, m the guess), estimated from how much its groups agree (dispersion_source: groups) or
    from the spread of its likelihood probes' pass rates (probes). `groups`: the candidates' family_counts from
    state.families, when the caller has them."""
    source = dispersion_source(cfg)
    if source is None:
        return np.full(len(families.index), float(m))
    if source == "probes":
        _, rate_s, rate_f = family_counts(cfg, state, families, state.family_probe_rates)
        _, squares, probes = family_counts(cfg, state, families, state.family_probe_squares)
        return family_strength(rate_s, rate_f, squares, probes, m, DISPERSION_GUESS_PROBES)
    _, fam_s, fam_f = family_counts(cfg, state, families) if groups is None else groups
    _, pair_s, pairs = family_counts(cfg, state, families, state.family_pairs)
    return family_strength(fam_s, fam_f, pair_s, pairs, m)  # from the groups' counts alone (no probe gives pairs)


def pool_prior(cfg: BudgetConfig, state: BudgetState, arrays: PromptArrays, families: FamilyRows, m: float,
               groups: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
               strength: np.ndarray | None = None) -> PromptArrays:
    """`arrays` (each prompt's own evidence on the global prior, as prompt_arrays gives them with pool_strength 0)
    with each candidate's prior Beta(prior_alpha, prior_beta) replaced by its family's, Beta(m·μ, m·(1 − μ)),
    keeping its own (faded) evidence. μ is the family's pass rate from the evidence of its other prompts (leave-one-out:
    the family's faded counts minus this prompt's own), shrunk to the global prior:
    μ = (S − s + prior_alpha) / (S − s + F − f + prior_alpha + prior_beta). A prompt without a family keeps the
    global prior. So a family that is never (or always) solved prices its unseen prompts out before each is tried.
    With budget.pool_probes the family's counts include its likelihood probes' (state.family_probes); a prompt's own
    evidence includes its probe, so leave-one-out takes that out too. With budget.pool_dispersion the strength is each
    family's own (prior_strength), in place of m. `families`: the candidates' family_rows; `groups`: their
    family_counts from state.families, and `strength` their prior_strength, when the caller has them."""
    alpha, beta = arrays.alpha, arrays.beta
    pooled, fam_s, fam_f = family_counts(cfg, state, families) if groups is None else groups
    with_probes = getattr(cfg, "pool_probes", False)
    # the families' probe counts (pool_probes; without it the group counts stand in, unread)
    probes = family_counts(cfg, state, families, state.family_probes) if with_probes else (pooled, fam_s, fam_f)
    if strength is None:
        strength = prior_strength(cfg, state, families, m, (pooled, fam_s, fam_f))
    kernel = kernels.pool_prior()
    if kernel is not None:  # the same arithmetic compiled (budget/kernels.py), bit for bit
        plain = kernels.plain
        alpha, beta = kernel(plain(alpha), plain(beta), plain(pooled, np.bool_), plain(fam_s), plain(fam_f),
                             plain(probes[0], np.bool_), plain(probes[1]), plain(probes[2]), with_probes, strength,
                             float(cfg.prior_alpha), float(cfg.prior_beta))
        return arrays._replace(alpha=alpha, beta=beta)
    own_s, own_f = alpha - cfg.prior_alpha, beta - cfg.prior_beta
    if with_probes:
        probed, probe_s, probe_f = probes
        pooled, fam_s, fam_f = pooled | probed, fam_s + probe_s, fam_f + probe_f
    others_s, others_f = np.maximum(fam_s - own_s, 0.0), np.maximum(fam_f - own_f, 0.0)
    mu = (others_s + cfg.prior_alpha) / (others_s + others_f + cfg.prior_alpha + cfg.prior_beta)
    return arrays._replace(alpha=np.where(pooled, strength * mu + own_s, alpha),
                           beta=np.where(pooled, strength * (1 - mu) + own_f, beta))


class FamilyRows(NamedTuple):
    """The candidates' families once, for the family books' lookups: the distinct families among them and each
    candidate's index into that list (−1: no family). A step's plan reads the books several times (every probe
    round), its candidates once."""

    names: list[str]
    index: np.ndarray  # (P,) int64; len(names): no family


def family_rows(state: BudgetState, candidates: Sequence[str]) -> FamilyRows:
    positions: dict[str, int] = {}
    index = [positions.setdefault(f, len(positions)) if (f := state.family_of.get(pid)) else -1 for pid in candidates]
    index = np.array(index, dtype=np.int64)
    return FamilyRows(list(positions), np.where(index >= 0, index, len(positions)))


def family_counts(cfg: BudgetConfig, state: BudgetState, candidates: FamilyRows | Sequence[str],
                  book: dict[str, list[float]] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P,) each: whether the candidate's family has evidence, and the family's successes and failures faded to the
    current version (0 without), from its groups (state.families) or another `book` of family counts. `candidates`:
    the prompt ids, or their family_rows."""
    rows = candidates if isinstance(candidates, FamilyRows) else family_rows(state, candidates)
    book = state.families if book is None else book
    stats = [book.get(name) for name in rows.names]
    # one row per family, and a last one (no evidence: zero counts, not faded) for no family and families not in the book
    fam = np.array([*((0.0, 0.0, state.version) if st is None else st for st in stats), (0.0, 0.0, state.version)],
                   dtype=float).reshape(-1, 3)
    keep = depreciation(state.version - fam[:, 2], current_drift(cfg, state), cfg.drift_scale)
    has = np.array([*(st is not None for st in stats), False], dtype=bool)
    return has[rows.index], (fam[:, 0] * keep)[rows.index], (fam[:, 1] * keep)[rows.index]


def family_weight(cfg: BudgetConfig, state: BudgetState, candidates: FamilyRows | Sequence[str],
                  n0: float, groups: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(P,) w_f = N0/(N0 + N_f): the marginal value of one more sample of family f under a log utility per family,
    N0·log(1 + N_f/N0), where N_f is the family's sample count so far (S + F of state.families, faded to the current
    version like its evidence). 1 for a prompt without a family, or of a family not sampled yet. `candidates`: the
    prompt ids, or their family_rows; `groups`: their family_counts, when the caller has them."""
    _, successes, failures = family_counts(cfg, state, candidates) if groups is None else groups
    return n0 / (n0 + successes + failures)


def group_tables(cfg: BudgetConfig, state: BudgetState, p: np.ndarray, arrays: PromptArrays,
                 n: np.ndarray | int, expected: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """P_inf(n), expected gain G(n), cost C(n) and tokens T(n) of groups of n samples, for pass rates p (P,), or with
    `expected`, their expectations over each prompt's posterior (arrays.alpha, arrays.beta; p unread): the planner's
    (P, n) tables of every size 0..n − 1 when n is an int (at the posterior's expectation compiled when numba is
    installed, kernels.posterior_tables: the same bit for bit), (P,) values when n is (P,)."""
    lengths = arrays.tok_rollout, arrays.tok_verify, arrays.tok_update
    prices = dict(value=cfg.value, n0=cfg.gain_half_samples, kappa_rollout=cfg.kappa_rollout,
                  kappa_verify=cfg.kappa_verify, kappa_update=cfg.kappa_update, kappa_scale=state.kappa_scale)
    if np.ndim(n) == 0:
        kernel = kernels.posterior_tables() if expected else None
        if kernel is not None:  # its arguments in this order
            return tuple(kernel(*(kernels.plain(x) for x in (arrays.alpha, arrays.beta, *lengths)), int(n),
                                *(float(x) for x in prices.values())))
        p, n, lengths = p[:, None], np.arange(n)[None, :], tuple(x[:, None] for x in lengths)
    return group_economics(p, n, *lengths, **prices, posterior=(arrays.alpha, arrays.beta) if expected else None)


def make_plan(candidates: Sequence[str], samples: np.ndarray, p_mean: np.ndarray, p: np.ndarray,
              informative: np.ndarray, gain: np.ndarray, cost: np.ndarray, tokens: np.ndarray,
              skip_reason: np.ndarray) -> PromptPlan:
    """The plan, priced at the group size allocated (or the smallest group, for a skipped prompt); `skip_reason`
    (P,): the reason code (records.SKIP_REASONS) of each prompt, read only where it gets no samples."""
    return PromptPlan(list(candidates), samples.astype(np.int64), p_mean, gain, cost, gain - cost,
                      np.zeros(len(samples)), p, informative, tokens,
                      np.where(samples > 0, SAMPLED, skip_reason).astype(np.int8))


def smallest_group(samples: np.ndarray, limits: SampleLimits, max_n: int) -> np.ndarray:
    """The group size a plan is priced at: the allocated one, or the smallest allowed for a skipped prompt."""
    return np.where(samples > 0, samples, min(limits.min_group_size, max_n))


def priced_plan(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str], samples: np.ndarray,
                limits: SampleLimits, arrays: PromptArrays, skip_reason: np.ndarray | int = POOL_FULL) -> PromptPlan:
    """The plan for a given allocation, priced at the posterior mean (for logging under the unpriced policies)."""
    p = arrays.mean
    at = smallest_group(samples, limits, max(limits.max_group_size, limits.group_size, limits.min_group_size))
    return make_plan(candidates, samples, p, p, *group_tables(cfg, state, p, arrays, at),
                     np.broadcast_to(skip_reason, samples.shape))


def uniform_plan(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str], step: int,
                 rng: np.random.Generator, limits: SampleLimits) -> PromptPlan:
    """The first `prompts_per_step` candidates (the trainer shuffles them) get `group_size` samples each."""
    samples = np.where(np.arange(len(candidates)) < limits.prompts_per_step, limits.group_size, 0)
    return priced_plan(cfg, state, candidates, samples, limits, prompt_arrays(cfg, state, candidates))


# ------------------------------------------------------------------------------------------------- after rollout


class TrajectoryArrays(NamedTuple):
    """The per-trajectory numbers pricing needs, (N,) each."""

    reward: np.ndarray
    group: np.ndarray  # dense group ids
    tokens_update: np.ndarray  # training tokens if trained: rollout tokens × epochs
    staleness: np.ndarray  # policy versions between behaviour and current


def trajectory_arrays(columns: TrajectoryColumns, current_version: int, num_iterations: int = 1) -> TrajectoryArrays:
    return TrajectoryArrays(columns.reward, columns.group, columns.tokens_rollout * num_iterations,
                            current_version - columns.behavior_version)


def price_components(cfg: BudgetConfig, state: BudgetState, arrays: TrajectoryArrays,
                     drift: float | None = None) -> PriceComponents:
    """Every price component of every trajectory (budget.pricing.price_arrays at the state's prices and drift, or at
    `drift` when given)."""
    return price_arrays(arrays.reward, arrays.group, arrays.tokens_update, arrays.staleness,
                        value=cfg.value, n0=cfg.gain_half_samples, kappa_update=state.kappa_scale * cfg.kappa_update,
                        drift=current_drift(cfg, state) if drift is None else drift, drift_scale=cfg.drift_scale,
                        risk_aversion=cfg.risk_aversion, risk_k=risk_factor(cfg.risk_measure, cfg.cvar_alpha))


# ------------------------------------------------------------------------------------------------------ policy


PlanFn = Callable[[BudgetConfig, BudgetState, Sequence[str], int, np.random.Generator, SampleLimits], PromptPlan]
FateFn = Callable[[BudgetConfig, TrajectoryArrays, PriceComponents], np.ndarray]  # (N,) int8 fate codes (FATES)
ControlFn = Callable[[BudgetConfig, BudgetState], None]


@dataclass(frozen=True)
class Policy:
    """One allocation policy: everything the budget needs to run it. Its name is its config's `policy`."""

    config: type[BudgetConfig]  # the keys it reads (common keys + its own)
    plan: PlanFn  # before rollout: samples per candidate prompt (0 = skipped)
    fates: FateFn  # after rollout: a fate code per trajectory
    chooses: bool = False  # offered the whole candidate pool (pool_factor × prompts_per_step), not its first part
    control: ControlFn | None = None  # after each step's evidence is folded in (e.g. the price controller)

    @property
    def name(self) -> str:
        return self.config.policy
