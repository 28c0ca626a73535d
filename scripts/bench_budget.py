"""Benchmark the budget's pricing: trajectories priced per second (vectorised core, and with per-object overhead).

    python scripts/bench_budget.py --trajectories 1000000 --group-size 8 --repeats 5

Synthetic groups (0/1 rewards at a per-group pass rate, 10-40 update tokens, 0-2 versions stale) are priced by the
`marginal` policy. The core is the numpy path price_trajectories runs on the columns; the end-to-end figure adds
reading Trajectory objects into TrajectoryColumns (once per step in the trainer) and returning TrajectoryPrices.
Medians of the repeats. Last, the budget's whole work in one quickstart-shaped training step (the plan's samples:
32 groups of 8 short completions under a uniform policy, 0/1 rewards at each prompt's own pass rate; 128 candidate
prompts; plan, columns, price, state update, ledger and metrics), per policy: what
`perf/budget_seconds` measures in the trainer, which must stay under 1 % of a ~130 ms quickstart step. With
--loop-shaped, the same step again with torch work between the phases (rollout and training evict the budget's code
and data from the caches; inside the trainer the budget costs about twice its hot figure, see docs/budget.md).

With --real-config, the budget's share of a real model's training step: `marginal-rl train` on that config (default:
RL on the warm-started SmolLM2-135M fixing generated bugs, CPU) for --real-steps steps with every mechanism on
(EVERY_MECHANISM, token budget --real-budget), then the median over the steps of `perf/budget_fraction` and
`perf/budget_seconds` from its metrics.jsonl (minutes per step on CPU; needs the `real` extra and the warm start).
The likelihood probe needs one-turn reference answers, which the fix_test agent task has not: it is left out there,
and a probing task runs with e.g. `--real-config configs/bench_arith.yaml --real-set model.path=smollm2`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without `pip install -e .`


# marginal with every issue-15 mechanism on: token budget, pooled evidence (its strength per family), one price for the
# run, priced reuse, price discovery on an empty plan, the likelihood probe and its pass rates pooled by family,
# pricing at the posterior's expectation, family and revisit balance, pilot then commit (budget.pool_clusters is left
# out: the quickstart's prompts all have a family, and clustering runs once, before the first step)
EVERY_MECHANISM = {"token_budget": 2400, "pool_strength": 4.0, "pool_dispersion": True, "pace": "run",
                   "reuse_buffer": 256, "discover_price": True, "probe_strength": 16.0, "probe_refresh": "every",
                   "pool_probes": True, "posterior": "expected", "family_half_samples": 256.0, "prompt_half_samples": 8.0,
                   "pilot_samples": 2}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trajectories", type=int, default=1_000_000, help="trajectories priced by the vectorised core")
    p.add_argument("--objects", type=int, default=100_000, help="trajectories priced end to end, as Trajectory objects")
    p.add_argument("--group-size", type=int, default=8, help="samples per group")
    p.add_argument("--candidates", type=int, default=64, help="candidate prompts per plan_prompts call")
    p.add_argument("--repeats", type=int, default=5, help="repeats; the median is reported")
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data")
    p.add_argument("--steps", type=int, default=60, help="quickstart-shaped steps per policy (the first 10 not timed)")
    p.add_argument("--data-seeds", type=int, default=5,
                   help="quickstart-shaped runs per policy, each on its own draw of the samples' rewards and lengths "
                        "(the figure is their median, the range theirs): one run's figure moves with how many probe "
                        "rounds its steps happen to need")
    p.add_argument("--loop-shaped", action="store_true",
                   help="also time the step with a small torch training step between the budget's phases, as the "
                        "trainer runs them: the cache-cold cost that perf/budget_seconds sees")
    p.add_argument("--real-config", default=None, nargs="?", const="configs/fix_test_smollm2_generated.yaml",
                   help="also time the budget inside real training steps of this config (bare flag: the SmolLM2 "
                        "fix_test config) with every mechanism on")
    p.add_argument("--real-steps", type=int, default=4, help="--real-config: training steps (the step-0 eval is "
                                                             "kept short: task.num_eval=4)")
    p.add_argument("--real-set", action="append", default=[], metavar="KEY=VALUE",
                   help="--real-config: a config override (repeatable), e.g. model.path=smollm2")
    p.add_argument("--real-budget", type=int, default=7307,
                   help="--real-config: budget.token_budget (default: the `none` arm's median tokens per step in "
                        "docs/fix_test.md's SmolLM2 run)")
    args = p.parse_args()
    for name, least in (("repeats", 1), ("data_seeds", 1), ("steps", 11), ("real_steps", 1)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}"
                    + (" (the first 10 steps are not timed)" if name == "steps" else ""))
    return args


def main() -> None:
    args = parse_args()
    import numpy as np

    from marginal_rl.budget import kernels
    from marginal_rl.budget.allocator import Budget, Update
    from marginal_rl.budget.policies import (
        POLICIES,
        SampleLimits,
        budget_config,
        plan_prompts,
        price_trajectories,
        update_state,
    )
    from marginal_rl.budget.policies.base import TrajectoryArrays, price_components
    from marginal_rl.budget.policies.marginal import fates_marginal
    from marginal_rl.budget.state import BudgetState
    from marginal_rl.rollout.types import Trajectory, TrajectoryColumns

    cfg, state = budget_config("marginal"), BudgetState(drift=0.01)
    rng = np.random.default_rng(args.seed)

    def synthetic(n: int) -> TrajectoryArrays:
        group = np.arange(n) // args.group_size
        p = rng.random(group[-1] + 1)
        return TrajectoryArrays(reward=(rng.random(n) < p[group]).astype(float), group=group,
                                tokens_update=rng.integers(10, 41, n).astype(float),
                                staleness=rng.integers(0, 3, n).astype(float))

    def median_time(fn) -> float:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    arrays = synthetic(args.trajectories)
    core = median_time(lambda: fates_marginal(cfg, arrays, price_components(cfg, state, arrays)))
    print(f"core (numpy):      {args.trajectories:>9,} trajectories in {core * 1e3:8.1f} ms = "
          f"{args.trajectories / core / 1e6:6.2f} M trajectories/s")

    small = synthetic(args.objects)
    trajs = [Trajectory(traj_id=str(i), prompt_id=f"p{g}", group_id=f"g{g}", step=0,
                        behavior_version=2 - int(s), prompt_ids=[0] * 10, completion_ids=[0] * (int(t) - 10),
                        completion_mask=[1] * (int(t) - 10), behavior_logprobs=[], reward=float(r), finish_reason="eos")
             for i, (g, r, t, s) in enumerate(zip(small.group, small.reward, small.tokens_update, small.staleness,
                                                   strict=True))]
    e2e = median_time(lambda: price_trajectories(cfg, state, TrajectoryColumns.of(trajs), 2))
    print(f"end to end:        {args.objects:>9,} trajectories in {e2e * 1e3:8.1f} ms = "
          f"{args.objects / e2e / 1e6:6.2f} M trajectories/s  (objects in, TrajectoryPrices out)")

    step = TrajectoryColumns.of(trajs[: 16 * args.group_size])
    upd = median_time(lambda: update_state(cfg, BudgetState(), step, 0, 1, drift_kl=0.01))
    print(f"update_state:      {len(step):>9,} trajectories in {upd * 1e3:8.2f} ms (one training step's worth)")

    limits = SampleLimits(args.candidates // 4, args.group_size, 2, 2 * args.group_size)
    cands = [f"p{i}" for i in range(args.candidates)]
    plan_state = BudgetState()
    update_state(cfg, plan_state, TrajectoryColumns.of(trajs[: 4096]), 0, 0)
    plan = median_time(lambda: plan_prompts(cfg, plan_state, cands, 1, rng, limits))
    print(f"plan_prompts:      {args.candidates:>9,} candidates   in {plan * 1e3:8.2f} ms")

    pass_rate = np.random.default_rng(args.seed).random(512)  # each prompt's chance of a reward of 1

    def quickstart_step(step: int, plan, samples=None, tag: str = "") -> list[Trajectory]:
        """The plan's samples, or `samples` per candidate (2-8 completion tokens after a 10-token prompt; 0/1 rewards
        at the prompt's pass rate); a prompt's samples share one group id, whichever draw they come from."""
        trajs = []
        for pid, n in zip(plan.prompt_ids, (plan.samples if samples is None else samples).tolist(), strict=True):
            for k in range(n):
                m = int(rng.integers(2, 9))
                trajs.append(Trajectory(f"t{tag}{step}-{pid}-{k}", pid, f"g{step}-{pid}", step, step, [0] * 10, [0] * m,
                                        [1] * m, [0.0] * m, float(rng.random() < pass_rate[int(pid[1:])]), "eos"))
        return trajs

    def torch_step():
        """A training-sized torch step (forward, backward, AdamW on a small MLP), run between the budget's phases
        with --loop-shaped: it evicts the budget's code and data from the caches, as rollout and training do."""
        for _ in range(3):
            model(batch).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    families = {f"p{i}": f"f{i % 6}" for i in range(512)}  # six task families, as the arithmetic task has

    def probe(ids):
        """The likelihood probe's answer: each prompt's own pass rate, 14 tokens (10-token prompt, answer, EOS). Its
        forward passes are the trainer's time, not the budget's (Budget.plan does not count them)."""
        return [float(pass_rate[int(pid[1:])]) for pid in ids], [14] * len(ids)

    def step_time(policy: str, keys: dict, between=lambda: None, data_seed: int = 0) -> float:
        """The budget's seconds in one step (median over steps), as the trainer's perf/budget_seconds counts them:
        Budget.plan, reading the step's columns, Budget.settle (price, fold, ledger, metrics; the update it calls is
        `between`) and the ledger's metrics. `data_seed`: the draw of the samples' rewards and lengths."""
        nonlocal rng
        rng = np.random.default_rng([args.seed, 1, data_seed])
        cfg = budget_config(policy, **keys)
        budget, times = Budget(cfg, SampleLimits(32, 8, 2, 16), families=families), []
        for step in range(args.steps):
            step_rng = np.random.default_rng([args.seed, step])
            cands = [f"p{i}" for i in step_rng.choice(512, size=128, replace=False)[:budget.candidates_per_step]]
            between()  # the previous step's training and logging
            budget.seconds = 0.0
            plan = budget.plan(cands, step, step_rng, probe if keys.get("probe_strength") else None)
            columns_s = 0.0
            if keys.get("pilot_samples"):  # the pilots, read and priced on (Budget.top_up), then the rest
                first = np.minimum(plan.samples, keys["pilot_samples"])
                pilots = quickstart_step(step, plan, first)
                between()  # the pilots' rollout
                t0 = time.perf_counter()
                pilot_columns = TrajectoryColumns.of(pilots)
                columns_s += time.perf_counter() - t0
                plan = budget.top_up(plan, pilot_columns, np.random.default_rng([args.seed, step, 1]))
                trajs = pilots + quickstart_step(step, plan, plan.samples - first, tag="u")
            else:
                trajs = quickstart_step(step, plan)
            between()  # rollout
            t0 = time.perf_counter()
            columns = TrajectoryColumns.of(trajs)
            columns_s += time.perf_counter() - t0
            budget.settle(plan, columns, step, step,
                          lambda prices, reuse, step=step: (between(), Update(step + 1, 0.01))[1], trajs)
            budget.ledger_metrics()
            times.append(budget.seconds + columns_s)
        return float(np.median(times[10:]))

    arms = [(policy, {}) for policy in POLICIES] + [("marginal", {"token_budget": 2400}),
                                                     ("marginal", {"token_budget": 2400, "pool_strength": 4.0}),
                                                     ("marginal", EVERY_MECHANISM)]

    def label(policy: str, keys: dict) -> str:
        return policy + (f" ({', '.join(f'{k} {v}' for k, v in keys.items())})" if keys else "")

    def per_arm(between=lambda: None) -> str:
        out = []
        for policy, keys in arms:
            ms = np.array([step_time(policy, keys, between, k) for k in range(args.data_seeds)]) * 1e3
            out.append(f"{label(policy, keys)} {np.median(ms):.2f} ms"
                       + (f" [{ms.min():.2f}-{ms.max():.2f}]" if len(ms) > 1 else ""))
        return ", ".join(out)

    compiled = "numba kernels" if kernels.greedy() is not None else "no kernels (numba missing or MARGINAL_RL_KERNELS=0)"
    print(f"budget per quickstart step ({compiled}; median over {args.data_seeds} runs [their range]): " + per_arm())
    if args.loop_shaped:
        import torch

        model = torch.nn.Sequential(*(torch.nn.Linear(384, 384) for _ in range(6)))
        optimizer, batch = torch.optim.AdamW(model.parameters()), torch.randn(512, 384)
        print("  with torch work between the phases, as in the trainer: " + per_arm(torch_step))
    if args.real_config:
        real_model_share(args)


