"""The training loop: rollout -> price -> advantages -> update -> log, one function, top to bottom.

Every rank plans the same prompts (same seed, same budget state), generates its share of the groups, and then
all ranks see every trajectory (gather_object), so pricing and packing are computed identically everywhere and
each rank trains on its own micro-batches of the admitted trajectories. Only the main process writes files.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object

from budget.ledger import Ledger
from budget.metrics import price_components, step_metrics
from budget.policies import BudgetState, SampleLimits, plan_prompts, price_trajectories, update_state
from rollout.tasks import TaskSet
from rollout.types import Trajectory
from train.algorithms import clipped_policy_loss, grpo_advantages, kl_penalty
from train.config import RunConfig, config_to_dict
from train.logger import NoOpLogger, WandbLogger
from train.packing import pack_microbatches, pad_batch
from train.store import StepStore, prompt_rows, trajectory_rows

# ------------------------------------------------------------------------------------------------ build_*


def build_accelerator() -> Accelerator:
    # On a machine without CUDA the CPU flag must be set here: `accelerate launch --cpu` silently starts one process.
    return Accelerator(cpu=not torch.cuda.is_available())


def build_policy(cfg: RunConfig, task: TaskSet, accelerator: Accelerator):
    from train.model import ensure_tiny_policy, load_policy

    path = cfg.model.path
    if path == "tiny":
        # Build once on the main process; the others wait and load the cached copy.
        if accelerator.is_main_process:
            path = str(ensure_tiny_policy(cfg.model, task.demonstrations, task.key, cfg.seed))
        accelerator.wait_for_everyone()
        path = str(ensure_tiny_policy(cfg.model, task.demonstrations, task.key, cfg.seed))
    return load_policy(path, cfg.model.gguf_file, cfg.model.dtype)


def build_reference(cfg: RunConfig, model: torch.nn.Module):
    """The frozen reference policy of the KL penalty: a copy of the starting weights (None when kl_coef = 0)."""
    if cfg.algo.kl_coef == 0:
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


def build_logger(cfg: RunConfig, accelerator: Accelerator, out: Path):
    if cfg.log.report_to == "none" or not accelerator.is_main_process:
        return NoOpLogger()
    return WandbLogger(cfg.log.project, cfg.log.run_name or out.name, cfg.log.group, config_to_dict(cfg), out)


def build_optimizer(cfg: RunConfig, model: torch.nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warmup = cfg.train.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return opt, sched


# ------------------------------------------------------------------------------------------------ helpers

TABLE_COLUMNS = ["prompt", "completion", "reward", "advantage", "gain", "cost", "risk", "price", "fate"]


@dataclass
class Batch:
    ids: torch.Tensor  # (B, L) prompt + completion, right-padded
    attn: torch.Tensor  # (B, L)
    mask: torch.Tensor  # (B, L-1) 1 where the target token is a policy token to train on
    old_logprobs: torch.Tensor  # (B, L-1) behaviour logprobs at target positions
    advantages: torch.Tensor  # (B,)


def make_batch(trajectories: Sequence[Trajectory], advantages: Sequence[float], pad_id: int) -> Batch:
    ids, attn = pad_batch([t.prompt_ids + t.completion_ids for t in trajectories], pad_id)
    mask = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    old = torch.zeros_like(mask)
    for i, t in enumerate(trajectories):
        start = t.tokens_prompt - 1  # logits at position j predict token j + 1
        n = t.tokens_completion
        mask[i, start : start + n] = torch.tensor(t.completion_mask, dtype=mask.dtype)
        old[i, start : start + n] = torch.tensor(t.behavior_logprobs, dtype=old.dtype)
    return Batch(ids, attn, mask, old, torch.tensor(list(advantages), dtype=torch.float32))


def token_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, L-1) log-probabilities of each next token under softmax(logits / temperature), as the sampler used."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # (B, L-1, V)
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def group_advantages(trajectories: Sequence[Trajectory], admitted: Sequence[bool], scale: bool) -> np.ndarray:
    """GRPO advantages over each group's admitted members; 0 for trajectories not trained on."""
    adv = np.zeros(len(trajectories))
    idx = [i for i, a in enumerate(admitted) if a]
    if idx:
        groups = {g: k for k, g in enumerate(dict.fromkeys(trajectories[i].group_id for i in idx))}
        rewards = torch.tensor([trajectories[i].reward for i in idx], dtype=torch.float32)
        index = torch.tensor([groups[trajectories[i].group_id] for i in idx])
        adv[idx] = grpo_advantages(rewards, index, scale_rewards=scale).numpy()
    return adv


