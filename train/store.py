"""The run directory's record stores: one parquet file per step under `trajectories/` and `prompts/` (and `reuse/`
with priced reuse).

Each step's file is written to a temporary name and renamed into place, so a run killed at any moment leaves
only complete files; `pandas.read_parquet(dir)` and `datasets.load_dataset("parquet", data_dir=dir)` load them."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from marginal_rl.budget.ledger import train_tokens, trajectory_tokens
from marginal_rl.budget.records import PromptPlan, TrajectoryPrices
from marginal_rl.budget.reuse import Reuse
from marginal_rl.rollout.types import Trajectory
from marginal_rl.train.config import ConfigError

# What a run (and `marginal-rl report`) writes under output_dir: what train.overwrite deletes, and nothing else.
RUN_FILES = ("config.yaml", "trajectories", "prompts", "reuse", "metrics.jsonl", "checkpoints", "summary.json", "final", "vllm",
             "wandb", "report.html", "budget_clusters.json")


class StorageError(RuntimeError):
    """A run file could not be written (a full disk, permissions); the message names the directory."""


def storage_error(what: str, directory: Path, exc: BaseException) -> StorageError:
    """What failed, where, and whether the device is full: torch reports a full disk as "unexpected pos", pyarrow and
    safetensors in words of their own, so the free space decides when no ENOSPC is in the chain."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = -1
    chain, cause = [], exc
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    full = any(getattr(c, "errno", None) == errno.ENOSPC for c in chain) or 0 <= free < 1 << 20
    reason = "no space left on the device" if full else f"{type(exc).__name__}: {exc}"
    return StorageError(f"{what}: could not write under {directory} ({reason}; {max(free, 0) / 2**20:.1f} MiB free)")


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start in a non-empty `out` unless resuming or overwriting (then delete the old run's files first).

    Starting afresh over an old run used to rewrite its stores but keep its checkpoints, so a later
    `resume_from=latest` resumed the other run into stores with steps missing."""
    out = Path(out)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries or resume:
        return
    if not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(f"output_dir: {out} is not empty ({shown}); resume it with train.resume_from=latest, start "
                          f"afresh with train.overwrite=true (deletes the old run's files), or choose another output_dir")
    for name in entries:
        path = out / name
        if name in RUN_FILES or name.endswith(".png"):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def trajectory_rows(trajectories: Sequence[Trajectory], prices: TrajectoryPrices, advantages: Sequence[float],
                    num_iterations: int) -> list[dict]:
    rows = []
    for t, a, fate, trained, gain, cost, risk, price in zip(
            trajectories, advantages, prices.fates, prices.trained.tolist(), prices.gain.tolist(), prices.cost.tolist(),
            prices.risk.tolist(), prices.price.tolist(), strict=True):
        toks = trajectory_tokens(t)
        rows.append({
            "traj_id": t.traj_id, "prompt_id": t.prompt_id, "group_id": t.group_id, "step": t.step,
            "behavior_version": t.behavior_version, "family": t.family, "reward": t.reward, "advantage": float(a),
            "finish_reason": t.finish_reason,
            "tokens_prompt": t.tokens_prompt, "tokens_completion": t.tokens_completion,
            "tokens_policy": t.tokens_policy, "tokens_observation": toks["observation"], "tokens_verify": toks["verify"],
            "tokens_rollout": sum(toks.values()), "tokens_train": train_tokens(t, num_iterations) if trained else 0,
            "gain": gain, "cost": cost, "risk": risk, "price": price, "fate": fate,
            **{f"rewards/{name}": value for name, value in t.rewards.items()},
            "prompt": t.prompt_text, "completion": t.completion_text, "actions": list(t.actions),
            "completion_ids": list(t.completion_ids), "completion_mask": list(t.completion_mask),
            "behavior_logprobs": list(t.behavior_logprobs),
        })
    return rows


def reuse_rows(step: int, reuse: Reuse, advantages: Sequence[float], num_iterations: int) -> list[dict]:
    """Priced reuse: one row per trajectory the buffer offered to `step` (trajectories/ holds it once, at the step that
    sampled it): its price now, its fate (`trained` = trained on again; otherwise it left the buffer), and `uses`,
    how often it has been trained on after this step (its first training included). Rollout tokens are not spent
    again: `tokens_reuse` is the update tokens, 0 when not trained."""
    return [{"step": step, "traj_id": t.traj_id, "prompt_id": t.prompt_id, "group_id": t.group_id,
             "sampled_step": t.step, "behavior_version": t.behavior_version, "staleness": staleness,
             "reward": t.reward, "advantage": float(a), "gain": gain, "cost": cost, "risk": risk, "price": price,
             "fate": fate, "uses": uses + int(trained),
             "tokens_reuse": train_tokens(t, num_iterations) if trained else 0}
            for t, a, fate, trained, gain, cost, risk, price, staleness, uses in zip(
                reuse.trajectories, advantages, reuse.prices.fates, reuse.prices.trained.tolist(),
                reuse.prices.gain.tolist(), reuse.prices.cost.tolist(), reuse.prices.risk.tolist(),
                reuse.prices.price.tolist(), reuse.prices.staleness.tolist(), reuse.uses.tolist(), strict=True)]


def prompt_rows(step: int, plan: PromptPlan) -> list[dict]:
    """One row per candidate; `probed` (the likelihood probe scored it this step) only when the probe is on, `pilot`
    (the samples its group drew before the rest were priced) only with budget.pilot_samples."""
    rows = [{"step": step, "prompt_id": pid, "samples": n, "pass_rate": rate, "gain": gain, "cost": cost,
             "price": price, "fate": "sampled" if n > 0 else "skipped", "reason": reason}
            for pid, n, rate, gain, cost, price, reason in zip(
                plan.prompt_ids, plan.samples.tolist(), plan.pass_rate.tolist(), plan.gain.tolist(),
                plan.cost.tolist(), plan.price.tolist(), plan.reasons, strict=True)]
    if plan.probed is not None:
        for row, probed in zip(rows, plan.probed.tolist(), strict=True):
            row["probed"] = probed
    if plan.pilot is not None:
        for row, pilot in zip(rows, plan.pilot.tolist(), strict=True):
            row["pilot"] = pilot
    return rows


class StepStore:
    """Append-only per-step parquet files in one directory."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step:06d}.parquet"

    def write(self, step: int, rows: list[dict]) -> None:
        if not rows:
            return
        tmp = self.dir / f".tmp-step-{step:06d}.parquet"
        try:
            pd.DataFrame(rows).to_parquet(tmp, index=False)
            os.replace(tmp, self.path(step))
        except OSError as e:  # pyarrow raises OSError subclasses; nothing half-written stays under the final name
            error = storage_error(f"step {step} of the store", self.dir, e)
            tmp.unlink(missing_ok=True)
            raise error from e

    def truncate(self, from_step: int) -> None:
        """Remove the files of steps >= from_step (a resumed run rewrites them) and any partial temporaries."""
        for f in self.dir.glob(".tmp-*"):
            f.unlink()
        for f in self.dir.glob("step-*.parquet"):
            if int(f.stem.split("-")[1]) >= from_step:
                f.unlink()

    def read(self) -> pd.DataFrame:
        files = sorted(self.dir.glob("step-*.parquet"))
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()


class MetricsLog:
    """metrics.jsonl: every scalar the step logged, one JSON line per step (NaN as null), what `marginal-rl report`
    plots without W&B. Appended and flushed line by line; a resumed run drops the lines after its checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def truncate(self, after_step: int) -> None:
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
            self.path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: None if isinstance(v, float) and v != v else v for k, v in metrics.items()
                                if isinstance(v, int | float)}}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise storage_error(f"step {step} of {self.path.name}", self.path.parent, e) from e

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line] if self.path.is_file() else []


def write_final(out: Path, model, tokenizer, summary: dict, state_dict: dict | None = None) -> None:
    """The end of a run: final weights (only the adapter with LoRA) and summary.json, and the one-line result.
    `state_dict`: the full weights when `model`'s own are sharded (FSDP), from `accelerator.get_state_dict`."""
    model.save_pretrained(out / "final", state_dict=state_dict)
    tokenizer.save_pretrained(out / "final")
    tmp = out / ".summary.json.tmp"  # written last and renamed: a summary.json is the mark of a finished run
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "summary.json")
    print(f"eval: start {summary['initial_eval_reward']:.3f} -> end {summary['final_eval_reward']:.3f} "
          f"(greedy {summary['final_eval_reward_greedy']:.3f}); tokens {summary['tokens']['total']:,}; "
          f"{summary['wall_seconds']:.0f} s; run directory {out}")
