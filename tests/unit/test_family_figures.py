"""scripts/family_figures.py: samples, zero-signal groups and eval gains by task family, checked by hand on a two-seed
grid written here (a dataset task whose eval split is 3 prompts of family a and 1 of family b)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("family_figures", ROOT / "scripts" / "family_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dataset(tmp: Path) -> tuple[Path, Path]:
    rows = [{"prompt": f"q{i}=", "answer": "x", "family": f} for i, f in enumerate("aaab")]
    for name in ("train", "eval"):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp / "train.jsonl", tmp / "eval.jsonl"


def _run(path: Path, data: tuple[Path, Path], steps: list[list[tuple[str, str, str, float]]], evals: list[dict]) -> None:
    """steps: per step, rows (prompt_id, group_id, family, reward); evals: eval_history entries."""
    (path / "trajectories").mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"task": {"name": "dataset", "dataset": str(data[0]),
                                                               "eval_dataset": str(data[1]),
                                                               "reward_funcs": ["examples.rewards.exact_match"]}}))
    for i, rows in enumerate(steps):
        table = pa.table({k: [r[j] for r in rows] for j, k in enumerate(("prompt_id", "group_id", "family", "reward"))})
        pq.write_table(table, path / "trajectories" / f"step-{i:06d}.parquet")
    (path / "summary.json").write_text(json.dumps({"eval_history": evals}))


def test_shares_and_gains_by_family_by_hand(tmp_path, capsys):
    data = _dataset(tmp_path)
    # seed 0: step 0 trains a group of prompt a1 with a signal and a flat group of b1; step 1 (after the eval at
    # 100 tokens) is not counted. Seed 1: one flat group of a2 and one of a3.
    step0 = [("a1", "g0", "a", 1.0), ("a1", "g0", "a", 0.0), ("b1", "g1", "b", 0.0), ("b1", "g1", "b", 0.0)]
    late = [("b2", "g9", "b", 1.0)] * 4
    evals0 = [{"step": 0, "tokens": 0, "eval/reward": 0.4, "eval/reward/a": 0.4, "eval/reward/b": 0.4},
              {"step": 1, "tokens": 100, "eval/reward": 0.55, "eval/reward/a": 0.6, "eval/reward/b": 0.4},
              {"step": 2, "tokens": 200, "eval/reward": 0.9, "eval/reward/a": 0.9, "eval/reward/b": 0.9}]
    _run(tmp_path / "grid" / "arm" / "seed0", data, [step0, late], evals0)
    step0 = [("a2", "g0", "a", 1.0), ("a2", "g0", "a", 1.0), ("a3", "g1", "a", 0.0), ("a3", "g1", "a", 0.0)]
    evals1 = [{"step": 0, "tokens": 0, "eval/reward": 0.4, "eval/reward/a": 0.4, "eval/reward/b": 0.4},
              {"step": 1, "tokens": 120, "eval/reward": 0.5, "eval/reward/a": 0.4, "eval/reward/b": 0.8}]
    _run(tmp_path / "grid" / "arm" / "seed1", data, [step0], evals1)
    assert _script().main([str(tmp_path / "grid"), "--arms", "arm", "--tokens", "100"]) == 0
    out = capsys.readouterr().out
    # distinct prompts 2 and 2; zero-signal shares 1/2 and 2/2 (median 0.75); eval/reward +0.15 and +0.10
    assert "arm: 2 seeds, to ~110 tokens: 2 distinct prompts, 0.75 of groups without signal (medians); " \
           "eval/reward +0.1250 (mean)" in out
    # family a: eval share 3/4; samples 2/4 and 4/4 (median 0.75); zero-signal groups 0/1 and 2/2 (median 0.5);
    # gains +0.2 and 0 (mean +0.1), parts 0.15 and 0 (mean 0.075). Family b: 1/4; 0.25; 0.5; +0.0 and +0.4
    assert "| a | 0.75 | 0.75 | 0.50 | +0.100 | +0.0750 |" in out
    assert "| b | 0.25 | 0.25 | 0.50 | +0.200 | +0.0500 |" in out


def test_a_missing_arm_is_named(tmp_path, capsys):
    assert _script().main([str(tmp_path), "--arms", "nope"]) == 2
    assert f"no finished runs under {tmp_path / 'nope'}" in capsys.readouterr().err
