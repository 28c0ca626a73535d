"""Allocation policies: which prompts get samples before rollout, which trajectories are trained on after it.

Every policy goes through the same three pure calls, so the trainer never changes when a policy does:

    plan = plan_prompts(cfg, state, candidates, step, rng, limits)                # before rollout
    decisions = price_trajectories(cfg, state, trajectories, current_version)    # after rollout
    update_state(cfg, state, trajectories, step, current_version, drift_kl)      # fold the evidence in

`state` (BudgetState) is the only memory: per-prompt pass-rate posteriors, the drift estimate and the controller's
price. It is plain data, saved and restored with the checkpoint. The formulas live in budget/pricing.py; every policy
records the same price components (so arms can be compared), only the rule that sets the fate differs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from budget.config import BudgetConfig
from budget.pricing import (
    allocate_greedy,
    consistent_admission,
    controller_step,
    expected_group_gain,
    expected_group_tokens,
    fade_posterior,
    informative_prob,
    max_variance_subset,
    price_arrays,
    risk_factor,
)
from rollout.types import Trajectory

FATES = ("trained", "zero_signal", "dropped_price", "dropped_stale")


@dataclass
class PromptDecision:
    """The pre-rollout price of one prompt and how many samples it gets (0 = skipped before rollout).

    For a skipped prompt the components are those of the smallest group it could have had (min_group_size)."""

    prompt_id: str
    samples: int
    pass_rate: float = 0.0  # predicted pass rate (posterior mean, evidence faded by drift)
    gain: float = 0.0  # expected learning gain of the allocated samples (V·ΔQ), reward units
    cost: float = 0.0  # expected cost of the allocated samples (tokens × κ), reward units
    price: float = 0.0  # gain − cost − risk
    risk: float = 0.0  # pre-rollout risk (0: estimator risk is priced after rollout, uncertainty by posterior sampling)
    sampled_rate: float = 0.0  # the pass rate the price was computed at (a posterior draw under thompson)
    informative: float = 0.0  # P(the group's rewards differ) = 1 − pⁿ − (1 − p)ⁿ at the priced n
    tokens: float = 0.0  # expected tokens (rollout + verify + expected update) at the priced n


@dataclass
class TrajectoryDecision:
    """The post-rollout price of one trajectory and its fate (see FATES). Reward units unless stated."""

    fate: str
    gain: float = 0.0  # V·ΔQ after staleness depreciation
    cost: float = 0.0  # κ_update × update tokens (rollout tokens are sunk)
    risk: float = 0.0  # risk_variance + risk_staleness
    price: float = 0.0  # gain − cost − risk
    advantage: float = 0.0  # group-normalised advantage over the whole group, (r − r̄)/σ̂
    staleness: int = 0  # policy versions between behaviour and current
    depreciation: float = 1.0  # exp(−δ·staleness/drift_scale)
    risk_variance: float = 0.0  # estimator-variance part of the risk
    risk_staleness: float = 0.0  # drift part of the risk

    @property
    def trained(self) -> bool:
        return self.fate == "trained"


@dataclass
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


@dataclass
class BudgetState:
    """Everything the budget remembers between steps. Plain data: saved and restored with the checkpoint."""

    step: int = 0
    version: int = 0  # current policy version at the last update_state
    drift: float | None = None  # EMA of measured per-version drift δ (nats/token); None = not measured yet
    kappa_scale: float = 1.0  # controller multiplier on every κ (the budget's dual variable); 1 under fixed prices
    last_spend: float = 0.0  # tokens spent in the last step (rollout + training), as the controller saw them
    tok_rollout: float | None = None  # moving averages over all prompts, for unseen ones
    tok_verify: float | None = None
    tok_update: float | None = None
    prompts: dict[str, PromptStats] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"step": self.step, "version": self.version, "drift": self.drift, "kappa_scale": self.kappa_scale,
                "last_spend": self.last_spend, "tok_rollout": self.tok_rollout, "tok_verify": self.tok_verify,
                "tok_update": self.tok_update, "prompts": {k: asdict(v) for k, v in self.prompts.items()},
                "extra": self.extra}

    @classmethod
    def from_state_dict(cls, d: dict) -> BudgetState:
        return cls(step=d["step"], version=d.get("version", 0), drift=d.get("drift"),
                   kappa_scale=d.get("kappa_scale", 1.0), last_spend=d.get("last_spend", 0.0),
                   tok_rollout=d.get("tok_rollout"), tok_verify=d.get("tok_verify"), tok_update=d.get("tok_update"),
                   prompts={k: PromptStats(**v) for k, v in d.get("prompts", {}).items()}, extra=d.get("extra", {}))


def current_drift(cfg: BudgetConfig, state: BudgetState) -> float:
    """δ: the measured drift EMA, or the configured prior until the trainer has measured one."""
    return cfg.drift_prior if state.drift is None else state.drift


def group_indices(trajectories: Sequence[Trajectory]) -> dict[str, list[int]]:
    """group_id -> indices into `trajectories`, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(trajectories):
        groups.setdefault(t.group_id, []).append(i)
    return groups


