"""Loggers (W&B, offline when no credentials are present, never an interactive prompt; or nothing) and the progress
report on the console (a bar on a terminal, a plain line every N steps in a log file)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

COMPLETIONS = "completions"  # the run's one table of sampled completions, appended as the run goes


class NoOpLogger:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_histograms(self, values: dict[str, np.ndarray], step: int) -> None:
        pass

    def log_completions(self, columns: list[str], rows: list[list], step: int) -> None:
        pass

    def describe(self) -> str:
        """Where the run's metrics go, for the console."""
        return "W&B: off (log.report_to=none)"

    def finish(self) -> None:
        pass


class WandbLogger(NoOpLogger):
    def __init__(self, project: str, name: str, group: str, config: dict, directory: Path):
        import wandb

        # no key and no mode chosen (WANDB_MODE unset or empty): offline, never a login prompt
        if not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()) and not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        directory.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, group=group or None, config=config, dir=str(directory),
                              settings=wandb.Settings(console="off"))
        # charts can be drawn against the tokens spent as well as the step: eval/ and ledger/ default to it
        self.run.define_metric("ledger/tokens_total")
        for prefix in ("eval/*", "ledger/*"):
            self.run.define_metric(prefix, step_metric="ledger/tokens_total", step_sync=True)
        self.table = None  # the completions table, created with the first step's columns

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_histograms(self, values: dict[str, np.ndarray], step: int) -> None:
        self.run.log({k: self.wandb.Histogram(np.asarray(v)) for k, v in values.items() if len(v)}, step=step)

    def log_completions(self, columns: list[str], rows: list[list], step: int) -> None:
        """Append `rows` to the run's one completions table (W&B's incremental table: each log adds the new rows)."""
        if self.table is None:
            self.table = self.wandb.Table(columns=columns, log_mode="INCREMENTAL")
        keep = [columns.index(c) if c in columns else None for c in self.table.columns]  # the first step's columns
        for row in rows:
            self.table.add_data(*(row[i] if i is not None else None for i in keep))
        self.run.log({COMPLETIONS: self.table}, step=step)

    def describe(self) -> str:
        if self.run.settings.mode == "offline":
            run_dir = Path(self.run.dir).parent  # .../wandb/offline-run-<time>-<id>
            return f"W&B: offline run in {run_dir} (upload it with `wandb sync {run_dir}`)"
        return f"W&B: {self.run.url}"

    def finish(self) -> None:
        self.run.finish()


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text()


class Progress:
    """The training progress on the main process: a tqdm bar on a terminal; in a log file (not a TTY) one plain line
    every `every` steps and at the last, so a log does not fill with redrawn bars."""

    def __init__(self, total: int | None, initial: int, every: int, stream=None):  # total None: run to a token budget
        self.stream = stream or sys.stderr
        self.total, self.step, self.every, self.t0 = total, initial, every, time.time()
        self.bar = None
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=self.stream)

    def update(self, **postfix: str) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.set_postfix(**postfix)
            self.bar.update(1)
        elif self.step % self.every == 0 or self.step == self.total:
            rate = (time.time() - self.t0) / max(self.step, 1)
            fields = ", ".join(f"{k} {v}" for k, v in postfix.items())
            print(f"step {self.step}/{self.total or '?'}: {fields}; {rate:.2f} s/step", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
