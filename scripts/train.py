"""Train a policy with risk-adjusted RL: rollout -> price -> train, every token ledgered.

    python scripts/train.py --config configs/quickstart.yaml [key=value ...]
    python scripts/train.py --config configs/quickstart.yaml budget.policy=none train.max_steps=50
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --config configs/quickstart.yaml   # CPU: see README
    python scripts/train.py --config configs/quickstart.yaml --dry-run    # print the resolved config and exit

Precedence: built-in defaults < --config files (in order) < key=value overrides. Bad config exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without `pip install -e .`

from train.config import (  # noqa: E402  (torch-free)
    ConfigError,
    add_config_arguments,
    config_to_dict,
    describe_keys,
    load_cli_config,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    keys = "\n".join(
        f"  {key:<30} {tp:<12} default {default}\n" + textwrap.fill(doc, 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
        for key, tp, default, doc in describe_keys()
    )
    p = argparse.ArgumentParser(
        description="Risk-adjusted RL fine-tuning (GRPO/PPO) with a token budget and ledger.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config keys (set in YAML or as key=value):\n{keys}",
    )
    add_config_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_cli_config(args)
    if cfg is None:
        return 2
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0

    from rollout.build import TaskError, build_task
    from rollout.errors import RolloutError
    from train.checkpoint import CheckpointError
    from train.loop import train

    try:
        task = build_task(cfg.task, cfg.rollout)
        train(cfg, task)
    except (ConfigError, TaskError, CheckpointError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (RolloutError, FloatingPointError) as e:  # user reward code or data, or a diverged run: stop cleanly
        print(f"error: {e}\n(every step before this one is in {cfg.output_dir}/trajectories)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