def real_model_share(args: argparse.Namespace) -> None:
    """perf/budget_fraction of real training steps: the trainer itself, every mechanism on."""
    import numpy as np

    from marginal_rl.rollout.build import build_task
    from marginal_rl.train.config import load_config

    keys = {**EVERY_MECHANISM, "token_budget": args.real_budget}
    cfg = load_config([args.real_config], args.real_set)
    task = build_task(cfg.task, cfg.rollout)
    if not (task.probes and all(p.answer for p in task.train)):
        for key in ("probe_strength", "probe_refresh", "pool_probes"):  # each is read only with the probe on
            keys.pop(key)
        print(f"real model: task.name={cfg.task.name} has no one-turn reference answers; every mechanism but the "
              f"likelihood probe")
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "marginal_rl", "train", "--config", args.real_config, *args.real_set,
               "budget.policy=marginal",
               *(f"budget.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items()),
               f"train.max_steps={args.real_steps}", "train.eval_every=0", "task.num_eval=4",
               "log.report_to=none", "log.progress=false", f"output_dir={out}"]
        print("real model: " + " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "WANDB_MODE": "offline"})
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line]
    frac = np.array([r["perf/budget_fraction"] for r in rows])
    secs = np.array([r["perf/budget_seconds"] for r in rows])
    step = np.array([r["perf/step_seconds"] for r in rows])
    reused = sum(r.get("budget/reuse_trained", 0) for r in rows)
    print(f"real model, {len(rows)} steps: budget {np.median(frac) * 100:.3f} % of the step (median; range "
          f"{frac.min() * 100:.3f}-{frac.max() * 100:.3f} %), {np.median(secs) * 1e3:.1f} ms of a {np.median(step):.1f} s "
          f"step; samples per step {[r['rollout/samples'] for r in rows]}, {reused:.0f} reuses")


if __name__ == "__main__":
    main()
