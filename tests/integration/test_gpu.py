"""The trainer on a CUDA GPU: half-precision weights, mixed precision (bf16 and fp16 with its loss scaler), LoRA in
bf16, and FSDP under `accelerate launch`. Skipped without a GPU (CI has none); run on one with
`python -m pytest -q tests/integration/test_gpu.py`, or one test per process
(`for t in $(pytest --collect-only -q tests/integration/test_gpu.py | grep ::); do pytest -q "$t"; done`): a CUDA
device-side assert in one test poisons the CUDA context of every later test in the same process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from marginal_rl.rollout.build import build_task
from marginal_rl.train import loop
from marginal_rl.train.config import load_config
from marginal_rl.train.logger import NoOpLogger
from marginal_rl.train.model import resolve_policy_path
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[2]


class Keep(NoOpLogger):
    def __init__(self):
        self.rows: list[dict] = []

    def log(self, metrics, step):
        self.rows.append(dict(metrics))


def _train(tmp_path, cache, extra, monkeypatch):
    rec = Keep()
    monkeypatch.setattr(loop, "build_logger", lambda cfg, acc, out: rec)
    cfg = load_config([], tiny_overrides(cache, str(tmp_path / "run")) + ["budget.policy=none", "train.lr=1e-3"] + extra)
    task = build_task(cfg.task, cfg.rollout)
    start = load_file(Path(resolve_policy_path(cfg.model, task, cfg.seed)) / "model.safetensors")
    summary = loop.train(cfg, task)
    return cfg, summary, rec.rows, start


def _moved(start: dict, out_dir: str) -> bool:
    end = load_file(Path(out_dir) / "final" / "model.safetensors")
    return any(not torch.equal(start[k].float(), end[k].float().cpu()) for k in start)


def test_bf16_weights_train(tmp_path, policy_cache, monkeypatch):
    cfg, summary, rows, start = _train(tmp_path, policy_cache, ["model.dtype=bfloat16", "train.max_steps=4"],
                                       monkeypatch)
    assert math.isfinite(summary["final_eval_reward"])
    assert sum(r["train/nonfinite"] for r in rows if "train/nonfinite" in r) == 0
    final = load_file(Path(cfg.output_dir) / "final" / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    assert _moved(start, cfg.output_dir)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_autocast(tmp_path, policy_cache, monkeypatch, precision):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)  # what `accelerate launch --mixed_precision` sets
    cfg, summary, rows, start = _train(tmp_path, policy_cache, ["train.max_steps=12"], monkeypatch)
    steps = [r for r in rows if "train/nonfinite" in r]
    assert sum(r["train/nonfinite"] for r in steps) == 0  # fp16 overflows are the scaler's business, not failures
    if precision == "fp16":  # the scaler starts at 2**16 and halves on each overflow; updates must happen after
        assert any(r["train/fp16_overflow"] < 1 for r in steps)
    assert steps[-1]["optim/policy_version"] == sum(r["train/fp16_overflow"] < 1 for r in steps)
    assert math.isfinite(summary["final_eval_reward"]) and _moved(start, cfg.output_dir)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_lora_on_a_half_precision_base_with_kl_to_the_adapter_free_reference(tmp_path, policy_cache, monkeypatch,
                                                                             dtype):
    cfg, summary, rows, _ = _train(tmp_path, policy_cache, [f"model.dtype={dtype}", "model.lora_r=4",
                                                            "algo.kl_coef=0.1", "train.max_steps=3"], monkeypatch)
    assert math.isfinite(summary["final_eval_reward"])
    assert (Path(cfg.output_dir) / "final" / "adapter_model.safetensors").is_file()
    assert all(math.isfinite(r["loss/kl"]) for r in rows if "loss/kl" in r)


def test_ppo_in_bf16(tmp_path, policy_cache, monkeypatch):
    cfg, summary, rows, start = _train(tmp_path, policy_cache, ["model.dtype=bfloat16", "algo.name=ppo",
                                                                "train.max_steps=3"], monkeypatch)
    assert math.isfinite(summary["final_eval_reward"]) and _moved(start, cfg.output_dir)


@pytest.mark.parametrize("launcher", ["single_gpu", "fsdp"])
def test_accelerate_launch_configs(tmp_path, policy_cache, launcher):
    out = tmp_path / launcher
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / f"{launcher}.yaml"), "--num_processes", "1",
           "-m", "marginal_rl", "train", *tiny_overrides(policy_cache, str(out)), "budget.policy=marginal",
           "train.max_steps=3", "rollout.max_staleness=1"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 1 and math.isfinite(summary["final_eval_reward"])
    assert len(pd.read_parquet(out / "trajectories")) > 0
