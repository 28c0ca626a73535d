"""The training loop: plan -> rollout -> price -> advantages -> update -> log, one function, top to bottom.

Every rank plans the same prompts (same seed, same budget state), generates its share of the groups, and then
all ranks see every trajectory (gather_object), so pricing and packing are computed identically everywhere and
each rank trains on its own micro-batches of the admitted trajectories. Only the main process writes files.
"""

from __future__ import annotations

import copy
import random
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object

from budget.ledger import Ledger
from budget.metrics import price_components, step_metrics
from budget.policies import (
    BudgetState,
    SampleLimits,
    candidate_count,
    plan_prompts,
    price_trajectories,
    update_state,
)
from rollout.tasks import TaskSet
from rollout.types import TrajectoryColumns
from train import zero
from train.config import ConfigError, RunConfig, config_to_dict
from train.logger import NoOpLogger, WandbLogger
from train.store import StepStore, prompt_rows, trajectory_rows, write_final
from train.update import group_advantages, measure_drift, train_step

TABLE_COLUMNS = ["prompt", "completion", "reward", "advantage", "gain", "cost", "risk", "price", "fate"]

# ------------------------------------------------------------------------------------------------ build_*


def build_accelerator(cfg: RunConfig) -> Accelerator:
    # On a machine without CUDA the CPU flag must be set here: `accelerate launch --cpu` silently starts one process.
    if cfg.model.dtype != "float32" and not torch.cuda.is_available():
        raise ConfigError(f"model.dtype: {cfg.model.dtype} needs a GPU; use float32 on CPU")
    if zero.requested():  # DeepSpeed: cpu=True would drop it for plain DDP; the engine is configured before prepare
        accelerator = zero.build_accelerator(cpu=not torch.cuda.is_available())
        zero.configure(accelerator, cfg)
        return accelerator
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if cfg.train.save_every and accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("train.save_every: checkpoints do not gather FSDP shards yet; set train.save_every=0 under FSDP")
    return accelerator


def build_policy(cfg: RunConfig, task: TaskSet, accelerator: Accelerator):
    """The starting policy (built and cached first if `tiny`), with LoRA adapters if asked, on the device."""
    from train.model import load_policy, resolve_policy_path

    if accelerator.is_main_process:  # a tiny policy is built once, by the main process; the others load the cache
        resolve_policy_path(cfg.model, task, cfg.seed)
    accelerator.wait_for_everyone()
    model, tokenizer = load_policy(resolve_policy_path(cfg.model, task, cfg.seed), cfg.model.gguf_file, cfg.model.dtype)
    if cfg.model.lora_r > 0:
        from train.lora import apply_lora

        model = apply_lora(model, cfg.model)
    return model.to(accelerator.device), tokenizer


def build_reference(cfg: RunConfig, model: torch.nn.Module):
    """The frozen reference of the KL penalty: a copy of the starting weights; None when kl_coef = 0 or with LoRA
    (then the reference is the same model with its adapters disabled: no second copy)."""
    if cfg.algo.kl_coef == 0 or cfg.model.lora_r > 0:
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


def build_value_head(cfg: RunConfig, model: torch.nn.Module):
    if cfg.algo.name != "ppo":
        return None
    from train.value import ValueHead

    return ValueHead(model.config.hidden_size).to(next(model.parameters()).device)


def build_logger(cfg: RunConfig, accelerator: Accelerator, out: Path):
    if cfg.log.report_to == "none" or not accelerator.is_main_process:
        return NoOpLogger()
    return WandbLogger(cfg.log.project, cfg.log.run_name or out.name, cfg.log.group, config_to_dict(cfg), out)


def build_optimizer(cfg: RunConfig, modules: list[torch.nn.Module]):
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warmup = cfg.train.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return opt, sched


