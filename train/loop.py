"""The training loop: plan -> rollout -> settle (price, update, fold the evidence in) -> log, top to bottom.

Every rank plans the same prompts (same seed, same budget state), generates its share of the groups, and then
all ranks see every trajectory (gather_object), so pricing and packing are computed identically everywhere and
each rank trains on its own micro-batches of the admitted trajectories. Only the main process writes files.

`Run` holds what a run is made of (built once, by its __init__) and the phases of a step as methods; `train` is
the loop that calls them. Everything a resumed run needs besides weights, optimiser and RNG is one RunState.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import random
import signal
import sys
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, gather_object

from marginal_rl.budget.allocator import Budget, Update
from marginal_rl.budget.clusters import cluster_prompts
from marginal_rl.budget.ledger import Ledger
from marginal_rl.budget.policies import SampleLimits
from marginal_rl.budget.records import PromptPlan, TrajectoryPrices
from marginal_rl.budget.reuse import Reuse
from marginal_rl.rollout.engine import VLLMEngine
from marginal_rl.rollout.tasks import TaskSet
from marginal_rl.rollout.types import Trajectory, TrajectoryColumns
from marginal_rl.train import zero
from marginal_rl.train.algorithms import ALGORITHMS
from marginal_rl.train.checkpoint import (
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    load_snapshot,
    read_state,
    save_checkpoint,
)
from marginal_rl.train.config import ConfigError, RunConfig, config_to_dict, resume_mismatch
from marginal_rl.train.logger import NoOpLogger, Progress, WandbLogger
from marginal_rl.train.sft import carry_demonstrations, check_demonstrations
from marginal_rl.train.store import (
    MetricsLog,
    StepStore,
    prepare_run_dir,
    prompt_rows,
    reuse_rows,
    trajectory_rows,
    write_final,
)
from marginal_rl.train.update import measure_drift, sequence_advantages, train_step

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
    from marginal_rl.train.model import load_policy, resolve_policy_path

    if accelerator.is_main_process:  # a tiny policy is built once, by the main process; the others load the cache
        resolve_policy_path(cfg.model, task, cfg.seed)
    accelerator.wait_for_everyone()
    path = resolve_policy_path(cfg.model, task, cfg.seed)
    check_demonstrations(path, task)  # a warm-started model must not be evaluated on what it was shown
    model, tokenizer = load_policy(path, cfg.model.gguf_file, cfg.model.dtype)
    if cfg.model.lora_r > 0:
        from marginal_rl.train.lora import apply_lora

        model = apply_lora(model, cfg.model)
    return model.to(accelerator.device), tokenizer


def fit_prompts_to_context(cfg: RunConfig, task: TaskSet, tokenizer, model_config) -> None:
    """Refuse (task.long_prompts=error) or leave out (drop) the prompts whose tokens plus the completion budget do not
    fit the model's positions (max_position_embeddings; a model without one is not checked). Generating past them
    fails or degrades silently, and a prompt of thousands of tokens can exhaust memory before it does."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if not limit:
        return
    budget, key = task.completion_budget(cfg.rollout)
    for split in ("train", "eval"):
        prompts = getattr(task, split)
        lengths = task.prompt_lengths(tokenizer, prompts)
        long = [(p, n) for p, n in zip(prompts, lengths, strict=True) if n + budget > limit]
        if not long:
            continue
        p, n = long[0]
        what = (f"{len(long)} of {len(prompts)} {split} prompts do not fit the model's context of {limit} tokens with "
                f"{key}={budget}, first {p.prompt_id!r} ({n} tokens: {p.text[:60]!r}...)")
        if cfg.task.long_prompts == "error":
            raise ConfigError(f"task.long_prompts: {what}; shorten them, lower {key}, or set task.long_prompts=drop")
        kept = [q for q, m in zip(prompts, lengths, strict=True) if m + budget <= limit]
        if not kept:
            raise ConfigError(f"task.long_prompts=drop: {what}; none is left")
        setattr(task, split, kept)
        print(f"task.long_prompts=drop: left out {what}", file=sys.stderr)


def check_probe(cfg: RunConfig, task: TaskSet) -> bool:
    """Whether the run uses the likelihood probe (budget.probe_strength > 0). It scores each prompt's reference answer
    under the sampling distribution: the task must be single-turn with an answer for every training prompt, and
    sampling must not truncate the distribution; else a ConfigError naming the key."""
    if getattr(cfg.budget, "probe_strength", 0) <= 0:
        return False
    if not task.probes:
        raise ConfigError(f"budget.probe_strength: task.name={cfg.task.name} runs multi-turn episodes; the likelihood "
                          f"probe scores one-turn answers (task.name=arith, or dataset with task.answer_column)")
    missing = [p.prompt_id for p in task.train if not p.answer]
    if missing:
        hint = "set task.answer_column to the column of reference answers" if cfg.task.name == "dataset" else \
            "this task has no reference answers"
        raise ConfigError(f"budget.probe_strength: {len(missing)} of {len(task.train)} training prompts have no "
                          f"reference answer (first: {missing[0]}); {hint}")
    if cfg.rollout.top_p < 1:
        raise ConfigError(f"budget.probe_strength: the probe scores the full sampling distribution; rollout.top_p="
                          f"{cfg.rollout.top_p} truncates it (set rollout.top_p=1.0)")
    return True


