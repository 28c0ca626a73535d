"""Built-in verifiable tasks: arithmetic prompts with known answers and a spread of difficulty.

The mix is chosen to look like real RL data for a small warm-started policy (measured numbers in docs/tasks.md):
some families are (almost) always solved, some never, and the rest sit in between, so allocation has something
to decide. Prompts are deterministic given `TaskConfig.seed`; train and eval splits never share a prompt.

    family  example        share   what it takes
    copy    "copy 407="    15 %    echo three digits                      (easy: solved almost always)
    add1    "3+4="         20 %    one-digit sum                           (easy to medium)
    add2    "23+45="       25 %    two-digit sum, carries                  (medium: the wide middle)
    add3    "123+456="     25 %    three-digit sum, carries                (hard: solved sometimes)
    mul2    "23*45="       15 %    two-digit product                       (never solved by the tiny policy)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rollout.config import RolloutConfig, TaskConfig
from rollout.generator import rollout_groups
from rollout.types import Prompt, Trajectory

FAMILIES: dict[str, tuple[float, Callable[[random.Random], tuple[str, str]]]] = {
    "copy": (0.15, lambda r: (lambda n: (f"copy {n}=", n))(f"{r.randrange(1000):03d}")),
    "add1": (0.15, lambda r: (lambda a, b: (f"{a}+{b}=", str(a + b)))(r.randrange(10), r.randrange(10))),
    "add21": (0.25, lambda r: (lambda a, b: (f"{a}+{b}=", str(a + b)))(r.randrange(10, 100), r.randrange(10))),
    "add2": (0.25, lambda r: (lambda a, b: (f"{a}+{b}=", str(a + b)))(r.randrange(10, 100), r.randrange(10, 100))),
    "add3": (0.10, lambda r: (lambda a, b: (f"{a}+{b}=", str(a + b)))(r.randrange(100, 1000), r.randrange(100, 1000))),
    "mul2": (0.10, lambda r: (lambda a, b: (f"{a}*{b}=", str(a * b)))(r.randrange(10, 100), r.randrange(10, 100))),
}


def generate_arith(num_train: int, num_eval: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Deterministic train/eval prompts drawn from the family mix; a prompt text appears in one split only."""
    rng = random.Random(seed)
    names = list(FAMILIES)
    weights = [FAMILIES[n][0] for n in names]
    seen: set[str] = set()
    out: list[Prompt] = []
    for _ in range(50 * (num_train + num_eval)):
        if len(out) == num_train + num_eval:
            break
        family = rng.choices(names, weights)[0]
        text, answer = FAMILIES[family][1](rng)
        if text in seen:  # small families (add1 has 100 prompts) run out: keep the splits disjoint
            continue
        seen.add(text)
        out.append(Prompt(prompt_id=f"{family}-{len(out)}", text=text, answer=answer, family=family))
    if len(out) < num_train + num_eval:
        raise ValueError(f"task.num_train + task.num_eval: expected at most ~10000 arithmetic prompts, got {num_train + num_eval}")
    return out[:num_train], out[num_train:]


def sample_arith(n: int, seed: int) -> list[tuple[str, str]]:
    """n fresh (prompt, answer) pairs from the family mix, repeats allowed: a warm-start corpus that teaches the
    skill rather than the RL prompts (a tiny model would memorise those and learn nothing that transfers)."""
    rng = random.Random(seed)
    names = list(FAMILIES)
    weights = [FAMILIES[n][0] for n in names]
    return [FAMILIES[rng.choices(names, weights)[0]][1](rng) for _ in range(n)]


def exact_match(prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
    """1.0 when the completion (up to the first newline, spaces stripped) equals the reference answer."""
    return [float(c.split("\n")[0].strip() == p.answer) for p, c in zip(prompts, completions, strict=True)]


@dataclass
class TaskSet:
    """Prompts, the reward that scores completions of them, and how an episode is rolled out.

    Single-turn tasks use `rollout_groups`; an agent task overrides `rollout` with its multi-turn episode loop.
    The trainer only ever calls `rollout`, for training and for eval."""

    train: list[Prompt]
    eval: list[Prompt]
    reward: Callable[[Sequence[Prompt], Sequence[str]], list[float]]
    demonstrations: Callable[[], list[tuple[str, str]]]  # (prompt, ideal completion) pairs for a warm start
    key: dict  # what identifies the task, for caching a policy warm-started on it

    def rollout(self, model, tokenizer, allocation: Sequence[tuple[Prompt, int]], cfg: RolloutConfig, *, step: int,
                version: int, temperature: float, id_prefix: str = "") -> list[Trajectory]:
        """`n` episodes for each (prompt, n) in `allocation` at `temperature` (0 = greedy)."""
        return rollout_groups(model, tokenizer, allocation, self.reward, step=step, version=version,
                              max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p,
                              batch_size=cfg.batch_size, id_prefix=id_prefix)


WARM_START_EXAMPLES = 50_000


def build_arith(cfg: TaskConfig, rollout_cfg: RolloutConfig) -> TaskSet:
    train, eval_ = generate_arith(cfg.num_train, cfg.num_eval, cfg.seed)
    return TaskSet(train, eval_, exact_match, lambda: sample_arith(WARM_START_EXAMPLES, cfg.seed + 1),
                   {"name": "arith", "seed": cfg.seed, "families": {k: v[0] for k, v in FAMILIES.items()}})
