"""Built-in verifiable tasks: arithmetic prompts with known answers and a spread of difficulty.

Families (share of prompts): copy 15 %, add1 15 %, add21 25 %, add2 25 %, add3 10 %, mul2 10 %. For the warm-started
tiny policy about a third of prompts are never solved, an eighth always, the rest sometimes (docs/tasks.md has the
measured mix). Prompts are deterministic given `TaskConfig.seed`; train and eval splits never share a prompt.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from marginal_rl.rollout.config import ArithTaskConfig, RolloutConfig
from marginal_rl.rollout.errors import TaskError
from marginal_rl.rollout.generator import answer_likelihood, encode_prompt, rollout_groups
from marginal_rl.rollout.types import Prompt, Trajectory


@dataclass(frozen=True)
class Family:
    share: float  # fraction of prompts drawn from this family
    hedge: float  # fraction of warm-start demonstrations that end with a stray "." the verifier rejects
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (prompt, answer)


def _sum(lo_a: int, hi_a: int, lo_b: int, hi_b: int) -> Callable[[random.Random], tuple[str, str]]:
    def make(r: random.Random) -> tuple[str, str]:
        a, b = r.randrange(lo_a, hi_a), r.randrange(lo_b, hi_b)
        return f"{a}+{b}=", str(a + b)

    return make


def _copy(r: random.Random) -> tuple[str, str]:
    n = f"{r.randrange(1000):03d}"
    return f"copy {n}=", n


def _product(r: random.Random) -> tuple[str, str]:
    a, b = r.randrange(10, 100), r.randrange(10, 100)
    return f"{a}*{b}=", str(a * b)


FAMILIES: dict[str, Family] = {
    "copy": Family(0.15, 0.0, _copy),
    "add1": Family(0.15, 0.1, _sum(0, 10, 0, 10)),
    "add21": Family(0.25, 0.4, _sum(10, 100, 0, 10)),
    "add2": Family(0.25, 0.4, _sum(10, 100, 10, 100)),
    "add3": Family(0.10, 0.4, _sum(100, 1000, 100, 1000)),
    "mul2": Family(0.10, 0.4, _product),
}


def generate_arith(num_train: int, num_eval: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Deterministic train/eval prompts drawn from the family mix; a prompt text appears in one split only."""
    rng = random.Random(seed)
    names = list(FAMILIES)
    weights = [FAMILIES[n].share for n in names]
    seen: set[str] = set()
    out: list[Prompt] = []
    for _ in range(50 * (num_train + num_eval)):
        if len(out) == num_train + num_eval:
            break
        family = rng.choices(names, weights)[0]
        text, answer = FAMILIES[family].make(rng)
        if text in seen:  # small families (add1 has 100 prompts) run out: keep the splits disjoint
            continue
        seen.add(text)
        out.append(Prompt(prompt_id=f"{family}-{len(out)}", text=text, answer=answer, family=family))
    if len(out) < num_train + num_eval:
        raise ValueError(f"task.num_train + task.num_eval: expected at most ~10000 arithmetic prompts, got {num_train + num_eval}")
    return out[:num_train], out[num_train:]


def sample_demonstrations(n: int, seed: int) -> list[tuple[str, str]]:
    """n fresh (prompt, completion) pairs from the family mix, repeats allowed: a warm-start corpus that teaches the
    skill rather than the RL prompts (a tiny model would memorise those and learn nothing that transfers).

    Like real SFT data it is imperfect: per family, a share of completions end with a stray "." (an unsure
    teacher), which the strict verifier rejects. The policy inherits the habit; RL can remove it everywhere."""
    rng = random.Random(seed)
    names = list(FAMILIES)
    weights = [FAMILIES[n].share for n in names]
    out = []
    for _ in range(n):
        family = FAMILIES[rng.choices(names, weights)[0]]
        prompt, answer = family.make(rng)
        out.append((prompt, answer + "." if rng.random() < family.hedge else answer))
    return out


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
    reward_name: str = "reward"  # how metrics and the store name `reward` (TRL: the reward function's name)
    finish_reasons: ClassVar[tuple[str, ...]] = ("eos", "length")  # how an episode can end (Trajectory.finish_reason)

    probes: ClassVar[bool] = True  # single-turn: a completion is the answer, so the likelihood probe applies

    def prompt_ids(self, tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Each prompt's token ids as `rollout` feeds them to the model."""
        return [encode_prompt(tokenizer, p.text) for p in prompts]

    def prompt_lengths(self, tokenizer, prompts: Sequence[Prompt]) -> list[int]:
        """Tokens of each prompt as `rollout` feeds it to the model (what the context check reads)."""
        return [len(ids) for ids in self.prompt_ids(tokenizer, prompts)]

    def answer_likelihood(self, model, tokenizer, prompts: Sequence[Prompt], temperature: float,
                          batch_size: int = 256) -> tuple[list[float], list[int]]:
        """The budget's likelihood probe: the probability that `model` sampled at `temperature` answers each prompt
        with its reference `answer` followed by EOS (generator.answer_likelihood), and the tokens each forward pass
        processed (prompt + answer + EOS)."""
        if not self.probes:
            raise TaskError("answer_likelihood: this task's episodes are multi-turn; the probe scores one-turn answers")
        missing = [p.prompt_id for p in prompts if not p.answer]
        if missing:
            raise TaskError(f"answer_likelihood: {len(missing)} prompt(s) without a reference answer (first: "
                            f"{', '.join(missing[:3])})")
        ids = self.prompt_ids(tokenizer, prompts)
        answers = [tokenizer(p.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                   for p in prompts]
        return (answer_likelihood(model, ids, answers, temperature, batch_size),
                [len(i) + len(a) for i, a in zip(ids, answers, strict=True)])

    def completion_budget(self, cfg: RolloutConfig) -> tuple[int, str]:
        """The most tokens an episode adds after its prompt, and the key that sets it."""
        return cfg.max_new_tokens, "rollout.max_new_tokens"

    def rollout(self, model, tokenizer, allocation: Sequence[tuple[Prompt, int]], cfg: RolloutConfig, *, step: int,
                version: int, temperature: float, id_prefix: str = "") -> list[Trajectory]:
        """`n` episodes for each (prompt, n) in `allocation` at `temperature` (0 = greedy)."""
        return rollout_groups(model, tokenizer, allocation, self.reward, step=step, version=version,
                              max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p,
                              batch_size=cfg.batch_size, id_prefix=id_prefix, reward_name=self.reward_name)


WARM_START_EXAMPLES = 50_000


def build_arith(cfg: ArithTaskConfig, rollout_cfg: RolloutConfig) -> TaskSet:
    train, eval_ = generate_arith(cfg.num_train, cfg.num_eval, cfg.seed)
    return TaskSet(train, eval_, exact_match, lambda: sample_demonstrations(WARM_START_EXAMPLES, cfg.seed + 1),
                   {"name": "arith", "seed": cfg.seed,
                    "families": {k: (f.share, f.hedge) for k, f in FAMILIES.items()}}, reward_name="exact_match")