@dataclass(frozen=True)
class SampleLimits:
    """What one step may spend on rollouts, from the rollout config."""

    prompts_per_step: int  # prompts a uniform policy samples
    group_size: int  # samples per prompt for a uniform policy
    min_group_size: int  # a priced policy gives an admitted prompt at least this many samples...
    max_group_size: int  # ...and at most this many

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


# ------------------------------------------------------------------------------------------------ before rollout


def prompt_arrays(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str]) -> dict[str, np.ndarray]:
    """Per candidate (P,): faded posterior (alpha, beta), expected tokens per sample by use, zero-variance streak."""
    num = len(candidates)
    alpha, beta = np.full(num, cfg.prior_alpha), np.full(num, cfg.prior_beta)
    age = np.zeros(num)
    streak = np.zeros(num, dtype=np.int64)
    tr = np.full(num, cfg.prior_tokens if state.tok_rollout is None else state.tok_rollout)
    tv = np.full(num, 0.0 if state.tok_verify is None else state.tok_verify)
    tu = np.full(num, cfg.prior_tokens if state.tok_update is None else state.tok_update)
    for i, pid in enumerate(candidates):
        s = state.prompts.get(pid)
        if s is not None:
            alpha[i], beta[i], age[i], streak[i] = s.alpha, s.beta, state.version - s.version, s.zero_var_streak
            tr[i], tv[i], tu[i] = s.tok_rollout, s.tok_verify, s.tok_update
    factor = np.exp(-current_drift(cfg, state) * np.maximum(age, 0) / cfg.drift_scale)
    alpha, beta = fade_posterior(alpha, beta, cfg.prior_alpha, cfg.prior_beta, factor)
    return {"alpha": alpha, "beta": beta, "tok_rollout": tr, "tok_verify": tv, "tok_update": tu, "streak": streak}


