"""What a user, their data or the machine can do to a run, end to end on the tiny model: a reused output_dir, a
resume under another config, SIGTERM / SIGINT, rewards that score nothing, prompts longer than the context, and the
CLI's one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from marginal_rl.rollout.build import build_task
from marginal_rl.rollout.config import ArithTaskConfig, RolloutConfig
from marginal_rl.rollout.tasks import build_arith
from marginal_rl.train import loop
from marginal_rl.train.config import ConfigError, load_config
from marginal_rl.train.logger import NoOpLogger
from marginal_rl.train.model import build_tokenizer
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, cache: str, extra: list[str], name: str = "run"):
    return load_config([], tiny_overrides(cache, str(tmp_path / name)) + extra)


def _run(cfg):
    return loop.train(cfg, build_task(cfg.task, cfg.rollout))


def _same_run(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(pd.read_parquet(a / "trajectories").drop(columns=["actions"]),
                                  pd.read_parquet(b / "trajectories").drop(columns=["actions"]))
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------------------------- run directories


def test_a_non_empty_output_dir_is_refused_before_any_model_is_built(tmp_path, policy_cache, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    monkeypatch.setattr(loop, "build_policy", lambda *a: pytest.fail("the model was built"))
    with pytest.raises(ConfigError, match=r"output_dir: .*run is not empty \(summary.json\); resume it with "
                                          r"train.resume_from=latest, start afresh with train.overwrite=true"):
        _run(_cfg(tmp_path, policy_cache, ["train.max_steps=1"]))


def test_overwrite_deletes_the_old_runs_files_and_nothing_else(tmp_path, policy_cache):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-000009").mkdir(parents=True)
    (out / "trajectories").mkdir()
    (out / "trajectories" / "step-000007.parquet").write_bytes(b"old")
    (out / "metrics.jsonl").write_text('{"step": 9}\n')
    (out / "notes.txt").write_text("mine")
    _run(_cfg(tmp_path, policy_cache, ["train.max_steps=1", "train.overwrite=true"]))
    assert not (out / "checkpoints").exists()  # the old run's checkpoints cannot be resumed into this run's stores
    assert sorted(p.name for p in (out / "trajectories").iterdir()) == ["step-000000.parquet"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_refuses_a_checkpoint_of_another_config_and_names_the_keys(tmp_path, policy_cache):
    common = ["budget.policy=none", "train.save_every=2", "train.lr=1e-3"]
    _run(_cfg(tmp_path, policy_cache, common + ["train.max_steps=2"]))
    changed = common + ["train.max_steps=3", "train.resume_from=latest", "train.lr=2e-3", "rollout.group_size=2"]
    with pytest.raises(ConfigError, match=r"another config \(rollout.group_size: 4 -> 2; train.lr: 0.001 -> 0.002\); "
                                          r".*train.force_resume=true"):
        _run(_cfg(tmp_path, policy_cache, changed))
    # max_steps (and eval_every, logging, paths) may change; with force_resume the rest may too
    summary = _run(_cfg(tmp_path, policy_cache, changed + ["train.force_resume=true", "train.eval_every=1"]))
    assert summary["steps"] == 3


# ------------------------------------------------------------------------------------------------ preemption


class SignalAt(NoOpLogger):
    """Sends `signum` to this process while logging step `at`, as a scheduler's preemption would mid-run."""

    def __init__(self, at: int, signum: int):
        self.at, self.signum = at, signum

    def log(self, metrics, step):
        if step == self.at:
            os.kill(os.getpid(), self.signum)


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_and_resume_continues_exactly(tmp_path, policy_cache,
                                                                                        monkeypatch):
    common = ["budget.policy=marginal", "train.max_steps=5", "train.save_every=100", "train.lr=1e-3"]
    _run(_cfg(tmp_path, policy_cache, common, "full"))
    monkeypatch.setattr(loop, "build_logger", lambda cfg, acc, out: SignalAt(2, signal.SIGTERM))
    with pytest.raises(loop.Preempted, match=r"stopped by SIGTERM at step 2: checkpoint .*step-000002; continue with "
                                             r"the same command and train.resume_from=latest") as info:
        _run(_cfg(tmp_path, policy_cache, common, "stopped"))
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone with it
    assert sorted(pd.read_parquet(tmp_path / "stopped" / "trajectories").step.unique()) == [0, 1]
    monkeypatch.setattr(loop, "build_logger", lambda cfg, acc, out: NoOpLogger())
    _run(_cfg(tmp_path, policy_cache, common + ["train.resume_from=latest"], "stopped"))
    _same_run(tmp_path / "full", tmp_path / "stopped")


