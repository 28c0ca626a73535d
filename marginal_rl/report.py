"""Tables and plots of finished runs, read from their files (no W&B needed): one run, or a grid of them.

    marginal-rl report runs/quickstart                         # one run
    marginal-rl report runs/ablations/budget_policies          # a grid written by `marginal-rl ablate`

A run: eval rewards, tokens by use and by fate recomputed from the trajectory store, tokens to target, waste.
A grid: the per-arm table (median [min, max] over seeds) and the reward-vs-tokens / reward-vs-wall plots.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

RESULT_COLUMNS = ["arm", "seed", "final_eval_reward", "best_eval_reward", "tokens_to_target", "tokens_total",
                  "tokens_rollout", "tokens_train", "wall_seconds", "run_dir"]


def result_row(arm: str, seed: int, run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {"arm": arm, "seed": seed, "final_eval_reward": s["final_eval_reward"], "best_eval_reward": s["best_eval_reward"],
            "tokens_to_target": s["tokens_to_target"], "tokens_total": s["tokens"]["total"],
            "tokens_rollout": s["tokens"]["rollout"], "tokens_train": s["tokens"]["train"],
            "wall_seconds": s["wall_seconds"], "run_dir": str(run_dir)}


def summarize(results):
    """Per arm: median, min and max of each figure over seeds. A run that never reached the target counts as
    infinitely many tokens to target, so an arm's median is finite only when most of its seeds got there."""
    import pandas as pd

    df = pd.DataFrame(results)
    df["tokens_to_target"] = pd.to_numeric(df.tokens_to_target, errors="coerce").fillna(math.inf)
    rows = []
    for arm, g in df.groupby("arm", sort=False):
        row = {"arm": arm, "runs": len(g), "reached_target": f"{int((g.tokens_to_target < math.inf).sum())}/{len(g)}"}
        for col in ("final_eval_reward", "best_eval_reward", "tokens_to_target", "tokens_total", "wall_seconds"):
            row[f"{col}_median"], row[f"{col}_min"], row[f"{col}_max"] = g[col].median(), g[col].min(), g[col].max()
        rows.append(row)
    return pd.DataFrame(rows)


def summary_markdown(table) -> str:
    lines = ["| arm | runs | reached target | tokens to target (median [min, max]) | final eval reward | best eval reward "
             "| total tokens | wall s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    def cell(r: dict, col: str, fmt: str) -> str:
        return f"{format(r[col + '_median'], fmt)} [{format(r[col + '_min'], fmt)}, {format(r[col + '_max'], fmt)}]"

    for r in table.to_dict("records"):
        lines.append(f"| {r['arm']} | {r['runs']} | {r['reached_target']} | {cell(r, 'tokens_to_target', ',.0f')} | "
                     f"{cell(r, 'final_eval_reward', '.3f')} | {cell(r, 'best_eval_reward', '.3f')} | "
                     f"{cell(r, 'tokens_total', ',.0f')} | {cell(r, 'wall_seconds', '.0f')} |")
    return "\n".join(lines)


def ratio_lines(table, arm: str = "marginal") -> list[str]:
    """Median tokens-to-target of every other arm divided by `arm`'s (> 1: `arm` needs fewer tokens)."""
    med = dict(zip(table.arm, table.tokens_to_target_median, strict=True))
    if arm not in med:
        return []
    return [f"{other} / {arm}: {med[other] / med[arm]:.2f}x" for other in med if other != arm
            and math.isfinite(med[arm]) and med[arm] > 0]


def plot_curves(runs: dict[str, list[Path]], out_dir: Path, target: float | None = None) -> list[Path]:
    """eval reward against total tokens, wall time and training step: one line per arm (median over seeds,
    interpolated on a common grid up to where the shortest seed ends), with the min-max band of the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    for x_key, label, fname in (("tokens", "total tokens", "reward_vs_tokens.png"),
                                ("seconds", "wall seconds", "reward_vs_wall.png"),
                                ("step", "training step", "reward_vs_steps.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm, dirs in runs.items():
            curves = []
            for d in dirs:
                hist = json.loads((d / "summary.json").read_text())["eval_history"]
                curves.append((np.array([h[x_key] for h in hist], float), np.array([h["eval/reward"] for h in hist])))
            grid = np.linspace(0, min(c[0][-1] for c in curves), 50)
            ys = np.array([np.interp(grid, x, y) for x, y in curves])
            (line,) = ax.plot(grid, np.median(ys, axis=0), label=f"{arm} ({len(dirs)} seeds)")
            ax.fill_between(grid, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.15)
        if target is not None:
            ax.axhline(target, color="grey", ls=":", lw=1, label=f"target {target}")
        ax.set_xlabel(label)
        ax.set_ylabel("eval reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def report_run(run: Path) -> None:
    import pandas as pd

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


def report(path: Path) -> int:
    """Report a run directory (it has summary.json) or a grid directory; 2 when `path` is neither."""
    if (path / "summary.json").is_file():
        report_run(path)
    elif path.is_dir():
        report_grid(path)
    else:
        print(f"error: {path} is not a directory", file=sys.stderr)
        return 2
    return 0
