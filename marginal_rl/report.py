"""Tables and plots of finished runs, read from their files (no W&B needed): one run, or a grid of them.

    marginal-rl report runs/quickstart                         # one run
    marginal-rl report runs/ablations/budget_policies          # a grid written by `marginal-rl ablate`
    marginal-rl report runs/ablations/bench_v2_fine --reference none_8   # every arm against another arm

A run: eval rewards, tokens by use and by fate recomputed from the trajectory store, tokens to target, waste.
A grid: the per-arm table (median [min, max] over seeds) and the reward-vs-tokens / reward-vs-wall plots.
Both also write report.html, one page readable offline, with its PNGs beside it: for a run, eval reward against
tokens and steps, tokens by use and by fate over the run, the controller's price, the price components'
histograms, per-family eval rewards over steps, and the last step's top and bottom priced trajectories; for a grid,
the curves per arm with their seed bands, tokens by fate per arm, and the table; with the reference arm (`marginal`
unless --reference names another), every arm against it paired by seed, at the two targets and at each relative
target start + δ (ratios_by_target.csv/.png: where on the way up an arm's edge lives).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

RESULT_COLUMNS = ["arm", "seed", "policy", "initial_eval_reward", "final_eval_reward", "best_eval_reward", "tokens_to_target",
                  "tokens_to_target_delta", "auc", "tokens_total", "tokens_rollout", "tokens_train", "tokens_reuse", "tokens_probe",
                  "steps",
                  "tokens_per_step", "zero_signal_group_fraction", "hindsight_bound_tokens", "tokens_over_hindsight",
                  "wall_seconds", "run_dir"]
REFERENCE_ARM = "marginal"  # the arm every other arm's ratios are against
MATCHED = 0.25  # an arm is compute-matched to the reference when its median tokens/step is within ±25 % of it


def result_row(arm: str, seed: int, run_dir: Path, budget: float | None = None) -> dict:
    """One run's figures. `budget`: the grid's common token budget, over which the reward-token AUC is taken (None:
    the run's own total)."""
    from marginal_rl.stats import reward_auc

    s = json.loads((run_dir / "summary.json").read_text())
    led = s["ledger"]
    hist = s["eval_history"]
    metric = s.get("target_metric", "eval/reward")
    steps = s.get("steps")  # summaries from before benchmark v2 lack the newer fields: None
    return {"arm": arm, "seed": seed, "policy": s.get("policy"), "initial_eval_reward": s.get("initial_eval_reward", hist[0]["eval/reward"]),
            "final_eval_reward": s["final_eval_reward"], "best_eval_reward": s["best_eval_reward"],
            "tokens_to_target": s["tokens_to_target"], "tokens_to_target_delta": s.get("tokens_to_target_delta"),
            "auc": reward_auc([h["tokens"] for h in hist], [h[metric] for h in hist], budget or s["tokens"]["total"]),
            "tokens_total": s["tokens"]["total"], "tokens_rollout": s["tokens"]["rollout"],
            "tokens_train": s["tokens"]["train"], "tokens_reuse": s["tokens"].get("reuse", 0),
            "tokens_probe": s["tokens"].get("probe", 0), "steps": s.get("steps"),
            "tokens_per_step": s["tokens"]["total"] / steps if steps else None,
            "zero_signal_group_fraction": led.get("zero_signal_groups", 0) / led["groups"] if led.get("groups") else None,
            "hindsight_bound_tokens": s.get("hindsight_bound_tokens"),
            "tokens_over_hindsight": s.get("tokens_over_hindsight"),
            "wall_seconds": s["wall_seconds"], "run_dir": str(run_dir)}


def common_budget(run_dirs: list[Path]) -> float:
    """The grid's common token budget: train.max_tokens when every run had the same one, else the smallest total any
    run spent (so every run's curve covers it)."""
    summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs]
    budgets = {s.get("max_tokens") for s in summaries}
    if len(budgets) == 1 and None not in budgets:
        return float(budgets.pop())
    return float(min(s["tokens"]["total"] for s in summaries))