def test_sigint_without_checkpointing_stops_and_says_what_is_kept(tmp_path, policy_cache, monkeypatch):
    monkeypatch.setattr(loop, "build_logger", lambda cfg, acc, out: SignalAt(1, signal.SIGINT))
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when pytest runs in the background
    with pytest.raises(loop.Preempted, match=r"stopped by SIGINT at step 1 without a checkpoint \(train.save_every=0\)"
                                             r"; the stores under .* hold steps 0-0"):
        _run(_cfg(tmp_path, policy_cache, ["budget.policy=none", "train.max_steps=4"]))
    assert signal.getsignal(signal.SIGINT) is before  # the run's handler is gone, the caller's is back


# ------------------------------------------------------------------------------------ rewards and prompts


def test_a_step_where_no_reward_function_scores_anything_warns_and_counts(tmp_path, policy_cache, capsys):
    import marginal_rl as mrl

    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(8) for b in range(8)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    def abstains(completions, **kwargs):
        return [None] * len(completions)

    cfg = mrl.load_config([], [f"output_dir={tmp_path / 'run'}", f"model.cache_dir={policy_cache}/dataset",
                               "model.hidden_size=32", "model.warm_start_steps=20", "task.name=dataset",
                               f"task.dataset={tmp_path / 'data.jsonl'}", "rollout.prompts_per_step=4",
                               "rollout.group_size=2", "rollout.max_new_tokens=4", "rollout.eval_samples=1",
                               "train.max_steps=2", "train.eval_every=0", "log.report_to=none", "log.progress=false"])
    summary = mrl.fit(cfg, reward_funcs=[abstains])
    assert summary["unscored_steps"] == 2
    err = capsys.readouterr().err
    assert "warning: step 0: every reward function returned None/NaN for all 8 completions" in err
    assert "(2 such step(s) so far" in err


@pytest.mark.parametrize("rule", ["error", "drop"])
def test_prompts_longer_than_the_context_are_refused_or_dropped_by_name(rule, capsys):
    task = build_arith(ArithTaskConfig(num_train=8, num_eval=4, long_prompts=rule), RolloutConfig())
    tokenizer = build_tokenizer([p.text for p in task.train + task.eval] + ["x" * 40])
    long_id = task.train[3].prompt_id
    task.train[3].text = "1+" * 200 + "1="
    cfg = SimpleNamespace(task=SimpleNamespace(long_prompts=rule), rollout=RolloutConfig(max_new_tokens=16))
    model_config = SimpleNamespace(max_position_embeddings=64)
    if rule == "error":
        with pytest.raises(ConfigError, match=rf"task.long_prompts: 1 of 8 train prompts do not fit the model's "
                                              rf"context of 64 tokens with rollout.max_new_tokens=16, first "
                                              rf"'{long_id}' \(\d+ tokens"):
            loop.fit_prompts_to_context(cfg, task, tokenizer, model_config)
        return
    loop.fit_prompts_to_context(cfg, task, tokenizer, model_config)
    assert len(task.train) == 7 and long_id not in {p.prompt_id for p in task.train} and len(task.eval) == 4
    assert "task.long_prompts=drop: left out 1 of 8 train prompts" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_errors_are_one_line_with_an_exit_status_and_no_traceback(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    base = [sys.executable, "-m", "marginal_rl", "train", "--config", str(ROOT / "configs" / "quickstart.yaml"),
            f"output_dir={out}", "log.report_to=none"]
    r = subprocess.run(base, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"config error: output_dir: {out} is not empty (config.yaml); resume it "
                                             f"with train.resume_from=latest, start afresh with train.overwrite=true "
                                             f"(deletes the old run's files), or choose another output_dir"]
    r = subprocess.run([*base, "--debug"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr  # --debug keeps it
