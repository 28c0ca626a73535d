"""The budget's results, as columns: PromptPlan (before rollout, one entry per candidate prompt) and TrajectoryPrices
(after rollout, one entry per trajectory). Both are read-only numpy columns that also read as sequences of
PromptDecision / TrajectoryDecision rows, for code that iterates; `of(rows)` builds the columns from rows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

FATES = ("trained", "zero_signal", "dropped_price", "dropped_stale")
TRAINED, ZERO_SIGNAL, DROPPED_PRICE, DROPPED_STALE = range(len(FATES))  # fate codes: FATES[code]
_FATE_NAMES = np.array(FATES, dtype=object)
# Why a candidate prompt got no samples ("" for a sampled one): `history` (prior: its last groups carried no signal,
# and the exploration draw passed it over), `pool_full` (the step already had prompts_per_step prompts), `price` (no
# group size of it has a positive price), `budget` (priced positive, but the step's sample or token limit was spent).
SKIP_REASONS = ("", "history", "pool_full", "price", "budget")
SAMPLED, HISTORY, POOL_FULL, PRICE, BUDGET = range(len(SKIP_REASONS))  # reason codes: SKIP_REASONS[code]
_REASON_NAMES = np.array(SKIP_REASONS, dtype=object)


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
    sampled_rate: float = 0.0  # the pass rate the price was computed at (posterior=thompson: a draw; else the mean)
    informative: float = 0.0  # P(the group's rewards differ) = 1 − pⁿ − (1 − p)ⁿ at the priced n
    tokens: float = 0.0  # expected tokens (rollout + verify + expected update) at the priced n
    reason: str = ""  # why it was skipped (SKIP_REASONS); "" when sampled


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
    reason_code: np.ndarray  # (P,) int8, SKIP_REASONS[code]
    probed: np.ndarray | None = None  # (P,) bool: the likelihood probe scored it this step (None: probe off)
    probe_tokens: int = 0  # tokens the step's likelihood probe processed (spent before rollout)
    pilot: np.ndarray | None = None  # (P,) int64: samples drawn as the group's pilot (None: pilot off)

    def __len__(self) -> int:
        return len(self.samples)

    def _columns(self) -> list[Any]:
        return [self.prompt_ids, self.samples, self.pass_rate, self.gain, self.cost, self.price, self.risk,
                self.sampled_rate, self.informative, self.tokens, _REASON_NAMES[self.reason_code]]

    @property
    def reasons(self) -> list[str]:
        return _REASON_NAMES[self.reason_code].tolist()

    @classmethod
    def of(cls, decisions: Sequence[PromptDecision]) -> PromptPlan:
        return cls([d.prompt_id for d in decisions], cls._gather(decisions, "samples", np.int64),
                   *(cls._gather(decisions, f.name) for f in fields(PromptDecision)[2:-1]),
                   np.array([SKIP_REASONS.index(d.reason) for d in decisions], dtype=np.int8))


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

    @cached_property
    def trained(self) -> np.ndarray:
        """(N,) bool, read-only: trained on."""
        trained = self.fate_code == TRAINED
        trained.flags.writeable = False
        return trained

    @classmethod
    def of(cls, decisions: Sequence[TrajectoryDecision]) -> TrajectoryPrices:
        return cls(np.array([FATES.index(d.fate) for d in decisions], dtype=np.int8),
                   *(cls._gather(decisions, f.name, np.int64 if f.name == "staleness" else float)
                     for f in fields(TrajectoryDecision)[1:]))