@torch.no_grad()
def evaluate(model, tokenizer, task: TaskSet, cfg: RunConfig, accelerator: Accelerator) -> dict[str, float]:
    """Mean reward on the eval split at the eval temperature (k samples each) and greedy; sharded over ranks."""
    mine = task.eval[accelerator.process_index :: accelerator.num_processes]
    out = {}
    for key, temp, k in (("eval/reward", cfg.rollout.eval_temperature, cfg.rollout.eval_samples),
                         ("eval/reward_greedy", 0.0, 1)):
        episodes = task.rollout(model, tokenizer, [(p, k if temp > 0 else 1) for p in mine], cfg.rollout, step=-1,
                                version=-1, temperature=temp)
        scored = [x for part in gather_object([[(t.family, t.reward) for t in episodes]]) for x in part]
        out[key] = float(np.mean([r for _, r in scored])) if scored else float("nan")
        for family in sorted({f for f, _ in scored} - {""}):
            out[f"{key}/{family}"] = float(np.mean([r for f, r in scored if f == family]))
    return out


# ------------------------------------------------------------------------------------------------ the loop


def train(cfg: RunConfig, task: TaskSet) -> dict:
    t_start = time.time()
    accelerator = build_accelerator()
    main = accelerator.is_main_process
    out = Path(cfg.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + accelerator.process_index)

    model, tokenizer = build_policy(cfg, task, accelerator)
    model.to(accelerator.device)
    reference = build_reference(cfg, model)
    optimizer, scheduler = build_optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    policy = accelerator.unwrap_model(model)
    logger = build_logger(cfg, accelerator, out)
    traj_store, prompt_store = StepStore(out / "trajectories"), StepStore(out / "prompts")
    if main:
        traj_store.truncate(0)
        prompt_store.truncate(0)

    state, ledger = BudgetState(), Ledger()
    limits = SampleLimits(cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.rollout.min_group_size,
                          cfg.rollout.max_group_size)
    by_id = {p.prompt_id: p for p in task.train}
    temperature = cfg.rollout.temperature
    world, rank = accelerator.num_processes, accelerator.process_index
    version, nonfinite_in_row = 0, 0

    evals = [(0, evaluate(policy, tokenizer, task, cfg, accelerator))]
    ledger.record_eval(0, evals[0][1]["eval/reward"])
    if main:
        print(f"eval at start: reward {evals[0][1]['eval/reward']:.3f} (greedy {evals[0][1]['eval/reward_greedy']:.3f})")
        logger.log(evals[0][1], step=0)

    bar = None
    if main and cfg.log.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.train.max_steps, desc="train", dynamic_ncols=True)

    for step in range(cfg.train.max_steps):
        t0 = time.time()
        step_rng = np.random.default_rng([cfg.seed, step])
        metrics: dict[str, float] = {}

        # 1. Plan: the budget decides how many samples each candidate prompt gets (same on every rank).
        tb = time.time()
        pool = step_rng.choice(len(task.train), size=min(len(task.train), cfg.budget.pool_factor * limits.prompts_per_step),
                               replace=False)
        plan = plan_prompts(cfg.budget, state, [task.train[i].prompt_id for i in pool], step, step_rng, limits)
        budget_s = time.time() - tb
        allocation = [(by_id[d.prompt_id], d.samples) for d in plan if d.samples > 0]

        # 2. Rollout: each rank generates its share of the groups; then every rank sees every trajectory.
        tr = time.time()
        mine = task.rollout(policy, tokenizer, allocation[rank::world], cfg.rollout, step=step, version=version,
                            temperature=temperature, id_prefix=f"r{rank}-")
        trajectories = [t for part in gather_object([mine]) for t in part]
        rollout_s = time.time() - tr

        # 3. Price: every trajectory gets a fate; only admitted ones are trained on.
        tb = time.time()
        decisions = price_trajectories(cfg.budget, state, trajectories, version, num_iterations=cfg.algo.num_iterations)
        budget_s += time.time() - tb
        admitted = [d.trained for d in decisions]

        # 4. Advantages over each group's admitted members.
        advantages = group_advantages(trajectories, admitted, cfg.algo.scale_rewards)

        # 5. Update: token-balanced micro-batches, equal count per rank, loss normalised by the global token count.
        tu = time.time()
        train_idx = [i for i, a in enumerate(admitted) if a]
        global_tokens = sum(trajectories[i].tokens_policy for i in train_idx)
        loss_stats = {"loss/policy": 0.0, "loss/kl": 0.0, "loss/clip_fraction": 0.0}
        grad_norm = float("nan")
        if global_tokens == 0:
            metrics["train/skipped_empty"] = 1.0  # every group filtered: nothing to learn from this step
        else:
            lengths = [trajectories[i].tokens_prompt + trajectories[i].tokens_completion for i in train_idx]
            plan_mb = pack_microbatches(lengths, world, cfg.train.micro_batch_tokens)[rank]
            for _ in range(cfg.algo.num_iterations):
                for m, mb in enumerate(plan_mb):
                    sel = [train_idx[j] for j in mb]
                    with accelerator.no_sync(model) if m < len(plan_mb) - 1 else nullcontext():
                        stats = _microbatch_backward(model, reference, [trajectories[i] for i in sel], advantages[sel], cfg,
                                                     tokenizer.pad_token_id, global_tokens, world, accelerator)
                    for k, v in stats.items():
                        loss_stats[k] += v
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or 1e9))
                finite = math.isfinite(grad_norm) and all(math.isfinite(v) for v in loss_stats.values())
                if finite:
                    optimizer.step()
                    nonfinite_in_row = 0
                else:
                    nonfinite_in_row += 1
                    metrics["train/nonfinite"] = 1.0
                optimizer.zero_grad(set_to_none=True)
                if nonfinite_in_row >= cfg.train.max_nonfinite:
                    raise FloatingPointError(
                        f"{nonfinite_in_row} non-finite losses/gradients in a row at step {step} "
                        f"(train.max_nonfinite={cfg.train.max_nonfinite}); lower train.lr or check the rewards"
                    )
            version += 1
            loss_stats = {k: v / cfg.algo.num_iterations for k, v in _reduce(loss_stats, accelerator).items()}
            scheduler.step()
        train_s = time.time() - tu

        # 6. Budget state, ledger, stores, logs.
        drift_kl = measure_drift(policy, [trajectories[i] for i in train_idx], version, cfg, tokenizer.pad_token_id,
                                 accelerator) if global_tokens else None
        tb = time.time()
        update_state(cfg.budget, state, trajectories, step, version, drift_kl, decisions=decisions,
                     num_iterations=cfg.algo.num_iterations)
        ledger.record_step(trajectories, decisions, cfg.algo.num_iterations,
                           prompts_skipped=sum(d.samples == 0 for d in plan))
        budget_s += time.time() - tb
        if main:
            traj_store.write(step, trajectory_rows(trajectories, decisions, advantages, cfg.algo.num_iterations))
            prompt_store.write(step, prompt_rows(step, plan))

        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 or step + 1 == cfg.train.max_steps:
            evals.append((step + 1, evaluate(policy, tokenizer, task, cfg, accelerator)))
            ledger.record_eval(step + 1, evals[-1][1]["eval/reward"])
            metrics.update(evals[-1][1])

        rewards = np.array([t.reward for t in trajectories]) if trajectories else np.zeros(1)
        step_s = time.time() - t0
        metrics.update({
            "rollout/reward_mean": float(rewards.mean()), "rollout/reward_std": float(rewards.std()),
            "rollout/samples": len(trajectories), "rollout/groups": len(allocation),
            "rollout/completion_tokens_mean": float(np.mean([t.tokens_completion for t in trajectories] or [0])),
            "rollout/eos_fraction": float(np.mean([t.finish_reason == "eos" for t in trajectories] or [0])),
            **step_metrics(plan, decisions, trajectories, state, cfg=cfg.budget),
            **ledger.metrics(cfg.budget.target_reward), **loss_stats, "optim/lr": scheduler.get_last_lr()[0], "optim/grad_norm": grad_norm,
            "optim/policy_version": version,
            "perf/step_seconds": step_s, "perf/rollout_seconds": rollout_s, "perf/train_seconds": train_s,
            "perf/budget_seconds": budget_s, "perf/budget_fraction": budget_s / step_s,
            "perf/tokens_per_second": sum(t.tokens_prompt + t.tokens_completion for t in trajectories) / step_s,
        })
        if drift_kl is not None:
            metrics["loss/drift_kl"] = drift_kl
        if main:
            logger.log(metrics, step=step + 1)
            logger.log_histograms({f"budget/hist_{k}": v for k, v in price_components(decisions).items()}, step=step + 1)
            if cfg.log.table_every and step % cfg.log.table_every == 0:
                logger.log_table("trajectories", TABLE_COLUMNS, [
                    [t.prompt_text, t.completion_text, t.reward, float(a), d.gain, d.cost, d.risk, d.price, d.fate]
                    for t, a, d in zip(trajectories, advantages, decisions, strict=True)], step=step + 1)
            if bar is not None:
                bar.set_postfix(reward=f"{metrics['rollout/reward_mean']:.3f}", tokens=f"{ledger.total_tokens / 1e3:.0f}k",
                                eval=f"{evals[-1][1]['eval/reward']:.3f}")
                bar.update(1)

    if bar is not None:
        bar.close()
    summary = {
        "steps": cfg.train.max_steps, "world_size": world, "algo": cfg.algo.name, "policy": cfg.budget.policy,
        "initial_eval_reward": evals[0][1]["eval/reward"], "final_eval_reward": evals[-1][1]["eval/reward"],
        "final_eval_reward_greedy": evals[-1][1]["eval/reward_greedy"],
        "eval_history": [{"step": s, **e} for s, e in evals],
        "tokens": {"rollout": ledger.rollout_tokens, "train": ledger.by_use["train"], "total": ledger.total_tokens},
        "target_reward": cfg.budget.target_reward,
        "tokens_to_target": ledger.tokens_to_target(cfg.budget.target_reward),
        "best_eval_reward": max(e["eval/reward"] for _, e in evals),
        "ledger": ledger.summary(cfg.budget.target_reward),
        "wall_seconds": round(time.time() - t_start, 2),
    }
    if main:
        policy.save_pretrained(out / "final")
        tokenizer.save_pretrained(out / "final")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"eval: start {summary['initial_eval_reward']:.3f} -> end {summary['final_eval_reward']:.3f} "
              f"(greedy {summary['final_eval_reward_greedy']:.3f}); tokens {ledger.total_tokens:,}; "
              f"{summary['wall_seconds']:.0f} s; run directory {out}")
    logger.finish()
    accelerator.end_training()
    return summary


