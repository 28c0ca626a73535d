"""The peer arm: TRL's own GRPOTrainer on the same task, starting policy, reward, eval and token ledger as ours.

    marginal-rl train-trl --config configs/quickstart.yaml [key=value ...]
    marginal-rl train-trl --config configs/quickstart.yaml train.max_steps=20 output_dir=runs/trl_check
    marginal-rl train-trl --config configs/quickstart.yaml --dry-run   # print the GRPOConfig arguments

Reads the same RunConfig as `marginal-rl train` (--config files, then key=value overrides; a bad config exits with
status 2) and maps it onto GRPOConfig: the tiny policy cached for this seed (train.model.resolve_policy_path), the
same train/eval prompts (rollout.build.build_task), exact-match reward, group size (num_generations), prompts per
step (one generation batch = one optimiser step), lr (constant, no warm-up), AdamW, grad-norm clip, temperature,
top_p, max_new_tokens, beta = algo.kl_coef, epsilon = algo.clip_low / clip_high, scale_rewards = algo.scale_rewards
(the same unbiased std + 1e-4 as ours) and loss_type = algo.loss_type (dapo by default: token-level loss summed
over the generation batch's completion tokens and divided by their global count; grpo and dr_grpo as ours; TRL's
"bnpo" divides by the local micro-batch's count instead, the same only with one process and no accumulation).

budget.policy is ignored: TRL trains on every sample, zero-advantage ones included, so every sample lands in the
ledger with fate `trained`: rollout tokens = prompt + completion of every sample, train tokens = (prompt +
completion) x num_iterations of every sample, counted by budget.ledger.Ledger as our loop does. Eval, its
record and the summary are the loop's own (train.loop.evaluate, record_eval, run_summary: same seeded sampling, same
prompts) at step 0, every train.eval_every steps and at the end, and the run directory gets the same config.yaml,
trajectories/ store, summary.json (policy "trl_grpo") and final/.

Differences that remain, by design of TRL: prompts are drawn by TRL's RepeatSampler (a shuffled pass over the
train split per epoch) rather than our per-step draw; one process only (the ledger counts the local batch).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from marginal_rl.train.config import ConfigError, RunConfig


def check_supported(cfg: RunConfig) -> None:
    """Keys that TRL's GRPOTrainer cannot honour the way our loop does: refuse rather than silently differ."""
    problems = {
        "algo.name": (cfg.algo.name == "grpo", "grpo (TRL's GRPOTrainer has no PPO)"),
        "rollout.max_staleness": (cfg.rollout.max_staleness == 0, "0 (GRPOTrainer rolls out on-policy)"),
        "model.lora_r": (cfg.model.lora_r == 0, "0 (full fine-tuning)"),
        "train.resume_from": (not cfg.train.resume_from, "'' (the peer arm does not checkpoint)"),
        "train.save_every": (cfg.train.save_every == 0, "0 (the peer arm does not checkpoint)"),
        "train.max_tokens": (cfg.train.max_tokens == 0, "0 (GRPOTrainer runs train.max_steps steps)"),
        "train.eval_every_tokens": (cfg.train.eval_every_tokens == 0, "0 (the peer evaluates every eval_every steps)"),
    }
    for key, (ok, expected) in problems.items():
        if not ok:
            raise ConfigError(f"{key}: marginal-rl train-trl expects {expected}")


