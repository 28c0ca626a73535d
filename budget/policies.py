"""Allocation policies: which prompts get samples before rollout, which trajectories are trained on after it.

Every policy goes through the same three pure calls, so the trainer never changes when a policy does:

    plan = plan_prompts(cfg, state, candidates, step, rng, limits)                # before rollout
    decisions = price_trajectories(cfg, state, trajectories, current_version)    # after rollout
    update_state(cfg, state, trajectories, step, current_version, drift_kl)      # fold the evidence in

`state` (BudgetState) is the only memory: per-prompt pass-rate posteriors, the drift estimate and the controller's
price. It is plain data, saved and restored with the checkpoint. The formulas live in budget/pricing.py; every policy
records the same price components (so arms can be compared), only the rule that sets the fate differs.

Results are columnar (PromptPlan, TrajectoryPrices: numpy arrays, one entry per prompt or trajectory) and read as
sequences of PromptDecision / TrajectoryDecision. Trajectories come in as rollout's TrajectoryColumns, built once per
step, or as a sequence of Trajectory records (converted here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from itertools import chain
from operator import attrgetter
from typing import Any, ClassVar, TypeVar

import numpy as np

from budget.config import BudgetConfig
from budget.pricing import (
    allocate_greedy,
    consistent_admission,
    controller_step,
    fade_posterior,
    group_economics,
    max_variance_keep,
    price_arrays,
    risk_factor,
)
from rollout.types import Trajectory, TrajectoryColumns

FATES = ("trained", "zero_signal", "dropped_price", "dropped_stale")
TRAINED, ZERO_SIGNAL, DROPPED_PRICE, DROPPED_STALE = range(len(FATES))  # fate codes: FATES[code]
_FATE_NAMES = np.array(FATES, dtype=object)


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


class _Columnar(Sequence):
    """A columnar result that also reads as a sequence of `record`s (one per row), for code that iterates."""

    record: ClassVar[type]

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:  # frozen all the way down: consumers get the arrays, not copies
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                value.flags.writeable = False

    def _columns(self) -> list[Any]:
        """One column per field of `record`, in its field order (arrays or lists)."""
        raise NotImplementedError

    @staticmethod
    def _gather(records: Sequence, name: str, dtype: type = float) -> np.ndarray:
        """Field `name` of every record, as an array."""
        return np.array([getattr(r, name) for r in records], dtype=dtype)

    def __iter__(self) -> Iterator[Any]:
        cols = [c.tolist() if isinstance(c, np.ndarray) else c for c in self._columns()]
        return (self.record(*row) for row in zip(*cols, strict=True))

    def __getitem__(self, i: int) -> Any:
        i = range(len(self))[i]  # negative indices and IndexError as a list has them
        return self.record(*(c.item(i) if isinstance(c, np.ndarray) else c[i] for c in self._columns()))


@dataclass(frozen=True, eq=False)
class PromptPlan(_Columnar):
    """plan_prompts' result: one entry per candidate prompt, in candidate order (fields as in PromptDecision)."""

    record: ClassVar[type] = PromptDecision
    prompt_ids: list[str]
    samples: np.ndarray  # (P,) int64; 0 = skipped before rollout
    pass_rate: np.ndarray  # (P,) float64, and so on below
    gain: np.ndarray
    cost: np.ndarray
    price: np.ndarray
    risk: np.ndarray
    sampled_rate: np.ndarray
    informative: np.ndarray
    tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.samples)

    def _columns(self) -> list[Any]:
        return [self.prompt_ids, self.samples, self.pass_rate, self.gain, self.cost, self.price, self.risk,
                self.sampled_rate, self.informative, self.tokens]

    @classmethod
    def of(cls, decisions: Sequence[PromptDecision]) -> PromptPlan:
        return cls([d.prompt_id for d in decisions], cls._gather(decisions, "samples", np.int64),
                   *(cls._gather(decisions, f.name) for f in fields(PromptDecision)[2:]))


