"""Example reward functions with TRL's signature, used by configs/dataset_example.yaml (docs/reward_functions.md).

The same functions work unchanged as `reward_funcs` of TRL's GRPOTrainer: each gets the batch's prompts and
completions (conversational here: lists of {"role", "content"} messages), every other dataset column as a keyword
list (here `answer`), and returns one float, or None for "no opinion", per completion.
"""

from __future__ import annotations

import re

ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the completion puts its final answer between <answer> and </answer>, else 0.0."""
    return [1.0 if ANSWER.search(_text(c)) else 0.0 for c in completions]


def accuracy_reward(completions, answer, **kwargs) -> list[float | None]:
    """1.0 when the tagged answer equals the reference, 0.0 when it differs, None when there is no tagged answer
    (format_reward already scores that case)."""
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        match = ANSWER.search(_text(completion))
        rewards.append(None if match is None else float(match.group(1).replace(" ", "") == str(reference)))
    return rewards


def exact_match(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's first line, stripped, is the reference answer exactly (the string benchmark task,
    configs/bench_strings.yaml; the arithmetic task's built-in verifier applies the same rule)."""
    return [float(_text(c).split("\n")[0].strip() == str(a)) for c, a in zip(completions, answer, strict=True)]