def build_families(cfg: RunConfig, task: TaskSet) -> tuple[dict[str, str], list[dict]]:
    """prompt id -> family for the budget's pooled evidence and family balance: the task's families and, with
    budget.pool_clusters k > 0, for the training prompts without one, the clusters of their surface template
    (budget/clusters.py), named `cluster-0`.. by decreasing size. Also each cluster's size and first prompt, for the
    run directory (empty without clusters). A ConfigError when every prompt already has a family."""
    families = {p.prompt_id: p.family for p in task.train if p.family}
    k = getattr(cfg.budget, "pool_clusters", 0)
    if not k:
        return families, []
    bare = [p for p in task.train if not p.family]
    if not bare:
        hint = " (set task.group_column: '' to cluster the prompts instead)" if cfg.task.name == "dataset" else ""
        raise ConfigError(f"budget.pool_clusters: every training prompt of task.name={cfg.task.name} has a family, so "
                          f"there is nothing to cluster{hint}")
    labels = cluster_prompts([p.text for p in bare], k, seed=cfg.seed)
    summary: dict[int, dict] = {}
    for p, c in zip(bare, labels, strict=True):
        families[p.prompt_id] = f"cluster-{c}"
        summary.setdefault(c, {"cluster": f"cluster-{c}", "prompts": 0, "first": p.text})["prompts"] += 1
    return families, [summary[c] for c in sorted(summary)]


def build_reference(cfg: RunConfig, model: torch.nn.Module):
    """The frozen reference of the KL penalty: a copy of the starting weights; None when kl_coef = 0 or with LoRA
    (then the reference is the same model with its adapters disabled: no second copy)."""
    if cfg.algo.kl_coef == 0 or cfg.model.lora_r > 0:
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


def build_value_head(cfg: RunConfig, model: torch.nn.Module):
    if not ALGORITHMS[cfg.algo.name].value_head:
        return None
    from marginal_rl.train.value import ValueHead

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
    family. The split is cut into fixed chunks of prompts (one generate batch each), each sampled from its own seed,
    and the chunks are dealt out to the ranks: the same weights give the same numbers whatever the number of
    processes. Runs on its own seeded RNG, so evaluating never changes the training run."""
    chunk = max(1, cfg.rollout.batch_size // cfg.rollout.eval_samples)
    chunks = [task.eval[i : i + chunk] for i in range(0, len(task.eval), chunk)]
    mine = range(accelerator.process_index, len(chunks), accelerator.num_processes)
    out = {}
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        for key, temp, k in (("eval/reward", cfg.rollout.eval_temperature, cfg.rollout.eval_samples),
                             ("eval/reward_greedy", 0.0, 1)):
            scored = []  # (chunk, position, family, reward): sorted after the gather, so the order is the same too
            for c in mine:
                torch.manual_seed(cfg.seed + 10_000 + c)
                episodes = task.rollout(model, tokenizer, [(p, k if temp > 0 else 1) for p in chunks[c]],
                                        cfg.rollout, step=-1, version=-1, temperature=temp)
                scored += [(c, j, t.family, t.reward) for j, t in enumerate(episodes)]
            scored = sorted(x for part in gather_object([scored]) for x in part)
            out[key] = float(np.mean([r for *_, r in scored])) if scored else float("nan")
            for family in sorted({f for _, _, f, _ in scored} - {""}):
                out[f"{key}/{family}"] = float(np.mean([r for _, _, f, r in scored if f == family]))
    return out


def build_engine(cfg: RunConfig, policy, tokenizer, accelerator: Accelerator, out: Path) -> VLLMEngine:
    """rollout.backend=vllm: the vLLM server that generates the rollouts, started by the main process on the starting
    policy (exported under output_dir/vllm/policy) or attached at rollout.vllm_url; every rank gets its client."""
    r = cfg.rollout
    if cfg.model.lora_r > 0:
        raise ConfigError("rollout.backend=vllm: LoRA adapters are not pushed to the server yet; use model.lora_r=0 or "
                          "rollout.backend=transformers")
    if zero.requested() or _fsdp(accelerator):
        raise ConfigError("rollout.backend=vllm: pushing weights gathers them on one process; run it under DDP or on "
                          "one process (FSDP and DeepSpeed ZeRO are not supported with vLLM yet)")
    url = [r.vllm_url]
    engine = None
    if accelerator.is_main_process and not r.vllm_url:
        policy_dir = out / "vllm" / "policy"
        policy.save_pretrained(policy_dir)
        tokenizer.save_pretrained(policy_dir)
        engine = VLLMEngine.start(r.vllm_python, str(policy_dir.resolve()), out / "vllm" / "server.log",
                                  port=r.vllm_port, dtype=cfg.model.dtype, kv_cache_gb=r.vllm_kv_cache_gb,
                                  gpu_memory_utilization=r.vllm_gpu_memory_utilization,
                                  startup_timeout_s=r.vllm_startup_timeout_s, seed=cfg.seed)
        url = [engine.url]
    if accelerator.num_processes > 1:
        broadcast_object_list(url)
    engine = engine or VLLMEngine(url[0])
    engine.health()
    return engine


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


# ------------------------------------------------------------------------------------------------ run state


def record_eval(result: dict[str, float], step: int, ledger: Ledger, evals: list[dict], started: float,
                metric: str = "eval/reward") -> None:
    """Note an eval in the ledger (its `metric`, budget.target_metric) and the history, with the tokens and seconds
    spent so far."""
    ledger.record_eval(step, result[metric])
    evals.append({"step": step, "tokens": ledger.total_tokens, "tokens_probe": ledger.by_use["probe"],
                  "seconds": round(time.time() - started, 2), **result})


def run_summary(cfg: RunConfig, ledger: Ledger, evals: list[dict], *, policy: str, world_size: int,
                started: float, unscored_steps: int = 0) -> dict:
    """summary.json: what the run reached and what it spent (shared with the TRL peer)."""
    b = cfg.budget
    delta = b.target_delta or None
    over = ledger.over_hindsight()
    return {
        "steps": ledger.steps, "world_size": world_size, "algo": cfg.algo.name, "policy": policy,
        "initial_eval_reward": evals[0]["eval/reward"], "final_eval_reward": evals[-1]["eval/reward"],
        "final_eval_reward_greedy": evals[-1]["eval/reward_greedy"],
        "best_eval_reward": max(e["eval/reward"] for e in evals),
        "target_metric": b.target_metric, "target_reward": b.target_reward,
        "tokens_to_target": ledger.tokens_to_target(b.target_reward),
        "target_delta": delta, "tokens_to_target_delta": ledger.tokens_to_delta(delta) if delta else None,
        "max_tokens": cfg.train.max_tokens or None,
        "tokens": {"rollout": ledger.rollout_tokens, "train": ledger.by_use["train"], "reuse": ledger.by_use["reuse"],
                   "probe": ledger.by_use["probe"], "total": ledger.total_tokens},
        "hindsight_bound_tokens": ledger.hindsight_bound,  # sampling only the groups with a signal, training on all
        "tokens_over_hindsight": None if math.isnan(over) else over,
        "eval_history": evals,  # each: step, tokens (total so far), tokens_probe (of them the probe's), seconds (since start), eval/* metrics
        "ledger": ledger.summary(b.target_reward, delta),
        "unscored_steps": unscored_steps,  # steps where every reward function returned None/NaN for every completion
        "wall_seconds": round(time.time() - started, 2),
    }


# TRL GRPOTrainer's metric names for what it and this trainer both compute (docs/metrics.md); `<func>` is each reward
# function's name. The rollout ones come from trl_rollout_metrics, the update ones from update.train_step.
TRL_METRIC_NAMES = ("reward", "reward_std", "rewards/<func>/mean", "rewards/<func>/std", "frac_reward_zero_std",
                    "completions/mean_length", "completions/min_length", "completions/max_length",
                    "completions/clipped_ratio", "num_tokens", "entropy", "kl", "clip_ratio/low_mean",
                    "clip_ratio/high_mean", "clip_ratio/region_mean")


def every_rank(mine: list[Trajectory]) -> list[Trajectory]:
    """Every rank's trajectories, in rank order, on every rank."""
    return [t for part in gather_object([mine]) for t in part]