@dataclass(frozen=True, eq=False)
class TrajectoryPrices(_Columnar):
    """price_trajectories' result: one entry per trajectory, in trajectory order (fields as in TrajectoryDecision;
    the fate as a code into FATES)."""

    record: ClassVar[type] = TrajectoryDecision
    fate_code: np.ndarray  # (N,) int8, FATES[code]
    gain: np.ndarray  # (N,) float64, and so on below
    cost: np.ndarray
    risk: np.ndarray
    price: np.ndarray
    advantage: np.ndarray
    staleness: np.ndarray  # (N,) int64
    depreciation: np.ndarray
    risk_variance: np.ndarray
    risk_staleness: np.ndarray

    def __len__(self) -> int:
        return len(self.fate_code)

    def _columns(self) -> list[Any]:
        return [_FATE_NAMES[self.fate_code], self.gain, self.cost, self.risk, self.price, self.advantage,
                self.staleness, self.depreciation, self.risk_variance, self.risk_staleness]

    @property
    def fates(self) -> list[str]:
        return _FATE_NAMES[self.fate_code].tolist()

    @property
    def trained(self) -> np.ndarray:
        """(N,) bool: trained on."""
        return self.fate_code == TRAINED

    @classmethod
    def of(cls, decisions: Sequence[TrajectoryDecision]) -> TrajectoryPrices:
        return cls(np.array([FATES.index(d.fate) for d in decisions], dtype=np.int8),
                   *(cls._gather(decisions, f.name, np.int64 if f.name == "staleness" else float)
                     for f in fields(TrajectoryDecision)[1:]))


Columnar = TypeVar("Columnar", TrajectoryColumns, PromptPlan, TrajectoryPrices)


def as_columnar(records: Sequence | Columnar, cls: type[Columnar]) -> Columnar:
    """`records` as columns of type `cls` (TrajectoryColumns, PromptPlan or TrajectoryPrices): as they are when they
    already are, else built from the sequence of per-item records."""
    return records if isinstance(records, cls) else cls.of(records)


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


_STATS = attrgetter("alpha", "beta", "version", "zero_var_streak", "tok_rollout", "tok_verify", "tok_update")


def prompt_arrays(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str]) -> dict[str, np.ndarray]:
    """Per candidate (P,): faded posterior (alpha, beta), expected tokens per sample by use, zero-variance streak."""
    num = len(candidates)
    # an unseen prompt reads as the prior, gathered at the current version (so nothing fades), with the average lengths
    unseen = (cfg.prior_alpha, cfg.prior_beta, state.version, 0,
              cfg.prior_tokens if state.tok_rollout is None else state.tok_rollout,
              0.0 if state.tok_verify is None else state.tok_verify,
              cfg.prior_tokens if state.tok_update is None else state.tok_update)
    rows = [unseen if s is None else _STATS(s) for s in map(state.prompts.get, candidates)]
    table = np.fromiter(chain.from_iterable(rows), dtype=float, count=7 * num).reshape(num, 7).T  # (7, P): a row each
    alpha, beta, version, streak, tr, tv, tu = table
    factor = np.exp(-current_drift(cfg, state) * np.maximum(state.version - version, 0) / cfg.drift_scale)
    alpha, beta = fade_posterior(alpha, beta, cfg.prior_alpha, cfg.prior_beta, factor)
    return {"alpha": alpha, "beta": beta, "tok_rollout": tr, "tok_verify": tv, "tok_update": tu, "streak": streak}