@torch.no_grad()
def evaluate(model, tokenizer, task: TaskSet, cfg: RunConfig, accelerator: Accelerator) -> dict[str, float]:
    """Mean reward on the eval split at the eval temperature (k samples each) and greedy, overall and per task
    family; sharded over ranks. Runs on its own seeded RNG, so evaluating never changes the training run."""
    mine = task.eval[accelerator.process_index :: accelerator.num_processes]
    out = {}
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 10_000 + accelerator.process_index)
        for key, temp, k in (("eval/reward", cfg.rollout.eval_temperature, cfg.rollout.eval_samples),
                             ("eval/reward_greedy", 0.0, 1)):
            episodes = task.rollout(model, tokenizer, [(p, k if temp > 0 else 1) for p in mine], cfg.rollout, step=-1,
                                    version=-1, temperature=temp)
            scored = [x for part in gather_object([[(t.family, t.reward) for t in episodes]]) for x in part]
            out[key] = float(np.mean([r for _, r in scored])) if scored else float("nan")
            for family in sorted({f for f, _ in scored} - {""}):
                out[f"{key}/{family}"] = float(np.mean([r for f, r in scored if f == family]))
    return out


def _fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def generation_context(model, accelerator: Accelerator):
    """Generating with the trained model itself: under FSDP the root unit's own weights (embeddings, final norm,
    head) are gathered for the duration (the nested units gather theirs in their forward); under ZeRO-3 every
    weight is gathered and the engine's fetch/release hooks are lifted; a no-op otherwise."""
    if model is None:
        return nullcontext()
    if zero.active(accelerator):
        return zero.generation_context(model, accelerator)
    if not _fsdp(accelerator):
        return nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.summon_full_params(model, writeback=False, recurse=False)


@torch.no_grad()
def sync_snapshot(snapshot: torch.nn.Module, model, accelerator: Accelerator) -> None:
    """Copy the trained weights into the rollout snapshot on every rank (under FSDP and ZeRO-3, gathered from the
    shards)."""
    ctx = zero.gathered_parameters(model, accelerator)
    if _fsdp(accelerator):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        ctx = FSDP.summon_full_params(model, writeback=False)
    with ctx:
        live = {name.replace("_fsdp_wrapped_module.", ""): p
                for name, p in accelerator.unwrap_model(model).named_parameters()}
        for name, p in snapshot.named_parameters():
            p.copy_(live[name])


# ------------------------------------------------------------------------------------------------ the loop