def join_groups(pilots: list[Trajectory], rest: list[Trajectory]) -> list[Trajectory]:
    """A step's pilot trajectories and the samples drawn after them, as one list in which each prompt's samples
    form one group (the pilot's group id), members adjacent, in the pilots' order."""
    group_of = {t.prompt_id: t.group_id for t in pilots}
    order = {g: i for i, g in enumerate(dict.fromkeys(t.group_id for t in pilots))}
    joined = pilots + [replace(t, group_id=group_of[t.prompt_id]) for t in rest]
    return sorted(joined, key=lambda t: order[t.group_id])  # stable: the pilot first within each group


def _unscored(t: Trajectory) -> bool:
    """No reward function gave this completion a value (each returned None or NaN): its reward 0.0 is TRL's nansum."""
    return bool(t.rewards) and all(v is None or v != v for v in t.rewards.values())


def _nanstd(x: np.ndarray) -> float:
    """The unbiased std over the finite entries (TRL's nanstd); NaN with fewer than two."""
    x = x[~np.isnan(x)]
    return float(x.std(ddof=1)) if len(x) > 1 else float("nan")


def trl_rollout_metrics(trajectories: list[Trajectory], columns: TrajectoryColumns, tokens_seen: int) -> dict:
    """The step's rollout scalars under TRL GRPOTrainer's names (docs/metrics.md): reward, reward_std, each reward
    function's mean and std, frac_reward_zero_std, completion lengths, clipped_ratio, num_tokens (cumulative)."""
    if not trajectories:
        return {"num_tokens": float(tokens_seen)}
    lengths = columns.tokens_completion
    out = {"reward": float(columns.reward.mean()), "reward_std": _nanstd(columns.reward),
           "frac_reward_zero_std": float(columns.group_flat[columns.group].mean()),
           "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
           "completions/max_length": float(lengths.max()),
           "completions/clipped_ratio": float(np.mean([t.finish_reason == "length" for t in trajectories])),
           "num_tokens": float(tokens_seen)}
    for name in dict.fromkeys(k for t in trajectories for k in t.rewards or ("reward",)):
        values = np.array([t.rewards.get(name, np.nan) if t.rewards else t.reward for t in trajectories])
        out[f"rewards/{name}/mean"] = float(np.nanmean(values)) if (~np.isnan(values)).any() else float("nan")
        out[f"rewards/{name}/std"] = _nanstd(values)
    return out