def group_tables(cfg: BudgetConfig, state: BudgetState, p: np.ndarray, arrays: dict[str, np.ndarray],
                 n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """P_inf(n), expected gain G(n), cost C(n) and tokens T(n) of groups of n samples, for pass rates p (P,) and
    `arrays` of prompt_arrays: (P, K) tables when n is a (1, K) row (n = 0..K − 1), (P,) values when n is (P,)."""
    table = n.ndim == 2
    p, col = (p[:, None], {k: v[:, None] for k, v in arrays.items()}) if table else (p, arrays)
    return group_economics(p, n, col["tok_rollout"], col["tok_verify"], col["tok_update"], value=cfg.value,
                           n0=cfg.gain_half_samples, kappa_rollout=cfg.kappa_rollout, kappa_verify=cfg.kappa_verify,
                           kappa_update=cfg.kappa_update, kappa_scale=state.kappa_scale)


def _plan(candidates: Sequence[str], samples: np.ndarray, p_mean: np.ndarray, p: np.ndarray, informative: np.ndarray,
          gain: np.ndarray, cost: np.ndarray, tokens: np.ndarray) -> PromptPlan:
    """The plan, priced at the group size allocated (or the smallest group, for a skipped prompt)."""
    return PromptPlan(list(candidates), samples.astype(np.int64), p_mean, gain, cost, gain - cost,
                      np.zeros(len(samples)), p, informative, tokens)


def _smallest_group(samples: np.ndarray, limits: SampleLimits, max_n: int) -> np.ndarray:
    return np.where(samples > 0, samples, min(limits.min_group_size, max_n))


def _priced_plan(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str], samples: np.ndarray,
                 limits: SampleLimits, arr: dict[str, np.ndarray]) -> PromptPlan:
    """The plan for a given allocation, priced at the posterior mean (for logging under the unpriced policies);
    `arr`: prompt_arrays of the candidates."""
    p = arr["alpha"] / (arr["alpha"] + arr["beta"])
    at = _smallest_group(samples, limits, max(limits.max_group_size, limits.group_size, limits.min_group_size))
    return _plan(candidates, samples, p, p, *group_tables(cfg, state, p, arr, at))


def _uniform_plan(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str], step: int,
                  rng: np.random.Generator, limits: SampleLimits) -> PromptPlan:
    """The first `prompts_per_step` candidates (the trainer shuffles them) get `group_size` samples each."""
    samples = np.where(np.arange(len(candidates)) < limits.prompts_per_step, limits.group_size, 0)
    return _priced_plan(cfg, state, candidates, samples, limits, prompt_arrays(cfg, state, candidates))


def _prior_plan(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str], step: int,
                rng: np.random.Generator, limits: SampleLimits) -> PromptPlan:
    """`prior`: skip prompts before rollout from their history, as GRESO does (Zhang et al. 2025, arXiv 2506.02177):
    a prompt whose last z groups were all zero-variance is rolled out with probability explore_prob**z (so it is
    still explored now and then), the others always; candidates are taken in order until prompts_per_step are kept.
    MoPPS (Qu et al. 2025, arXiv 2507.04632) predicts the same from a decayed Beta posterior; `marginal` prices that."""
    arr = prompt_arrays(cfg, state, candidates)
    keep = rng.random(len(candidates)) < cfg.explore_prob ** arr["streak"]
    chosen = keep & (np.cumsum(keep) <= limits.prompts_per_step)
    return _priced_plan(cfg, state, candidates, np.where(chosen, limits.group_size, 0), limits, arr)


def planner_limits(cfg: BudgetConfig, limits: SampleLimits) -> tuple[float, float]:
    """(max samples, max expected tokens) the `marginal` planner may allocate in one step: samples_per_step under
    fixed prices; with a token budget, token_budget × budget_slack tokens and max_samples_per_step samples
    (0: samples_per_step × budget_slack)."""
    if cfg.token_budget <= 0:
        return limits.samples_per_step, math.inf
    return (cfg.max_samples_per_step or limits.samples_per_step * cfg.budget_slack,
            cfg.token_budget * cfg.budget_slack)


def _marginal_plan(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str], step: int,
                   rng: np.random.Generator, limits: SampleLimits) -> PromptPlan:
    """`marginal` (seed paper, arXiv 2605.01214): price the next sample of every candidate, G(n) − G(n−1) against
    C(n) − C(n−1) (budget/pricing.py), at a pass rate drawn from its drift-faded posterior (Thompson sampling keeps
    unseen and long-unseen prompts, whose posteriors are wide, from starving), and hand samples out greedily to the
    highest price per token until the step's limits (planner_limits) are spent or no price is positive. Groups get
    min_group_size..max_group_size samples. With a token budget the controller keeps the realised spend on it."""
    arr = prompt_arrays(cfg, state, candidates)
    p_mean = arr["alpha"] / (arr["alpha"] + arr["beta"])
    p = rng.beta(arr["alpha"], arr["beta"]) if cfg.thompson and len(candidates) else p_mean
    max_n = limits.max_group_size
    informative, gain, cost, tokens = group_tables(cfg, state, p, arr, np.arange(max_n + 1)[None, :])
    max_samples, max_tokens = planner_limits(cfg, limits)
    samples = allocate_greedy(gain, cost, tokens, limits.min_group_size, max_n, max_samples=max_samples,
                              max_tokens=max_tokens)
    at = _smallest_group(samples, limits, max_n)
    rows = np.arange(len(candidates))
    return _plan(candidates, samples, p_mean, p, informative[rows, at], gain[rows, at], cost[rows, at],
                 tokens[rows, at])


# ------------------------------------------------------------------------------------------------- after rollout


def trajectory_arrays(columns: TrajectoryColumns, current_version: int,
                      num_iterations: int = 1) -> dict[str, np.ndarray]:
    """The per-trajectory numbers pricing needs, (N,) each: reward, dense group id, update tokens, staleness."""
    return {"reward": columns.reward, "group": columns.group,
            "tokens_update": columns.tokens_rollout * num_iterations,
            "staleness": current_version - columns.behavior_version}


def price_components_arrays(cfg: BudgetConfig, state: BudgetState,
                            arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The vectorised core: every price component of every trajectory (see budget.pricing.price_arrays)."""
    return price_arrays(arrays["reward"], arrays["group"], arrays["tokens_update"], arrays["staleness"],
                        value=cfg.value, n0=cfg.gain_half_samples, kappa_update=state.kappa_scale * cfg.kappa_update,
                        drift=current_drift(cfg, state), drift_scale=cfg.drift_scale,
                        risk_aversion=cfg.risk_aversion, risk_k=risk_factor(cfg.risk_measure, cfg.cvar_alpha))


def fates_none(cfg: BudgetConfig, arrays: dict[str, np.ndarray], comp: dict[str, np.ndarray]) -> np.ndarray:
    """`none`: vanilla GRPO/PPO, every trajectory is trained on."""
    return np.full(len(arrays["reward"]), TRAINED, dtype=np.int8)


def fates_zero_var(cfg: BudgetConfig, arrays: dict[str, np.ndarray], comp: dict[str, np.ndarray]) -> np.ndarray:
    """`zero_var`: DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476): a group whose rewards are all equal
    has zero group-relative advantage everywhere, so it carries no gradient and is not trained on."""
    return np.where(comp["zero_var"], ZERO_SIGNAL, TRAINED).astype(np.int8)


def fates_max_var(cfg: BudgetConfig, arrays: dict[str, np.ndarray], comp: dict[str, np.ndarray]) -> np.ndarray:
    """`max_var`: PODS max-variance down-sampling (Xu et al. 2025, arXiv 2504.13818): of each group of n keep the
    subset of m = max(2, round(keep_fraction·n)) with the largest reward variance (top-k and bottom-(m − k) rewards);
    the rest are dropped (fate dropped_price). As in PODS, a zero-variance group's subset is still trained on."""
    rewards, group = arrays["reward"], arrays["group"]
    if not len(rewards):
        return np.zeros(0, dtype=np.int8)
    count = np.bincount(group)
    keep = np.minimum(count, np.maximum(2, np.rint(cfg.keep_fraction * count).astype(np.int64)))  # rint: as round()
    return np.where(max_variance_keep(rewards, group, keep), TRAINED, DROPPED_PRICE).astype(np.int8)