def train(cfg: RunConfig, task: TaskSet) -> dict:
    t_start = time.time()
    accelerator = build_accelerator(cfg)
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    out = Path(cfg.output_dir)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + rank)

    model, tokenizer = build_policy(cfg, task, accelerator)
    reference = build_reference(cfg, model)
    value_head = build_value_head(cfg, model)
    optimizer, scheduler = build_optimizer(cfg, [model] + ([value_head] if value_head is not None else []))
    state, ledger, version, start_step, evals, nonfinite_in_row = BudgetState(), Ledger(), 0, 0, [], 0
    if cfg.train.resume_from:
        from train.checkpoint import find_checkpoint, load_checkpoint

        ckpt = find_checkpoint(out, cfg.train.resume_from)
        extra = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, value_head=value_head,
                                rank=rank)
        state, ledger = BudgetState.from_state_dict(extra["budget"]), Ledger.from_state_dict(extra["ledger"])
        version, start_step, evals = extra["version"], extra["step"], extra["evals"]
        nonfinite_in_row, t_start = extra["nonfinite_in_row"], t_start - extra["elapsed_seconds"]
        if main:
            print(f"resumed from {ckpt} at step {start_step} (policy version {version})")
    # a plain copy made before prepare(): FSDP's wrapped modules cannot be deep-copied, and the snapshot must hold
    # every weight on every rank to generate on its own
    snapshot = copy.deepcopy(model).eval().requires_grad_(False) if cfg.rollout.max_staleness else None
    behaviour_version = version
    if snapshot is not None and cfg.train.resume_from:
        from train.checkpoint import load_snapshot

        if load_snapshot(ckpt, snapshot):  # resume sampling from the same lagging weights as the interrupted run
            behaviour_version = extra["behaviour_version"]
    if value_head is not None and zero.active(accelerator):  # the engine trains one module: the head joins the policy
        model, optimizer = accelerator.prepare(zero.with_value_head(model, value_head), optimizer)
    elif value_head is not None:
        model, value_head, optimizer = accelerator.prepare(model, value_head, optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    policy = accelerator.unwrap_model(model)
    # Rollouts may run ahead of training by up to max_staleness versions: they sample from a snapshot of the
    # weights that is refreshed once it is that many versions behind (on-policy: the policy itself).
    behaviour = snapshot if snapshot is not None else policy

    traj_store, prompt_store = StepStore(out / "trajectories"), StepStore(out / "prompts")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        traj_store.truncate(start_step)  # a resumed run rewrites the steps after its checkpoint; nothing is doubled
        prompt_store.truncate(start_step)
    logger = build_logger(cfg, accelerator, out)
    limits = SampleLimits(cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.rollout.min_group_size,
                          cfg.rollout.max_group_size)
    by_id = {p.prompt_id: p for p in task.train}

    def run_eval(step: int) -> dict[str, float]:
        """Evaluate, note it in the ledger and the history (with the tokens and seconds spent so far)."""
        with generation_context(model, accelerator):
            result = evaluate(policy, tokenizer, task, cfg, accelerator)
        ledger.record_eval(step, result["eval/reward"])
        evals.append({"step": step, "tokens": ledger.total_tokens, "seconds": round(time.time() - t_start, 2), **result})
        return result

    if not evals:
        logger.log(run_eval(0), step=0)
    if main:
        print(f"eval at step {evals[-1]['step']}: reward {evals[-1]['eval/reward']:.3f} "
              f"(greedy {evals[-1]['eval/reward_greedy']:.3f})")
    bar = None
    if main and cfg.log.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def plan_step(step: int):
        """The budget's plan for `step` (the same on every rank): a seeded pool of candidates (the data sampler's
        draw, as any trainer makes one), samples for each (the budget's decision). Returns (plan, seconds in the
        budget)."""
        step_rng = np.random.default_rng([cfg.seed, step])
        # every policy draws the same pool, so the arms of an ablation meet the same prompts first; a uniform policy
        # is offered only its prompts_per_step (candidate_count)
        pool_size = min(len(task.train), cfg.budget.pool_factor * limits.prompts_per_step)
        pool = step_rng.choice(len(task.train), size=pool_size, replace=False)[:candidate_count(cfg.budget, limits)]
        candidates = [task.train[i].prompt_id for i in pool]
        tb = time.time()
        return plan_prompts(cfg.budget, state, candidates, step, step_rng, limits), time.time() - tb

    def refresh_behaviour(trains_after: int) -> None:
        """Refresh the rollout snapshot if rollouts sampled now, trained `trains_after` updates from now, would be more
        than max_staleness versions stale (on-policy: the behaviour is the policy itself, never behind)."""
        nonlocal behaviour_version
        if version + trains_after - behaviour_version > cfg.rollout.max_staleness:
            if snapshot is not None:  # on-policy there is nothing to copy (or, sharded, to gather)
                sync_snapshot(snapshot, model, accelerator)
            behaviour_version = version

    def generate(step: int, plan, sampler, sampler_version: int):
        """This rank's share of the planned groups, sampled from `sampler` (the policy or the lagging snapshot)."""
        allocation = [(by_id[pid], n) for pid, n in zip(plan.prompt_ids, plan.samples.tolist(), strict=True) if n > 0]
        with generation_context(model if sampler is policy else None, accelerator):
            return task.rollout(sampler, tokenizer, allocation[rank::world], cfg.rollout, step=step,
                                version=sampler_version, temperature=cfg.rollout.temperature, id_prefix=f"r{rank}-")

    # Async rollouts: while step t trains, a background thread generates step t+1's rollouts from the snapshot (which
    # is not trained, so the two never touch the same weights). Step t+1's plan is then made before step t's
    # evidence reaches the budget, and its samples are at least one version stale. The producer is joined before
    # anything that reads the global RNG (eval, checkpoint), and no step is started ahead across a checkpoint, so a
    # resumed run follows the same schedule as an uninterrupted one.
    producer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout") if cfg.rollout.async_rollout else None
    ahead = None  # (plan, future) of the next step's rollouts, when started ahead

    try:
        for step in range(start_step, cfg.train.max_steps):
            t0 = time.time()
            metrics: dict[str, float] = {}

            # 1-2. Plan and roll out: the budget decides how many samples each candidate prompt gets, each rank
            # generates its share of the groups, then every rank sees every trajectory (started ahead if async).
            tr = time.time()
            if ahead is not None:
                (plan, future), ahead = ahead, None
                mine, budget_s, sampled_ahead = future.result(), 0.0, 1.0
            else:
                (plan, budget_s), sampled_ahead = plan_step(step), 0.0
                refresh_behaviour(trains_after=0)
                mine = generate(step, plan, behaviour, behaviour_version)
            trajectories = [t for part in gather_object([mine]) for t in part]
            rollout_s = time.time() - tr - budget_s

            # 3. Price: every trajectory gets a fate; only admitted ones are trained on. The budget reads the step's
            # trajectories as columns, built once here.
            tb = time.time()
            columns = TrajectoryColumns.of(trajectories)
            decisions = price_trajectories(cfg.budget, state, columns, version, num_iterations=cfg.algo.num_iterations)
            budget_s += time.time() - tb
            admitted = decisions.trained

            # 4. Advantages (GRPO) over each group's admitted members; PPO computes GAE inside the update.
            advantages = group_advantages(trajectories, admitted, cfg.algo.scale_rewards)

            saves = bool(cfg.train.save_every) and (step + 1) % cfg.train.save_every == 0
            if producer is not None and step + 1 < cfg.train.max_steps and not saves:
                next_plan, next_plan_s = plan_step(step + 1)
                budget_s += next_plan_s
                refresh_behaviour(trains_after=1)  # step + 1 trains after this step's update
                ahead = (next_plan, producer.submit(generate, step + 1, next_plan, behaviour, behaviour_version))

            # 5. Update: token-balanced micro-batches, equal count per rank, loss normalised by the global token count.
            tu = time.time()
            train_idx = np.flatnonzero(admitted)
            trained = [trajectories[i] for i in train_idx]
            drift_kl = None
            if not trained or columns.tokens_policy[train_idx].sum() == 0:
                metrics["train/skipped_empty"] = 1.0  # every group filtered: nothing to learn from this step
            else:
                metrics.update(train_step(model, optimizer, trained, advantages[train_idx], cfg, tokenizer.pad_token_id,
                                          accelerator, reference=reference, value_head=value_head))
                nonfinite_in_row = nonfinite_in_row + 1 if metrics["train/nonfinite"] else 0
                if not metrics["train/nonfinite"] and metrics["train/fp16_overflow"] < 1:  # the weights moved
                    version += 1
                    scheduler.step()
                drift_kl = measure_drift(policy, trained, version, cfg, tokenizer.pad_token_id, accelerator.device)
            train_s = time.time() - tu

            # 6. Budget state, ledger, stores, eval, checkpoint, logs.
            tb = time.time()
            update_state(cfg.budget, state, columns, step, version, drift_kl, decisions=decisions,
                         num_iterations=cfg.algo.num_iterations)
            ledger.record_step(columns, decisions, cfg.algo.num_iterations,
                               prompts_skipped=int((plan.samples == 0).sum()))
            budget_metrics = step_metrics(plan, decisions, columns, state, cfg=cfg.budget)
            histograms = {f"budget/hist_{k}": v for k, v in price_components(decisions).items()}
            budget_s += time.time() - tb
            if main:
                traj_store.write(step, trajectory_rows(trajectories, decisions, advantages, cfg.algo.num_iterations))
                prompt_store.write(step, prompt_rows(step, plan))
            if nonfinite_in_row >= cfg.train.max_nonfinite:
                raise FloatingPointError(
                    f"{nonfinite_in_row} non-finite losses or gradients in a row at step {step} "
                    f"(train.max_nonfinite={cfg.train.max_nonfinite}): lower train.lr or check the rewards; "
                    f"the stores under {out} hold every step so far")
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 or step + 1 == cfg.train.max_steps:
                if ahead is not None:
                    wait([ahead[1]])  # sampling draws from the global RNG, which eval re-seeds (and restores)
                metrics.update(run_eval(step + 1))
            if saves:
                from train.checkpoint import capture_rng_state, save_checkpoint

                rng_states = gather_object([capture_rng_state()])  # every rank's streams, in rank order
                if main:
                    save_checkpoint(out, step + 1, model=policy, optimizer=optimizer, scheduler=scheduler,
                                    value_head=accelerator.unwrap_model(value_head) if value_head is not None else None,
                                    keep_last=cfg.train.keep_last, rng_states=rng_states, snapshot=snapshot,
                                    extra_state={"step": step + 1, "version": version, "budget": state.state_dict(),
                                                 "ledger": ledger.state_dict(), "evals": evals,
                                                 "nonfinite_in_row": nonfinite_in_row,
                                                 "behaviour_version": behaviour_version,
                                                 "elapsed_seconds": time.time() - t_start})
            accelerator.wait_for_everyone()

            tb = time.time()
            budget_metrics.update(ledger.metrics(cfg.budget.target_reward))  # after the eval: tokens_to_target
            budget_s += time.time() - tb
            rewards = columns.reward if len(columns) else np.zeros(1)  # the step's columns, read once above
            step_s = time.time() - t0
            metrics.update({
                "rollout/reward_mean": float(rewards.mean()), "rollout/reward_std": float(rewards.std()),
                "rollout/samples": len(trajectories), "rollout/groups": int((plan.samples > 0).sum()),
                "rollout/sampled_ahead": sampled_ahead,
                "rollout/completion_tokens_mean": float(columns.tokens_completion.mean()) if len(columns) else 0.0,
                **{f"rollout/finish_{reason}": float(np.mean([t.finish_reason == reason for t in trajectories] or [0]))
                   for reason in task.finish_reasons},
                "rollout/staleness_mean": float(version - columns.behavior_version.mean()) if len(columns) else 0.0,
                **budget_metrics, "optim/lr": scheduler.get_last_lr()[0],
                "optim/policy_version": version, "perf/step_seconds": step_s, "perf/rollout_seconds": rollout_s,
                "perf/train_seconds": train_s, "perf/budget_seconds": budget_s, "perf/budget_fraction": budget_s / step_s,
                "perf/tokens_per_second": float(columns.tokens_rollout.sum()) / step_s,
            })
            if drift_kl is not None:
                metrics["train/drift_kl"] = drift_kl
            if main:
                logger.log(metrics, step=step + 1)
                logger.log_histograms(histograms, step=step + 1)
                if cfg.log.table_every and step % cfg.log.table_every == 0:
                    logger.log_table("trajectories", TABLE_COLUMNS, [
                        [t.prompt_text, t.completion_text, t.reward, float(a), d.gain, d.cost, d.risk, d.price, d.fate]
                        for t, a, d in zip(trajectories, advantages, decisions, strict=True)], step=step + 1)
                if bar is not None:
                    bar.set_postfix(reward=f"{metrics['rollout/reward_mean']:.3f}", eval=f"{evals[-1]['eval/reward']:.3f}",
                                    tokens=f"{ledger.total_tokens / 1e3:.0f}k")
                    bar.update(1)
    finally:
        if producer is not None:  # at the end or after an error: let a rollout in flight finish, start nothing new
            producer.shutdown(wait=True, cancel_futures=True)

    if bar is not None:
        bar.close()
    summary = {
        "steps": cfg.train.max_steps, "world_size": world, "algo": cfg.algo.name, "policy": cfg.budget.policy,
        "initial_eval_reward": evals[0]["eval/reward"], "final_eval_reward": evals[-1]["eval/reward"],
        "final_eval_reward_greedy": evals[-1]["eval/reward_greedy"],
        "best_eval_reward": max(e["eval/reward"] for e in evals),
        "target_reward": cfg.budget.target_reward, "tokens_to_target": ledger.tokens_to_target(cfg.budget.target_reward),
        "tokens": {"rollout": ledger.rollout_tokens, "train": ledger.by_use["train"], "total": ledger.total_tokens},
        "eval_history": evals,  # each: step, tokens (total so far), seconds (since start), eval/* metrics
        "ledger": ledger.summary(cfg.budget.target_reward),
        "wall_seconds": round(time.time() - t_start, 2),
    }
    weights = accelerator.get_state_dict(model)  # a collective under FSDP and ZeRO-3: full weights on the main rank
    if zero.active(accelerator):
        weights = zero.policy_weights(weights)
    if main:
        write_final(out, policy, tokenizer, summary, state_dict=weights)
    logger.finish()
    accelerator.end_training()
    return summary
