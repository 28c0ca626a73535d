"""PPO critic: value/logprob alignment with the loss mask, terminal rewards, the KL-shaped reward, GAE on top."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from marginal_rl.train.algorithms import gae_advantages, token_rewards
from marginal_rl.train.value import ValueHead, forward_policy_and_values


class _FixedModel(torch.nn.Module):
    """Logits and hidden states known by hand: vocab 2, hidden size 1 whose value is the position index."""

    def forward(self, input_ids, attention_mask, output_hidden_states):
        assert output_hidden_states
        b, length = input_ids.shape
        logits = torch.zeros(b, length, 2)
        logits[:, :, 1] = math.log(3.0)  # p(token 1) = 3/4, p(token 0) = 1/4 at every position
        hidden = torch.arange(length, dtype=torch.float32).view(1, length, 1).expand(b, length, 1)
        return SimpleNamespace(logits=logits, hidden_states=(hidden * 0, hidden))


def test_values_are_the_states_that_chose_the_scored_tokens():
    # prompt [0, 1] (p = 2), completion [1, 0] (n = 2): L = 4, loss mask columns p-1 .. p+n-2 = 1, 2
    ids = torch.tensor([[0, 1, 1, 0]])
    head = ValueHead(1)
    with torch.no_grad():
        head.proj.weight.fill_(10.0)
        head.proj.bias.fill_(1.0)
    lp, values = forward_policy_and_values(_FixedModel(), head, ids, torch.ones_like(ids), temperature=1.0)
    # column j scores token j+1 from the state at position j: V(h_j) = 10 * j + 1
    torch.testing.assert_close(values, torch.tensor([[1.0, 11.0, 21.0]]))
    # tokens 1, 1, 0 -> log 3/4, log 3/4, log 1/4
    torch.testing.assert_close(lp, torch.log(torch.tensor([[0.75, 0.75, 0.25]])))
    # temperature 2 halves the logits: p(1) = sqrt(3) / (1 + sqrt(3))
    lp2, _ = forward_policy_and_values(_FixedModel(), head, ids, torch.ones_like(ids), temperature=2.0)
    p1 = math.sqrt(3) / (1 + math.sqrt(3))
    torch.testing.assert_close(lp2, torch.log(torch.tensor([[p1, p1, 1 - p1]])))


def test_alignment_on_a_real_model_and_gradients_reach_head_and_trunk():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    head = ValueHead(32)
    torch.nn.init.normal_(head.proj.weight)
    ids = torch.randint(0, 50, (2, 6))
    attn = torch.ones_like(ids)
    lp, values = forward_policy_and_values(model, head, ids, attn, temperature=0.7)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        for j in range(5):
            expected = torch.log_softmax(out.logits[:, j] / 0.7, -1).gather(-1, ids[:, j + 1 : j + 2]).squeeze(-1)
            torch.testing.assert_close(lp[:, j], expected)
            torch.testing.assert_close(values[:, j], head(out.hidden_states[-1][:, j]))
    values.sum().backward()
    assert head.proj.weight.grad.abs().sum() > 0 and model.model.norm.weight.grad.abs().sum() > 0


def test_zero_initialised_head_predicts_zero():
    head = ValueHead(4)
    assert torch.equal(head(torch.randn(2, 3, 4)), torch.zeros(2, 3))


def test_terminal_reward_sits_on_the_last_policy_token():
    # 1x4, policy tokens at columns 1, 2: the reward 2.0 goes to column 2
    out = token_rewards(torch.tensor([2.0]), torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 2.0, 0.0]]))
    # multi-turn: an observation (0) between policy tokens; a row with no policy token gets nothing
    out = token_rewards(torch.tensor([1.0, -1.0, 5.0]),
                        torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]))


def test_kl_shaped_rewards():
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    lp = torch.tensor([[-9.0, -1.0, -2.0, -9.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0]])
    out = token_rewards(torch.tensor([2.0]), mask, logprobs=lp, ref_logprobs=ref, kl_coef=0.1)
    # column 1: -0.1 * (-1 - -1.5) = -0.05; column 2: 2 - 0.1 * (-2 - -1) = 2.1; unmasked columns stay 0
    torch.testing.assert_close(out, torch.tensor([[0.0, -0.05, 2.1, 0.0]]))
    with pytest.raises(ValueError, match="needs logprobs"):
        token_rewards(torch.tensor([2.0]), mask, kl_coef=0.1)


def test_gae_over_the_terminal_reward():
    # rewards [0, 0, 2, 0] on mask [0, 1, 1, 0], values V1 = 0.5, V2 = 1.0, gamma = 1, lam = 0.5:
    # column 2 (last): delta = 2 - 1.0 = 1.0, A = 1.0, R = 2.0
    # column 1: delta = 0 + 1.0 - 0.5 = 0.5, A = 0.5 + 0.5 * 1.0 = 1.0, R = 1.5
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    rewards = token_rewards(torch.tensor([2.0]), mask)
    adv, ret = gae_advantages(rewards, torch.tensor([[7.0, 0.5, 1.0, 7.0]]), mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 1.5, 2.0, 0.0]]))