def group_tables(cfg: BudgetConfig, state: BudgetState, p: np.ndarray, arrays: dict[str, np.ndarray],
                 max_n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P, max_n + 1) tables of expected gain G(n), cost C(n) and tokens T(n) for n = 0..max_n."""
    ns = np.arange(max_n + 1)[None, :]
    col = {k: v[:, None] for k, v in arrays.items()}
    gain = expected_group_gain(p[:, None], ns, cfg.value, cfg.gain_half_samples)
    tr, tv, tu = expected_group_tokens(p[:, None], ns, col["tok_rollout"], col["tok_verify"], col["tok_update"])
    cost = state.kappa_scale * (cfg.kappa_rollout * tr + cfg.kappa_verify * tv + cfg.kappa_update * tu)
    return gain, cost, tr + tv + tu


def _decisions_from_tables(candidates: Sequence[str], samples: np.ndarray, p_mean: np.ndarray, p: np.ndarray,
                           gain: np.ndarray, cost: np.ndarray, tokens: np.ndarray, min_n: int) -> list[PromptDecision]:
    at = np.where(samples > 0, samples, min(min_n, gain.shape[1] - 1))
    rows = np.arange(len(candidates))
    g, c, tk = gain[rows, at], cost[rows, at], tokens[rows, at]
    inf = informative_prob(p, at)
    return [PromptDecision(prompt_id=pid, samples=int(samples[i]), pass_rate=float(p_mean[i]), gain=float(g[i]),
                           cost=float(c[i]), price=float(g[i] - c[i]), sampled_rate=float(p[i]),
                           informative=float(inf[i]), tokens=float(tk[i])) for i, pid in enumerate(candidates)]


def _priced_plan(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str], samples: np.ndarray,
                 limits: SampleLimits) -> list[PromptDecision]:
    """Decisions for a given allocation, priced at the posterior mean (for logging under the unpriced policies)."""
    arr = prompt_arrays(cfg, state, candidates)
    p = arr["alpha"] / (arr["alpha"] + arr["beta"])
    max_n = max(limits.max_group_size, limits.group_size, limits.min_group_size)
    gain, cost, tokens = group_tables(cfg, state, p, arr, max_n)
    return _decisions_from_tables(candidates, samples, p, p, gain, cost, tokens, limits.min_group_size)


def _uniform_plan(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str], step: int,
                  rng: np.random.Generator, limits: SampleLimits) -> list[PromptDecision]:
    """The first `prompts_per_step` candidates (the trainer shuffles them) get `group_size` samples each."""
    samples = np.where(np.arange(len(candidates)) < limits.prompts_per_step, limits.group_size, 0)
    return _priced_plan(cfg, state, candidates, samples, limits)


def _prior_plan(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str], step: int,
                rng: np.random.Generator, limits: SampleLimits) -> list[PromptDecision]:
    """`prior`: skip prompts before rollout from their history, as GRESO does (Zhang et al. 2025, arXiv 2506.02177):
    a prompt whose last z groups were all zero-variance is rolled out with probability explore_prob**z (so it is
    still explored now and then), the others always; candidates are taken in order until prompts_per_step are kept.
    MoPPS (Qu et al. 2025, arXiv 2507.04632) predicts the same from a decayed Beta posterior; `marginal` prices that."""
    arr = prompt_arrays(cfg, state, candidates)
    keep = rng.random(len(candidates)) < cfg.explore_prob ** arr["streak"].astype(float)
    chosen = keep & (np.cumsum(keep) <= limits.prompts_per_step)
    return _priced_plan(cfg, state, candidates, np.where(chosen, limits.group_size, 0), limits)


def _marginal_plan(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str], step: int,
                   rng: np.random.Generator, limits: SampleLimits) -> list[PromptDecision]:
    """`marginal` (seed paper, arXiv 2605.01214): price the next sample of every candidate, G(n) − G(n−1) against
    C(n) − C(n−1) (budget/pricing.py), at a pass rate drawn from its drift-faded posterior (Thompson sampling keeps
    unseen and long-unseen prompts, whose posteriors are wide, from starving), and hand samples out greedily to the
    highest price per token until the step's budget is spent or no price is positive. Groups get
    min_group_size..max_group_size samples. Budget: samples_per_step samples, or token_budget × budget_slack
    expected tokens when a token budget is set (the controller then keeps the realised spend on the budget)."""
    arr = prompt_arrays(cfg, state, candidates)
    p_mean = arr["alpha"] / (arr["alpha"] + arr["beta"])
    p = rng.beta(arr["alpha"], arr["beta"]) if cfg.thompson and len(candidates) else p_mean
    gain, cost, tokens = group_tables(cfg, state, p, arr, limits.max_group_size)
    by_tokens = cfg.token_budget > 0
    budget = cfg.token_budget * cfg.budget_slack if by_tokens else limits.samples_per_step
    samples = allocate_greedy(gain, cost, tokens, limits.min_group_size, limits.max_group_size, budget, by_tokens)
    return _decisions_from_tables(candidates, samples, p_mean, p, gain, cost, tokens, limits.min_group_size)


# ------------------------------------------------------------------------------------------------- after rollout


def trajectory_arrays(trajectories: Sequence[Trajectory], current_version: int,
                      num_iterations: int = 1) -> dict[str, np.ndarray]:
    """The per-trajectory numbers pricing needs, (N,) each: reward, dense group id, update tokens, staleness."""
    ids: dict[str, int] = {}
    group = np.fromiter((ids.setdefault(t.group_id, len(ids)) for t in trajectories), dtype=np.int64,
                        count=len(trajectories))
    rewards = np.fromiter((t.reward for t in trajectories), dtype=float, count=len(trajectories))
    tokens = np.fromiter((len(t.prompt_ids) + len(t.completion_ids) for t in trajectories), dtype=float,
                         count=len(trajectories))
    version = np.fromiter((t.behavior_version for t in trajectories), dtype=float, count=len(trajectories))
    return {"reward": rewards, "group": group, "tokens_update": tokens * num_iterations,
            "staleness": current_version - version}


def price_components_arrays(cfg: BudgetConfig, state: BudgetState,
                            arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The vectorised core: every price component of every trajectory (see budget.pricing.price_arrays)."""
    return price_arrays(arrays["reward"], arrays["group"], arrays["tokens_update"], arrays["staleness"],
                        value=cfg.value, n0=cfg.gain_half_samples, kappa_update=state.kappa_scale * cfg.kappa_update,
                        drift=current_drift(cfg, state), drift_scale=cfg.drift_scale,
                        risk_aversion=cfg.risk_aversion, risk_k=risk_factor(cfg.risk_measure, cfg.cvar_alpha))


