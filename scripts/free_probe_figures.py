"""Benchmark figures with the likelihood probe's tokens taken off the x-axis: what an arm's pass rates would buy if
they cost nothing. For the oracle diagnostic (`budget.probe_charge: false`, docs/budget.md "Pricing at the current
pass rate"); for any other arm the figures are those of `marginal-rl report`, less the probe's tokens.

    python scripts/free_probe_figures.py runs/ablations/bench_v2_fine --arms marginal_6_oracle,marginal_6_probe \\
        --baselines none_8,none_4 --delta 0.05

For each arm and baseline, paired by seed: tokens to start + delta on that x-axis (eval_history's tokens minus
tokens_probe; runs from before tokens_probe was recorded have no probe and read 0), censored at B, the smallest
probe-free total any run of the pair reached (so both curves cover it); the geometric mean of baseline / arm with
its 95 % bootstrap interval over seeds (marginal_rl.stats), the AUC over [0, B]; per arm, the probe's share of the
tokens, the probe-free tokens per step and the AUC, and every seed, over the smallest B of all listed runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from marginal_rl.stats import censored_paired_ratio, mean_interval, reward_auc, tokens_to_gain


def curve(run: Path) -> tuple[list[float], list[float], dict]:
    s = json.loads((run / "summary.json").read_text())
    hist = s["eval_history"]
    return [h["tokens"] - h.get("tokens_probe", 0) for h in hist], [h[s.get("target_metric", "eval/reward")]
                                                                     for h in hist], s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("grid", type=Path, help="a grid's output_dir (runs under ARM/seedN)")
    ap.add_argument("--arms", required=True, help="comma-separated arms to report")
    ap.add_argument("--baselines", required=True, help="comma-separated arms each arm is compared against")
    ap.add_argument("--delta", type=float, default=0.05, help="the relative target: start + delta (default 0.05)")
    args = ap.parse_args(argv)
    arms, bases = args.arms.split(","), args.baselines.split(",")
    runs = {}
    for arm in dict.fromkeys(arms + bases):
        seeds = sorted((args.grid / arm).glob("seed*/summary.json"))
        if not seeds:
            print(f"error: no finished runs under {args.grid / arm}", file=sys.stderr)
            return 2
        runs[arm] = {int(p.parent.name.removeprefix("seed")): curve(p.parent) for p in seeds}
    budget = min(x[-1] for r in runs.values() for x, _, _ in r.values())
    print(f"x-axis: tokens less the probe's; budget B = {budget:,.0f} (the smallest probe-free total of these runs: "
          f"the per-arm AUC and the seed table; each comparison uses its own pair's B)")
    figures = {arm: _figures(r, args.delta, budget) for arm, r in runs.items()}
    for arm, r in runs.items():
        s = [v for _, _, v in r.values()]
        probe = [v["tokens"].get("probe", 0) / v["tokens"]["total"] for v in s]
        per_step = [(v["tokens"]["total"] - v["tokens"].get("probe", 0)) / v["steps"] for v in s]
        zero = [v["ledger"]["zero_signal_groups"] / v["ledger"]["groups"] for v in s if v["ledger"].get("groups")]
        auc = mean_interval([a for _, a, _ in figures[arm].values()])
        print(f"{arm}: {len(s)} seeds, probe share {_median(probe):.3f}, probe-free tokens/step {_median(per_step):.0f}, "
              f"zero-signal groups {_median(zero):.2f}, AUC {auc[0]:.4f} [{auc[1]:.4f}, {auc[2]:.4f}]")
    for arm in arms:
        for base in bases:
            if base == arm:
                continue
            pair = min(x[-1] for a in (arm, base) for x, _, _ in runs[a].values())  # both curves cover [0, pair]
            mine, theirs = _figures(runs[arm], args.delta, pair), _figures(runs[base], args.delta, pair)
            seeds = sorted(set(mine) & set(theirs))
            n, ratio, lo, hi = censored_paired_ratio([theirs[s][0] for s in seeds], [mine[s][0] for s in seeds], pair)
            diff = mean_interval([mine[s][1] - theirs[s][1] for s in seeds])
            print(f"{base} / {arm}, tokens to start + {args.delta}: {ratio:.2f}x [{lo:.2f}, {hi:.2f}] ({n} seeds); "
                  f"AUC {arm} - {base}: {diff[0]:+.4f} [{diff[1]:+.4f}, {diff[2]:+.4f}] (B = {pair:,.0f})")
    print("\n| seed | start | " + " | ".join(f"{a}: tokens to start + {args.delta}" for a in runs) + " | "
          + " | ".join(f"{a}: AUC" for a in runs) + " |")
    print("|" + " --- |" * (2 + 2 * len(runs)))
    for seed in sorted(set.intersection(*(set(f) for f in figures.values()))):
        cells = [_k(figures[a][seed][0], budget) for a in runs] + [f"{figures[a][seed][1]:.3f}" for a in runs]
        print(f"| {seed} | {figures[arms[0]][seed][2]:.3f} | " + " | ".join(cells) + " |")
    return 0


def _figures(runs: dict, delta: float, budget: float) -> dict[int, tuple[float | None, float, float]]:
    """Per seed: tokens to start + delta on the probe-free axis, the AUC over [0, budget], the start."""
    return {seed: (tokens_to_gain(x, y, delta), reward_auc(x, y, budget), y[0]) for seed, (x, y, _) in runs.items()}


def _median(v: list[float]) -> float:
    return statistics.median(v) if v else math.nan


def _k(t: float | None, budget: float) -> str:
    if t is None or t > budget:
        return "never"
    return f"{t / 1000:.1f}k" if t < 10_000 else f"{t / 1000:.0f}k"


if __name__ == "__main__":
    sys.exit(main())