def summarize(results, budget: float):
    """Per arm over its seeds: how many reached each target, tokens to target (median [min, max]; a run that never
    reached it counts as infinitely many, so a median is finite only when most seeds got there), the AUC's mean and
    95 % bootstrap interval, and the medians of the rest."""
    import pandas as pd

    from marginal_rl.stats import mean_interval

    df = pd.DataFrame(results)
    rows = []
    for arm, g in df.groupby("arm", sort=False):
        row = {"arm": arm, "runs": len(g)}
        for col in ("tokens_to_target", "tokens_to_target_delta"):
            t = pd.to_numeric(g[col], errors="coerce").fillna(math.inf)
            row[f"reached_{col.removeprefix('tokens_to_')}"] = f"{int((t < math.inf).sum())}/{len(g)}"
            row[f"{col}_median"], row[f"{col}_min"], row[f"{col}_max"] = t.median(), t.min(), t.max()
        row["auc_mean"], row["auc_lo"], row["auc_hi"] = mean_interval(g.auc.to_numpy())
        for col in ("initial_eval_reward", "final_eval_reward", "tokens_total", "tokens_per_step",
                    "zero_signal_group_fraction", "tokens_over_hindsight", "wall_seconds"):
            values = pd.to_numeric(g[col], errors="coerce")
            row[f"{col}_median"], row[f"{col}_min"], row[f"{col}_max"] = values.median(), values.min(), values.max()
        rows.append(row)
    return pd.DataFrame(rows)


def compare(results, table, budget: float, reference: str = REFERENCE_ARM):
    """Every other arm against `reference`, paired by seed: the geometric mean of baseline / reference tokens to each
    target (censored at the budget; seeds that start at the target or where neither run reached it are left out,
    `ratio_seeds` counts the rest) and
    the reference's AUC minus the baseline's, each with a 95 % bootstrap interval; `matched`: the baseline's median
    tokens/step is within ±25 % of the reference's; `variant`: the arm runs the reference's budget policy (or, in
    summaries that do not record it, is named `<reference>_...`), so it is a variant of the reference, not a
    baseline."""
    import pandas as pd

    from marginal_rl.stats import censored_paired_ratio, mean_interval

    df = pd.DataFrame(results)
    if reference not in set(df.arm):
        return pd.DataFrame()
    ref = df[df.arm == reference].set_index("seed")
    tps = dict(zip(table.arm, table.tokens_per_step_median, strict=True))
    rows = []
    for arm, g in df[df.arm != reference].groupby("arm", sort=False):
        g = g.set_index("seed")
        seeds = sorted(set(g.index) & set(ref.index))
        if not seeds:
            continue
        policy, ref_policy = g.policy.iloc[0], ref.policy.iloc[0]
        row = {"arm": arm, "seeds": len(seeds), "tokens_per_step": tps[arm],
               "matched": abs(tps[arm] / tps[reference] - 1) <= MATCHED,
               "variant": (policy == ref_policy if isinstance(policy, str) and isinstance(ref_policy, str)
                           else arm.startswith(f"{reference}_"))}
        for col, name in (("tokens_to_target", "ratio"), ("tokens_to_target_delta", "ratio_delta")):
            row[f"{name}_seeds"], row[name], row[f"{name}_lo"], row[f"{name}_hi"] = censored_paired_ratio(
                *(list(x.loc[seeds, col].where(x.loc[seeds, col].notna(), None)) for x in (g, ref)), budget)
        row["auc_diff"], row["auc_diff_lo"], row["auc_diff_hi"] = mean_interval(
            ref.loc[seeds, "auc"].to_numpy() - g.loc[seeds, "auc"].to_numpy())
        rows.append(row)
    return pd.DataFrame(rows)


SWEEP_DELTAS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07)


def target_sweep(results, budget: float, reference: str = REFERENCE_ARM, deltas=SWEEP_DELTAS):
    """Every other arm against `reference` at each relative target start + δ (δ in `deltas`), paired by seed as in
    `compare`: where on the way up an arm's edge lives (early, or only on the plateau). One row per (arm, δ): seeds
    used, the geometric mean of arm / reference tokens to start + δ and its 95 % interval. Read from each run's
    eval history (summary.json)."""
    import pandas as pd

    from marginal_rl.stats import censored_paired_ratio, tokens_to_gain

    df = pd.DataFrame(results)
    if reference not in set(df.arm):
        return pd.DataFrame()
    reached = {}  # (arm, seed) -> tokens to start + δ for each δ
    for r in results:
        s = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        metric = s.get("target_metric", "eval/reward")
        tokens, rewards = [h["tokens"] for h in s["eval_history"]], [h[metric] for h in s["eval_history"]]
        reached[r["arm"], r["seed"]] = [tokens_to_gain(tokens, rewards, d) for d in deltas]
    ref_seeds = set(df.seed[df.arm == reference])
    rows = []
    for arm in dict.fromkeys(df.arm[df.arm != reference]):
        seeds = sorted(set(df.seed[df.arm == arm]) & ref_seeds)
        for i, d in enumerate(deltas):
            used, ratio, lo, hi = censored_paired_ratio([reached[arm, k][i] for k in seeds],
                                                        [reached[reference, k][i] for k in seeds], budget)
            rows.append({"arm": arm, "delta": d, "seeds": used, "ratio": ratio, "ratio_lo": lo, "ratio_hi": hi})
    return pd.DataFrame(rows)