def fates_marginal(cfg: BudgetConfig, arrays: dict[str, np.ndarray], comp: dict[str, np.ndarray]) -> np.ndarray:
    """`marginal` (seed paper, arXiv 2605.01214): train on a trajectory when its price is positive. Zero-variance
    groups are zero_signal; a trajectory whose price is not positive only because of staleness is dropped_stale, any
    other dropped_price; a group whose admitted subset would carry no signal (< 2 members or equal rewards, as the
    trainer recomputes advantages over admitted members) is dropped_price as a whole."""
    fresh_price = comp["gain_fresh"] - comp["cost"] - comp["risk_variance"]
    admit = consistent_admission(comp["price"] > 0, arrays["reward"], arrays["group"])
    fates = np.where(fresh_price > 0, DROPPED_STALE, DROPPED_PRICE).astype(np.int8)
    fates[(comp["price"] > 0) & ~admit] = DROPPED_PRICE
    fates[admit] = TRAINED
    fates[comp["zero_var"]] = ZERO_SIGNAL
    return fates


PlanFn = Callable[[BudgetConfig, BudgetState, Sequence[str], int, np.random.Generator, SampleLimits], PromptPlan]
FateFn = Callable[[BudgetConfig, dict, dict], np.ndarray]  # (N,) int8: a fate code (index into FATES) per trajectory

PLANNERS: dict[str, PlanFn] = {"none": _uniform_plan, "zero_var": _uniform_plan, "max_var": _uniform_plan,
                               "prior": _prior_plan, "marginal": _marginal_plan}
FATE_RULES: dict[str, FateFn] = {"none": fates_none, "zero_var": fates_zero_var, "max_var": fates_max_var,
                                 "prior": fates_zero_var, "marginal": fates_marginal}


CHOOSING = ("prior", "marginal")  # the policies that choose among candidates before rollout


def candidate_count(cfg: BudgetConfig, limits: SampleLimits) -> int:
    """How many candidates the policy is offered per step: `pool_factor` × prompts_per_step for a policy that chooses
    (prior, marginal); prompts_per_step for the uniform ones (none, zero_var, max_var), which sample every prompt
    they are offered and skip none."""
    return limits.prompts_per_step * (cfg.pool_factor if cfg.policy in CHOOSING else 1)


def plan_prompts(cfg: BudgetConfig, state: BudgetState, candidates: Sequence[str], step: int,
                 rng: np.random.Generator, limits: SampleLimits) -> PromptPlan:
    """Before rollout: how many samples each candidate prompt gets (0 = skipped before rollout).

    `candidates` is a shuffled pool of prompt ids, `candidate_count` long (`budget.pool_factor` times
    `prompts_per_step` for a policy that chooses); it returns one entry per candidate, in the same order."""
    return PLANNERS[cfg.policy](cfg, state, candidates, step, rng, limits)


def price_trajectories(cfg: BudgetConfig, state: BudgetState, trajectories: Sequence[Trajectory] | TrajectoryColumns,
                       current_version: int, *, num_iterations: int = 1) -> TrajectoryPrices:
    """After rollout: price every trajectory and give it a fate (see FATES). Every policy records the same price
    components; the policy's rule sets the fate. `num_iterations`: training epochs, which multiply update tokens."""
    arrays = trajectory_arrays(as_columnar(trajectories, TrajectoryColumns), current_version, num_iterations)
    comp = price_components_arrays(cfg, state, arrays)
    return TrajectoryPrices(FATE_RULES[cfg.policy](cfg, arrays, comp), comp["gain"], comp["cost"], comp["risk"],
                            comp["price"], comp["advantage"], arrays["staleness"].astype(np.int64),
                            comp["depreciation"], comp["risk_variance"], comp["risk_staleness"])


# ---------------------------------------------------------------------------------------------------- state


def _ema(old: float | None, new: float, weight: float) -> float:
    return new if old is None else weight * old + (1.0 - weight) * new


