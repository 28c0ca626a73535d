"""The token ledger: every token counted by use and by fate. Pure accumulation, no I/O.

Uses: prefill (prompt tokens, once per sample), decode (policy tokens), observation (environment tokens that are not
verification), verify (verification tokens), train (training tokens: prompt + completion per epoch of a trained
trajectory), reuse (training tokens of trajectories trained on again), probe (the likelihood probe's forward passes
over prompt + reference answer, before rollout). Fates (rollout tokens of each trajectory): trained, zero_signal,
dropped_price, dropped_stale; prompts skipped before rollout cost no tokens and are counted as prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from marginal_rl.budget.records import FATES, TrajectoryPrices
from marginal_rl.rollout.types import Trajectory, TrajectoryColumns

USES = ("prefill", "decode", "observation", "verify", "train", "reuse", "probe")


def trajectory_tokens(t: Trajectory) -> dict[str, int]:
    """Rollout tokens of one trajectory by use. Verification tokens are the observations the agent asked to verify."""
    return {
        "prefill": t.tokens_prompt,
        "decode": t.tokens_policy,
        "observation": t.tokens_observation - t.tokens_verify,
        "verify": t.tokens_verify,
    }


def train_tokens(t: Trajectory, num_iterations: int) -> int:
    """Tokens processed by training one trajectory: forward + backward over prompt and completion, per epoch."""
    return (t.tokens_prompt + t.tokens_completion) * num_iterations


@dataclass
class Ledger:
    by_use: dict[str, int] = field(default_factory=lambda: dict.fromkeys(USES, 0))
    by_fate: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FATES, 0))  # rollout tokens, by fate
    trajectories_by_fate: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FATES, 0))
    prompts_skipped: int = 0
    reused: int = 0  # trajectories trained on again in a later step (priced reuse), one per reuse
    probed: int = 0  # prompts scored by the likelihood probe, one per probe
    steps: int = 0
    groups: int = 0
    zero_signal_groups: int = 0  # groups whose rewards were all equal, whatever their fate
    reward_sum: float = 0.0  # sum of rollout rewards
    hindsight_rollout: int = 0  # rollout tokens of groups that turned out to carry no signal
    hindsight_train: int = 0  # training tokens spent on such groups (policies that train on them)
    hindsight_bound: int = 0  # tokens of sampling only the groups that carried a signal and training on all of them
    evals: list[list[float]] = field(default_factory=list)  # [step, eval reward, total tokens at that point]

    def record_step(self, cols: TrajectoryColumns, prices: TrajectoryPrices, num_iterations: int,
                    prompts_skipped: int = 0, *, reused: int = 0, reuse_tokens: int = 0, probe_tokens: int = 0,
                    probed: int = 0) -> None:
        """One step: its new trajectories `cols` with their `prices` (fates), the `reused` trajectories it trained
        on again with their `reuse_tokens` (update tokens only), and the `probed` prompts its likelihood probe scored
        with their `probe_tokens`."""
        if len(cols) != len(prices):
            raise ValueError(f"record_step: {len(prices)} decisions for {len(cols)} trajectories")
        rollout = cols.tokens_rollout  # = the sum of trajectory_tokens(t)
        trained = rollout * prices.trained * num_iterations  # = train_tokens(t, num_iterations) when trained
        prefill, decode = int(cols.tokens_prompt.sum()), int(cols.tokens_policy.sum())
        verify = int(cols.tokens_verify.sum())
        for use, n in (("prefill", prefill), ("decode", decode), ("verify", verify),
                       ("observation", int(cols.tokens_completion.sum()) - decode - verify),
                       ("train", int(trained.sum())), ("reuse", int(reuse_tokens)), ("probe", int(probe_tokens))):
            self.by_use[use] += n
        tokens_by_fate = np.bincount(prices.fate_code, weights=rollout, minlength=len(FATES)).astype(np.int64)
        count_by_fate = np.bincount(prices.fate_code, minlength=len(FATES))
        for fate, tokens, count in zip(FATES, tokens_by_fate.tolist(), count_by_fate.tolist(), strict=True):
            self.by_fate[fate] += tokens
            self.trajectories_by_fate[fate] += count
        if len(cols):
            self.reward_sum += float(np.cumsum(cols.reward)[-1])  # summed left to right, in trajectory order
        flat_group = cols.group_flat  # the group's rewards were all equal: it carried no signal
        flat = flat_group[cols.group]
        self.groups += cols.num_groups
        self.zero_signal_groups += int(flat_group.sum())
        self.hindsight_rollout += int(rollout[flat].sum())
        self.hindsight_train += int(trained[flat].sum())
        self.hindsight_bound += int(rollout[~flat].sum()) * (1 + num_iterations)
        self.prompts_skipped += int(prompts_skipped)
        self.reused += int(reused)
        self.probed += int(probed)
        self.steps += 1

    def record_eval(self, step: int, reward: float) -> None:
        """Note an eval result (of budget.target_metric) together with the total tokens spent so far."""
        self.evals.append([int(step), float(reward), int(self.total_tokens)])

    @property
    def rollout_tokens(self) -> int:
        return self.by_use["prefill"] + self.by_use["decode"] + self.by_use["observation"] + self.by_use["verify"]

    @property
    def total_tokens(self) -> int:
        return self.rollout_tokens + self.by_use["train"] + self.by_use["reuse"] + self.by_use["probe"]

    @property
    def trajectories(self) -> int:
        return sum(self.trajectories_by_fate.values())

    @property
    def wasted_tokens(self) -> int:
        """Rollout tokens of trajectories not trained on."""
        return self.rollout_tokens - self.by_fate["trained"]

    @property
    def hindsight_gap(self) -> int:
        """Tokens (rollout + training) spent on groups that carried no signal: what hindsight would not have spent."""
        return self.hindsight_rollout + self.hindsight_train

    def tokens_to_target(self, target: float) -> int | None:
        """Total tokens spent when an eval first reached `target`; None if none has."""
        return next((int(tok) for _, r, tok in self.evals if r >= target), None)

    def tokens_to_delta(self, delta: float) -> int | None:
        """tokens_to_target of the first eval + `delta` (a target relative to the run's own start)."""
        return self.tokens_to_target(self.evals[0][1] + delta) if self.evals else None

    def over_hindsight(self) -> float:
        """The run's tokens over the hindsight bound (>= 1 for a run that trains on every signal group; NaN before a
        signal group)."""
        return self.total_tokens / self.hindsight_bound if self.hindsight_bound else float("nan")

    def reward_per_mtok(self) -> float:
        """Rollout reward earned per million tokens spent (rollout + training); NaN before any token."""
        return self.reward_sum / self.total_tokens * 1e6 if self.total_tokens else float("nan")

    def eval_gain_per_mtok(self) -> float:
        """(last eval reward − first eval reward) per million tokens spent between them; NaN with < 2 evals."""
        if len(self.evals) < 2 or self.evals[-1][2] == self.evals[0][2]:
            return float("nan")
        return (self.evals[-1][1] - self.evals[0][1]) / (self.evals[-1][2] - self.evals[0][2]) * 1e6

    def metrics(self, target: float | None = None, delta: float | None = None) -> dict[str, float]:
        """Cumulative `ledger/...` scalars (tokens unless stated)."""
        total, roll = self.total_tokens, self.rollout_tokens
        out: dict[str, float] = {f"ledger/tokens_{use}": float(n) for use, n in self.by_use.items()}
        out.update({"ledger/tokens_rollout": float(roll), "ledger/tokens_total": float(total)})
        out.update({f"ledger/tokens_{fate}": float(n) for fate, n in self.by_fate.items()})
        out.update({f"ledger/trajectories_{fate}": float(n) for fate, n in self.trajectories_by_fate.items()})
        tt = self.tokens_to_target(target) if target is not None else None
        out.update({
            "ledger/prompts_skipped": float(self.prompts_skipped),
            "ledger/trajectories_reused": float(self.reused),
            "ledger/prompts_probed": float(self.probed),
            "ledger/tokens_wasted": float(self.wasted_tokens),
            "ledger/wasted_fraction": self.wasted_tokens / roll if roll else float("nan"),
            "ledger/hindsight_gap_tokens": float(self.hindsight_gap),
            "ledger/hindsight_gap_fraction": self.hindsight_gap / total if total else float("nan"),
            "ledger/hindsight_bound_tokens": float(self.hindsight_bound),
            "ledger/tokens_over_hindsight": self.over_hindsight(),
            "ledger/zero_signal_group_fraction": self.zero_signal_groups / self.groups if self.groups else float("nan"),
            "ledger/reward_per_mtok": self.reward_per_mtok(),
            "ledger/eval_gain_per_mtok": self.eval_gain_per_mtok(),
            "ledger/tokens_to_target": float("nan") if tt is None else float(tt),
        })
        if delta is not None:
            td = self.tokens_to_delta(delta)
            out["ledger/tokens_to_target_delta"] = float("nan") if td is None else float(td)
        return out

    def summary(self, target: float | None = None, delta: float | None = None) -> dict:
        """Plain-data summary for summary.json (None where a number is undefined)."""

        def num(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {
            "tokens_by_use": dict(self.by_use), "tokens_by_fate": dict(self.by_fate),
            "trajectories_by_fate": dict(self.trajectories_by_fate), "prompts_skipped": self.prompts_skipped,
            "trajectories_reused": self.reused, "prompts_probed": self.probed, "tokens_rollout": self.rollout_tokens,
            "tokens_total": self.total_tokens,
            "tokens_wasted": self.wasted_tokens, "hindsight_gap_tokens": self.hindsight_gap,
            "hindsight_bound_tokens": self.hindsight_bound, "tokens_over_hindsight": num(self.over_hindsight()),
            "zero_signal_groups": self.zero_signal_groups, "groups": self.groups,
            "reward_per_mtok": num(self.reward_per_mtok()), "eval_gain_per_mtok": num(self.eval_gain_per_mtok()),
            "target_reward": target,
            "tokens_to_target": self.tokens_to_target(target) if target is not None else None,
            "target_delta": delta, "tokens_to_target_delta": self.tokens_to_delta(delta) if delta else None,
            "eval_history": [{"step": int(s), "reward": r, "tokens": int(tok)} for s, r, tok in self.evals],
        }

    def state_dict(self) -> dict:
        return {"by_use": dict(self.by_use), "by_fate": dict(self.by_fate),
                "trajectories_by_fate": dict(self.trajectories_by_fate), "prompts_skipped": self.prompts_skipped,
                "reused": self.reused, "probed": self.probed, "steps": self.steps, "groups": self.groups,
                "zero_signal_groups": self.zero_signal_groups,
                "reward_sum": self.reward_sum, "hindsight_rollout": self.hindsight_rollout,
                "hindsight_train": self.hindsight_train, "hindsight_bound": self.hindsight_bound, "evals": [list(e) for e in self.evals]}

    @classmethod
    def from_state_dict(cls, d: dict) -> Ledger:
        return cls(by_use={**dict.fromkeys(USES, 0), **d["by_use"]}, by_fate=dict(d["by_fate"]),
                   trajectories_by_fate=dict(d["trajectories_by_fate"]), prompts_skipped=d["prompts_skipped"],
                   reused=d.get("reused", 0), probed=d.get("probed", 0),
                   steps=d.get("steps", 0), groups=d.get("groups", 0),
                   zero_signal_groups=d.get("zero_signal_groups", 0),
                   reward_sum=d.get("reward_sum", 0.0), hindsight_rollout=d.get("hindsight_rollout", 0),
                   hindsight_train=d.get("hindsight_train", 0), hindsight_bound=d.get("hindsight_bound", 0), evals=[list(e) for e in d.get("evals", [])])
