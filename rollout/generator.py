"""Sampling with transformers `generate` (KV cache, batched, left-padded): groups of completions per prompt,
with the behaviour log-probability of every generated token recorded for off-policy corrections."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from marginal_rl.rollout.engine import VLLMEngine
from marginal_rl.rollout.types import Prompt, Trajectory


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]  # up to and including EOS when one was produced
    logprobs: list[float]  # behaviour log-probability of each completion token
    finish_reason: str  # "eos" | "length"


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: Sequence[list[int]], max_new_tokens: int, temperature: float,
           top_p: float = 1.0, batch_size: int = 256) -> list[Sample]:
    """Sample one completion per entry of `prompt_ids` (temperature 0 = greedy).

    The recorded log-probabilities are those of the sampling distribution, log softmax(logits / temperature), the
    same scaling the trainer uses, so the ratio is exactly 1 for an unchanged policy (top_p truncation excepted)."""
    if isinstance(model, VLLMEngine):  # a serving engine samples for itself
        return [Sample(list(p), ids, lps, reason) for p, (ids, lps, reason) in zip(
            prompt_ids, model.sample(prompt_ids, max_new_tokens, temperature, top_p, tokenizer.eos_token_id),
            strict=True)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    greedy = temperature == 0
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=None if greedy else temperature,
        top_p=None if greedy or top_p >= 1 else top_p, top_k=None, eos_token_id=eos, pad_token_id=pad,
        output_logits=True, return_dict_in_generate=True,
    )
    out: list[Sample] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding: every prompt ends at the same column
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        res = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=gen_cfg)
        new = res.sequences[:, width:].cpu()  # (B, T_new)
        logits = torch.stack(res.logits, dim=1).float().cpu()  # (B, T_new, V)
        logprobs = torch.log_softmax(logits / (1.0 if greedy else temperature), dim=-1)
        token_lp = logprobs.gather(-1, new.unsqueeze(-1)).squeeze(-1)  # (B, T_new)
        for i, p in enumerate(chunk):
            row = new[i].tolist()
            n = row.index(eos) + 1 if eos in row else len(row)
            out.append(Sample(list(p), row[:n], token_lp[i, :n].tolist(), "eos" if eos in row[:n] else "length"))
    if was_training:
        model.train()
    return out


@torch.no_grad()
def answer_likelihood(model, prompt_ids: Sequence[list[int]], answer_ids: Sequence[list[int]], temperature: float,
                      batch_size: int = 256) -> list[float]:
    """The probability that sampling from `model` at `temperature` completes each prompt with exactly its answer:
    exp Σ log softmax(logits / temperature) over the answer's tokens, teacher-forced in one forward pass per batch
    (no decoding). For an exact-match reward this is the pass rate, less the other spellings the reward would also
    accept (another tokenisation of the same text, trailing whitespace): a lower bound that a test checks against
    sampled rates."""
    if temperature <= 0:
        raise ValueError(f"answer_likelihood: expected a sampling temperature > 0, got {temperature}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = [list(p) + list(a) for p, a in zip(prompt_ids[start:start + batch_size],
                                                   answer_ids[start:start + batch_size], strict=True)]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: positions count from 0 as in generation
            ids[i, :len(r)] = torch.tensor(r)
            attn[i, :len(r)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float().cpu()
        logprobs = torch.log_softmax(logits[:, :-1] / temperature, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        for i, (p, a) in enumerate(zip(prompt_ids[start:start + batch_size], answer_ids[start:start + batch_size],
                                       strict=True)):  # the answer's tokens are predicted from positions len(p)-1 ..
            out.append(float(torch.exp(logprobs[i, len(p) - 1:len(p) - 1 + len(a)].sum())))
    if was_training:
        model.train()
    return out


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
    """A prompt's token ids as TRL's GRPOTrainer makes them: plain text with the tokenizer's defaults (so a BOS token
    where the tokenizer adds one), a prompt rendered with the chat template with no more special tokens (the
    template writes its own)."""
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def decode_completion(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def rollout_groups(model, tokenizer, allocation: Sequence[tuple[Prompt, int]],
                   reward_fn: Callable[[Sequence[Prompt], Sequence[str]], list[float]], *, step: int, version: int,
                   max_new_tokens: int, temperature: float, top_p: float = 1.0, batch_size: int = 256,
                   id_prefix: str = "", reward_name: str = "reward") -> list[Trajectory]:
    """Single-turn rollouts: `n` completions for each (prompt, n) in `allocation`, scored by `reward_fn` (recorded
    under `reward_name` in each trajectory's `rewards`)."""
    flat: list[tuple[int, Prompt]] = [(g, p) for g, (p, n) in enumerate(allocation) for _ in range(n)]
    if not flat:
        return []
    encoded = {p.prompt_id: encode_prompt(tokenizer, p.text) for p, _ in allocation}
    samples = sample(model, tokenizer, [encoded[p.prompt_id] for _, p in flat], max_new_tokens, temperature, top_p,
                     batch_size)
    texts = [decode_completion(tokenizer, s.completion_ids) for s in samples]
    rewards = reward_fn([p for _, p in flat], texts)
    trajectories = []
    for k, ((g, p), s, text, r) in enumerate(zip(flat, samples, texts, rewards, strict=True)):
        trajectories.append(Trajectory(
            traj_id=f"{id_prefix}s{step}-{k}", prompt_id=p.prompt_id, group_id=f"{id_prefix}s{step}-g{g}", step=step,
            behavior_version=version, prompt_ids=s.prompt_ids, completion_ids=s.completion_ids,
            completion_mask=[1] * len(s.completion_ids), behavior_logprobs=s.logprobs, reward=float(r),
            finish_reason=s.finish_reason, prompt_text=p.text, completion_text=text, family=p.family,
            rewards={reward_name: float(r)},
        ))
    return trajectories