def update_state(cfg: BudgetConfig, state: BudgetState, trajectories: Sequence[Trajectory] | TrajectoryColumns,
                 step: int, current_version: int, drift_kl: float | None = None, *,
                 decisions: Sequence[TrajectoryDecision] | TrajectoryPrices | None = None,
                 num_iterations: int = 1) -> None:
    """After the step: fold the step's evidence into the state (drift, posteriors, token lengths, controller).

    `drift_kl` is the trainer's measurement of how far the policy moved per version (mean per-token KL between the
    behaviour and current policy on this step's samples, divided by the version gap); None when not measured.
    Posteriors: each group adds Σr pseudo-successes and Σ(1 − r) pseudo-failures (rewards clipped to [0, 1]: the
    exact Beta update for 0/1 rewards, its mean-matching analogue for graded ones), after the prompt's old evidence
    has faded by exp(−δ·Δv/drift_scale) for the Δv versions since it was gathered.
    Controller (token_budget > 0): spend = rollout tokens + training tokens of the trained trajectories (`decisions`;
    without them every trajectory counts as trained), then κ-scale ← κ-scale·exp(rate·(spend/budget − 1))."""
    cols = as_columnar(trajectories, TrajectoryColumns)
    trained = np.ones(len(cols), dtype=bool) if decisions is None else as_columnar(decisions, TrajectoryPrices).trained
    if len(trained) != len(cols):
        raise ValueError(f"update_state: {len(trained)} decisions for {len(cols)} trajectories")
    if drift_kl is not None and math.isfinite(drift_kl):
        state.drift = _ema(state.drift, max(float(drift_kl), 0.0), cfg.ema)
    drift = current_drift(cfg, state)
    # per group (G,), in first-seen order; bincount sums each group's members in order, as a Python sum would
    num_groups, group, lengths = cols.num_groups, cols.group, cols.tokens_rollout
    count = cols.group_size
    length_sum = np.bincount(group, weights=lengths, minlength=num_groups)
    verify_mean = np.bincount(group, weights=cols.tokens_verify, minlength=num_groups) / count
    successes = np.bincount(group, weights=np.clip(cols.reward, 0.0, 1.0), minlength=num_groups)
    versions = np.full(num_groups, np.iinfo(np.int64).min)
    np.maximum.at(versions, group, cols.behavior_version)
    per_group = zip(cols.group_prompt_ids, count.tolist(), successes.tolist(),
                    (length_sum / count - verify_mean).tolist(), verify_mean.tolist(),
                    (length_sum * num_iterations / count).tolist(), versions.tolist(), cols.group_flat.tolist(),
                    strict=True)
    w, prior_a, prior_b, prompts = cfg.ema, cfg.prior_alpha, cfg.prior_beta, state.prompts
    for pid, n, succ, tok_r, tok_v, tok_u, version, flat in per_group:  # EMAs as _ema, written out: a hot loop
        s = prompts.get(pid)
        if s is None:
            s = prompts[pid] = PromptStats(prior_a, prior_b, version, step, 0, 0, tok_r, tok_v, tok_u)
        factor = math.exp(-drift * max(version - s.version, 0) / cfg.drift_scale)
        a, b = fade_posterior(s.alpha, s.beta, prior_a, prior_b, factor)
        s.alpha, s.beta = a + succ, b + (n - succ)
        s.version, s.last_step, s.groups = max(version, s.version), step, s.groups + 1
        s.zero_var_streak = s.zero_var_streak + 1 if flat else 0
        if s.groups > 1:
            s.tok_rollout = w * s.tok_rollout + (1.0 - w) * tok_r
            s.tok_verify = w * s.tok_verify + (1.0 - w) * tok_v
            s.tok_update = w * s.tok_update + (1.0 - w) * tok_u
        if state.tok_rollout is None:
            state.tok_rollout, state.tok_verify, state.tok_update = tok_r, tok_v, tok_u
        else:
            state.tok_rollout = w * state.tok_rollout + (1.0 - w) * tok_r
            state.tok_verify = w * state.tok_verify + (1.0 - w) * tok_v
            state.tok_update = w * state.tok_update + (1.0 - w) * tok_u
    spend = float(lengths.sum() + lengths[trained].sum() * num_iterations)
    state.last_spend = spend
    if cfg.token_budget > 0:
        state.kappa_scale = controller_step(state.kappa_scale, spend, cfg.token_budget, cfg.controller_rate,
                                            cfg.kappa_scale_min, cfg.kappa_scale_max)
    state.version = max(state.version, current_version)
    state.step = step + 1
