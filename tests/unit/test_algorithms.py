"""Advantages, losses and importance weights against numbers worked out by hand (arithmetic in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from marginal_rl.train.algorithms import (
    ALGORITHMS,
    LOSS_TYPES,
    LossInputs,
    aggregate,
    clipped_policy_loss,
    clipped_value_loss,
    gae_advantages,
    grpo_advantages,
    grpo_loss,
    kl_penalty,
    ppo_loss,
    staleness_stats,
    truncated_is_weights,
)
from marginal_rl.train.config import GRPOAlgoConfig, PPOAlgoConfig

F64 = torch.float64


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=F64)


# ------------------------------------------------------------------------------------------------ GRPO advantages


def test_grpo_advantages_by_hand():
    # Groups: [1, 0, 1, 1] | [0, 0] | [5].
    # Group 0: mean 0.75; deviations +.25, -.75, +.25, +.25; squares sum 3 * .0625 + .5625 = .75;
    #   unbiased var .75 / 3 = .25, std .5 -> A = +.25/.5 = +.5 and -.75/.5 = -1.5 (eps = 0 here).
    # Group 1: all equal -> 0.  Group 2: one member -> 0.
    rewards = t(1, 0, 1, 1, 0, 0, 5)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    adv = grpo_advantages(rewards, groups, eps=0.0)
    assert torch.allclose(adv, t(0.5, -1.5, 0.5, 0.5, 0, 0, 0))
    # Default eps = 1e-4 is added to the std: .25 / .5001 = .49990002, -.75 / .5001 = -1.49970006.
    adv = grpo_advantages(rewards, groups)
    assert torch.allclose(adv, t(0.25 / 0.5001, -0.75 / 0.5001, 0.25 / 0.5001, 0.25 / 0.5001, 0, 0, 0))
    assert adv[4:].eq(0).all()  # exactly zero, not merely small
    assert adv.dtype == rewards.dtype


def test_grpo_advantages_dr_grpo_no_scaling():
    # scale="none" (Dr. GRPO): A = r - mean only -> +.25, -.75, +.25, +.25; zero-variance and singleton 0.
    adv = grpo_advantages(t(1, 0, 1, 1, 0, 0, 5), torch.tensor([0, 0, 0, 0, 1, 1, 2]), scale="none")
    assert torch.allclose(adv, t(0.25, -0.75, 0.25, 0.25, 0, 0, 0))


def test_grpo_advantages_batch_scaling():
    # scale="batch" (TRL's scale_rewards="batch"): group-centred, divided by the std of every reward in the batch.
    # rewards 1, 0, 1, 1 | 0, 0 | 5: mean 8/7, Σ(r − 8/7)² = 18.857143, unbiased std √(18.857143/6) = 1.772811;
    # group 0's deviations +.25, -.75 over (1.772811 + 1e-4); the flat group and the singleton stay exactly 0
    adv = grpo_advantages(t(1, 0, 1, 1, 0, 0, 5), torch.tensor([0, 0, 0, 0, 1, 1, 2]), scale="batch")
    std = torch.tensor([1.0, 0, 1, 1, 0, 0, 5], dtype=F64).std().item()
    assert std == pytest.approx(1.772811, abs=1e-6)
    assert adv.tolist() == pytest.approx([0.25 / (std + 1e-4), -0.75 / (std + 1e-4), 0.25 / (std + 1e-4),
                                          0.25 / (std + 1e-4), 0, 0, 0])
    with pytest.raises(ValueError, match="scale: expected group, batch or none"):
        grpo_advantages(t(1, 0), torch.tensor([0, 0]), scale="token")


def test_grpo_advantages_exact_zero_for_equal_rewards_despite_rounding():
    # mean(.1, .1, .1) = .30000000000000004 / 3 != .1 in floating point; without the exact test this
    # residue would be divided by eps = 1e-4 and become a spurious advantage.
    adv = grpo_advantages(t(0.1, 0.1, 0.1), torch.tensor([0, 0, 0]))
    assert adv.eq(0).all()


def test_grpo_advantages_group_ids_any_order_and_values():
    # Interleaved, non-contiguous ids give the same per-member advantages as the sorted layout.
    rewards = t(1, 3, 0, 5, 2)
    ids = torch.tensor([7, 42, 7, 42, 7])
    # Group 7: [1, 0, 2] mean 1, deviations 0, -1, +1, var (0 + 1 + 1) / 2 = 1 -> A = 0, -1, +1.
    # Group 42: [3, 5] mean 4, deviations -1, +1, var 2 / 1 = 2, std sqrt 2 -> A = -1/sqrt2, +1/sqrt2.
    s = math.sqrt(2)
    assert torch.allclose(grpo_advantages(rewards, ids, eps=0.0), t(0, -1 / s, -1, 1 / s, 1))


def test_grpo_advantages_matches_trl_formula():
    # TRL's GRPOTrainer: rewards.view(-1, G); mean and unbiased std per row; (r - mean) / (std + 1e-4).
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(6 * 4, generator=gen, dtype=F64)
    grouped = rewards.view(6, 4)
    trl = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    ours = grpo_advantages(rewards, torch.arange(6).repeat_interleave(4))
    assert torch.allclose(ours, trl.reshape(-1))


def test_grpo_advantages_empty_and_shape_errors():
    assert grpo_advantages(t(), torch.tensor([], dtype=torch.long)).numel() == 0
    with pytest.raises(ValueError, match="same shape"):
        grpo_advantages(t(1, 2), torch.tensor([0]))


# ------------------------------------------------------------------------------------------------ policy loss


def _lp(*ratios: float) -> torch.Tensor:
    """Logprobs whose ratio to old logprobs of 0 is `ratios`, with grad."""
    return torch.log(t(*ratios)).reshape(1, -1).requires_grad_(True)


def test_clipped_policy_loss_positive_advantage_by_hand():
    # clip_low .2, clip_high .28 -> range [.8, 1.28]; A = +1; rho = 1.5, .5, 1.1.
    # token 0: min(1.5, 1.28) = 1.28, clipped (rho > 1.28, A > 0) -> loss -1.28, grad 0
    # token 1: min(.5, .8) = .5, rho below the range but A > 0 so unclipped -> loss -.5, d(-rho)/dlp = -rho = -.5
    # token 2: inside the range -> loss -1.1, grad -1.1
    lp = _lp(1.5, 0.5, 1.1)
    loss, stats = clipped_policy_loss(lp, torch.zeros(1, 3, dtype=F64), t(1.0), torch.ones(1, 3), 0.2, 0.28)
    assert loss.item() == pytest.approx(-1.28 - 0.5 - 1.1)
    loss.backward()
    assert torch.allclose(lp.grad, t(0.0, -0.5, -1.1).reshape(1, 3))
    assert stats["clipped_tokens"].item() == 1 and stats["clipped_high_tokens"].item() == 1
    assert stats["tokens"].item() == 3


def test_clipped_policy_loss_negative_advantage_by_hand():
    # A = -1; rho = 1.5, .5, 1.1; range [.8, 1.28].
    # token 0: min(-1.5, -1.28) = -1.5 -> unclipped (pessimistic bound), loss +1.5, grad d(rho)/dlp = +1.5
    # token 1: min(-.5, -.8) = -.8 -> clipped below (rho < .8, A < 0), loss +.8, grad 0
    # token 2: inside -> loss +1.1, grad +1.1
    lp = _lp(1.5, 0.5, 1.1)
    loss, stats = clipped_policy_loss(lp, torch.zeros(1, 3, dtype=F64), t(-1.0), torch.ones(1, 3), 0.2, 0.28)
    assert loss.item() == pytest.approx(1.5 + 0.8 + 1.1)
    loss.backward()
    assert torch.allclose(lp.grad, t(1.5, 0.0, 1.1).reshape(1, 3))
    assert stats["clipped_tokens"].item() == 1 and stats["clipped_low_tokens"].item() == 1


def test_clipped_policy_loss_token_advantages_one_clipped_above_one_below():
    # Per-token A = +1, -1, +1 on rho = 1.5, .5, 1.1:
    # token 0 clipped above: -1.28 (grad 0); token 1 clipped below: +.8 (grad 0); token 2: -1.1 (grad -1.1)
    # sum = -1.28 + .8 - 1.1 = -1.58
    lp = _lp(1.5, 0.5, 1.1)
    adv = t(1, -1, 1).reshape(1, 3)
    loss, stats = clipped_policy_loss(lp, torch.zeros(1, 3, dtype=F64), adv, torch.ones(1, 3), 0.2, 0.28)
    assert loss.item() == pytest.approx(-1.58)
    loss.backward()
    assert torch.allclose(lp.grad, t(0.0, 0.0, -1.1).reshape(1, 3))
    assert stats["clipped_tokens"].item() == 2
    # With IS weights .5, 2, 1 (detached): .5 * -1.28 + 2 * .8 + 1 * -1.1 = -.64 + 1.6 - 1.1 = -.14
    lp2 = _lp(1.5, 0.5, 1.1)
    w = t(0.5, 2.0, 1.0).reshape(1, 3).requires_grad_(True)
    loss2, _ = clipped_policy_loss(lp2, torch.zeros(1, 3, dtype=F64), adv, torch.ones(1, 3), 0.2, 0.28, is_weights=w)
    assert loss2.item() == pytest.approx(-0.14)
    loss2.backward()
    assert torch.allclose(lp2.grad, t(0.0, 0.0, -1.1).reshape(1, 3))  # token 2's weight is 1
    assert w.grad is None  # the weights are constants


def test_clipped_policy_loss_masked_tokens_ignored_even_if_garbage():
    # Token 2 is an observation: old logprob -inf there must not make NaN; it contributes nothing.
    # Tokens 0, 1 as in the positive-advantage case: -1.28 - .5.
    lp = _lp(1.5, 0.5, 1.1)
    old = t(0.0, 0.0, -math.inf).reshape(1, 3)
    loss, stats = clipped_policy_loss(lp, old, t(1.0), t(1, 1, 0).reshape(1, 3), 0.2, 0.28)
    assert loss.item() == pytest.approx(-1.78)
    loss.backward()
    assert torch.allclose(lp.grad, t(0.0, -0.5, 0.0).reshape(1, 3))
    assert stats["tokens"].item() == 2


def test_clipped_policy_loss_empty_mask_is_zero_with_grad():
    lp = torch.randn(2, 4, dtype=F64, requires_grad=True)
    loss, stats = clipped_policy_loss(lp, torch.randn(2, 4, dtype=F64), t(1.0, -2.0), torch.zeros(2, 4), 0.2, 0.2)
    assert loss.item() == 0.0
    loss.backward()
    assert lp.grad is not None and lp.grad.eq(0).all()
    assert all(v.item() == 0 for v in stats.values())


def _toy_policy(seed: int = 0):
    """A linear 'model': logprob of token y at position t = log_softmax(x_t W)[y]; W is the parameter."""
    gen = torch.Generator().manual_seed(seed)
    b, length, d, v = 4, 6, 5, 7
    feats = torch.randn(b, length, d, generator=gen, dtype=F64)
    tokens = torch.randint(v, (b, length), generator=gen)
    weight = torch.randn(d, v, generator=gen, dtype=F64)
    old = torch.log_softmax(feats @ (weight + 0.3 * torch.randn(d, v, generator=gen, dtype=F64)), -1)
    old = old.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    lengths = [6, 2, 4, 5]  # right padding after these
    mask = torch.zeros(b, length)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    mask[3, 2] = 0  # an observation token inside a sequence
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=F64)
    return feats, tokens, weight, old, mask, adv, lengths


def _update(parts: list[list[list[int]]], clip: tuple[float, float] = (0.2, 0.28)):
    """Loss and grad of W when the 4 sequences are split into ranks x micro-batches as `parts`.

    Each micro-batch is trimmed to its own longest sequence (different padding per split), each rank
    accumulates sum-losses scaled by world / N, and DDP's gradient average is simulated by a mean over ranks.
    """
    feats, tokens, weight, old, mask, adv, lengths = _toy_policy()
    n_tokens = mask.sum()
    world = len(parts)
    grads, total = [], 0.0
    for rank in parts:
        w = weight.clone().requires_grad_(True)
        for mb in rank:
            idx = torch.tensor(mb)
            width = max(lengths[i] for i in mb)
            lp = torch.log_softmax(feats[idx, :width] @ w, -1).gather(-1, tokens[idx, :width].unsqueeze(-1)).squeeze(-1)
            loss_sum, _ = clipped_policy_loss(lp, old[idx, :width], adv[idx], mask[idx, :width], *clip)
            (loss_sum * world / n_tokens).backward()
            total += loss_sum.item() / n_tokens.item()
        grads.append(w.grad)
    return total, torch.stack(grads).mean(0)


def test_loss_sum_invariant_to_microbatch_and_rank_split():
    full_loss, full_grad = _update([[[0, 1, 2, 3]]])  # one rank, one micro-batch of 4
    for parts in (
        [[[0], [1], [2], [3]]],  # one rank, four micro-batches of 1
        [[[2, 0], [3, 1]]],  # one rank, 2 x 2, reordered
        [[[0, 3]], [[1], [2]]],  # two ranks, unequal micro-batch sizes
    ):
        loss, grad = _update(parts)
        assert loss == pytest.approx(full_loss, rel=1e-12)
        assert torch.allclose(grad, full_grad, rtol=1e-10, atol=1e-12)
    assert full_grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ KL penalty


def test_kl_penalty_k3_by_hand():
    # d = ref - lp: log 2 -> 2 - log 2 - 1 = .30685; log .5 -> .5 + log 2 - 1 = .19315; sum = .5 exactly
    # (the logs cancel). Third token masked out. d/dlp k3 = 1 - exp(d): -1 and +.5.
    lp = t(math.log(0.5), 0.0, -3.0).reshape(1, 3).requires_grad_(True)
    ref = t(0.0, math.log(0.5), -math.inf).reshape(1, 3)
    kl = kl_penalty(lp, ref, t(1, 1, 0).reshape(1, 3))
    assert kl.item() == pytest.approx(0.5)
    kl.backward()
    assert torch.allclose(lp.grad, t(-1.0, 0.5, 0.0).reshape(1, 3))
    assert kl_penalty(lp, lp.detach(), torch.ones(1, 3)).item() == 0.0


# ------------------------------------------------------------------------------------------------ PPO


def test_gae_skips_observation_token_by_hand():
    # gamma .9, lambda .8; mask [1, 0, 1]: position 1 is an observation (its reward 5 and value 9 are ignored).
    # Policy positions 0 and 2; position 2 is last -> terminal.
    #   pos 2: delta = 1 + .9 * 0 - .2 = .8;            A = .8
    #   pos 0: delta = 0 + .9 * V(pos 2) - .5 = .18 - .5 = -.32; A = -.32 + .9 * .8 * .8 = -.32 + .576 = .256
    # returns = A + V: pos 0 .756, pos 2 1.0; 0 at the observation.
    rewards = t(0.0, 5.0, 1.0).reshape(1, 3)
    values = t(0.5, 9.0, 0.2).reshape(1, 3)
    adv, ret = gae_advantages(rewards, values, t(1, 0, 1).reshape(1, 3), gamma=0.9, lam=0.8)
    assert torch.allclose(adv, t(0.256, 0.0, 0.8).reshape(1, 3))
    assert torch.allclose(ret, t(0.756, 0.0, 1.0).reshape(1, 3))


def test_gae_padding_after_last_token_is_terminal_and_matches_textbook():
    # Row 0: three policy tokens then padding with large values that must not bootstrap.
    # gamma .9, lambda .8 (gamma * lambda = .72); V = .5, .4, .3; r = 0, 0, 1.
    #   pos 2: delta = 1 - .3 = .7                A = .7
    #   pos 1: delta = .9 * .3 - .4 = -.13        A = -.13 + .72 * .7 = .374
    #   pos 0: delta = .9 * .4 - .5 = -.14        A = -.14 + .72 * .374 = .12928
    values = t(0.5, 0.4, 0.3, 100.0, 100.0).reshape(1, 5)
    rewards = t(0.0, 0.0, 1.0, 7.0, 7.0).reshape(1, 5)
    adv, ret = gae_advantages(rewards, values, t(1, 1, 1, 0, 0).reshape(1, 5), gamma=0.9, lam=0.8)
    assert torch.allclose(adv, t(0.12928, 0.374, 0.7, 0.0, 0.0).reshape(1, 5))
    assert torch.allclose(ret, t(0.62928, 0.774, 1.0, 0.0, 0.0).reshape(1, 5))
    # gamma = lambda = 1 on a contiguous row: A_t = (sum of future rewards) - V_t.
    adv, _ = gae_advantages(rewards, values, t(1, 1, 1, 0, 0).reshape(1, 5), gamma=1.0, lam=1.0)
    assert torch.allclose(adv, t(0.5, 0.6, 0.7, 0.0, 0.0).reshape(1, 5))


def test_clipped_value_loss_by_hand():
    # clip .2; old v = 1 everywhere.
    # token 0: v 1.5, R 2: (v-R)^2 = .25; v_clip = 1.2, (1.2-2)^2 = .64; max .64 -> .32, grad 0 (clipped branch)
    # token 1: v .9,  R 0: (.9)^2 = .81; v_clip = .9 (inside) -> .405, grad v - R = .9
    # token 2: v .5,  R 2: (-1.5)^2 = 2.25; v_clip = .8, (-1.2)^2 = 1.44; max 2.25 -> 1.125, grad -1.5
    # token 3: masked out.  Sum = .32 + .405 + 1.125 = 1.85
    v = t(1.5, 0.9, 0.5, 3.0).reshape(1, 4).requires_grad_(True)
    loss = clipped_value_loss(
        v, torch.ones(1, 4, dtype=F64), t(2.0, 0.0, 2.0, 0.0).reshape(1, 4), t(1, 1, 1, 0).reshape(1, 4), clip=0.2
    )
    assert loss.item() == pytest.approx(1.85)
    loss.backward()
    assert torch.allclose(v.grad, t(0.0, 0.9, -1.5, 0.0).reshape(1, 4))


# ------------------------------------------------------------------------------------------------ stale rollouts


def test_truncated_is_weights_token_vs_sequence_by_hand():
    # Row 0 ratios .5, 3, 1.2 (all policy tokens); row 1 ratios .5, 3 and a masked-out garbage token.
    # token level, cap 2: [.5, 2, 1.2] and [.5, 2, 0]
    # sequence level: row 0 product .5 * 3 * 1.2 = 1.8 (< cap) on every token; row 1 .5 * 3 = 1.5, 0 masked out.
    prox = torch.log(t(0.5, 3.0, 1.2, 0.5, 3.0, 1.0)).reshape(2, 3)
    behav = torch.zeros(2, 3, dtype=F64)
    behav[1, 2] = math.inf  # garbage at an observation position
    mask = t(1, 1, 1, 1, 1, 0).reshape(2, 3)
    tok = truncated_is_weights(prox, behav, mask, level="token", cap=2.0)
    assert torch.allclose(tok, t(0.5, 2.0, 1.2, 0.5, 2.0, 0.0).reshape(2, 3))
    seq = truncated_is_weights(prox, behav, mask, level="sequence", cap=2.0)
    assert torch.allclose(seq, t(1.8, 1.8, 1.8, 1.5, 1.5, 0.0).reshape(2, 3))
    # sequence product 3 * 1 = 3 > cap -> 2; a log-ratio of 1000 caps instead of overflowing to inf.
    seq = truncated_is_weights(
        t(math.log(3.0), 0.0, 1000.0).reshape(1, 3),
        torch.zeros(1, 3, dtype=F64),
        t(1, 1, 1).reshape(1, 3),
        level="sequence",
        cap=2.0,
    )
    assert torch.allclose(seq, t(2.0, 2.0, 2.0).reshape(1, 3))
    with pytest.raises(ValueError, match="level"):
        truncated_is_weights(prox, behav, mask, level="turn")


def test_truncated_is_weights_are_detached():
    prox = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    assert not truncated_is_weights(prox, torch.zeros(1, 2, dtype=F64), torch.ones(1, 2)).requires_grad


def test_staleness_stats_by_hand():
    # rho = current / behaviour = 2, .5, 1; range [.8, 1.28].
    # k3 KL(behaviour || current) = sum(rho - 1 - log rho) = (1 - log 2) + (-.5 + log 2) + 0 = .5
    # ratio_sum 3.5; ratio_sq_sum 4 + .25 + 1 = 5.25.
    # With A = +1 only the clip above zeroes a gradient (rho 2) -> 1; with A = -1 only rho .5 -> 1.
    lp = torch.log(t(2.0, 0.5, 1.0, 1.0)).reshape(1, 4)
    mask = t(1, 1, 1, 0).reshape(1, 4)
    behav = torch.zeros(1, 4, dtype=F64)
    s = staleness_stats(lp, behav, mask, 0.2, 0.28)
    assert s["tokens"].item() == 3
    assert s["kl_k3_sum"].item() == pytest.approx(0.5)
    assert s["ratio_sum"].item() == pytest.approx(3.5)
    assert s["ratio_sq_sum"].item() == pytest.approx(5.25)
    assert "clip_zeroed_tokens" not in s
    assert staleness_stats(lp, behav, mask, 0.2, 0.28, advantages=t(1.0))["clip_zeroed_tokens"].item() == 1
    assert staleness_stats(lp, behav, mask, 0.2, 0.28, advantages=t(-1.0))["clip_zeroed_tokens"].item() == 1
    # It agrees with the loss's own count on the same tokens.
    _, loss_stats = clipped_policy_loss(lp, behav, t(1.0), mask, 0.2, 0.28)
    assert loss_stats["clipped_tokens"].item() == 1


# ------------------------------------------------------------------------------------------------ the table


def test_every_algorithm_has_a_config_and_the_table_decides_the_value_head():
    from marginal_rl.train.config import ALGO_CONFIGS

    assert set(ALGORITHMS) == set(ALGO_CONFIGS)
    assert {name: a.value_head for name, a in ALGORITHMS.items()} == {"grpo": False, "ppo": True}


def test_group_relative_advantages_cover_only_the_admitted():
    # group 0: rewards 1, 0 (admitted), 1 (not admitted); group 1: 0, 1 admitted.
    # admitted group 0 = [1, 0]: mean .5, unbiased std .70711 -> ±.5/(.70711 + 1e-4) = ±.70701; the third gets 0
    rewards, group = t(1.0, 0.0, 1.0, 0.0, 1.0), torch.tensor([0, 0, 0, 1, 1])
    admitted = torch.tensor([True, True, False, True, True])
    adv = ALGORITHMS["grpo"].advantages(rewards, group, admitted, GRPOAlgoConfig())
    assert adv.tolist() == pytest.approx([0.70701, -0.70701, 0.0, -0.70701, 0.70701], abs=1e-5)


def test_grpo_and_ppo_losses_are_their_parts():
    # One row, 3 policy tokens at rho = 1.5, .5, 1.1 (as the by-hand cases above), A = +1: policy sum −2.88.
    lp = _lp(1.5, 0.5, 1.1)
    mask, old = torch.ones(1, 3), torch.zeros(1, 3, dtype=F64)
    x = LossInputs(lp, old, mask, t(1.0), t(1.0), None, None, None)
    loss, parts = grpo_loss(x, GRPOAlgoConfig(clip_low=0.2, clip_high=0.28))
    assert loss.item() == pytest.approx(-1.28 - 0.5 - 1.1) and parts["value_sum"].item() == 0.0
    assert parts["clipped_tokens"].item() == 1
    # PPO, gamma = lam = 1, values 0 (old and new), reward 1 on the last token: A = R = 1 everywhere, so the same
    # policy sum; value loss .5·Σ(0 − 1)² = 1.5; loss = −2.88 + vf_coef·1.5 = −2.88 + .75
    values = torch.zeros(1, 3, dtype=F64, requires_grad=True)
    x = LossInputs(lp, old, mask, t(0.0), t(1.0), None, values, values.detach())
    loss, parts = ppo_loss(x, PPOAlgoConfig(clip_low=0.2, clip_high=0.28, gamma=1.0, lam=1.0, vf_coef=0.5))
    assert parts["policy_sum"].item() == pytest.approx(-2.88) and parts["value_sum"].item() == pytest.approx(1.5)
    assert loss.item() == pytest.approx(-2.88 + 0.75)


# ------------------------------------------------------------------------------------------------ loss types


def test_loss_types_by_hand():
    # Per-token losses of 3 completions with 2, 1 and 3 policy tokens (T = 3, 99 = masked out), max_length 4:
    #   row 0: 1, 3    row 1: 2    row 2: 1, 1, 7        Σ = 15 over 6 tokens
    # dapo:    Σ l / tokens             = 15 / 6 = 2.5
    # grpo:    Σ (row mean) / rows      = (4/2 + 2/1 + 9/3) / 3 = 7/3
    # dr_grpo: Σ l / (rows · max_length) = 15 / 12 = 1.25
    per_token = t(1, 3, 99, 2, 99, 99, 1, 1, 7).reshape(3, 3)
    mask = t(1, 1, 0, 1, 0, 0, 1, 1, 1).reshape(3, 3)
    kw = dict(tokens=6, sequences=3, max_length=4)
    assert aggregate(per_token, mask, "dapo", **kw).item() == pytest.approx(2.5)
    assert aggregate(per_token, mask, "grpo", **kw).item() == pytest.approx(7 / 3)
    assert aggregate(per_token, mask, "dr_grpo", **kw).item() == pytest.approx(1.25)
    # split into micro-batches (rows 0-1 and row 2), each weighted and summed, the parts add up to the whole
    for loss_type in LOSS_TYPES:
        parts = 0.0
        for rows in (slice(0, 2), slice(2, 3)):
            w, norm = LOSS_TYPES[loss_type](mask[rows], **kw)
            terms = per_token[rows] if w is None else per_token[rows] * w
            parts += (terms * mask[rows]).sum().item() / norm
        assert parts == pytest.approx(aggregate(per_token, mask, loss_type, **kw).item())
    # a row with no policy token contributes nothing (and does not divide by zero)
    empty = t(0, 0, 0).reshape(1, 3)
    assert aggregate(per_token[:1], empty, "grpo", tokens=1, sequences=1, max_length=4).item() == 0.0
