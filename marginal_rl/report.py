"""Tables and plots of finished runs, read from their files (no W&B needed): one run, or a grid of them.

    marginal-rl report runs/quickstart                         # one run
    marginal-rl report runs/ablations/budget_policies          # a grid written by `marginal-rl ablate`

A run: eval rewards, tokens by use and by fate recomputed from the trajectory store, tokens to target, waste.
A grid: the per-arm table (median [min, max] over seeds) and the reward-vs-tokens / reward-vs-wall plots.
Both also write report.html, one page readable offline, with its PNGs beside it: for a run, eval reward against
tokens and steps, tokens by use and by fate over the run, the controller's price, the price components'
histograms, per-family eval rewards over steps, and the last step's top and bottom priced trajectories; for a grid,
the curves per arm with their seed bands, tokens by fate per arm, and the table.
"""

from __future__ import annotations

import csv
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(runs: dict[str, list[Path]], out_dir: Path, target: float | None = None) -> list[Path]:
    """eval reward against total tokens, wall time and training step: one line per arm (median over seeds,
    interpolated on a common grid up to where the shortest seed ends), with the min-max band of the seeds."""
    import numpy as np

    plt = _pyplot()
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
            (line,) = ax.plot(grid, np.median(ys, axis=0), label=f"{arm} ({len(dirs)} seed{'s' * (len(dirs) > 1)})")
            ax.fill_between(grid, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.15)
        if target is not None:
            ax.axhline(target, color="grey", ls=":", lw=1, label=f"target {target}")
        ax.set_xlabel(label)
        ax.set_ylabel("eval reward")
        several = any(len(dirs) > 1 for dirs in runs.values())
        ax.set_title(f"eval reward against {label}" + (" (median over seeds, band: min-max)" if several else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(plt, fig, out_dir / fname))
    return written


USES = {"prefill": "tokens_prompt", "decode": "tokens_policy", "observation": "tokens_observation",
        "verify": "tokens_verify", "train": "tokens_train"}
FATES = ("trained", "zero_signal", "dropped_price", "dropped_stale")


def plot_tokens_over_steps(df, out_dir: Path) -> list[Path]:
    """Tokens per step, stacked: by use (rollout uses and training), and rollout tokens by fate."""
    plt = _pyplot()
    by_step = df.groupby("step")
    written = []
    for fname, title, series in (
            ("tokens_by_use.png", "tokens per step by use",
             {use: by_step[col].sum() for use, col in USES.items()}),
            ("tokens_by_fate.png", "rollout tokens per step by fate",
             {fate: df[df.fate == fate].groupby("step").tokens_rollout.sum().reindex(by_step.size().index,
                                                                                    fill_value=0)
              for fate in FATES})):
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = list(by_step.size().index)
        ax.stackplot(steps, *[v.to_numpy() for v in series.values()], labels=list(series), alpha=0.85)
        ax.set_xlabel("training step")
        ax.set_ylabel("tokens")
        ax.set_title(title)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
        written.append(_save(plt, fig, out_dir / fname))
    return written


def plot_price(metrics: list[dict], out_dir: Path) -> Path | None:
    """The controller's per-token price (κ_rollout × its multiplier) and the mean trajectory price, per step."""
    if not metrics or "budget/controller_price" not in metrics[0]:
        return None
    plt = _pyplot()
    steps = [m["step"] for m in metrics]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(steps, [m["budget/controller_price"] for m in metrics])
    a.set_title("controller price per rollout token")
    a.set_xlabel("training step")
    a.set_ylabel("reward units / token")
    b.plot(steps, [m["budget/price_mean"] for m in metrics], label="price")
    b.plot(steps, [m["budget/gain_mean"] for m in metrics], label="gain")
    b.plot(steps, [m["budget/cost_mean"] for m in metrics], label="cost")
    b.plot(steps, [m["budget/risk_mean"] for m in metrics], label="risk")
    b.set_title("mean trajectory price components")
    b.set_xlabel("training step")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return _save(plt, fig, out_dir / "price.png")


def plot_price_histograms(df, out_dir: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
    for ax, col in zip(axes, ("gain", "cost", "risk", "price"), strict=True):
        ax.hist(df[col], bins=40)
        ax.set_title(f"trajectory {col}")
        ax.set_xlabel("reward units")
    axes[0].set_ylabel("trajectories (all steps)")
    return _save(plt, fig, out_dir / "price_components.png")


def plot_families(summary: dict, out_dir: Path) -> Path | None:
    """Eval reward per task family at each eval."""
    hist = summary["eval_history"]
    families = sorted({k.split("/", 2)[2] for h in hist for k in h if k.startswith("eval/reward/")})
    if not families:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for fam in families:
        ax.plot([h["step"] for h in hist], [h.get(f"eval/reward/{fam}") for h in hist], marker="o", label=fam)
    ax.set_xlabel("training step")
    ax.set_ylabel("eval reward")
    ax.set_title("eval reward per task family (sampled)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, out_dir / "families.png")


def plot_fates_per_arm(arms: dict[str, list[Path]], out_dir: Path) -> Path:
    """Rollout tokens by fate per arm (median over seeds), stacked bars."""
    import numpy as np

    plt = _pyplot()
    names = list(arms)
    by_fate = {f: [float(np.median([json.loads((d / "summary.json").read_text())["ledger"]["tokens_by_fate"][f]
                                    for d in arms[a]])) for a in names] for f in FATES}
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    bottom = np.zeros(len(names))
    for fate, values in by_fate.items():
        ax.bar(names, values, bottom=bottom, label=fate)
        bottom += values
    ax.set_ylabel("rollout tokens (median over seeds)")
    ax.set_title("where each arm's rollout tokens went")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", rotation=30)
    return _save(plt, fig, out_dir / "tokens_by_fate_per_arm.png")


CAPTIONS = {
    "reward_vs_tokens.png": "Eval reward against the total tokens spent (rollout + training).",
    "reward_vs_steps.png": "Eval reward against the training step.",
    "reward_vs_wall.png": "Eval reward against wall-clock seconds.",
    "tokens_by_use.png": "Tokens per step by use: prompt prefill, policy decode, tool observations, verification "
                         "and training.",
    "tokens_by_fate.png": "Rollout tokens per step by the fate of their trajectory: trained on, zero signal, dropped "
                          "by price or as stale.",
    "price.png": "Left: the controller's per-token price. Right: the mean post-rollout price and its components.",
    "price_components.png": "Distribution of every trajectory's gain, cost, risk and price (price = gain − cost − "
                            "risk).",
    "families.png": "Eval reward per task family at each eval.",
    "tokens_by_fate_per_arm.png": "Rollout tokens by fate per arm, median over seeds.",
}


def write_html(path: Path, title: str, intro: str, images: list[Path], tables: list[tuple[str, str]]) -> Path:
    """One self-contained page: a heading, a paragraph, each image (beside the page) with its caption, the tables."""
    import html

    figures = "\n".join(f'<figure><img src="{p.name}" alt="{html.escape(CAPTIONS.get(p.name, p.stem))}">'
                        f"<figcaption>{html.escape(CAPTIONS.get(p.name, p.stem))}</figcaption></figure>"
                        for p in images)
    sections = "\n".join(f"<h2>{html.escape(name)}</h2>\n{table}" for name, table in tables)
    path.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}figure{{margin:1.5em 0}}
img{{max-width:100%;border:1px solid #ddd}}figcaption{{color:#555;font-size:.9em}}
table{{border-collapse:collapse;font-size:.85em}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left;
vertical-align:top;max-width:380px;overflow-wrap:anywhere}}</style></head>
<body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>
{figures}
{sections}
</body></html>
""")
    return path


def report_run(run: Path) -> Path:
    import pandas as pd

    s = json.loads((run / "summary.json").read_text())
    print(f"run {run}: {s['algo']} / policy {s['policy']}, {s['steps']} steps, world size {s['world_size']}, "
          f"{s['wall_seconds']:.0f} s")
    reached = "not reached" if s["tokens_to_target"] is None else f"reached after {s['tokens_to_target']:,} tokens"
    intro = (f"{s['algo']} / policy {s['policy']}, {s['steps']} steps on {s['world_size']} process(es), "
             f"{s['wall_seconds']:.0f} s. Eval reward: start {s['initial_eval_reward']:.3f}, final "
             f"{s['final_eval_reward']:.3f}, best {s['best_eval_reward']:.3f}; target {s['target_reward']} {reached}.")
    print(f"eval reward: start {s['initial_eval_reward']:.3f}, final {s['final_eval_reward']:.3f}, "
          f"best {s['best_eval_reward']:.3f}; target {s['target_reward']} {reached}")
    plots = [p for p in plot_curves({s["policy"]: [run]}, run, s["target_reward"]) if "wall" not in p.name]
    tables = []
    store = run / "trajectories"
    if store.is_dir():
        df = pd.read_parquet(store)
        print("tokens by use (store): " + ", ".join(f"{col.removeprefix('tokens_')} {int(df[col].sum()):,}"
                                                   for col in USES.values()))
        by_fate = df.groupby("fate")[["tokens_rollout", "tokens_train"]].sum()
        by_fate["trajectories"] = df.groupby("fate").size()
        print(by_fate.to_string())
        wasted = int(df.loc[df.fate != "trained", "tokens_rollout"].sum())
        print(f"wasted rollout tokens (not trained on): {wasted:,} ({wasted / max(df.tokens_rollout.sum(), 1):.1%})")
        plots += plot_tokens_over_steps(df, run) + [plot_price_histograms(df, run)]
        last = df[df.step == df.step.max()].sort_values("price", ascending=False)
        cols = ["prompt_id", "prompt", "completion", "reward", "advantage", "gain", "cost", "risk", "price", "fate"]
        tables += [("tokens by fate (whole run)", by_fate.to_html()),
                   (f"step {int(df.step.max())}: the 5 highest-priced trajectories", last[cols].head(5).to_html(
                       index=False, float_format="%.4g")),
                   (f"step {int(df.step.max())}: the 5 lowest-priced trajectories", last[cols].tail(5).to_html(
                       index=False, float_format="%.4g"))]
    from marginal_rl.train.store import MetricsLog

    plots += [p for p in (plot_price(MetricsLog(run / "metrics.jsonl").read(), run), plot_families(s, run)) if p]
    page = write_html(run / "report.html", f"run {run.name}", intro, plots, tables)
    print(f"report: {page} ({len(plots)} plots beside it)")
    return page


def report_grid(grid: Path) -> Path:
    runs = sorted(p.parent for p in grid.glob("*/seed*/summary.json"))
    if not runs:
        raise SystemExit(f"{grid}: no finished runs (expected <arm>/seed<k>/summary.json)")
    results = [result_row(r.parent.name, int(r.name.removeprefix("seed")), r) for r in runs]
    with (grid / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(results)
    table = summarize(results)
    table.to_csv(grid / "summary.csv", index=False)
    md, ratios = summary_markdown(table), ratio_lines(table)
    (grid / "summary.md").write_text(md + "\n\nmedian tokens to target, ratios:\n" + "\n".join(ratios) + "\n")
    print(md)
    print("\n".join(ratios))
    arms: dict[str, list[Path]] = {}
    for r in runs:
        arms.setdefault(r.parent.name, []).append(r)
    target = json.loads((runs[0] / "summary.json").read_text())["target_reward"]
    plots = plot_curves(arms, grid, target) + [plot_fates_per_arm(arms, grid)]
    print("plots: " + ", ".join(map(str, plots)))
    intro = (f"{len(runs)} runs in {len(arms)} arms. Median tokens to target, ratios: {'; '.join(ratios) or 'none'}.")
    page = write_html(grid / "report.html", f"grid {grid.name}", intro, plots,
                      [("per arm (median [min, max] over seeds)", table.to_html(index=False, float_format="%.4g"))])
    print(f"report: {page}; results: {grid / 'results.csv'}")
    return page
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