def _microbatch_backward(model, reference, trajectories: Sequence[Trajectory], advantages: np.ndarray, cfg: RunConfig,
                         pad_id: int, global_tokens: int, world: int, accelerator: Accelerator) -> dict[str, float]:
    """Forward + backward of one micro-batch; returns its contribution to the step's loss statistics."""
    if not trajectories:  # this rank has fewer micro-batches' worth of data: a zero-loss step keeps DDP in step
        dummy = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        accelerator.backward(dummy)
        return {}
    b = make_batch(trajectories, advantages, pad_id)
    dev = accelerator.device
    lp = token_logprobs(model, b.ids.to(dev), b.attn.to(dev), cfg.rollout.temperature)
    mask, old, adv = b.mask.to(dev), b.old_logprobs.to(dev), b.advantages.to(dev)
    loss_sum, stats = clipped_policy_loss(lp, old, adv, mask, cfg.algo.clip_low, cfg.algo.clip_high)
    kl_sum = torch.zeros((), device=dev)
    if reference is not None:
        with torch.no_grad():
            ref = token_logprobs(reference, b.ids.to(dev), b.attn.to(dev), cfg.rollout.temperature)
        kl_sum = kl_penalty(lp, ref, mask)
    # DDP averages gradients over ranks: scale by world so the update is the sum over all tokens / global_tokens.
    loss = (loss_sum + cfg.algo.kl_coef * kl_sum) * world / global_tokens
    accelerator.backward(loss)
    return {"loss/policy": loss_sum.item() / global_tokens, "loss/kl": kl_sum.item() / global_tokens,
            "loss/clip_fraction": float(stats["clipped_tokens"]) / global_tokens}


