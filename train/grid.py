"""Ablation grids (arms × seeds, each arm a config overlay) and the tables and plots that read their runs.

A grid file:

    base: configs/bench_arith.yaml          # the run config every arm starts from
    output_dir: runs/ablations/budget_policies
    seeds: [0, 1, 2]
    overrides: {log.report_to: none}        # applied to every arm (dotted keys or nested mappings)
    arms:
      none: {budget.policy: none}
      marginal: {budget.policy: marginal}
      trl_grpo: {runner: trl}               # `runner` picks the entry point: ours (default) or TRL's GRPOTrainer

Every arm's full config is resolved with the normal loader, so a misspelt key fails before anything runs.
Shared by scripts/ablate.py (runs a grid) and scripts/report.py (reads a run or a grid back, without W&B).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from train.config import ConfigError, RunConfig, config_from_dict, load_config, read_yaml

RUNNERS = {"ours": "scripts/train.py", "trl": "scripts/train_trl.py"}
RESULT_COLUMNS = ["arm", "seed", "final_eval_reward", "best_eval_reward", "tokens_to_target", "tokens_total",
                  "tokens_rollout", "tokens_train", "wall_seconds", "run_dir"]


@dataclass
class Run:
    arm: str
    seed: int
    runner: str
    overrides: list[str]  # key=value, in order, after the base file
    config: RunConfig

    @property
    def dir(self) -> Path:
        return Path(self.config.output_dir)


def _flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v) if isinstance(v, list | bool) or v is None else v}")
    return out


def load_grid(path: str | Path) -> tuple[dict, list[Run]]:
    """Parse and validate a grid file; every run's config is fully resolved (ConfigError on any bad key)."""
    spec = read_yaml(path)
    unknown = set(spec) - {"base", "output_dir", "seeds", "overrides", "arms", "name"}
    if unknown:
        raise ConfigError(f"grid {path}: unknown key(s) {sorted(unknown)} (expected base, output_dir, seeds, overrides, arms)")
    for key in ("base", "output_dir", "arms"):
        if key not in spec:
            raise ConfigError(f"grid {path}: missing '{key}'")
    if not isinstance(spec["arms"], dict) or not spec["arms"]:
        raise ConfigError(f"grid {path}: 'arms' must be a mapping of arm name -> overrides")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"grid {path}: 'seeds' must be a list of integers, got {seeds!r}")
    name = spec.get("name", Path(path).stem)
    common = _flatten(spec.get("overrides") or {})
    runs = []
    for arm, overlay in spec["arms"].items():
        overlay = dict(overlay or {})
        runner = overlay.pop("runner", "ours")
        if runner not in RUNNERS:
            raise ConfigError(f"grid {path}: arm {arm}: runner must be one of {list(RUNNERS)}, got {runner!r}")
        for seed in seeds:
            overrides = common + _flatten(overlay) + [
                f"seed={seed}", f"output_dir={Path(spec['output_dir']) / arm / f'seed{seed}'}", f"log.group={name}",
                f"log.run_name={name}-{arm}-seed{seed}", "log.progress=false"]  # runs log to files: no bars
            try:
                cfg = load_config([spec["base"]], overrides)
            except ConfigError as e:
                raise ConfigError(f"grid {path}: arm {arm}: {e}") from None
            runs.append(Run(arm, seed, runner, overrides, cfg))
    return {**spec, "name": name, "seeds": seeds}, runs


def is_finished(run: Run) -> bool:
    """A run is finished when its summary exists and its recorded config is the one the grid asks for.

    The recorded config is read back through the current loader, so a key added to the schema since the run (which
    takes its default) does not force a rerun; a changed value, or a recorded key the schema no longer has, does."""
    summary, recorded = run.dir / "summary.json", run.dir / "config.yaml"
    if not (summary.is_file() and recorded.is_file()):
        return False
    try:
        return config_from_dict(yaml.safe_load(recorded.read_text())) == run.config
    except ConfigError:
        return False


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