def sweep_markdown(sweep, reference: str = REFERENCE_ARM) -> str:
    """The sweep as one row per arm, one column per δ: ratio [95 % CI] (seeds used)."""
    if sweep.empty:
        return ""
    deltas = list(dict.fromkeys(sweep.delta))
    rows = [[arm] + [f"{_ci(r, 'ratio', '.2f', 'x')} ({r['seeds']})" for r in g.to_dict("records")]
            for arm, g in sweep.groupby("arm", sort=False)]
    return "\n".join([f"arm / {reference} tokens to start + δ, paired by seed [95 % CI] (seeds used):", "",
                      *_markdown_table(["arm", *(f"start + {d:g}" for d in deltas)], rows)])


def _interval(value: float, lo: float, hi: float, fmt: str, unit: str = "") -> str:
    """`value<unit> [lo, hi]`, each formatted with `fmt`."""
    return f"{format(value, fmt)}{unit} [{format(lo, fmt)}, {format(hi, fmt)}]"


def _range(r: dict, col: str, fmt: str) -> str:
    return _interval(r[col + "_median"], r[col + "_min"], r[col + "_max"], fmt)


def _ci(r: dict, col: str, fmt: str, unit: str = "") -> str:
    return _interval(r[col], r[col + "_lo"], r[col + "_hi"], fmt, unit)


def _markdown_table(header: list[str], rows: list[list]) -> list[str]:
    return [f"| {' | '.join(header)} |", "|" + " --- |" * len(header), *(f"| {' | '.join(map(str, r))} |" for r in rows)]


def summary_markdown(table, target: float, delta: float | None) -> str:
    header = ["arm", "runs", f"reached {target}", f"tokens to {target} (median [min, max])", f"reached start+{delta}",
              f"tokens to start+{delta}", "AUC (mean [95 % CI])", "final eval", "tokens/step", "zero-signal groups",
              "tokens / hindsight bound", "wall s"]
    rows = [[r["arm"], r["runs"], r["reached_target"], _range(r, "tokens_to_target", ",.0f"),
             r["reached_target_delta"], _range(r, "tokens_to_target_delta", ",.0f"),
             _interval(r["auc_mean"], r["auc_lo"], r["auc_hi"], ".4f"), _range(r, "final_eval_reward", ".3f"),
             f"{r['tokens_per_step_median']:,.0f}", f"{r['zero_signal_group_fraction_median']:.2f}",
             f"{r['tokens_over_hindsight_median']:.2f}", f"{r['wall_seconds_median']:.0f}"]
            for r in table.to_dict("records")]
    return "\n".join(_markdown_table(header, rows))


def comparison_markdown(ratios, reference: str = REFERENCE_ARM) -> str:
    """The ratio table, then the reference against the best baseline overall and the best at matched compute, on each
    target (variants of the reference, arms of its budget policy, are in the table but are not baselines)."""
    if ratios.empty:
        return ""
    header = ["baseline", "seeds (absolute / relative target)", "tokens/step", "matched",
              f"baseline / {reference}, tokens to target [95 % CI]", "to start + delta [95 % CI]",
              f"AUC {reference} − baseline [95 % CI]"]
    lines = _markdown_table(header, [
        [r["arm"], f"{r['ratio_seeds']} / {r['ratio_delta_seeds']}", f"{r['tokens_per_step']:,.0f}",
         "yes" if r["matched"] else "no", _ci(r, "ratio", ".2f", "x"), _ci(r, "ratio_delta", ".2f", "x"),
         _ci(r, "auc_diff", "+.4f")] for r in ratios.to_dict("records")])
    lines.append("")
    baselines = ratios[~ratios.variant.astype(bool)]
    for label, subset in (("best baseline", baselines),
                          ("best baseline at matched compute", baselines[baselines.matched])):
        for col, target in (("ratio", "the absolute target"), ("ratio_delta", "start + delta")):
            if subset[col].notna().any():  # the baseline that comes closest to (or beats) the reference
                b = subset.loc[subset[col].idxmin()].to_dict()
                lines.append(f"- {label}, {target}: {b['arm']}: {_ci(b, col, '.2f', 'x')} ({reference} needs that many "
                             f"times fewer tokens)")
    return "\n".join(lines)


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


