"""Where each arm of a grid spends its samples, and where the eval's gain comes from, by task family.

    python scripts/family_figures.py runs/ablations/bench_v2_fine --arms none_8,marginal_6_probe_seen8 --tokens 60000

Per arm, over its seeds, up to the first eval at or past --tokens tokens (medians unless stated): the distinct
prompts sampled and the share of their groups whose rewards are all equal (zero-signal, whatever the policy did with
them), each family's share of the samples and of the zero-signal groups (trajectories/), and each family's eval gain
from the start (eval_history's eval/reward/<family>), as the change
in the family's own pass rate and as its part of the eval's mean (that change times the family's share of the eval
split, read from the run's config.yaml, so the parts sum to the change in eval/reward). For the reading of docs/budget.md
("Family balance", the eleventh round): whether the price spends its samples on the families the eval learns on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from marginal_rl.rollout.build import build_task
from marginal_rl.train.config import config_from_dict


def eval_shares(run: Path) -> dict[str, float]:
    """Each family's share of the run's eval split (its task rebuilt from config.yaml, as the run built it)."""
    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    counts = Counter(p.family for p in build_task(cfg.task, cfg.rollout).eval)
    return {f: n / sum(counts.values()) for f, n in counts.items() if f}


def seed_figures(run: Path, tokens: float, shares: dict[str, float]) -> dict:
    """One run's figures up to its first eval at or past `tokens`: distinct prompts, samples and zero-signal groups
    per family, each family's eval gain (own pass rate; share-weighted)."""
    hist = json.loads((run / "summary.json").read_text())["eval_history"]
    start = hist[0]
    end = next((h for h in hist if h["tokens"] >= tokens), hist[-1])
    files = sorted((run / "trajectories").glob("step-*.parquet"))[:end["step"]]  # the steps trained before that eval
    cols = ["prompt_id", "group_id", "family", "reward"]
    rows = [r for f in files for r in pq.read_table(f, columns=cols).to_pylist()]
    samples = Counter(r["family"] for r in rows)
    rewards: dict[tuple, set] = {}
    for r in rows:  # a group without signal: its rewards are all equal (under any policy, whatever it trained on)
        rewards.setdefault((r["group_id"], r["family"]), set()).add(r["reward"])
    flat = [g for g, seen in rewards.items() if len(seen) == 1]
    gain = {k.split("/", 2)[2]: end[k] - v for k, v in start.items() if k.startswith("eval/reward/")}
    return {"distinct": len({r["prompt_id"] for r in rows}), "samples": samples,
            "zero_signal": Counter(f for _, f in flat), "flat_share": len(flat) / max(len(rewards), 1),
            "gain": gain, "part": {f: g * shares.get(f, 0.0) for f, g in gain.items()},
            "total": end["eval/reward"] - start["eval/reward"], "end_tokens": end["tokens"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("grid", type=Path, help="a grid's output_dir (runs under ARM/seedN)")
    ap.add_argument("--arms", required=True, help="comma-separated arms to report")
    ap.add_argument("--tokens", type=float, default=60000,
                    help="eval gains to the first eval at or past this many tokens (default 60000)")
    args = ap.parse_args(argv)
    if args.tokens <= 0:
        print("family_figures: --tokens must be positive", file=sys.stderr)
        return 2
    for arm in args.arms.split(","):
        runs = sorted(r for r in (args.grid / arm).glob("seed*") if (r / "summary.json").exists())
        if not runs:
            print(f"family_figures: no finished runs under {args.grid / arm}", file=sys.stderr)
            return 2
        shares = eval_shares(runs[0])
        seeds = [seed_figures(r, args.tokens, shares) for r in runs]
        families = sorted(set(shares) | {f for s in seeds for f in s["samples"]})
        med = statistics.median
        print(f"\n{arm}: {len(seeds)} seeds, to ~{med(s['end_tokens'] for s in seeds):,.0f} tokens: {med(s['distinct'] for s in seeds):.0f} distinct "
              f"prompts, {med(s['flat_share'] for s in seeds):.2f} of groups without signal (medians); eval/reward {statistics.mean(s['total'] for s in seeds):+.4f} (mean)")
        print("| family | eval share | share of samples | share of zero-signal groups | eval gain (own) | part of eval/reward |")
        print("| --- | --- | --- | --- | --- | --- |")
        for f in families:
            sample_share = med(s["samples"][f] / max(sum(s["samples"].values()), 1) for s in seeds)
            flat_share = med(s["zero_signal"][f] / max(sum(s["zero_signal"].values()), 1) for s in seeds)
            own = [s["gain"][f] for s in seeds if f in s["gain"]]
            part = [s["part"][f] for s in seeds if f in s["part"]]
            print(f"| {f} | {shares.get(f, 0.0):.2f} | {sample_share:.2f} | {flat_share:.2f} | "
                  f"{statistics.mean(own):+.3f} | {statistics.mean(part):+.4f} |" if own else
                  f"| {f} | {shares.get(f, 0.0):.2f} | {sample_share:.2f} | {flat_share:.2f} | – | – |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
