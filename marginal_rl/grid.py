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
`marginal-rl ablate` runs a grid (each run its own process, as many at a time as --parallel), then tabulates and
plots it (marginal_rl.report). Interrupted? Run the same command again: finished runs are skipped, half-written ones
are cleaned and rerun.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from marginal_rl.report import report_grid
from marginal_rl.train.config import ConfigError, RunConfig, config_from_dict, load_config, read_yaml

# The command each runner's runs start with; `--config BASE key=value ...` follow.
RUNNERS = {"ours": [sys.executable, "-m", "marginal_rl", "train"],
           "trl": [sys.executable, "-m", "marginal_rl", "train-trl"]}


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
    takes its default) does not force a rerun; a changed value, or a recorded key the schema no longer has, does.
    The W&B names a grid derives from its own name (log.group, log.run_name) do not count: they change no result, and
    the same runs reached through a grid file of another name must not be deleted and redone."""
    summary, recorded = run.dir / "summary.json", run.dir / "config.yaml"
    if not (summary.is_file() and recorded.is_file()):
        return False
    try:
        cfg = config_from_dict(yaml.safe_load(recorded.read_text()))
    except ConfigError:
        return False
    names = {"group": run.config.log.group, "run_name": run.config.log.run_name}
    return dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, **names)) == run.config


def launch(run: Run, base: str, log_dir: Path) -> subprocess.Popen:
    if run.dir.exists():  # half-written by an interrupted grid: start it again from nothing
        shutil.rmtree(run.dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = (log_dir / f"{run.arm}-seed{run.seed}.log").open("w")
    cmd = [*RUNNERS[run.runner], "--config", base, *run.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_grid(path: str, parallel: int = 1, dry_run: bool = False, arms: list[str] | None = None) -> int:
    """Run every unfinished run of the grid at `path` (of the named `arms` only, when given), then write
    results.csv, summary.md / summary.csv and the plots under its output_dir, over every arm with finished runs.
    Returns the exit status: 2 for a bad grid or an arm it lacks, 1 if a run failed, else 0."""
    try:
        spec, runs = load_grid(path)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if arms:
        missing = [a for a in arms if a not in spec["arms"]]
        if missing:
            print(f"config error: --arms: grid {path} has no arm(s) {missing}; its arms: {list(spec['arms'])}",
                  file=sys.stderr)
            return 2
        runs = [r for r in runs if r.arm in arms]
    out = Path(spec["output_dir"])
    todo = [r for r in runs if not is_finished(r)]
    print(f"grid {spec['name']}: {len(runs)} runs ({len(runs) - len(todo)} finished, {len(todo)} to run) -> {out}")
    if dry_run:
        for r in runs:
            print(f"  {r.arm:<12} seed {r.seed}  {'done' if r not in todo else r.runner}  {r.dir}")
        return 0

    from tqdm.auto import tqdm

    failed = []
    active: list[tuple[Run, subprocess.Popen]] = []
    queue = list(todo)
    with tqdm(total=len(todo), desc="grid", dynamic_ncols=True) as bar:
        while queue or active:
            while queue and len(active) < parallel:
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

    if any((r.dir / "summary.json").is_file() for r in runs):
        report_grid(out)  # results.csv, summary.md/.csv, the plots and report.html
    return 1 if failed else 0
