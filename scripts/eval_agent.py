"""Measure a starting policy on a config's eval split: pass rate per family, actions, finish reasons, seconds.

    python scripts/eval_agent.py --config configs/fix_test_tiny.yaml --samples 4 --temperature 1.0
    python scripts/eval_agent.py --config configs/fix_test_smollm2.yaml --samples 1 --temperature 0 task.num_eval=40

Builds (or loads from the cache) the same policy the trainer would start from, rolls out `--samples` episodes per eval
prompt with the task's own rollout (the agent loop for fix_test), and prints one JSON object. A pass is an episode whose
reward before the step cost is 1.0 (tests pass on submit).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without `pip install -e .`

from train.config import add_config_arguments, load_cli_config  # noqa: E402  (torch-free)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(p, "config overrides")
    p.add_argument("--samples", type=int, default=4, help="episodes per eval prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    args = p.parse_args(argv)
    cfg = load_cli_config(args)
    if cfg is None:
        return 2

    import torch
    from accelerate import Accelerator

    from rollout.build import build_task
    from train.loop import build_policy

    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task, cfg.rollout)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, tokenizer = build_policy(cfg, task, accelerator)
    t0 = time.time()
    episodes = task.rollout(model, tokenizer, [(q, args.samples) for q in task.eval], cfg.rollout, step=-1, version=0,
                            temperature=args.temperature)
    seconds = time.time() - t0
    passed: dict[str, list[bool]] = defaultdict(list)
    for t in episodes:
        passed[t.family].append(t.reward + cfg.task.step_cost * t.tokens_policy == 1.0)
    everything = [x for v in passed.values() for x in v]
    print(json.dumps({
        "episodes": len(episodes), "prompts": len(task.eval), "samples": args.samples, "temperature": args.temperature,
        "pass_rate": sum(everything) / len(everything),
        "pass_rate_by_family": {f: round(sum(v) / len(v), 3) for f, v in sorted(passed.items())},
        "episodes_by_family": {f: len(v) for f, v in sorted(passed.items())},
        "prompts_solved_at_least_once": len({t.prompt_id for t in episodes
                                             if t.reward + cfg.task.step_cost * t.tokens_policy == 1.0}),
        "finish_reasons": dict(Counter(t.finish_reason for t in episodes)),
        "actions": dict(Counter(a for t in episodes for a in t.actions)),
        "verified_share": sum("run_tests" in t.actions for t in episodes) / len(episodes),
        "mean_policy_tokens": sum(t.tokens_policy for t in episodes) / len(episodes),
        "mean_observation_tokens": sum(t.tokens_observation for t in episodes) / len(episodes),
        "rollout_seconds": round(seconds, 1), "device": str(accelerator.device), "dtype": cfg.model.dtype,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
