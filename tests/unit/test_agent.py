"""The multi-turn agent loop: exact token accounting (teacher forcing reproduces the behaviour logprobs), masks,
verification tokens, limits and the step cost, with a tiny random policy and a scripted environment."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from marginal_rl.rollout.agent import PLAIN_EOS, TurnFormat, plain_demonstration_pairs, run_episodes
from marginal_rl.rollout.config import RolloutConfig
from marginal_rl.rollout.fix_test import StepResult, format_observation
from marginal_rl.rollout.types import Prompt
from marginal_rl.train.config import ModelConfig
from marginal_rl.train.model import SPECIALS, build_tiny_model, build_tokenizer
from marginal_rl.train.update import make_batch, token_logprobs

CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


@dataclass
class ScriptedEnv:
    """Ignores what the policy writes: observation k answers turn k; `verify_turns` are test runs; ends at `end_turn`."""

    end_turn: int = 3
    verify_turns: tuple[int, ...] = (1,)
    reward: float = 1.0
    turn: int = 0

    def reset(self) -> str:
        self.turn = 0
        return "Fix the code.\n<code>\ndef f(x):\n    return x - 1\n</code>"

    def step(self, turn_text: str) -> StepResult:
        self.turn += 1
        if self.turn == self.end_turn:
            return StepResult("submitted: tests pass", True, self.reward, "submit", finish_reason="submit")
        verify = self.turn in self.verify_turns
        obs = "FAIL: assert f(1) == 2 -> AssertionError" if verify else "edit applied (2 lines)"
        return StepResult(obs, False, 0.0, "run_tests" if verify else "edit", verify=verify)


@pytest.fixture(scope="module")
def policy():
    texts = ["Fix the code.\n<code>\ndef f(x):\n    return x - 1\n</code>\n<edit>\ndef f(x):\n    return x + 1\n</edit>",
             format_observation("FAIL: assert f(1) == 2 -> AssertionError"), format_observation("edit applied (2 lines)"),
             "<run_tests/> <submit/> user assistant"] * 20
    tokenizer = build_tokenizer(texts, vocab_size=300)
    model = build_tiny_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2), tokenizer, seed=0).eval()
    return model, tokenizer


def _teacher_forced_max_diff(model, tokenizer, trajectories, temperature: float) -> float:
    """What the trainer computes (train.update.make_batch + token_logprobs) against the behaviour logprobs."""
    batch = make_batch(trajectories, [0.0] * len(trajectories), tokenizer.pad_token_id)
    with torch.no_grad():
        lp = token_logprobs(model, batch.ids, batch.attn, temperature)  # (B, L-1)
    on = batch.mask > 0
    assert on.sum() == sum(t.tokens_policy for t in trajectories)
    return float((lp[on] - batch.old_logprobs[on]).abs().max())


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_teacher_forced_logprobs_equal_behaviour_logprobs(policy, chat, temperature):
    model, tokenizer = policy
    tokenizer.chat_template = CHAT_TEMPLATE if chat else None
    torch.manual_seed(0)
    cfg = RolloutConfig(max_new_tokens=12, max_turns=4, max_episode_tokens=400)
    prompts = [Prompt("a", "", family="x"), Prompt("b", "", family="y")]
    trajectories = run_episodes(model, tokenizer, [(prompts[0], 3), (prompts[1], 2)], lambda p: ScriptedEnv(), cfg,
                                step=0, version=0, temperature=temperature)
    tokenizer.chat_template = None
    assert len(trajectories) == 5
    # Episodes differ in length (random turns end at EOS or at the cap), so the batch really is padded.
    assert all(t.tokens_observation > 0 and t.tokens_policy > 0 for t in trajectories)
    assert _teacher_forced_max_diff(model, tokenizer, trajectories, temperature) < 1e-4


def test_masks_actions_verify_tokens_and_step_cost(policy):
    model, tokenizer = policy
    fmt = TurnFormat(tokenizer)
    cfg = RolloutConfig(max_new_tokens=6, max_turns=5, max_episode_tokens=400)
    (t,) = run_episodes(model, tokenizer, [(Prompt("a", ""), 1)], lambda p: ScriptedEnv(end_turn=3, reward=1.0), cfg,
                        step=2, version=1, temperature=1.0, step_cost=0.01)
    assert t.actions == ["run_tests", "edit", "submit"] and t.finish_reason == "submit"
    assert (t.step, t.behavior_version, t.group_id) == (2, 1, "s2-g0")
    # three policy turns of 1..6 tokens, two observations between them; the last (submit) observation is not kept
    runs: list[list[int]] = []
    for m in t.completion_mask:  # run-length encode the mask
        if runs and runs[-1][0] == m:
            runs[-1][1] += 1
        else:
            runs.append([m, 1])
    assert [m for m, _ in runs] == [1, 0, 1, 0, 1]
    assert all(1 <= n <= 6 for m, n in runs if m == 1)
    assert all(lp == 0.0 for lp, m in zip(t.behavior_logprobs, t.completion_mask, strict=True) if m == 0)
    assert all(lp < 0.0 for lp, m in zip(t.behavior_logprobs, t.completion_mask, strict=True) if m == 1)
    # the first observation is the test run: its tokens, and only those, are verification tokens
    first_turn = t.completion_ids[: runs[0][1]]
    closed = first_turn[-1] == tokenizer.eos_token_id
    obs1 = fmt.observation_ids("FAIL: assert f(1) == 2 -> AssertionError", closed)
    assert t.completion_ids[runs[0][1] : runs[0][1] + runs[1][1]] == obs1
    assert t.tokens_verify == len(obs1) == runs[1][1]
    # reward = env reward - step_cost * policy tokens
    assert t.reward == pytest.approx(1.0 - 0.01 * t.tokens_policy)


def test_turn_and_token_limits(policy):
    model, tokenizer = policy
    never_done = ScriptedEnv(end_turn=99)
    (t,) = run_episodes(model, tokenizer, [(Prompt("a", ""), 1)], lambda p: never_done,
                        RolloutConfig(max_new_tokens=4, max_turns=3, max_episode_tokens=1000), step=0, version=0,
                        temperature=1.0, step_cost=0.5)
    assert t.finish_reason == "turns" and len(t.actions) == 3
    assert t.reward == pytest.approx(-0.5 * t.tokens_policy)  # no env reward at a limit, the tokens still cost

    (t,) = run_episodes(model, tokenizer, [(Prompt("a", ""), 1)], lambda p: ScriptedEnv(end_turn=99),
                        RolloutConfig(max_new_tokens=8, max_turns=50, max_episode_tokens=60), step=0, version=0,
                        temperature=1.0)
    assert t.finish_reason == "length" and t.reward == 0.0
    assert t.tokens_completion <= 60
    assert t.completion_mask[-1] == 1  # a trajectory never ends on an observation nothing conditioned on


def test_plain_layout_matches_demonstrations(policy):
    """The warm-start pairs spell out the same text the agent loop feeds the policy, EOS included."""
    _, tokenizer = policy
    assert PLAIN_EOS == SPECIALS["eos_token"] == tokenizer.eos_token
    fmt = TurnFormat(tokenizer)
    pairs = plain_demonstration_pairs("task", ["<edit>\nx\n</edit>", "<submit/>"], ["edit applied (1 lines)", "done"])
    assert pairs[0] == ("task\n", "<edit>\nx\n</edit>")
    assert pairs[1][0] == fmt.prompt_text("task") + "<edit>\nx\n</edit>" + PLAIN_EOS + fmt.observation_text(
        "edit applied (1 lines)", turn_closed=True)
    assert fmt.observation_text("obs", turn_closed=False) == PLAIN_EOS + "\n<observation>\nobs\n</observation>\n"


def test_chat_layout_uses_the_template_between_turns(policy):
    _, tokenizer = policy
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        fmt = TurnFormat(tokenizer)
        assert fmt.prompt_text("task") == "<|bos|>user\ntask<|eos|>\n<|bos|>assistant\n"
        # after a turn the policy closed with EOS, the observation starts with the rest of the template's frame
        assert fmt.observation_text("obs", turn_closed=True) == "\n<|bos|>user\nobs<|eos|>\n<|bos|>assistant\n"
        assert fmt.observation_text("obs", turn_closed=False) == "<|eos|>\n<|bos|>user\nobs<|eos|>\n<|bos|>assistant\n"
        shown = TurnFormat(tokenizer, [{"role": "user", "content": "ex"}, {"role": "assistant", "content": "<submit/>"}])
        assert shown.prompt_text("task") == ("<|bos|>user\nex<|eos|>\n<|bos|>assistant\n<submit/><|eos|>\n"
                                             "<|bos|>user\ntask<|eos|>\n<|bos|>assistant\n")
    finally:
        tokenizer.chat_template = None
