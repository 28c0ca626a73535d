"""Ablation grids: validation, resume detection, the results table, and plots from run files alone."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from marginal_rl.grid import is_finished, load_grid
from marginal_rl.report import compare, comparison_markdown, result_row, summarize, sweep_markdown, target_sweep
from marginal_rl.train.config import ConfigError, config_to_dict

ROOT = Path(__file__).resolve().parents[2]


def _grid(tmp_path: Path, arms: dict, **extra) -> Path:
    spec = {"base": str(ROOT / "configs" / "quickstart.yaml"), "output_dir": str(tmp_path / "grid"), "seeds": [0, 1],
            "overrides": {"log": {"report_to": "none"}}, "arms": arms, **extra}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_grid_resolves_every_arm_and_seed(tmp_path):
    spec, runs = load_grid(_grid(tmp_path, {"none": {"budget.policy": "none"}, "marg": {"budget": {"policy": "marginal"}},
                                            "peer": {"runner": "trl"}}))
    assert [(r.arm, r.seed) for r in runs] == [("none", 0), ("none", 1), ("marg", 0), ("marg", 1), ("peer", 0), ("peer", 1)]
    assert runs[2].config.budget.policy == "marginal" and runs[3].config.seed == 1
    assert runs[4].runner == "trl" and runs[0].runner == "ours"
    assert runs[1].config.output_dir == str(tmp_path / "grid" / "none" / "seed1")
    assert runs[0].config.log.group == "grid" and runs[0].config.log.report_to == "none"


@pytest.mark.parametrize(("arms", "extra", "needle"), [
    ({"bad": {"budget.polcy": "none"}}, {}, "arm bad: unknown key 'budget.polcy'"),
    ({"x": {"runner": "jax"}}, {}, "runner must be one of"),
    ({}, {}, "'arms' must be a mapping"),
    ({"x": {}}, {"seeds": "0,1"}, "'seeds' must be a list of integers"),
    ({"x": {}}, {"colour": 1}, "unknown key(s) ['colour']"),
])
def test_bad_grids_name_the_problem(tmp_path, arms, extra, needle):
    with pytest.raises(ConfigError) as e:
        load_grid(_grid(tmp_path, arms, **extra))
    assert needle in str(e.value)


def _fake_finished(run, reward: float, ttt: int | None) -> None:
    run.dir.mkdir(parents=True)
    (run.dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(run.config), sort_keys=False))
    hist = [{"step": 0, "tokens": 0, "seconds": 1.0, "eval/reward": 0.3},
            {"step": 10, "tokens": 1000, "seconds": 5.0, "eval/reward": reward}]
    (run.dir / "summary.json").write_text(json.dumps({
        "initial_eval_reward": 0.3, "final_eval_reward": reward, "best_eval_reward": reward, "tokens_to_target": ttt,
        "target_reward": 0.4, "target_delta": 0.1, "tokens_to_target_delta": ttt, "steps": 10,
        "tokens": {"total": 1000, "rollout": 700, "train": 300}, "wall_seconds": 5.0, "eval_history": hist,
        "ledger": {"tokens_by_fate": {"trained": 400, "zero_signal": 300, "dropped_price": 0, "dropped_stale": 0}}}))


def test_finished_runs_are_skipped_and_a_changed_config_is_not(tmp_path):
    path = _grid(tmp_path, {"a": {"budget.policy": "none"}})
    _, runs = load_grid(path)
    _fake_finished(runs[0], 0.5, 600)
    (runs[1].dir).mkdir(parents=True)  # half-written: no summary
    assert [is_finished(r) for r in runs] == [True, False]
    # the same runs through a grid file of another name (its W&B group and run names differ): still finished
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(path.read_text())
    _, same = load_grid(renamed)
    assert same[0].config.log.group == "renamed" and is_finished(same[0])
    _, changed = load_grid(_grid(tmp_path, {"a": {"budget.policy": "none", "train.max_steps": 7}}))
    assert not is_finished(changed[0])  # same directory, different config: rerun


def test_summary_medians_count_unreached_targets_as_infinite_and_ratios_censor_them_at_the_budget(tmp_path):
    _, runs = load_grid(_grid(tmp_path, {"none": {}, "marginal": {"budget.policy": "marginal"}}, seeds=[0, 1, 2]))
    ttts = {"none": [900, None, 1000], "marginal": [300, 400, 500]}
    rows = []
    for r in runs:
        _fake_finished(r, 0.45, ttts[r.arm][r.seed])
        rows.append(result_row(r.arm, r.seed, r.dir, budget=1000))
    table = summarize(rows, budget=1000).set_index("arm")
    assert table.loc["none", "tokens_to_target_median"] == 1000  # median of [900, 1000, inf]
    assert math.isinf(table.loc["none", "tokens_to_target_max"]) and table.loc["none", "reached_target"] == "2/3"
    assert table.loc["marginal", "tokens_to_target_median"] == 400
    # AUC over the 1000-token budget: eval 0.3 at 0 tokens, 0.45 at 1000 -> mean 0.375 in every run
    assert table.loc["marginal", "auc_mean"] == pytest.approx(0.375)
    ratios = compare(rows, table.reset_index(), budget=1000).set_index("arm")
    # paired by seed, the unreached seed censored at the budget: 900/300, 1000/400, 1000/500 -> geometric mean
    assert ratios.loc["none", "ratio"] == pytest.approx((3 * 2.5 * 2) ** (1 / 3))
    assert ratios.loc["none", "ratio_lo"] <= ratios.loc["none", "ratio"] <= ratios.loc["none", "ratio_hi"]
    assert bool(ratios.loc["none", "matched"])  # same tokens per step in this fake grid
    assert "- best baseline at matched compute, the absolute target: none: 2.47x" in comparison_markdown(
        ratios.reset_index())


def _fake_curve(run, rewards: list[float]) -> None:
    """A finished run whose evals are `rewards` at 0, 100, 200, ... tokens (budget 1,000)."""
    _fake_finished(run, rewards[-1], None)
    s = json.loads((run.dir / "summary.json").read_text())
    s["eval_history"] = [{"step": i, "tokens": 100 * i, "eval/reward": r} for i, r in enumerate(rewards)]
    (run.dir / "summary.json").write_text(json.dumps(s))


def test_target_sweep_pairs_seeds_at_each_relative_target(tmp_path):
    _, runs = load_grid(_grid(tmp_path, {"ref": {}, "base": {}}))
    curves = {("ref", 0): [0.30, 0.32, 0.36, 0.40], ("ref", 1): [0.20, 0.22, 0.26, 0.26],
              ("base", 0): [0.30, 0.31, 0.32, 0.36], ("base", 1): [0.20, 0.21, 0.25, 0.30]}
    rows = []
    for r in runs:
        _fake_curve(r, curves[r.arm, r.seed])
        rows.append(result_row(r.arm, r.seed, r.dir, budget=1000))
    sweep = target_sweep(rows, 1000, reference="ref", deltas=(0.02, 0.05, 0.08, 0.2)).set_index("delta")
    # start + 0.02: ref at 100 and 100, base at 200 and 200 -> 2x on both seeds
    assert sweep.loc[0.02, "ratio"] == pytest.approx(2.0) and sweep.loc[0.02, "seeds"] == 2
    # + 0.05: ref 200, 200; base 300, 200 -> sqrt(1.5 * 1)
    assert sweep.loc[0.05, "ratio"] == pytest.approx(math.sqrt(1.5))
    # + 0.08: seed 0 ref 300, base never (censored at the budget 1000); seed 1 ref never, base 300 -> sqrt(10/3 * 0.3)
    assert sweep.loc[0.08, "ratio"] == pytest.approx(math.sqrt(1000 / 300 * 300 / 1000))
    # + 0.2: neither run of either seed gets there: no seed says anything
    assert sweep.loc[0.2, "seeds"] == 0 and math.isnan(sweep.loc[0.2, "ratio"])
    table = sweep_markdown(sweep.reset_index())
    assert "| base | 2.00x [2.00, 2.00] (2) | 1.22x" in table and "start + 0.08" in table
    assert target_sweep(rows, 1000, reference="other").empty


def test_arms_of_the_reference_policy_are_its_variants_not_baselines(tmp_path):
    _, runs = load_grid(_grid(tmp_path, {"ref": {}, "cheap": {}, "none": {}}))
    rows = []
    for r in runs:
        _fake_finished(r, 0.45, {"ref": 800, "cheap": 500, "none": 900}[r.arm])
        s = json.loads((r.dir / "summary.json").read_text())
        (r.dir / "summary.json").write_text(json.dumps({**s, "policy": "none" if r.arm == "none" else "marginal"}))
        rows.append(result_row(r.arm, r.seed, r.dir, budget=1000))
    ratios = compare(rows, summarize(rows, budget=1000), budget=1000, reference="ref")
    assert ratios.set_index("arm").variant.to_dict() == {"cheap": True, "none": False}
    # `cheap` needs fewer tokens than the reference, but it is the reference's own policy: the best baseline is none
    assert "- best baseline, the absolute target: none: 1.12x" in comparison_markdown(ratios, reference="ref")


def test_report_names_a_missing_reference_arm(tmp_path):
    _, runs = load_grid(_grid(tmp_path, {"none": {}}))
    for r in runs:
        _fake_finished(r, 0.45, 800)
    cmd = [sys.executable, "-m", "marginal_rl", "report"]
    out = subprocess.run([*cmd, str(tmp_path / "grid"), "--reference", "marginal"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "--reference marginal: no finished runs of that arm" in out.stderr
    assert "its arms: none" in out.stderr
    out = subprocess.run([*cmd, str(runs[0].dir), "--reference", "none"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--reference compares the arms of a grid" in out.stderr


def test_report_script_reads_a_grid_without_wandb(tmp_path):
    _, runs = load_grid(_grid(tmp_path, {"none": {}}))
    for r in runs:
        _fake_finished(r, 0.45, 800)
    out = subprocess.run([sys.executable, "-m", "marginal_rl", "report", str(tmp_path / "grid")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| none | 2 | 2/2 | 800 [800, 800]" in out.stdout
    assert (tmp_path / "grid" / "reward_vs_tokens.png").stat().st_size > 1000
    assert (tmp_path / "grid" / "reward_vs_wall.png").is_file()
    page = (tmp_path / "grid" / "report.html").read_text()
    for image in ("reward_vs_tokens.png", "reward_vs_steps.png", "tokens_by_fate_per_arm.png"):
        assert f'src="{image}"' in page and (tmp_path / "grid" / image).stat().st_size > 1000
    assert "per arm (median [min, max] over seeds; AUC: mean [95 % CI])" in page
