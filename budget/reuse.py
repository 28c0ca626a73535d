"""Priced reuse (`budget.reuse_buffer` > 0, marginal policy): trajectories trained on in earlier steps stay in a bounded
buffer and compete with new samples on price.

Each step the buffer's trajectories are priced with the same formula as new ones (budget/pricing.py), at their
staleness Δv = current version − behaviour version: the gain depreciates as exp(−δ·Δv/s) at the drift δ measured on
the reused trajectories themselves (BudgetState.reuse_drift: they move faster than new samples, since every update
that trained on them pushed them; the policy's drift until one is measured) and the staleness risk grows with it, while the cost is the update tokens only (their rollout tokens were spent, and
ledgered, when they were sampled: sunk). The marginal fate rule decides, within each original group: a reused
trajectory is trained on again while its price is positive and its group's admitted members still differ, and leaves
the buffer the first step it is not (there is no version bound). When the buffer is over `capacity`, the lowest
priced leave first. Training on one is importance-corrected as any stale sample is (the trainer's truncated IS
weights on the behaviour log-probabilities the rollout recorded).

Pure: Trajectory records and numbers in and out, no torch. The buffer is part of the budget's checkpointed state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np

from marginal_rl.budget.records import TrajectoryPrices
from marginal_rl.rollout.types import Trajectory, TrajectoryColumns


@dataclass(frozen=True)
class Reuse:
    """The buffer's trajectories offered to one step, priced (what the trainer's update gets besides the new ones)."""

    trajectories: list[Trajectory]
    columns: TrajectoryColumns
    prices: TrajectoryPrices  # fates under the marginal rule: `trained` = trained on again this step
    uses: np.ndarray  # (R,) int64: times each was trained on before this step

    def __len__(self) -> int:
        return len(self.trajectories)

    def tokens(self, num_iterations: int) -> float:
        """Update tokens of the reused trajectories trained on this step (their rollout tokens are sunk)."""
        return float(self._trained_rollout_tokens * num_iterations)

    @cached_property
    def _trained_rollout_tokens(self) -> int:  # the plan, the top-up and the settle each ask for it
        return int((self.columns.tokens_rollout * self.prices.trained).sum())


@dataclass
class ReuseBuffer:
    """Up to `capacity` trajectories already trained on, with how often each was (`uses`), oldest first."""

    capacity: int
    trajectories: list[Trajectory] = field(default_factory=list)
    uses: list[int] = field(default_factory=list)
    _columns: TrajectoryColumns | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.trajectories)

    def columns(self) -> TrajectoryColumns:
        """The buffer's trajectories as columns (built once per refill: the plan and the settle both read them)."""
        if self._columns is None:
            self._columns = TrajectoryColumns.of(self.trajectories)
        return self._columns

    def refill(self, offered: Reuse | None, fresh: list[Trajectory], fresh_prices: TrajectoryPrices,
               fresh_columns: TrajectoryColumns | None = None) -> dict[str, int]:
        """After a step: the reused trajectories trained on again stay (one more use), the others leave (their price
        was not positive); the step's new trajectories that were trained on join with one use; then, over capacity,
        the lowest priced (this step's price) leave. Returns the counts {kept, dropped, added, dropped_capacity}
        (dropped: not trained on again, its price not positive or its group left without a signal). With
        `fresh_columns` (`fresh` as columns) the buffer's columns are taken from the offer's and the step's rows
        instead of being read again from its records."""
        empty = np.zeros(0, dtype=np.int64)
        again = offered.prices.trained.nonzero()[0] if offered is not None else empty
        new = fresh_prices.trained.nonzero()[0]
        kept = [offered.trajectories[i] for i in again.tolist()] if offered is not None else []
        trajectories = kept + [fresh[i] for i in new.tolist()]
        uses = np.concatenate([offered.uses[again] + 1 if offered is not None else empty, np.ones(len(new), np.int64)])
        columns = None
        if fresh_columns is not None:
            columns = TrajectoryColumns.take(([(offered.columns, again)] if offered is not None else [])
                                             + [(fresh_columns, new)])
        over = len(trajectories) - self.capacity
        if over > 0:  # the highest priced stay, in their order (stable: ties keep the older)
            price = np.concatenate([offered.prices.price[again] if offered is not None else np.zeros(0),
                                    fresh_prices.price[new]])
            stay = np.sort(np.argsort(-price, kind="stable")[: self.capacity])
            trajectories, uses = [trajectories[i] for i in stay.tolist()], uses[stay]
            columns = None if columns is None else TrajectoryColumns.take([(columns, stay)])
        self.trajectories, self.uses, self._columns = trajectories, uses.tolist(), columns
        return {"kept": len(kept), "dropped": (len(offered) if offered is not None else 0) - len(kept),
                "added": len(new), "dropped_capacity": max(over, 0)}

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "trajectories": [asdict(t) for t in self.trajectories],
                "uses": list(self.uses)}

    @classmethod
    def from_state_dict(cls, d: dict) -> ReuseBuffer:
        return cls(d["capacity"], [Trajectory(**t) for t in d["trajectories"]], list(d["uses"]))


def reuse_metrics(reuse: Reuse | None, moved: dict[str, int], size: int, tokens: float, drift: float) -> dict:
    """The step's budget/reuse_... scalars: what was offered and trained on again, its tokens and staleness, the
    buffer's size after the refill and what joined or left it (`moved`, ReuseBuffer.refill's counts), and δ_reuse."""
    trained = reuse.prices.trained if reuse is not None else np.zeros(0, dtype=bool)
    staleness = reuse.prices.staleness[trained] if reuse is not None else np.zeros(0)
    return {"budget/reuse_offered": float(len(trained)), "budget/reuse_trained": float(trained.sum()),
            "budget/reuse_tokens": float(tokens),
            "budget/reuse_staleness": float(staleness.sum()) / len(staleness) if len(staleness) else 0.0,
            "budget/reuse_buffer": float(size), "budget/reuse_drift": float(drift),
            **{f"budget/reuse_{k}": float(v) for k, v in moved.items() if k != "kept"}}
