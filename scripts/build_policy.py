"""Build (or find in the cache) the offline starting policy of a config and report how often it is right.

    python scripts/build_policy.py --config configs/quickstart.yaml [key=value ...] [--samples 8]

For `model.path=tiny` this trains a tokenizer with `tokenizers`, builds a tiny Llama from the config, gives it a
short supervised warm start on the task's demonstrations and caches it under `model.cache_dir` (what the quickstart
does on first use). It then samples the train split and prints the pass rate per task family and the share of
prompts never, sometimes and always solved: the spread that allocation decides about.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.config import ConfigError, add_config_arguments, load_cli_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, "config overrides")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt at the rollout temperature")
    args = p.parse_args(argv)
    cfg = load_cli_config(args)
    if cfg is None:
        return 2

    import numpy as np
    import torch

    from rollout.build import TaskError, build_task
    from train.model import load_policy, resolve_policy_path

    try:
        task = build_task(cfg.task, cfg.rollout)
        path = resolve_policy_path(cfg.model, task, cfg.seed)
        model, tokenizer = load_policy(path, cfg.model.gguf_file, cfg.model.dtype)
    except (ConfigError, TaskError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
