"""Run an ablation grid (arms × seeds, each arm a config overlay), then tabulate and plot it.

    python scripts/ablate.py --config configs/ablations/budget_policies.yaml [--parallel 2] [--dry-run]

Writes every run's directory under the grid's output_dir (<arm>/seed<k>/), results.csv (one row per run),
summary.md / summary.csv (median and [min, max] per arm) and reward_vs_{tokens,wall,steps}.png.
All runs share a W&B group (the grid's name). Interrupted? Run the same command again: finished runs are skipped,
half-written ones are cleaned and rerun. Grid format: docs/ablations.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train.config import ConfigError  # noqa: E402
from train.grid import (  # noqa: E402
    RESULT_COLUMNS,
    RUNNERS,
    Run,
    is_finished,
    load_grid,
    plot_curves,
    ratio_lines,
    result_row,
    summarize,
    summary_markdown,
)


def launch(run: Run, base: str, log_dir: Path) -> subprocess.Popen:
    if run.dir.exists():  # half-written by an interrupted grid: start it again from nothing
        shutil.rmtree(run.dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = (log_dir / f"{run.arm}-seed{run.seed}.log").open("w")
    cmd = [sys.executable, str(ROOT / RUNNERS[run.runner]), "--config", base, *run.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, help="grid YAML (see docs/ablations.md)")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (each a separate process)")
    p.add_argument("--dry-run", action="store_true", help="validate the grid and list its runs, run nothing")
    args = p.parse_args(argv)
    try:
        spec, runs = load_grid(args.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    out = Path(spec["output_dir"])
    todo = [r for r in runs if not is_finished(r)]
    print(f"grid {spec['name']}: {len(runs)} runs ({len(runs) - len(todo)} finished, {len(todo)} to run) -> {out}")
    if args.dry_run:
        for r in runs:
            print(f"  {r.arm:<12} seed {r.seed}  {'done' if r not in todo else r.runner}  {r.dir}")
        return 0

    from tqdm.auto import tqdm

    failed = []
    active: list[tuple[Run, subprocess.Popen]] = []
    queue = list(todo)
    with tqdm(total=len(todo), desc="grid", dynamic_ncols=True) as bar:
        while queue or active:
            while queue and len(active) < args.parallel:
                run = queue.pop(0)
                active.append((run, launch(run, spec["base"], out / "logs")))
            time.sleep(0.5)
            for run, proc in list(active):
                if proc.poll() is None:
                    continue
                active.remove((run, proc))
                if proc.returncode != 0:
                    failed.append(run)
                    tqdm.write(f"FAILED {run.arm} seed {run.seed} (exit {proc.returncode}): see {out / 'logs'}")
                bar.update(1)
                bar.set_postfix(last=f"{run.arm}/seed{run.seed}")

    done = [r for r in runs if (r.dir / "summary.json").is_file()]
    results = [result_row(r.arm, r.seed, r.dir) for r in done]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(results)
    table = summarize(results)
    table.to_csv(out / "summary.csv", index=False)
    md = summary_markdown(table)
    ratios = ratio_lines(table)
    (out / "summary.md").write_text(md + "\n\nmedian tokens to target, ratios:\n" + "\n".join(ratios) + "\n")
    arms: dict[str, list[Path]] = {}
    for r in done:
        arms.setdefault(r.arm, []).append(r.dir)
    plots = plot_curves(arms, out, runs[0].config.budget.target_reward)
    print(md)
    print("\n".join(ratios))
    print(f"results: {out / 'results.csv'}; plots: {', '.join(str(p) for p in plots)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
