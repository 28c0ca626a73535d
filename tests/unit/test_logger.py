"""The console progress (a bar on a terminal, plain lines in a log) and the W&B logger offline: one completions table
appended step by step, and where the run is."""

from __future__ import annotations

import io
import json

import pytest

from marginal_rl.train.logger import Progress, WandbLogger


def test_progress_in_a_log_is_one_plain_line_every_n_steps():
    out = io.StringIO()  # not a TTY
    progress = Progress(total=25, initial=0, every=10, stream=out)
    for _ in range(25):
        progress.update(reward="0.500", tokens="3k")
    progress.close()
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 10/25", "step 20/25", "step 25/25"]
    assert "reward 0.500, tokens 3k" in lines[0] and "\r" not in out.getvalue()


def test_wandb_offline_appends_one_completions_table_and_says_how_to_sync(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    logger = WandbLogger("p", "run", "", {"seed": 0}, tmp_path)
    columns = ["step", "prompt_id", "rewards/f", "reward"]
    logger.log({"ledger/tokens_total": 0.0, "eval/reward": 0.1}, step=0)
    logger.log_completions(columns, [[1, "a", 1.0, 1.0], [1, "b", 0.0, 0.0]], step=1)
    logger.log_completions(columns + ["rewards/g"], [[2, "c", 1.0, 1.0, 0.5]], step=2)  # a new column is dropped
    described = logger.describe()
    logger.finish()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    assert described == f"W&B: offline run in {run_dir} (upload it with `wandb sync {run_dir}`)"
    tables = sorted((run_dir / "files" / "media" / "table").glob("completions_*.table.json"),
                    key=lambda p: int(p.name.split("_")[1]))
    parts = [json.loads(p.read_text()) for p in tables]
    assert [p["columns"] for p in parts] == [columns, columns]
    assert [p["data"] for p in parts] == [[[1, "a", 1.0, 1.0], [1, "b", 0.0, 0.0]], [[2, "c", 1.0, 1.0]]]