def plot_curves(runs: dict[str, list[Path]], out_dir: Path, target: float | None = None,
                dashed: set[str] = frozenset()) -> list[Path]:
    """eval reward against total tokens, wall time and training step: one line per arm (the mean over seeds,
    interpolated on a common grid up to where the shortest seed ends) with the 95 % interval of the mean as a band
    (normal approximation, ±1.96 standard errors); the arms in `dashed` (compute-matched baselines) are dashed."""
    import numpy as np

    plt = _pyplot()
    written = []
    for x_key, label, fname, gain in (("tokens", "total tokens", "reward_vs_tokens.png", False),
                                      ("tokens", "total tokens", "gain_vs_tokens.png", True),
                                      ("seconds", "wall seconds", "reward_vs_wall.png", False),
                                      ("step", "training step", "reward_vs_steps.png", False)):
        if gain and not any(len(dirs) > 1 for dirs in runs.values()):
            continue  # one seed: the gain plot is the reward plot shifted
        fig, ax = plt.subplots(figsize=(8, 5))
        for arm, dirs in runs.items():
            curves = [_seed_curve(d, x_key, gain) for d in dirs]
            grid = np.linspace(0, min(x[-1] for x, _ in curves), 60)
            _mean_and_band(ax, grid, np.array([np.interp(grid, x, y) for x, y in curves]), band=len(runs) <= 4,
                           ls="--" if arm in dashed else "-", lw=1.6,
                           label=f"{arm} ({len(dirs)} seed{'s' * (len(dirs) > 1)})")  # >4 bands hide each other
        if target is not None and not gain:
            ax.axhline(target, color="grey", ls=":", lw=1, label=f"target {target}")
        ax.set_xlabel(label)
        what = "eval reward − the seed's start" if gain else "eval reward"
        ax.set_ylabel(what)
        several = any(len(dirs) > 1 for dirs in runs.values())
        band = ", band: 95 % CI" if len(runs) <= 4 else ""
        ax.set_title(f"{what} against {label}" + (f" (mean over seeds{band})" if several else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        written.append(_save(plt, fig, out_dir / fname))
    return written


def _seed_curve(run_dir: Path, x_key: str, gain: bool = False):
    """(x, eval reward) of one run's evals, x one of tokens | seconds | step; `gain`: minus the run's start."""
    import numpy as np

    hist = json.loads((run_dir / "summary.json").read_text())["eval_history"]
    y = np.array([h["eval/reward"] for h in hist])
    return np.array([h[x_key] for h in hist], float), y - y[0] if gain else y


def _mean_and_band(ax, grid, ys, band: bool = True, alpha: float = 0.12, **line) -> None:
    """The mean over seeds (rows of `ys`) as a line and, with several seeds, its 95 % interval as a band (normal
    approximation, ±1.96 standard errors)."""
    import numpy as np

    mean = ys.mean(axis=0)
    (drawn,) = ax.plot(grid, mean, **line)
    if band and len(ys) > 1:
        half = 1.96 * ys.std(axis=0, ddof=1) / np.sqrt(len(ys))
        ax.fill_between(grid, mean - half, mean + half, color=drawn.get_color(), alpha=alpha)


def plot_pairs(runs: dict[str, list[Path]], out_dir: Path, matched: set[str],
               reference: str = REFERENCE_ARM) -> Path | None:
    """One panel per baseline: its eval gain over the seed's start against tokens beside the reference's, each the
    mean over seeds with its 95 % interval as a band (compute-matched baselines dashed, their panel titled so)."""
    import numpy as np

    others = [a for a in runs if a != reference]
    if reference not in runs or not others:
        return None
    plt = _pyplot()
    end = min(json.loads((d / "summary.json").read_text())["eval_history"][-1]["tokens"]
              for dirs in runs.values() for d in dirs)
    grid = np.linspace(0, end, 60)
    cols = min(3, len(others))
    rows = -(-len(others) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.1 * rows), sharex=True, sharey=True, squeeze=False)
    for k, ax in enumerate(axes.flat[len(others):], start=len(others)):
        ax.set_visible(False)
        axes.flat[k - cols].xaxis.set_tick_params(labelbottom=True)  # the panel above is its column's last
        axes.flat[k - cols].set_xlabel("total tokens")
    for ax, arm in zip(axes.flat, others, strict=False):
        for name, color, ls in ((reference, "C0", "-"), (arm, "C3", "--" if arm in matched else "-")):
            ys = np.array([np.interp(grid, *_seed_curve(d, "tokens", gain=True)) for d in runs[name]])
            _mean_and_band(ax, grid, ys, alpha=0.15, color=color, ls=ls, lw=1.5, label=name)
        ax.set_title(f"{arm}{' (matched compute)' if arm in matched else ''}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[:, 0]:
        ax.set_ylabel("eval reward − start")
    for ax in axes[-1, :]:
        ax.set_xlabel("total tokens")
    fig.suptitle(f"each baseline against {reference}: mean over seeds, band: 95 % CI", fontsize=10)
    return _save(plt, fig, out_dir / "gain_pairs.png")


def plot_ratios(ratios, out_dir: Path, reference: str = REFERENCE_ARM) -> Path:
    """Baseline / reference tokens to each target per baseline: the geometric mean over seeds and its 95 % interval
    (log axis; right of 1: the reference needs fewer tokens)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(ratios) + 1.6))
    for offset, (col, label) in ((-0.15, ("ratio", "absolute target")), (0.15, ("ratio_delta", "start + delta"))):
        ys = [i + offset for i in range(len(ratios))]
        err = [ratios[col] - ratios[f"{col}_lo"], ratios[f"{col}_hi"] - ratios[col]]
        ax.errorbar(ratios[col], ys, xerr=err, fmt="o", capsize=3, label=label)
    ax.axvline(1, color="grey", lw=1)
    ax.set_yticks(range(len(ratios)))
    ax.set_yticklabels([f"{a}{' (matched)' if m else ''}" for a, m in zip(ratios.arm, ratios.matched, strict=True)])
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.xaxis.set_major_locator(FixedLocator([0.25, 0.33, 0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 3, 4]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel(f"baseline / {reference} tokens to target (geometric mean over seeds, 95 % CI)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    return _save(plt, fig, out_dir / "ratios.png")


def plot_sweep(sweep, out_dir: Path, reference: str = REFERENCE_ARM) -> Path:
    """Arm / reference tokens to start + δ against δ, one line per arm with its 95 % interval (log axis; above 1:
    the reference needs fewer tokens to that target)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4))
    arms = list(dict.fromkeys(sweep.arm))
    width = 0.004 / max(len(arms), 1)
    for k, (arm, g) in enumerate(sweep.groupby("arm", sort=False)):
        x = g.delta + (k - (len(arms) - 1) / 2) * width
        ax.errorbar(x, g.ratio, yerr=[g.ratio - g.ratio_lo, g.ratio_hi - g.ratio], fmt="o-", capsize=2, ms=3,
                    lw=1, label=arm)
    ax.axhline(1, color="grey", lw=1)
    ax.set_yscale("log")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.yaxis.set_major_locator(FixedLocator([0.125, 0.25, 0.33, 0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 3, 4, 6, 8]))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("relative target: start + δ (eval reward)")
    ax.set_ylabel(f"arm / {reference} tokens to it")
    ax.set_title(f"tokens to each relative target against {reference}: geometric mean over seeds, 95 % CI",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(plt, fig, out_dir / "ratios_by_target.png")


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
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.tick_params(axis="x", rotation=30)
    return _save(plt, fig, out_dir / "tokens_by_fate_per_arm.png")


CAPTIONS = {
    "reward_vs_tokens.png": "Eval reward against the total tokens spent (rollout + training).",
    "reward_vs_steps.png": "Eval reward against the training step.",
    "gain_vs_tokens.png": "Eval reward minus each seed's starting eval against total tokens: the seeds' different "
                          "starting policies no longer widen the band (the comparison the paired ratios make).",
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
    "gain_pairs.png": "One panel per baseline: its eval gain over the seed's start against total tokens beside the "
                      "reference arm's, each the mean over seeds with its 95 % interval as a band (matched-compute "
                      "baselines dashed).",
    "ratios.png": "Each baseline's tokens to target over the reference arm's, paired by seed: the geometric mean and "
                  "its 95 % bootstrap interval, for the absolute target and the start + delta one (right of 1: the "
                  "reference needs fewer tokens).",
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
        if (run / "reuse").is_dir() and any((run / "reuse").glob("*.parquet")):  # priced reuse: its own store
            reuse = pd.read_parquet(run / "reuse")
            again = reuse[reuse.fate == "trained"]
            print(f"priced reuse (store): {len(again):,} reuses of {again.traj_id.nunique():,} trajectories, "
                  f"{int(reuse.tokens_reuse.sum()):,} update tokens; most uses of one trajectory "
                  f"{int(reuse.uses.max())}")
        prompts = run / "prompts"
        if prompts.is_dir() and any(prompts.glob("*.parquet")):
            plans = pd.read_parquet(prompts)
            if "probed" in plans.columns:  # the likelihood probe: the plan records what it scored
                probed = plans[plans.probed]
                print(f"likelihood probe (store): {len(probed):,} probes of {probed.prompt_id.nunique():,} prompts, "
                      f"{s['tokens'].get('probe', 0):,} tokens; {int((probed.samples > 0).sum()):,} of them sampled "
                      f"in the step they were probed")
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


def report_grid(grid: Path, reference: str | None = None) -> Path:
    """`reference`: the arm every other arm is compared with (None: `marginal`, and no comparison when the grid has
    no such arm; a named arm the grid lacks is an error)."""
    runs = sorted(p.parent for p in grid.glob("*/seed*/summary.json"))
    if not runs:
        raise SystemExit(f"{grid}: no finished runs (expected <arm>/seed<k>/summary.json)")
    names = sorted({r.parent.name for r in runs})
    if reference is not None and reference not in names:
        raise SystemExit(f"--reference {reference}: no finished runs of that arm in {grid}; its arms: "
                         f"{', '.join(names)}")
    reference = reference or REFERENCE_ARM
    budget = common_budget(runs)
    results = [result_row(r.parent.name, int(r.name.removeprefix("seed")), r, budget) for r in runs]
    with (grid / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(results)
    first = json.loads((runs[0] / "summary.json").read_text())
    target, delta = first["target_reward"], first.get("target_delta")
    table = summarize(results, budget)
    ratios = compare(results, table, budget, reference)
    sweep = target_sweep(results, budget, reference)
    # summary.csv: per arm, with its ratios against the reference (and their intervals) beside its own figures
    merged = table if ratios.empty else table.merge(ratios.drop(columns="tokens_per_step"), on="arm", how="left")
    merged.to_csv(grid / "summary.csv", index=False)
    if not ratios.empty:
        ratios.to_csv(grid / "ratios.csv", index=False)
        sweep.to_csv(grid / "ratios_by_target.csv", index=False)
    md = (f"common token budget {budget:,.0f}; target {target} ({first.get('target_metric', 'eval/reward')}), "
          f"start + {delta}\n\n{summary_markdown(table, target, delta)}\n\n{comparison_markdown(ratios, reference)}"
          f"\n\n{sweep_markdown(sweep, reference)}\n")
    (grid / "summary.md").write_text(md)
    print(md)
    arms: dict[str, list[Path]] = {}
    for r in runs:
        arms.setdefault(r.parent.name, []).append(r)
    dashed = set(ratios.arm[ratios.matched]) if not ratios.empty else set()
    plots = plot_curves(arms, grid, target, dashed) + [plot_fates_per_arm(arms, grid)]
    if not ratios.empty:
        plots += [p for p in (plot_pairs(arms, grid, dashed, reference), plot_ratios(ratios, grid, reference),
                              plot_sweep(sweep, grid, reference)) if p]
    print("plots: " + ", ".join(map(str, plots)))
    intro = f"{len(runs)} runs in {len(arms)} arms, common token budget {budget:,.0f}."
    tables = [("per arm (median [min, max] over seeds; AUC: mean [95 % CI])",
               table.to_html(index=False, float_format="%.4g"))]
    if not ratios.empty:
        tables.append((f"against {reference}, paired by seed", ratios.to_html(index=False, float_format="%.4g")))
        tables.append((f"tokens to start + δ against {reference}, paired by seed",
                       sweep.to_html(index=False, float_format="%.4g")))
    page = write_html(grid / "report.html", f"grid {grid.name}", intro, plots, tables)
    print(f"report: {page}; results: {grid / 'results.csv'}")
    return page


def report(path: Path, reference: str | None = None) -> int:
    """Report a run directory (it has summary.json) or a grid directory (`reference`: its arm to compare against);
    2 when `path` is neither, or `reference` is given for a single run."""
    if (path / "summary.json").is_file():
        if reference is not None:
            print(f"error: --reference compares the arms of a grid; {path} is one run", file=sys.stderr)
            return 2
        report_run(path)
    elif path.is_dir():
        report_grid(path, reference)
    else:
        print(f"error: {path} is not a directory", file=sys.stderr)
        return 2
    return 0
