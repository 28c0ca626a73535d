"""The `marginal-rl` command: one subcommand per entry point, each with its own --help.

    marginal-rl train --config configs/quickstart.yaml [key=value ...]       # train (GRPO/PPO under the budget)
    marginal-rl train --config configs/quickstart.yaml --dry-run             # print the resolved config and exit
    marginal-rl train-trl --config configs/quickstart.yaml                   # the same run on TRL's GRPOTrainer
    marginal-rl eval --config configs/fix_test_tiny.yaml --samples 4         # measure a starting policy
    marginal-rl build-policy --config configs/quickstart.yaml                # build/cache the tiny starting policy
    marginal-rl warm-start --config configs/warm_start_smollm2.yaml          # SFT a chat model on demonstrations
    marginal-rl ablate --config configs/ablations/budget_policies.yaml --parallel 2
    marginal-rl report runs/quickstart                                       # tables and plots of a run or grid
    accelerate launch --multi_gpu --num_processes 2 -m marginal_rl train --config configs/quickstart.yaml

Precedence: built-in defaults < --config files (in order) < key=value overrides. A bad config exits with status 2,
before any model loads. Heavy imports happen after parsing, so --help is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from collections import Counter, defaultdict
from pathlib import Path

from marginal_rl.train.config import (
    ConfigError,
    WarmStartConfig,
    add_config_arguments,
    config_to_dict,
    describe_keys,
    load_cli_config,
)


def _keys_epilog(cls: type | None = None) -> str:
    keys = "\n".join(
        f"  {key:<32} {tp:<12} default {default}\n"
        + textwrap.fill(doc, 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
        for key, tp, default, doc in (describe_keys(cls) if cls else describe_keys()))
    head = f"config keys (set in YAML or as key=value; a key in [brackets] is read only by that variant):\n{keys}"
    return head if cls else f"{head}\n\nTRL's GRPOConfig names (learning_rate, num_generations, beta, ...): see docs/configuration.md"


def reported(fn, args: argparse.Namespace, output_dir: str = "") -> int:
    """Run `fn()`, turning the errors a user, their data or their machine can cause into one line on stderr and an
    exit status (2: the config or a checkpoint; 1: reward code, data, a diverged run, the sandbox, the disk; 128 + N:
    stopped by signal N). Anything else is a bug and keeps its traceback; `--debug` keeps it for everything."""
    from marginal_rl.rollout.errors import RolloutError, TaskError
    from marginal_rl.rollout.sandbox import SandboxError
    from marginal_rl.train.checkpoint import CheckpointError
    from marginal_rl.train.loop import Preempted
    from marginal_rl.train.store import StorageError

    kept = f" (every step before this one is in {output_dir}/trajectories)" if output_dir else ""
    try:
        fn()
    except Preempted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except (ConfigError, TaskError, CheckpointError, RolloutError, FloatingPointError, StorageError, SandboxError,
            OSError, KeyboardInterrupt) as e:
        if args.debug:
            raise
        if isinstance(e, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        label = {ConfigError: "config error", TaskError: "config error", CheckpointError: "checkpoint error"}
        prefix = next((v for k, v in label.items() if isinstance(e, k)), "error")
        print(f"{prefix}: {e}{kept if isinstance(e, RolloutError | FloatingPointError) else ''}", file=sys.stderr)
        return 2 if prefix != "error" else 1
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_cli_config(args)
    if cfg is None:
        return 2
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0

    from marginal_rl.rollout.build import build_task
    from marginal_rl.train.loop import train

    return reported(lambda: train(cfg, build_task(cfg.task, cfg.rollout)), args, cfg.output_dir)


def cmd_train_trl(args: argparse.Namespace) -> int:
    cfg = load_cli_config(args)
    if cfg is None:
        return 2
    from marginal_rl.trl_peer import check_supported, grpo_config_kwargs

    try:
        check_supported(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for k, v in grpo_config_kwargs(cfg).items():
            print(f"{k}: {v}")
        return 0
    from marginal_rl.rollout.build import build_task
    from marginal_rl.rollout.tasks import TaskSet
    from marginal_rl.trl_peer import train_trl

    def run() -> None:
        task = build_task(cfg.task, cfg.rollout)
        if type(task).rollout is not TaskSet.rollout:
            raise ConfigError(f"task.name: {cfg.task.name} has multi-turn episodes; marginal-rl train-trl needs a "
                              f"single-turn task (GRPOTrainer generates one completion per prompt)")
        train_trl(cfg, task)

    return reported(run, args, cfg.output_dir)


def cmd_eval(args: argparse.Namespace) -> int:
    """Roll out `--samples` episodes per eval prompt from the policy the trainer would start from; one JSON object.
    A pass is an episode whose reward before the step cost is 1.0 (tests pass on submit)."""
    cfg = load_cli_config(args)
    if cfg is None:
        return 2
    return reported(lambda: _eval(cfg, args), args)


def _eval(cfg, args: argparse.Namespace) -> None:
    import torch
    from accelerate import Accelerator

    from marginal_rl.rollout.build import build_task
    from marginal_rl.train.loop import build_policy

    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task, cfg.rollout)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, tokenizer = build_policy(cfg, task, accelerator)
    t0 = time.time()
    episodes = task.rollout(model, tokenizer, [(q, args.samples) for q in task.eval], cfg.rollout, step=-1, version=0,
                            temperature=args.temperature)
    seconds = time.time() - t0
    step_cost = cfg.task.step_cost if cfg.task.name == "fix_test" else 0.0
    report = eval_report(episodes, step_cost)
    report.update({"prompts": len(task.eval), "samples": args.samples, "temperature": args.temperature,
                   "rollout_seconds": round(seconds, 1), "device": str(accelerator.device), "dtype": cfg.model.dtype,
                   "model": cfg.model.path})
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


def eval_report(episodes, step_cost: float = 0.0) -> dict:
    """Pass rates of eval episodes (a pass: reward before the step cost is 1.0) with standard errors over prompts
    (a prompt's k samples are one cluster: SE = sd of the per-prompt pass rates / sqrt(prompts)), per family, the
    spread of per-prompt solve rates, and how the episodes spent their tokens."""
    import numpy as np

    def passed(t) -> bool:
        return abs(t.reward + step_cost * t.tokens_policy - 1.0) < 1e-9

    per_prompt: dict[str, list[bool]] = defaultdict(list)
    family: dict[str, str] = {}
    for t in episodes:
        per_prompt[t.prompt_id].append(passed(t))
        family[t.prompt_id] = t.family

    def rate_and_se(prompt_ids) -> tuple[float, float]:
        rates = np.array([np.mean(per_prompt[p]) for p in prompt_ids])
        se = float(rates.std(ddof=1) / np.sqrt(len(rates))) if len(rates) > 1 else float("nan")
        return float(rates.mean()), se

    rate, se = rate_and_se(list(per_prompt))
    families = sorted(set(family.values()))
    by_family = {f: rate_and_se([p for p in per_prompt if family[p] == f]) for f in families}
    solve = [float(np.mean(v)) for v in per_prompt.values()]
    verified = [t for t in episodes if "run_tests" in t.actions]
    return {
        "episodes": len(episodes), "pass_rate": round(rate, 4), "pass_rate_se": round(se, 4),
        "pass_rate_by_family": {f: round(r, 3) for f, (r, _) in by_family.items()},
        "pass_rate_se_by_family": {f: round(e, 3) for f, (_, e) in by_family.items()},
        "prompts_by_family": {f: sum(family[p] == f for p in per_prompt) for f in families},
        "prompts_never_solved": sum(r == 0 for r in solve), "prompts_sometimes_solved": sum(0 < r < 1 for r in solve),
        "prompts_always_solved": sum(r == 1 for r in solve),
        "finish_reasons": dict(Counter(t.finish_reason for t in episodes)),
        "actions": dict(Counter(a for t in episodes for a in t.actions)),
        "verified_share": round(len(verified) / len(episodes), 4),
        "pass_rate_when_verified": round(float(np.mean([passed(t) for t in verified])), 4) if verified else None,
        "mean_policy_tokens": round(sum(t.tokens_policy for t in episodes) / len(episodes), 1),
        "mean_observation_tokens": round(sum(t.tokens_observation for t in episodes) / len(episodes), 1),
        "mean_verification_tokens": round(sum(t.tokens_verify for t in episodes) / len(episodes), 1),
    }


def cmd_warm_start(args: argparse.Namespace) -> int:
    """Supervised warm start of a chat model on demonstrated fix_test episodes (train/sft.py, docs/fix_test.md)."""
    cfg = load_cli_config(args, WarmStartConfig)
    if cfg is None:
        return 2
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    from marginal_rl.train.sft import warm_start

    return reported(lambda: warm_start(cfg), args)


def cmd_build_policy(args: argparse.Namespace) -> int:
    """Build (or find in the cache) the starting policy, sample the train split, print the pass rate per family and
    the share of prompts never, sometimes and always solved: the spread that allocation decides about."""
    cfg = load_cli_config(args)
    if cfg is None:
        return 2
    return reported(lambda: _build_policy(cfg, args), args)


def _build_policy(cfg, args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from marginal_rl.rollout.build import build_task
    from marginal_rl.train.model import load_policy, resolve_policy_path

    task = build_task(cfg.task, cfg.rollout)
    path = resolve_policy_path(cfg.model, task, cfg.seed)
    model, tokenizer = load_policy(path, cfg.model.gguf_file, cfg.model.dtype)
    torch.manual_seed(cfg.seed)
    episodes = task.rollout(model, tokenizer, [(q, args.samples) for q in task.train], cfg.rollout, step=0, version=0,
                            temperature=cfg.rollout.temperature)
    rates: dict[str, list[float]] = defaultdict(list)
    family = {}
    for t in episodes:
        rates[t.prompt_id].append(t.reward)
        family[t.prompt_id] = t.family
    print(f"policy: {path}")
    print(f"{'family':<10} {'prompts':>7} {'pass rate':>9} {'never':>6} {'some':>6} {'always':>6}")
    for fam in sorted(set(family.values())) + ["all"]:
        r = [np.mean(v) for k, v in rates.items() if fam in ("all", family[k])]
        never, always = sum(x == 0 for x in r), sum(x == 1 for x in r)
        print(f"{fam:<10} {len(r):>7} {np.mean(r):>9.2f} {never:>6} {len(r) - never - always:>6} {always:>6}")


def cmd_ablate(args: argparse.Namespace) -> int:
    from marginal_rl.grid import run_grid

    arms = [a for a in (args.arms or "").split(",") if a]
    return run_grid(args.config, parallel=args.parallel, dry_run=args.dry_run, arms=arms or None)


def cmd_report(args: argparse.Namespace) -> int:
    from marginal_rl.report import report

    return report(args.path, args.reference)


def _debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error (by default a problem "
                        "with the config, data, reward code, a checkpoint or the disk is one line)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="marginal-rl", description="Risk-adjusted RL fine-tuning (GRPO/PPO) for "
                                "language-model agents, with a token budget and ledger.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n")[1])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    train = sub.add_parser("train", help="train a policy: rollout -> price -> update, every token ledgered",
                           description="Train a policy with risk-adjusted RL (GRPO/PPO, budget.policy).",
                           formatter_class=raw, epilog=_keys_epilog())
    add_config_arguments(train)
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    _debug_flag(train)
    train.set_defaults(func=cmd_train)

    trl = sub.add_parser("train-trl", help="the same run on TRL's GRPOTrainer (the peer arm of a benchmark)",
                         description="Train with TRL's GRPOTrainer on the same task, policy, reward, eval and ledger "
                                     "(see marginal_rl/trl_peer.py for what is mapped and what differs).",
                         formatter_class=raw)
    add_config_arguments(trl)
    trl.add_argument("--dry-run", action="store_true", help="print the GRPOConfig arguments and exit")
    _debug_flag(trl)
    trl.set_defaults(func=cmd_train_trl)

    ev = sub.add_parser("eval", help="measure the starting policy on the eval split (pass rate per family, actions)",
                        description=cmd_eval.__doc__)
    add_config_arguments(ev, "config overrides")
    ev.add_argument("--samples", type=int, default=4, help="episodes per eval prompt")
    ev.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    ev.add_argument("--out", default="", help="also write the JSON report to this file")
    _debug_flag(ev)
    ev.set_defaults(func=cmd_eval)

    build = sub.add_parser("build-policy", help="build or load the starting policy and report how often it is right",
                           description=cmd_build_policy.__doc__)
    add_config_arguments(build, "config overrides")
    build.add_argument("--samples", type=int, default=8, help="samples per prompt at the rollout temperature")
    _debug_flag(build)
    build.set_defaults(func=cmd_build_policy)

    warm = sub.add_parser("warm-start", help="supervised warm start of a chat model on demonstrated fix_test episodes",
                          description=cmd_warm_start.__doc__ + " The model goes to output_dir/model: use it as "
                          "model.path in the RL config.", formatter_class=raw,
                          epilog=_keys_epilog(WarmStartConfig))
    add_config_arguments(warm, "config overrides, e.g. train.max_steps=20")
    warm.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    _debug_flag(warm)
    warm.set_defaults(func=cmd_warm_start)

    ablate = sub.add_parser("ablate", help="run an ablation grid (arms x seeds), then tabulate and plot it",
                            description="Run an ablation grid (docs/ablations.md): results.csv, summary.md/.csv and "
                                        "reward_vs_{tokens,wall,steps}.png under its output_dir. Rerunning skips "
                                        "finished runs.")
    ablate.add_argument("--config", required=True, help="grid YAML (see docs/ablations.md)")
    ablate.add_argument("--parallel", type=int, default=1, help="runs at a time (each a separate process)")
    ablate.add_argument("--arms", metavar="A,B", help="run only these arms (comma-separated), e.g. to add an arm to a "
                                                      "grid; the report still covers every arm with finished runs")
    ablate.add_argument("--dry-run", action="store_true", help="validate the grid and list its runs, run nothing")
    ablate.set_defaults(func=cmd_ablate)

    rep = sub.add_parser("report", help="summarise a run or a grid from its files and draw its plots",
                         description="Summarise a run directory (summary.json) or a grid directory from its files.")
    rep.add_argument("path", type=Path, help="a run directory (has summary.json) or a grid directory")
    rep.add_argument("--reference", default=None, metavar="ARM",
                     help="grid only: the arm every other arm is compared with, paired by seed (default: marginal; "
                          "a grid without it gets no comparison)")
    rep.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head` and closed early: not an error of the command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's final flush is quiet
        return 0


if __name__ == "__main__":
    sys.exit(main())
