"""Records produced by rollout and read by budget/ and train/. Defined once, here, by their producer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


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
    # each reward function's own value, by name, before weighting (NaN: the function gave none); `reward` combines
    # them (a weighted sum). Empty for a record made by hand: it then counts as one function named "reward".
    rewards: dict[str, float] = field(default_factory=dict)

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


@dataclass(frozen=True, eq=False)
class TrajectoryColumns:
    """One step's trajectories as read-only numpy columns, (N,) each, built in one pass by `of`: what budget/ reads,
    so that no per-trajectory number is recomputed from the records by each consumer."""

    reward: np.ndarray  # float64
    group: np.ndarray  # int64: dense group ids 0..G-1, in first-seen order
    group_ids: list[str]  # (G,) group_id of each dense id
    group_prompt_ids: list[str]  # (G,) prompt_id of each group (that of its first trajectory)
    tokens_prompt: np.ndarray  # int64, as Trajectory.tokens_prompt
    tokens_completion: np.ndarray  # int64, as Trajectory.tokens_completion (policy + observation tokens)
    tokens_policy: np.ndarray  # int64, as Trajectory.tokens_policy
    tokens_verify: np.ndarray  # int64, as Trajectory.tokens_verify
    behavior_version: np.ndarray  # int64

    @classmethod
    def of(cls, trajectories: Sequence[Trajectory]) -> TrajectoryColumns:
        ids: dict[str, int] = {}
        prompt_ids: list[str] = []
        for t in trajectories:
            if t.group_id not in ids:
                ids[t.group_id] = len(ids)
                prompt_ids.append(t.prompt_id)
        n = len(trajectories)

        def column(values: list, dtype=np.int64) -> np.ndarray:
            return _frozen(np.fromiter(values, dtype=dtype, count=n))

        return cls(reward=column([t.reward for t in trajectories], float),
                   group=column([ids[t.group_id] for t in trajectories]), group_ids=list(ids),
                   group_prompt_ids=prompt_ids, tokens_prompt=column([len(t.prompt_ids) for t in trajectories]),
                   tokens_completion=column([len(t.completion_ids) for t in trajectories]),
                   tokens_policy=column([sum(t.completion_mask) for t in trajectories]),
                   tokens_verify=column([t.tokens_verify for t in trajectories]),
                   behavior_version=column([t.behavior_version for t in trajectories]))

    @classmethod
    def take(cls, parts: Sequence[tuple[TrajectoryColumns, np.ndarray]]) -> TrajectoryColumns:
        """The rows `rows` (int indices) of each part's columns, in order: what `of` gives for the same trajectories,
        without reading the records again (the trajectories of one group share its prompt, as rollout makes them)."""
        if not parts:
            return cls.of([])
        ids: dict[str, int] = {}
        prompt_ids: list[str] = []
        groups = []
        for cols, rows in parts:
            local = cols.group[rows]
            lookup = np.zeros(max(cols.num_groups, 1), dtype=np.int64)
            for g in dict.fromkeys(local.tolist()):  # the part's groups in first-seen order
                gid = cols.group_ids[g]
                if gid not in ids:
                    ids[gid] = len(ids)
                    prompt_ids.append(cols.group_prompt_ids[g])
                lookup[g] = ids[gid]
            groups.append(lookup[local])

        def column(name: str) -> np.ndarray:
            return _frozen(np.concatenate([getattr(cols, name)[rows] for cols, rows in parts]))

        return cls(reward=column("reward"), group=_frozen(np.concatenate(groups)), group_ids=list(ids),
                   group_prompt_ids=prompt_ids, tokens_prompt=column("tokens_prompt"),
                   tokens_completion=column("tokens_completion"), tokens_policy=column("tokens_policy"),
                   tokens_verify=column("tokens_verify"), behavior_version=column("behavior_version"))

    def __len__(self) -> int:
        return len(self.reward)

    @property
    def num_groups(self) -> int:
        return len(self.group_ids)

    @cached_property
    def group_size(self) -> np.ndarray:
        """(G,) int64: members of each group."""
        return _frozen(np.bincount(self.group, minlength=self.num_groups))

    @cached_property
    def group_flat(self) -> np.ndarray:
        """(G,) bool: every reward in the group is the same (its group-relative advantages are all zero)."""
        lo, hi = np.empty(self.num_groups), np.empty(self.num_groups)
        lo.fill(np.inf)  # (np.full takes twice as long at these sizes: it works out the fill value's dtype first)
        hi.fill(-np.inf)
        np.minimum.at(lo, self.group, self.reward)
        np.maximum.at(hi, self.group, self.reward)
        return _frozen(lo == hi)

    @cached_property
    def tokens_rollout(self) -> np.ndarray:
        """Prompt + completion tokens of each trajectory (prefill, decode, observation and verification)."""
        return _frozen(self.tokens_prompt + self.tokens_completion)


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr
