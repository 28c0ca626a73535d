"""Multi-turn agent episodes: the policy's turns interleaved with environment observations, batched across episodes.

One episode in tokens (everything after the prompt is the Trajectory's `completion_ids`):

    prompt | turn 1 ... EOS | observation 1 | turn 2 ... EOS | observation 2 | ... | last turn ... EOS
             mask 1           mask 0          mask 1           mask 0                  mask 1

Every turn is sampled conditioned on exactly `prompt_ids + completion_ids` so far: token ids are concatenated, never
re-tokenised from text, so teacher forcing over the finished trajectory reproduces the behaviour logprobs. All active
episodes generate their next turn in one batched `sample` call; finished ones drop out.

Two layouts (`TurnFormat`):
- chat (the tokenizer has a chat template, e.g. SmolLM2-Instruct): the first user message is rendered with
  `apply_chat_template(..., add_generation_prompt=True)`; an observation is the template's text between the end of an
  assistant message and the start of the next one, with the observation as the user message's content
  (ChatML: `\\n<|im_start|>user\\n{obs}<|im_end|>\\n<|im_start|>assistant\\n`);
- plain (no template, the tiny policy): `{user}\\n`, then each turn ends with EOS and each observation is
  `\\n<observation>\\n{obs}\\n</observation>\\n` (`rollout.fix_test.format_observation`).
A turn cut off by the token limit has no EOS; its observation then starts with the EOS string (plain) or the
template's end-of-message text (chat), so the next turn always starts after a closed one. The observation of the
action that ends an episode is not appended: no policy token conditions on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from marginal_rl.rollout.config import RolloutConfig
from marginal_rl.rollout.fix_test import format_observation
from marginal_rl.rollout.generator import sample
from marginal_rl.rollout.types import Prompt, Trajectory

# The tiny policy's EOS string (train/model.py SPECIALS); its tokenizer maps it to the EOS id, so plain-text
# demonstrations can spell out where a turn ends. A test pins the two together.
PLAIN_EOS = "<|eos|>"
_SENTINEL_TURN, _SENTINEL_OBS = "\x00TURN\x00", "\x00OBSERVATION\x00"


class StepLike(Protocol):
    """What an environment's `step` returns (rollout.fix_test.StepResult has these fields)."""

    observation: str
    done: bool
    reward: float
    action: str
    verify: bool
    finish_reason: str


class Env(Protocol):
    def reset(self) -> str: ...  # the first user message

    def step(self, turn_text: str) -> StepLike: ...  # must not raise on malformed model output


class TurnFormat:
    """How the first user message, the policy's turns and the observations are laid out in tokens."""

    def __init__(self, tokenizer, example: Sequence[dict[str, str]] = ()) -> None:
        self.tokenizer = tokenizer
        self.example = list(example)  # chat messages shown before the task (chat templates only)
        self.eos_id: int = tokenizer.eos_token_id
        self.eos_text: str = tokenizer.eos_token
        self.chat = tokenizer.chat_template is not None
        if self.chat:
            self._before, self._after = _chat_observation_frame(tokenizer)

    def prompt_text(self, user: str) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template([*self.example, {"role": "user", "content": user}],
                                                      add_generation_prompt=True, tokenize=False)
        return f"{user}\n"

    def prompt_ids(self, user: str) -> list[int]:
        return self._encode(self.prompt_text(user))

    def observation_text(self, observation: str, turn_closed: bool) -> str:
        """The text between one policy turn and the next. `turn_closed`: the turn ended with the EOS token."""
        if self.chat:
            before = self._before
            if turn_closed and before.startswith(self.eos_text):  # the policy already wrote the end of its message
                before = before[len(self.eos_text) :]
            return f"{before}{observation}{self._after}"
        return ("" if turn_closed else self.eos_text) + format_observation(observation)

    def observation_ids(self, observation: str, turn_closed: bool) -> list[int]:
        return self._encode(self.observation_text(observation, turn_closed))

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_observation_frame(tokenizer) -> tuple[str, str]:
    """(text before, text after) an observation in the chat template, found by rendering a conversation with
    sentinels: after an assistant message's content up to the next user content, and after it up to the next
    assistant message's content."""
    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _SENTINEL_TURN},
                {"role": "user", "content": _SENTINEL_OBS}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if _SENTINEL_TURN not in text or _SENTINEL_OBS not in text.split(_SENTINEL_TURN, 1)[1]:
        raise ValueError("the tokenizer's chat template does not render assistant and user contents verbatim; "
                         "multi-turn episodes need one that does")
    between = text.split(_SENTINEL_TURN, 1)[1]
    before, after = between.split(_SENTINEL_OBS, 1)
    return before, after


def plain_demonstration_pairs(user: str, turns: Sequence[str], observations: Sequence[str]) -> list[tuple[str, str]]:
    """(context, turn) pairs of one demonstrated episode in the plain layout, one per policy turn, for a supervised
    warm start that puts the loss on the policy's turns only (the trainer appends EOS to each turn).

    `observations[k]` answers `turns[k]`; the last turn's observation is not part of any context."""
    pairs, context = [], f"{user}\n"
    for k, turn in enumerate(turns):
        pairs.append((context, turn))
        if k < len(observations):
            context += turn + PLAIN_EOS + format_observation(observations[k])
    return pairs


@dataclass
class _Episode:
    prompt: Prompt
    group: int
    env: Env
    prompt_ids: list[int]
    prompt_text: str
    completion_ids: list[int] = field(default_factory=list)
    completion_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    tokens_verify: int = 0
    turns: int = 0
    done: bool = False
    env_reward: float = 0.0
    finish_reason: str = ""

    def add(self, ids: Sequence[int], logprobs: Sequence[float] | None) -> None:
        """Policy tokens (with their behaviour logprobs) or, when `logprobs` is None, observation tokens."""
        self.completion_ids += ids
        self.completion_mask += [0 if logprobs is None else 1] * len(ids)
        self.logprobs += [0.0] * len(ids) if logprobs is None else list(logprobs)

    def finish(self, reward: float, reason: str) -> None:
        self.done, self.env_reward, self.finish_reason = True, float(reward), reason


def run_episodes(model, tokenizer, allocation: Sequence[tuple[Prompt, int]], make_env: Callable[[Prompt], Env],
                 cfg: RolloutConfig, *, step: int, version: int, temperature: float, step_cost: float = 0.0,
                 id_prefix: str = "", example: Sequence[dict[str, str]] = ()) -> list[Trajectory]:
    """`n` agent episodes for each (prompt, n) in `allocation`, batched turn by turn.

    An episode ends when the environment says so (finish_reason "submit"/"defer"/... from the env), after
    `cfg.max_turns` turns ("turns"), or when the episode's tokens (policy + observations) would pass
    `cfg.max_episode_tokens` ("length"; each turn is also capped at `cfg.max_new_tokens`). Reward: the env's reward
    at the end (0.0 when cut off by a limit) minus `step_cost` per policy token, so verifying has a price.
    `example`: chat messages put before each episode's first user message under a chat template (a worked episode;
    they are prompt tokens)."""
    fmt = TurnFormat(tokenizer, example)
    episodes: list[_Episode] = []
    for g, (prompt, n) in enumerate(allocation):
        for _ in range(n):
            env = make_env(prompt)
            user = env.reset()
            episodes.append(_Episode(prompt, g, env, fmt.prompt_ids(user), fmt.prompt_text(user)))
    active = list(episodes)
    # Test runs are sandboxed subprocesses: threads overlap them; the model's turns are batched in one call.
    with ThreadPoolExecutor(max_workers=cfg.env_workers) as pool:
        while active:
            # Shortest contexts first, so each generate() chunk of cfg.batch_size pads to similar widths.
            active.sort(key=lambda e: len(e.prompt_ids) + len(e.completion_ids))
            limits = [min(cfg.max_new_tokens, cfg.max_episode_tokens - len(e.completion_ids)) for e in active]
            samples = sample(model, tokenizer, [e.prompt_ids + e.completion_ids for e in active], max(limits),
                             temperature, cfg.top_p, cfg.batch_size)
            stepping: list[tuple[_Episode, str, bool]] = []
            for e, s, limit in zip(active, samples, limits, strict=True):
                ids = s.completion_ids[:limit]  # the batch ran to the longest limit; causal, so the prefix is exact
                e.add(ids, s.logprobs[:limit])
                e.turns += 1
                closed = ids[-1] == fmt.eos_id
                if not closed and len(e.completion_ids) >= cfg.max_episode_tokens:
                    e.finish(0.0, "length")  # cut mid-turn by the episode limit: nothing complete to act on
                else:
                    stepping.append((e, tokenizer.decode(ids, skip_special_tokens=True), closed))
            results = list(pool.map(lambda item: item[0].env.step(item[1]), stepping))
            for (e, _, closed), r in zip(stepping, results, strict=True):
                e.actions.append(r.action)
                if r.done:
                    e.finish(r.reward, r.finish_reason)
                    continue
                if e.turns >= cfg.max_turns:
                    e.finish(0.0, "turns")
                    continue
                obs = fmt.observation_ids(r.observation, closed)
                if len(e.completion_ids) + len(obs) >= cfg.max_episode_tokens:
                    e.finish(0.0, "length")  # no room for another policy token after this observation
                    continue
                e.add(obs, None)
                if r.verify:
                    e.tokens_verify += len(obs)
            active = [e for e in active if not e.done]

    return [
        Trajectory(
            traj_id=f"{id_prefix}s{step}-{k}", prompt_id=e.prompt.prompt_id, group_id=f"{id_prefix}s{step}-g{e.group}",
            step=step, behavior_version=version, prompt_ids=e.prompt_ids, completion_ids=e.completion_ids,
            completion_mask=e.completion_mask, behavior_logprobs=e.logprobs,
            reward=e.env_reward - step_cost * sum(e.completion_mask), finish_reason=e.finish_reason,
            prompt_text=e.prompt_text, completion_text=tokenizer.decode(e.completion_ids, skip_special_tokens=False),
            family=e.prompt.family, actions=e.actions, tokens_verify=e.tokens_verify,
            rewards={"env": e.env_reward, "step_cost": -step_cost * sum(e.completion_mask)},
        )
        for k, e in enumerate(episodes)
    ]