@torch.no_grad()
def measure_drift(model, trajectories: Sequence[Trajectory], version: int, cfg: RunConfig, pad_id: int,
                  accelerator: Accelerator) -> float:
    """Mean per-token KL(behaviour || current) on up to `budget.drift_probe` of the step's trained trajectories,
    per policy version between them: the drift rate at which the budget depreciates stale evidence. A forward pass
    of the new policy over a few sequences (not counted in the ledger; its share is logged as perf/)."""
    probe = list(trajectories[: cfg.budget.drift_probe])
    if not probe:
        return 0.0
    b = make_batch(probe, [0.0] * len(probe), pad_id)
    dev = accelerator.device
    lp = token_logprobs(model, b.ids.to(dev), b.attn.to(dev), cfg.rollout.temperature)
    mask, old = b.mask.to(dev), b.old_logprobs.to(dev)
    # k3 with r = π_current / π_behaviour on samples from the behaviour policy: KL(behaviour || current)
    kl = kl_penalty(old, lp, mask).item() / max(mask.sum().item(), 1.0)
    return kl / max(float(np.mean([version - t.behavior_version for t in probe])), 1.0)


def _reduce(stats: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    if accelerator.num_processes == 1:
        return stats
    t = torch.tensor(list(stats.values()), device=accelerator.device, dtype=torch.float64)
    return dict(zip(stats, accelerator.reduce(t, reduction="sum").tolist(), strict=True))