@dataclass
class RunState:
    """Everything a resumed run needs besides the weights, the optimiser and the RNG streams."""

    budget: Budget
    step: int = 0  # the next step to run
    version: int = 0  # policy version: optimiser updates that moved the weights
    behaviour_version: int = 0  # version of the weights rollouts sample from (lags `version` with stale rollouts)
    evals: list[dict] = field(default_factory=list)
    nonfinite_in_row: int = 0
    unscored_steps: int = 0  # steps where no reward function scored any completion (all None/NaN)
    started: float = field(default_factory=time.time)  # wall clock of the run's start (earlier on resume)

    def record_eval(self, step: int, result: dict[str, float]) -> None:
        record_eval(result, step, self.budget.ledger, self.evals, self.started, self.budget.cfg.target_metric)

    def state_dict(self) -> dict:
        return {"step": self.step, "version": self.version, "behaviour_version": self.behaviour_version,
                "evals": self.evals, "nonfinite_in_row": self.nonfinite_in_row, "unscored_steps": self.unscored_steps,
                "elapsed_seconds": time.time() - self.started, **self.budget.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.budget.load_state_dict(d)
        self.step, self.version, self.evals = d["step"], d["version"], d["evals"]
        self.behaviour_version, self.nonfinite_in_row = d["behaviour_version"], d["nonfinite_in_row"]
        self.unscored_steps = d.get("unscored_steps", 0)
        self.started = time.time() - d["elapsed_seconds"]


class Stopwatch:
    """Seconds per phase of a step: `with watch("rollout"): ...`; `take()` returns them and starts afresh."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0

    def take(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


@dataclass(frozen=True)
class StepUpdate(Update):
    """The trainer's update of one step, as the budget reads it (version, drift) and as the loop logs it."""

    advantages: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (N,) the algorithm's sequence advantages
    metrics: dict[str, float] = field(default_factory=dict)
    reuse_advantages: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (R,) those of the reused trajectories


# ------------------------------------------------------------------------------------------------ one run


class Run:
    """The parts of one training run and the phases of a step. Built in the order the RNG streams expect: policy,
    reference, value head, optimiser, then the checkpoint (if resuming) and accelerate's prepare."""

    def __init__(self, cfg: RunConfig, task: TaskSet):
        started = time.time()  # the run's wall clock includes building (and warm-starting) the policy
        self.cfg, self.task = cfg, task
        self.accelerator = accelerator = build_accelerator(cfg)
        self.main, self.world, self.rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
        self.out = Path(cfg.output_dir)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed + self.rank)
        if self.main:  # before the model is built: the other ranks wait for it in build_policy
            prepare_run_dir(self.out, resume=bool(cfg.train.resume_from), overwrite=cfg.train.overwrite)

        self.probing = check_probe(cfg, task)  # before the model loads
        families, clusters = build_families(cfg, task)  # for the pooled evidence
        if clusters and self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "budget_clusters.json").write_text(json.dumps(clusters, indent=1) + "\n")
            print(f"budget.pool_clusters: {sum(c['prompts'] for c in clusters)} prompts without a family in "
                  f"{len(clusters)} clusters (sizes {', '.join(str(c['prompts']) for c in clusters)}; "
                  f"{self.out / 'budget_clusters.json'})")
        model, self.tokenizer = build_policy(cfg, task, accelerator)
        fit_prompts_to_context(cfg, task, self.tokenizer, model.config)
        self.reference = build_reference(cfg, model)
        value_head = build_value_head(cfg, model)
        self.optimizer, self.scheduler = build_optimizer(cfg, [model] + ([value_head] if value_head is not None else []))
        self.limits = SampleLimits(cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.rollout.min_group_size,
                                   cfg.rollout.max_group_size)
        self.state = RunState(Budget(cfg.budget, self.limits, cfg.algo.num_iterations, families), started=started)
        ckpt = self._resume(model, value_head) if cfg.train.resume_from else None
        # a plain copy made before prepare(): FSDP's wrapped modules cannot be deep-copied, and the snapshot must hold
        # every weight on every rank to generate on its own (with vLLM the server holds the lagging weights)
        lagging = cfg.rollout.max_staleness and cfg.rollout.backend == "transformers"
        self.snapshot = copy.deepcopy(model).eval().requires_grad_(False) if lagging else None
        if not (self.snapshot is not None and ckpt is not None and load_snapshot(ckpt, self.snapshot)):
            self.state.behaviour_version = self.state.version  # sample from the weights as they are now
        if value_head is not None and zero.active(accelerator):  # the engine trains one module: the head joins it
            self.model, self.optimizer = accelerator.prepare(zero.with_value_head(model, value_head), self.optimizer)
        elif value_head is not None:
            self.model, value_head, self.optimizer = accelerator.prepare(model, value_head, self.optimizer)
        else:
            self.model, self.optimizer = accelerator.prepare(model, self.optimizer)
        self.value_head = value_head
        self.policy = accelerator.unwrap_model(self.model)
        # Rollouts may run ahead of training by up to max_staleness versions: they sample from a snapshot of the
        # weights that is refreshed once it is that many versions behind (on-policy: the policy itself), or from the
        # vLLM server, which gets the trained weights as often.
        self.engine = None
        if cfg.rollout.backend == "vllm":
            self.engine = build_engine(cfg, self.policy, self.tokenizer, accelerator, self.out)
            self.engine.version = self.state.behaviour_version = self.state.version
        self.behaviour = self.engine or (self.snapshot if self.snapshot is not None else self.policy)
        self.by_id = {p.prompt_id: p for p in task.train}

        self.traj_store, self.prompt_store = StepStore(self.out / "trajectories"), StepStore(self.out / "prompts")
        # priced reuse: one row per reused trajectory offered to a step
        self.reuse_store = StepStore(self.out / "reuse") if self.state.budget.buffer is not None else None
        self.metrics_log = MetricsLog(self.out / "metrics.jsonl")
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            self.traj_store.truncate(self.state.step)  # a resumed run rewrites the steps after its checkpoint
            self.prompt_store.truncate(self.state.step)
            if self.reuse_store is not None:
                self.reuse_store.truncate(self.state.step)
            self.metrics_log.truncate(self.state.step)
        self.logger = build_logger(cfg, accelerator, self.out)
        self.watch = Stopwatch()
        # Async rollouts: while step t trains, a background thread generates step t+1's rollouts from the snapshot
        # (which is not trained, so the two never touch the same weights). Step t+1's plan is then made before step
        # t's evidence reaches the budget, and its samples are at least one version stale. The producer is joined
        # before anything that reads the global RNG (eval, checkpoint), and no step is started ahead across a
        # checkpoint, so a resumed run follows the same schedule as an uninterrupted one.
        self.producer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout") if cfg.rollout.async_rollout \
            else None
        self.ahead: tuple[PromptPlan, Future] | None = None  # the next step's plan and rollouts, when started ahead

    def _resume(self, model, value_head) -> Path:
        ckpt = find_checkpoint(self.out, self.cfg.train.resume_from)
        recorded = read_state(ckpt).get("config")
        differs = resume_mismatch(recorded, self.cfg) if recorded is not None else []
        if recorded is None:
            warnings.warn(f"checkpoint {ckpt} records no config (written by an older version): resuming without "
                          f"comparing it with this run's", stacklevel=2)
        elif differs and not self.cfg.train.force_resume:
            raise ConfigError(f"train.resume_from: checkpoint {ckpt} was written under another config ("
                              f"{'; '.join(differs)}); resume with the checkpoint's config, or set "
                              f"train.force_resume=true to resume anyway")
        elif differs and self.main:
            print(f"train.force_resume: resuming {ckpt} under a changed config ({'; '.join(differs)})", file=sys.stderr)
        self.state.load_state_dict(load_checkpoint(ckpt, model=model, optimizer=self.optimizer,
                                                   scheduler=self.scheduler, value_head=value_head, rank=self.rank))
        if self.main:
            print(f"resumed from {ckpt} at step {self.state.step} (policy version {self.state.version})")
        return ckpt

    # ---------------------------------------------------------------------------------------- phases of a step

    def plan(self, step: int) -> PromptPlan:
        """The budget's plan for `step`, the same on every rank: a seeded pool of candidates (the data sampler's
        draw, as any trainer makes one), samples for each (the budget's decision)."""
        rng = np.random.default_rng([self.cfg.seed, step])
        # every policy draws the same pool, so the arms of an ablation meet the same prompts first; a uniform policy
        # is offered only its prompts_per_step
        pool_size = min(len(self.task.train), self.cfg.budget.pool_factor * self.limits.prompts_per_step)
        pool = rng.choice(len(self.task.train), size=pool_size, replace=False)[:self.state.budget.candidates_per_step]
        return self.state.budget.plan([self.task.train[i].prompt_id for i in pool], step, rng,
                                      self.probe if self.probing else None)

    def probe(self, prompt_ids: Sequence[str]) -> tuple[list[float], list[int]]:
        """The budget's likelihood probe (budget.probe_strength) on the current policy: each prompt's pass rate as
        the probability of its reference answer at rollout.temperature, and the tokens each forward pass processed.
        Every rank scores an equal share (padded, so every rank runs the same forwards), then sees every result."""
        prompts = [self.by_id[pid] for pid in prompt_ids]
        share = -(-len(prompts) // self.world)
        mine = prompts[self.rank * share:(self.rank + 1) * share]
        with generation_context(self.model, self.accelerator):  # rollout time, as sampling
            rates, tokens = self.task.answer_likelihood(self.policy, self.tokenizer, mine + prompts[:share - len(mine)],
                                                        self.cfg.rollout.temperature, self.cfg.rollout.batch_size)
        parts = gather_object([(rates[:len(mine)], tokens[:len(mine)])])
        return [r for part, _ in parts for r in part], [n for _, part in parts for n in part]

    def refresh_behaviour(self, trains_after: int) -> None:
        """Refresh the rollout snapshot if rollouts sampled now, trained `trains_after` updates from now, would be
        more than max_staleness versions stale (on-policy: the behaviour is the policy itself, never behind)."""
        s = self.state
        if s.version + trains_after - s.behaviour_version > self.cfg.rollout.max_staleness:
            if self.engine is not None:
                self.push_weights()
            elif self.snapshot is not None:  # on-policy there is nothing to copy (or, sharded, to gather)
                sync_snapshot(self.snapshot, self.model, self.accelerator)
            s.behaviour_version = s.version

    def push_weights(self) -> None:
        """The trained weights to the vLLM server: written under output_dir/vllm/weights, reloaded in place there."""
        if self.accelerator.is_main_process:
            path = self.out / "vllm" / "weights"
            self.policy.save_pretrained(path)
            self.engine.update_weights(str(path.resolve()), self.state.version)
        self.accelerator.wait_for_everyone()

    def generate(self, step: int, plan: PromptPlan, version: int, samples: np.ndarray | None = None,
                 tag: str = "") -> list[Trajectory]:
        """This rank's share of the planned groups (or of `samples` per candidate), sampled from the behaviour
        weights (at policy `version`); `tag` keeps a second draw's trajectory ids apart from the first's."""
        counts = plan.samples if samples is None else samples
        allocation = [(self.by_id[pid], n) for pid, n in zip(plan.prompt_ids, counts.tolist(), strict=True) if n > 0]
        with generation_context(self.model if self.behaviour is self.policy else None, self.accelerator):
            return self.task.rollout(self.behaviour, self.tokenizer, allocation[self.rank::self.world],
                                     self.cfg.rollout, step=step, version=version,
                                     temperature=self.cfg.rollout.temperature, id_prefix=f"r{self.rank}-{tag}")

    def rollout(self, step: int) -> tuple[PromptPlan, list[Trajectory], bool]:
        """The step's plan and every rank's trajectories (each rank generates its share of the groups, then every
        rank sees all of them); True when they were generated ahead, during the last step's update."""
        if self.ahead is not None:
            (plan, future), self.ahead = self.ahead, None
            return plan, every_rank(future.result()), True
        plan = self.plan(step)
        self.refresh_behaviour(trains_after=0)
        version, pilot = self.state.behaviour_version, getattr(self.cfg.budget, "pilot_samples", 0)
        if not pilot:
            return plan, every_rank(self.generate(step, plan, version)), False
        # pilot then commit: each group's first samples, then the rest priced on what they showed
        first = np.minimum(plan.samples, pilot)
        drawn = every_rank(self.generate(step, plan, version, first))
        plan = self.state.budget.top_up(plan, TrajectoryColumns.of(drawn), np.random.default_rng([self.cfg.seed, step, 1]))
        rest = every_rank(self.generate(step, plan, version, plan.samples - first, tag="u"))
        return plan, join_groups(drawn, rest), False

    def start_ahead(self, step: int) -> None:
        """Async rollouts: plan `step` and start generating it in the background (it trains after this update)."""
        plan = self.plan(step)
        self.refresh_behaviour(trains_after=1)
        self.ahead = (plan, self.producer.submit(self.generate, step, plan, self.state.behaviour_version))

    def wait_ahead(self) -> None:
        if self.ahead is not None:
            wait([self.ahead[1]])

    def update(self, trajectories: list[Trajectory], columns: TrajectoryColumns, prices: TrajectoryPrices,
               reuse: Reuse | None, *, next_step: int | None) -> StepUpdate:
        """Train on the admitted trajectories (the step's new ones, then the reused ones the budget priced positive):
        token-balanced micro-batches, equal count per rank, loss normalised by the global token count (after starting
        `next_step`'s rollouts, when given). Returns the new policy version and the drift it measured (on the new
        trajectories, and on the reused ones)."""
        cfg, s = self.cfg, self.state
        if next_step is not None:
            self.start_ahead(next_step)
        if reuse is not None:  # one batch: advantages over each group's admitted members, as for new samples
            everything = trajectories + reuse.trajectories
            columns, admitted = TrajectoryColumns.of(everything), np.concatenate([prices.trained, reuse.prices.trained])
        else:
            everything, admitted = trajectories, prices.trained
        advantages = sequence_advantages(cfg, columns, admitted)
        fresh, reused = advantages[:len(trajectories)], advantages[len(trajectories):]
        train_idx = np.flatnonzero(admitted)
        trained = [everything[i] for i in train_idx]
        if not trained or columns.tokens_policy[train_idx].sum() == 0:  # nothing to learn from
            return StepUpdate(s.version, None, None, fresh, {"train/skipped_empty": 1.0}, reused)
        with self.watch("train"):
            metrics = train_step(self.model, self.optimizer, trained, advantages[train_idx], cfg,
                                 self.tokenizer.pad_token_id, self.accelerator, reference=self.reference,
                                 value_head=self.value_head)
            s.nonfinite_in_row = s.nonfinite_in_row + 1 if metrics["train/nonfinite"] else 0
            if not metrics["train/nonfinite"] and metrics["train/fp16_overflow"] < 1:  # the weights moved
                s.version += 1
                self.scheduler.step()
            # the policy's drift on the new samples, as without reuse; the reused ones' own (they were pushed by the
            # updates that trained on them) depreciates the buffer
            new = int(prices.trained.sum())
            drift_kl = measure_drift(self.policy, trained[:new], s.version, cfg, self.tokenizer.pad_token_id,
                                     self.accelerator.device)
            reuse_kl = measure_drift(self.policy, trained[new:], s.version, cfg, self.tokenizer.pad_token_id,
                                     self.accelerator.device) if len(trained) > new else None
        if drift_kl is not None:
            metrics["train/drift_kl"] = drift_kl
        if reuse_kl is not None:
            metrics["train/reuse_drift_kl"] = reuse_kl
        return StepUpdate(s.version, drift_kl, reuse_kl, fresh, metrics, reused)

    def evaluate(self, step: int) -> dict[str, float]:
        with generation_context(self.model, self.accelerator):
            result = evaluate(self.policy, self.tokenizer, self.task, self.cfg, self.accelerator)
        self.state.record_eval(step, result)
        return result

    def save(self, step: int) -> None:
        rng_states = gather_object([capture_rng_state()])  # every rank's streams, in rank order
        if self.main:
            head = self.accelerator.unwrap_model(self.value_head) if self.value_head is not None else None
            save_checkpoint(self.out, step, model=self.policy, optimizer=self.optimizer, scheduler=self.scheduler,
                            value_head=head, keep_last=self.cfg.train.keep_last, rng_states=rng_states,
                            snapshot=self.snapshot,
                            extra_state={**self.state.state_dict(), "config": config_to_dict(self.cfg)})

    def loop_metrics(self, plan: PromptPlan, trajectories: list[Trajectory], columns: TrajectoryColumns,
                     sampled_ahead: bool, step_s: float, seconds: dict[str, float]) -> dict[str, float]:
        """rollout/, optim/ and perf/ scalars of a step."""
        rewards = columns.reward if len(columns) else np.zeros(1)
        return {
            "rollout/reward_mean": float(rewards.mean()), "rollout/reward_std": float(rewards.std()),
            "rollout/samples": len(trajectories), "rollout/groups": int((plan.samples > 0).sum()),
            "rollout/sampled_ahead": float(sampled_ahead),
            "rollout/unscored_fraction": float(np.mean([_unscored(t) for t in trajectories] or [0])),
            "rollout/completion_tokens_mean": float(columns.tokens_completion.mean()) if len(columns) else 0.0,
            **{f"rollout/finish_{reason}": float(np.mean([t.finish_reason == reason for t in trajectories] or [0]))
               for reason in self.task.finish_reasons},
            "rollout/staleness_mean": float(self.state.version - columns.behavior_version.mean()) if len(columns)
            else 0.0,
            "optim/lr": self.scheduler.get_last_lr()[0], "optim/policy_version": self.state.version,
            "perf/step_seconds": step_s, "perf/rollout_seconds": seconds.get("rollout", 0.0),
            "perf/train_seconds": seconds.get("train", 0.0), "perf/budget_seconds": seconds.get("budget", 0.0),
            "perf/budget_fraction": seconds.get("budget", 0.0) / step_s,
            "perf/tokens_per_second": float(columns.tokens_rollout.sum()) / step_s,
            **trl_rollout_metrics(trajectories, columns, self.state.budget.ledger.rollout_tokens),
        }

    def log_completions(self, step: int, trajectories: list[Trajectory], done: StepUpdate,
                        prices: TrajectoryPrices) -> None:
        """The step's completions into the run's completions table: ids, texts, each reward function's value, and
        the price record."""
        names = list(dict.fromkeys(k for t in trajectories for k in t.rewards))
        columns = ["step", "prompt_id", "prompt", "completion", *(f"rewards/{n}" for n in names), "reward",
                   "advantage", "gain", "cost", "risk", "price", "fate"]
        rows = [[step, t.prompt_id, t.prompt_text, t.completion_text, *(t.rewards.get(n) for n in names), t.reward,
                 float(a), d.gain, d.cost, d.risk, d.price, d.fate]
                for t, a, d in zip(trajectories, done.advantages, prices, strict=True)]
        self.logger.log_completions(columns, rows, step=step)

    def close(self) -> None:
        """At the end or after an error: let a rollout in flight finish, start nothing new, stop the vLLM server."""
        if self.producer is not None:
            self.producer.shutdown(wait=True, cancel_futures=True)
        if self.engine is not None:
            self.engine.close()

    def finish(self) -> dict:
        s = self.state
        summary = run_summary(self.cfg, s.budget.ledger, s.evals, policy=self.cfg.budget.policy, world_size=self.world,
                              started=s.started, unscored_steps=s.unscored_steps)
        weights = self.accelerator.get_state_dict(self.model)  # a collective under FSDP and ZeRO-3: full weights
        if zero.active(self.accelerator):
            weights = zero.policy_weights(weights)
        if self.main:
            write_final(self.out, self.policy, self.tokenizer, summary, state_dict=weights)
            carry_demonstrations(self.cfg.model.path, self.out / "final")
            print(self.logger.describe())
        self.logger.finish()
        self.accelerator.end_training()
        return summary


def _eval_due(t, step: int, tokens: int, tokens_at_last_eval: int) -> bool:
    """After `step`: every eval_every steps, or (eval_every_tokens) at the first step past each multiple of it."""
    if t.eval_every_tokens:
        return tokens // t.eval_every_tokens > tokens_at_last_eval // t.eval_every_tokens
    return bool(t.eval_every) and (step + 1) % t.eval_every == 0


class Preempted(Exception):
    """The run stopped at a step boundary on SIGTERM or SIGINT (with a checkpoint when checkpointing is on)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """SIGTERM and SIGINT (a scheduler's preemption, Ctrl-C) ask the loop to stop at the next step boundary; a second
    one stops at once. Handlers are installed only from the main thread (Python allows no other) and restored at the
    end of the run."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, main: bool):
        self.signum = 0
        self.main = main
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if self.signum:  # the second signal: stop now
            self.restore()
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.signum = signum
        if self.main:
            print(f"\n{signal.Signals(signum).name}: stopping at the end of this step (send it again to stop now)",
                  file=sys.stderr, flush=True)

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank once any rank was signalled (ranks must stop at the same step)."""
        if accelerator.num_processes > 1:
            self.signum = max(gather_object([self.signum]))
        return bool(self.signum)

    def message(self, step: int, out: Path, saved: bool) -> str:
        name = signal.Signals(self.signum).name
        if saved:
            return (f"stopped by {name} at step {step}: checkpoint {out / 'checkpoints' / f'step-{step:06d}'}; "
                    f"continue with the same command and train.resume_from=latest")
        return (f"stopped by {name} at step {step} without a checkpoint (train.save_every=0); the stores under {out} "
                f"hold steps 0-{step - 1}")

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


# ------------------------------------------------------------------------------------------------ the loop


def train(cfg: RunConfig, task: TaskSet) -> dict:
    """Train `task` with the config's algorithm and budget policy; writes the run directory, returns the summary."""
    run = Run(cfg, task)
    s, budget, watch = run.state, run.state.budget, run.watch
    if run.main:
        print(f"run directory {run.out}; {run.logger.describe()}")
    if not s.evals:
        run.logger.log({**run.evaluate(0), **budget.ledger_metrics()}, step=0)
    if run.main:
        print(f"eval at step {s.evals[-1]['step']}: reward {s.evals[-1]['eval/reward']:.3f} "
              f"(greedy {s.evals[-1]['eval/reward_greedy']:.3f})")
    t = cfg.train
    bar = Progress(t.max_steps or None, s.step, cfg.log.progress_every) if run.main and cfg.log.progress else None
    stop = StopRequest(run.main)
    saved_at = s.step if cfg.train.resume_from else -1  # the step of the newest checkpoint of this timeline
    try:
        for step in range(s.step, t.max_steps) if t.max_steps else itertools.count(s.step):
            if t.max_tokens and budget.ledger.total_tokens >= t.max_tokens:
                break  # a resumed run whose budget was spent at its checkpoint
            # A stop (SIGTERM, SIGINT) ends the run here, at a step boundary, unless the last step started this one's
            # rollouts ahead: then this step runs too (starting nothing ahead), so the checkpoint is exact.
            stopping = stop.agreed(run.accelerator)
            if stopping and run.ahead is None:
                if cfg.train.save_every and saved_at < step:
                    run.save(step)
                    saved_at = step
                raise Preempted(stop.signum, stop.message(step, run.out, saved_at == step and bool(cfg.train.save_every)))
            t0, budget.seconds = time.perf_counter(), 0.0
            saves = bool(cfg.train.save_every) and (step + 1) % cfg.train.save_every == 0
            ahead = run.producer is not None and step + 1 != t.max_steps and not saves and not stopping

            # 1-2. Plan and roll out: the budget decides how many samples each candidate prompt gets, each rank
            # generates its share of the groups, then every rank sees every trajectory (started ahead if async).
            with watch("rollout"):
                plan, trajectories, sampled_ahead = run.rollout(step)
            plan_s = budget.seconds  # the budget's part of the rollout phase
            with watch("budget"):
                columns = TrajectoryColumns.of(trajectories)  # what the budget reads, built once
            if trajectories and all(_unscored(t) for t in trajectories):
                s.unscored_steps += 1
                if run.main:
                    print(f"warning: step {step}: every reward function returned None/NaN for all {len(trajectories)} "
                          f"completions, so every reward is 0.0 and nothing is learnt from this step "
                          f"({s.unscored_steps} such step(s) so far; summary.json counts them)", file=sys.stderr)

            # 3-5. Settle: every trajectory gets a price and a fate, the trainer updates on the admitted ones (after
            # starting the next step's rollouts, if async), and the budget folds the step's evidence in (posteriors,
            # drift, controller), records every token in the ledger and computes its metrics.
            settled = budget.settle(plan, columns, step, s.version, functools.partial(
                run.update, trajectories, columns, next_step=step + 1 if ahead else None), trajectories)
            done: StepUpdate = settled.update
            if run.main:
                run.traj_store.write(step, trajectory_rows(trajectories, settled.prices, done.advantages,
                                                           cfg.algo.num_iterations))
                run.prompt_store.write(step, prompt_rows(step, plan))
                if settled.reuse is not None:
                    run.reuse_store.write(step, reuse_rows(step, settled.reuse, done.reuse_advantages,
                                                           cfg.algo.num_iterations))
            if s.nonfinite_in_row >= cfg.train.max_nonfinite:
                raise FloatingPointError(
                    f"{s.nonfinite_in_row} non-finite losses or gradients in a row at step {step} "
                    f"(train.max_nonfinite={cfg.train.max_nonfinite}): lower train.lr or check the rewards; "
                    f"the stores under {run.out} hold every step so far")

            # 6. Eval, checkpoint, logs.
            metrics = dict(done.metrics)
            tokens = budget.ledger.total_tokens  # this step's rollout and training tokens included
            last = step + 1 == t.max_steps or bool(t.max_tokens) and tokens >= t.max_tokens
            if last or _eval_due(t, step, tokens, s.evals[-1]["tokens"]):
                run.wait_ahead()  # sampling draws from the global RNG, which eval re-seeds (and restores)
                metrics.update(run.evaluate(step + 1))
            s.step = step + 1
            if saves:
                run.save(step + 1)
                saved_at = step + 1
            run.accelerator.wait_for_everyone()
            metrics.update(settled.metrics)
            metrics.update(budget.ledger_metrics())  # after the eval: tokens_to_target
            seconds = watch.take()
            seconds["budget"] += budget.seconds
            seconds["rollout"] -= plan_s
            metrics.update(run.loop_metrics(plan, trajectories, columns, sampled_ahead, time.perf_counter() - t0,
                                            seconds))
            if run.main:
                run.metrics_log.write(step + 1, metrics)
                run.logger.log(metrics, step=step + 1)
                run.logger.log_histograms(settled.histograms, step=step + 1)
                if cfg.log.table_every and step % cfg.log.table_every == 0:
                    run.log_completions(step + 1, trajectories, done, settled.prices)
                if bar is not None:
                    bar.update(reward=f"{metrics['rollout/reward_mean']:.3f}", eval=f"{s.evals[-1]['eval/reward']:.3f}",
                               tokens=f"{budget.ledger.total_tokens / 1e3:.0f}k")
            if last:
                break
    finally:
        stop.restore()
        run.close()
    if bar is not None:
        bar.close()
    return run.finish()
