"""Records produced by rollout and read by budget/ and train/. Defined once, here, by their producer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Prompt:
    """One task instance: what the policy sees and what the reward needs to score it."""

    prompt_id: str
    text: str  # the prompt as the policy sees it (chat template already applied when there is one)
    answer: str = ""  # reference answer for verifiable tasks; "" when a reward function needs none
    family: str = ""  # task family / difficulty bucket, for reporting
    meta: dict = field(default_factory=dict)  # extra columns passed to reward functions as keyword lists


@dataclass
class Trajectory:
    """One sampled episode for one prompt: a single completion, or a multi-turn agent episode.

    `completion_ids` holds everything after the prompt: the policy's tokens interleaved with environment
    observations. `completion_mask[t]` is 1 for a policy token (trained on, has a behaviour logprob) and 0 for an
    observation token (masked out of the loss, counted in the ledger as observation).
    """

    traj_id: str
    prompt_id: str
    group_id: str  # trajectories sampled together for one prompt at one step share a group
    step: int  # trainer step whose rollout produced it
    behavior_version: int  # policy version (number of optimiser updates) that generated it
    prompt_ids: list[int]
    completion_ids: list[int]
    completion_mask: list[int]
    behavior_logprobs: list[float]  # per completion token; 0.0 on observation tokens
    reward: float
    finish_reason: str  # "eos" | "length" (token limit) | "turns" (turn limit) | "submit" | "defer"
    prompt_text: str = ""
    completion_text: str = ""
    family: str = ""
    actions: list[str] = field(default_factory=list)  # one entry per agent action taken, in order
    tokens_verify: int = 0  # tokens spent verifying (e.g. test-run output the agent asked for)

    @property
    def tokens_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def tokens_completion(self) -> int:
        return len(self.completion_ids)

    @property
    def tokens_policy(self) -> int:
        return int(sum(self.completion_mask))

    @property
    def tokens_observation(self) -> int:
        return self.tokens_completion - self.tokens_policy
