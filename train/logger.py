"""Loggers: W&B (offline when no credentials are present, never an interactive prompt) or nothing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class NoOpLogger:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_histograms(self, values: dict[str, np.ndarray], step: int) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        pass

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

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_histograms(self, values: dict[str, np.ndarray], step: int) -> None:
        self.run.log({k: self.wandb.Histogram(np.asarray(v)) for k, v in values.items() if len(v)}, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        # A fresh table object under a per-step key: W&B keeps every step's table instead of overwriting one.
        self.run.log({f"{key}/step_{step:06d}": self.wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        self.run.finish()


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text()