def fates_none(cfg: BudgetConfig, arrays: dict[str, np.ndarray], comp: dict[str, np.ndarray]) -> np.ndarray:
    """`none`: vanilla GRPO/PPO, every trajectory is trained on."""
    return np.full(len(arrays["reward"]), "trained", dtype=object)


def fates_zero_var(cfg: BudgetConfig, arrays: dict[str, np.ndarray], comp: dict[str, np.ndarray]) -> np.ndarray:
    """`zero_var`: DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476): a group whose rewards are all equal
    has zero group-relative advantage everywhere, so it carries no gradient and is not trained on."""
    return np.where(comp["zero_var"], "zero_signal", "trained").astype(object)


def fates_max_var(cfg: BudgetConfig, arrays: dict[str, np.ndarray], comp: dict[str, np.ndarray]) -> np.ndarray:
    """`max_var`: PODS max-variance down-sampling (Xu et al. 2025, arXiv 2504.13818): of each group of n keep the
    subset of m = max(2, round(keep_fraction·n)) with the largest reward variance (top-k and bottom-(m − k) rewards);
    the rest are dropped (fate dropped_price). As in PODS, a zero-variance group's subset is still trained on."""
    fates = np.full(len(arrays["reward"]), "dropped_price", dtype=object)
    rewards, group = arrays["reward"], arrays["group"]
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    for members in np.split(order, bounds) if len(order) else []:
        m = min(len(members), max(2, round(cfg.keep_fraction * len(members))))
        fates[members[max_variance_subset(rewards[members], m)]] = "trained"
    return fates


def fates_marginal(cfg: BudgetConfig, arrays: dict[str, np.ndarray], comp: dict[str, np.ndarray]) -> np.ndarray:
    """`marginal` (seed paper, arXiv 2605.01214): train on a trajectory when its price is positive. Zero-variance
    groups are zero_signal; a trajectory whose price is not positive only because of staleness is dropped_stale, any
    other dropped_price; a group whose admitted subset would carry no signal (< 2 members or equal rewards, as the
    trainer recomputes advantages over admitted members) is dropped_price as a whole."""
    fresh_price = comp["gain_fresh"] - comp["cost"] - comp["risk_variance"]
    admit = consistent_admission(comp["price"] > 0, arrays["reward"], arrays["group"])
    fates = np.where(fresh_price > 0, "dropped_stale", "dropped_price").astype(object)
    fates[(comp["price"] > 0) & ~admit] = "dropped_price"
    fates[admit] = "trained"
    fates[comp["zero_var"]] = "zero_signal"
    return fates


PlanFn = Callable[[BudgetConfig, BudgetState, Sequence[str], int, np.random.Generator, SampleLimits],
                  list[PromptDecision]]
FateFn = Callable[[BudgetConfig, dict, dict], np.ndarray]

PLANNERS: dict[str, PlanFn] = {"none": _uniform_plan, "zero_var": _uniform_plan, "max_var": _uniform_plan,
                               "prior": _prior_plan, "marginal": _marginal_plan}
FATE_RULES: dict[str, FateFn] = {"none": fates_none, "zero_var": fates_zero_var, "max_var": fates_max_var,
                                 "prior": fates_zero_var, "marginal": fates_marginal}


def plan_prompts(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str], step: int,
                 rng: np.random.Generator, limits: SampleLimits) -> list[PromptDecision]:
    """Before rollout: how many samples each candidate prompt gets (0 = skipped before rollout).

    `candidates` is a shuffled pool of prompt ids, `budget.pool_factor` times `prompts_per_step` long, so that a
    pricing policy can choose; it returns one decision per candidate, in the same order."""
    return PLANNERS[cfg.policy](cfg, state, candidates, step, rng, limits)


def price_trajectories(cfg: BudgetConfig, state: BudgetState, trajectories: Sequence[Trajectory],
                       current_version: int, *, num_iterations: int = 1) -> list[TrajectoryDecision]:
    """After rollout: price every trajectory and give it a fate (see FATES). Every policy records the same price
    components; the policy's rule sets the fate. `num_iterations`: training epochs, which multiply update tokens."""
    if not trajectories:
        return []
    arrays = trajectory_arrays(trajectories, current_version, num_iterations)
    comp = price_components_arrays(cfg, state, arrays)
    fates = FATE_RULES[cfg.policy](cfg, arrays, comp)
    cols = [comp[k].tolist() for k in ("gain", "cost", "risk", "price", "advantage", "depreciation", "risk_variance",
                                       "risk_staleness")]
    stale = arrays["staleness"].astype(np.int64).tolist()
    return [TrajectoryDecision(f, g, c, r, p, a, s, d, rv, rs)
            for f, g, c, r, p, a, d, rv, rs, s in zip(fates.tolist(), *cols, stale, strict=True)]