def grpo_config_kwargs(cfg: RunConfig) -> dict:
    """GRPOConfig keyword arguments that make TRL's update the same as ours (see the module docstring)."""
    samples = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    return dict(
        output_dir=cfg.output_dir, seed=cfg.seed, data_seed=cfg.seed,
        max_steps=cfg.train.max_steps * cfg.algo.num_iterations,  # TRL counts one optimiser step per iteration
        per_device_train_batch_size=samples, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=cfg.rollout.group_size, num_iterations=cfg.algo.num_iterations,
        max_completion_length=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
        learning_rate=cfg.train.lr, lr_scheduler_type="constant_with_warmup" if cfg.train.warmup_steps else "constant",
        warmup_steps=cfg.train.warmup_steps, weight_decay=cfg.train.weight_decay, optim="adamw_torch",
        max_grad_norm=cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else 1e9,
        beta=cfg.algo.kl_coef, epsilon=cfg.algo.clip_low, epsilon_high=cfg.algo.clip_high,
        scale_rewards=cfg.algo.scale_rewards, loss_type=cfg.algo.loss_type,
        mask_truncated_completions=False, use_vllm=False, use_cpu=not _cuda(), bf16=False, fp16=False,
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1,
        disable_tqdm=not cfg.log.progress, remove_unused_columns=False, dataloader_num_workers=0,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def train_trl(cfg: RunConfig, task) -> dict:
    """Train with GRPOTrainer on `task` (a single-turn TaskSet); writes the run directory, returns the summary."""
    import numpy as np
    import yaml
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from marginal_rl.budget.ledger import Ledger
    from marginal_rl.budget.records import TrajectoryDecision, TrajectoryPrices
    from marginal_rl.rollout.types import Trajectory, TrajectoryColumns
    from marginal_rl.train.config import config_to_dict
    from marginal_rl.train.loop import build_logger, evaluate, record_eval, run_summary
    from marginal_rl.train.model import load_policy, resolve_policy_path
    from marginal_rl.train.store import StepStore, prepare_run_dir, trajectory_rows, write_final
    from marginal_rl.train.update import sequence_advantages

    # transformers deprecation notices that GRPOTrainer triggers on every step; they say nothing about the run
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
    t_start = time.time()
    out = Path(cfg.output_dir)
    prepare_run_dir(out, resume=False, overwrite=cfg.train.overwrite)
    if cfg.budget.policy != "none":
        print(f"note: budget.policy={cfg.budget.policy} is ignored: GRPOTrainer trains on every sample")
    model, tokenizer = load_policy(resolve_policy_path(cfg.model, task, cfg.seed), cfg.model.gguf_file, cfg.model.dtype)
    by_id = {p.prompt_id: p for p in task.train}
    # TRL tokenises a plain-text prompt with the tokenizer's defaults; the ledger counts exactly those ids.
    encoded = {p.prompt_id: tokenizer(p.text)["input_ids"] for p in task.train}
    dataset = Dataset.from_list([{"prompt": p.text, "prompt_id": p.prompt_id} for p in task.train])

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    store = StepStore(out / "trajectories")
    store.truncate(0)
    ledger, evals = Ledger(), []
    group, iters, eos = cfg.rollout.group_size, cfg.algo.num_iterations, tokenizer.eos_token_id

    def exact_match(prompts, completions, completion_ids, prompt_id, trainer_state, **_) -> list[float]:
        """TRL reward function: exact match, and every sample of the generation batch into the ledger and store."""
        rewards = task.reward([by_id[i] for i in prompt_id], completions)
        step = trainer_state.global_step // iters  # generation happens once per num_iterations optimiser steps
        trajectories = []
        for k, (pid, text, ids, r) in enumerate(zip(prompt_id, completions, completion_ids, rewards, strict=True)):
            if pid != prompt_id[k - k % group]:
                raise RuntimeError("GRPOTrainer batch is not grouped by prompt: cannot form GRPO groups")
            p, ids = by_id[pid], list(ids)
            trajectories.append(Trajectory(
                traj_id=f"s{step}-{k}", prompt_id=pid, group_id=f"s{step}-g{k // group}", step=step,
                behavior_version=step, prompt_ids=encoded[pid], completion_ids=ids, completion_mask=[1] * len(ids),
                behavior_logprobs=[0.0] * len(ids), reward=float(r),
                finish_reason="eos" if ids and ids[-1] == eos else "length", prompt_text=p.text, completion_text=text,
                family=p.family, rewards={task.reward_name: float(r)}))
        columns = TrajectoryColumns.of(trajectories)
        prices = TrajectoryPrices.of([TrajectoryDecision("trained")] * len(trajectories))
        ledger.record_step(columns, prices, iters)
        advantages = sequence_advantages(cfg, columns, np.ones(len(trajectories), dtype=bool))
        store.write(step, trajectory_rows(trajectories, prices, advantages, iters))
        return rewards

    args = GRPOConfig(**grpo_config_kwargs(cfg))
    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    if trainer.accelerator.num_processes != 1:
        raise ConfigError("marginal-rl train-trl runs in one process (its ledger counts the local batch)")
    logger = build_logger(cfg, trainer.accelerator, out)

    def run_eval(step: int) -> None:
        result = evaluate(trainer.model, tokenizer, task, cfg, trainer.accelerator)
        record_eval(result, step, ledger, evals, t_start, cfg.budget.target_metric)
        logger.log({**result, **ledger.metrics(cfg.budget.target_reward, cfg.budget.target_delta or None)}, step=step)

    class EvalCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % iters:
                return
            step = state.global_step // iters
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
                run_eval(step)

    trainer.add_callback(EvalCallback())
    run_eval(0)
    print(f"eval at step 0: reward {evals[0]['eval/reward']:.3f} (greedy {evals[0]['eval/reward_greedy']:.3f})")
    trainer.train()
    summary = run_summary(cfg, ledger, evals, policy="trl_grpo", world_size=1, started=t_start)
    # TRL's own count of prompt + completion tokens generated: equals tokens.rollout (a test checks it)
    summary["trl"] = {"loss_type": args.loss_type, "scale_rewards": args.scale_rewards, "beta": args.beta,
                      "num_input_tokens_seen": int(trainer.state.num_input_tokens_seen)}
    write_final(out, trainer.model, tokenizer, summary)
    logger.finish()
    return summary
