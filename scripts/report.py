"""Summarise a run or an ablation grid from its files (no W&B needed) and draw its plots.

    python scripts/report.py runs/quickstart                         # one run
    python scripts/report.py runs/ablations/budget_policies          # a grid written by scripts/ablate.py

A run: eval rewards, tokens by use and by fate recomputed from the trajectory store, tokens to target, waste.
A grid: the per-arm table (median [min, max] over seeds) and the reward-vs-tokens / reward-vs-wall plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def report_run(run: Path) -> None:
    import pandas as pd

    from train.grid import plot_curves

    s = json.loads((run / "summary.json").read_text())
    print(f"run {run}: {s['algo']} / policy {s['policy']}, {s['steps']} steps, world size {s['world_size']}, "
          f"{s['wall_seconds']:.0f} s")
    reached = "not reached" if s["tokens_to_target"] is None else f"reached after {s['tokens_to_target']:,} tokens"
    print(f"eval reward: start {s['initial_eval_reward']:.3f}, final {s['final_eval_reward']:.3f}, "
          f"best {s['best_eval_reward']:.3f}; target {s['target_reward']} {reached}")
    store = run / "trajectories"
    if store.is_dir():
        df = pd.read_parquet(store)
        uses = {u: int(df[f"tokens_{u}"].sum()) for u in ("prompt", "policy", "observation", "verify", "train")}
        print("tokens by use (store): " + ", ".join(f"{k} {v:,}" for k, v in uses.items()))
        by_fate = df.groupby("fate")[["tokens_rollout", "tokens_train"]].sum()
        by_fate["trajectories"] = df.groupby("fate").size()
        print(by_fate.to_string())
        wasted = int(df.loc[df.fate != "trained", "tokens_rollout"].sum())
        print(f"wasted rollout tokens (not trained on): {wasted:,} ({wasted / max(df.tokens_rollout.sum(), 1):.1%})")
    plots = plot_curves({s["policy"]: [run]}, run, s["target_reward"])
    print("plots: " + ", ".join(map(str, plots)))


def report_grid(grid: Path) -> None:
    from train.grid import plot_curves, ratio_lines, result_row, summarize, summary_markdown

    runs = sorted(p.parent for p in grid.glob("*/seed*/summary.json"))
    if not runs:
        raise SystemExit(f"{grid}: no finished runs (expected <arm>/seed<k>/summary.json)")
    results = [result_row(r.parent.name, int(r.name.removeprefix("seed")), r) for r in runs]
    table = summarize(results)
    print(summary_markdown(table))
    print("\n".join(ratio_lines(table)))
    arms: dict[str, list[Path]] = {}
    for r in runs:
        arms.setdefault(r.parent.name, []).append(r)
    target = json.loads((runs[0] / "summary.json").read_text())["target_reward"]
    print("plots: " + ", ".join(map(str, plot_curves(arms, grid, target))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("path", type=Path, help="a run directory (has summary.json) or a grid directory")
    args = p.parse_args(argv)
    if (args.path / "summary.json").is_file():
        report_run(args.path)
    elif args.path.is_dir():
        report_grid(args.path)
    else:
        print(f"error: {args.path} is not a directory", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
