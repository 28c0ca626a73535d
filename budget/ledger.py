"""The token ledger: every token counted by use and by fate. Pure accumulation, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from budget.policies import FATES, TrajectoryDecision
from rollout.types import Trajectory

USES = ("prefill", "decode", "observation", "verify", "train")


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

    def record_step(self, trajectories: Sequence[Trajectory], decisions: Sequence[TrajectoryDecision],
                    num_iterations: int, prompts_skipped: int = 0) -> None:
        for t, d in zip(trajectories, decisions, strict=True):
            toks = trajectory_tokens(t)
            for use, n in toks.items():
                self.by_use[use] += n
            self.by_fate[d.fate] += sum(toks.values())
            self.trajectories_by_fate[d.fate] += 1
            if d.trained:
                self.by_use["train"] += train_tokens(t, num_iterations)
        self.prompts_skipped += prompts_skipped

    @property
    def rollout_tokens(self) -> int:
        return self.by_use["prefill"] + self.by_use["decode"] + self.by_use["observation"] + self.by_use["verify"]

    @property
    def total_tokens(self) -> int:
        return self.rollout_tokens + self.by_use["train"]

    def state_dict(self) -> dict:
        return {"by_use": dict(self.by_use), "by_fate": dict(self.by_fate),
                "trajectories_by_fate": dict(self.trajectories_by_fate), "prompts_skipped": self.prompts_skipped}

    @classmethod
    def from_state_dict(cls, d: dict) -> Ledger:
        return cls(by_use=dict(d["by_use"]), by_fate=dict(d["by_fate"]),
                   trajectories_by_fate=dict(d["trajectories_by_fate"]), prompts_skipped=d["prompts_skipped"])