# ---------------------------------------------------------------------------------------------------- state


def _ema(old: float | None, new: float, weight: float) -> float:
    return new if old is None else weight * old + (1.0 - weight) * new


def update_state(cfg: BudgetConfig, state: BudgetState, trajectories: Sequence[Trajectory], step: int,
                 current_version: int, drift_kl: float | None = None, *,
                 decisions: Sequence[TrajectoryDecision] | None = None, num_iterations: int = 1) -> None:
    """After the step: fold the step's evidence into the state (drift, posteriors, token lengths, controller).

    `drift_kl` is the trainer's measurement of how far the policy moved per version (mean per-token KL between the
    behaviour and current policy on this step's samples, divided by the version gap); None when not measured.
    Posteriors: each group adds Σr pseudo-successes and Σ(1 − r) pseudo-failures (rewards clipped to [0, 1]: the
    exact Beta update for 0/1 rewards, its mean-matching analogue for graded ones), after the prompt's old evidence
    has faded by exp(−δ·Δv/drift_scale) for the Δv versions since it was gathered.
    Controller (token_budget > 0): spend = rollout tokens + training tokens of the trained trajectories (`decisions`;
    without them every trajectory counts as trained), then κ-scale ← κ-scale·exp(rate·(spend/budget − 1))."""
    if drift_kl is not None and math.isfinite(drift_kl):
        state.drift = _ema(state.drift, max(float(drift_kl), 0.0), cfg.ema)
    drift = current_drift(cfg, state)
    spend = 0.0
    for idx in group_indices(trajectories).values():
        # plain Python on purpose: groups are a handful of samples, where numpy's per-call overhead dominates
        group = [trajectories[i] for i in idx]
        n = len(group)
        raw = [float(t.reward) for t in group]
        successes = sum(min(max(r, 0.0), 1.0) for r in raw)
        lengths = [t.tokens_prompt + t.tokens_completion for t in group]
        tok_v = sum(t.tokens_verify for t in group) / n
        tok_r = sum(lengths) / n - tok_v
        tok_u = sum(lengths) * num_iterations / n
        version = max(t.behavior_version for t in group)
        pid = group[0].prompt_id
        s = state.prompts.get(pid)
        if s is None:
            s = state.prompts[pid] = PromptStats(cfg.prior_alpha, cfg.prior_beta, version, step, 0, 0, tok_r, tok_v,
                                                 tok_u)
        factor = math.exp(-drift * max(version - s.version, 0) / cfg.drift_scale)
        a, b = fade_posterior(s.alpha, s.beta, cfg.prior_alpha, cfg.prior_beta, factor)
        s.alpha, s.beta = float(a) + successes, float(b) + (n - successes)
        s.version, s.last_step, s.groups = max(version, s.version), step, s.groups + 1
        s.zero_var_streak = s.zero_var_streak + 1 if max(raw) == min(raw) else 0
        if s.groups > 1:
            s.tok_rollout, s.tok_verify, s.tok_update = (_ema(s.tok_rollout, tok_r, cfg.ema),
                                                        _ema(s.tok_verify, tok_v, cfg.ema),
                                                        _ema(s.tok_update, tok_u, cfg.ema))
        state.tok_rollout = _ema(state.tok_rollout, tok_r, cfg.ema)
        state.tok_verify = _ema(state.tok_verify, tok_v, cfg.ema)
        state.tok_update = _ema(state.tok_update, tok_u, cfg.ema)
    trained = [True] * len(trajectories) if decisions is None else [d.trained for d in decisions]
    for t, tr in zip(trajectories, trained, strict=True):
        spend += t.tokens_prompt + t.tokens_completion + (tr * (t.tokens_prompt + t.tokens_completion) * num_iterations)
    state.last_spend = spend
    if cfg.token_budget > 0:
        state.kappa_scale = controller_step(state.kappa_scale, spend, cfg.token_budget, cfg.controller_rate,
                                            cfg.kappa_scale_min, cfg.kappa_scale_max)
    state.version = max(state.version, current_version)
    state.step = step + 1
