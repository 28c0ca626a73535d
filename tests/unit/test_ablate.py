"""`marginal-rl ablate` end to end with a fake runner (resume, cleaning half-written runs, results.csv), `report` on a
run directory (a hand-made store; a real tiny run is marked slow), and the TRL peer's config mapping (a real TRL run:
tests/integration/test_trl_peer.py)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from marginal_rl import grid as ablate
from marginal_rl import trl_peer as train_trl
from marginal_rl.budget.records import TrajectoryDecision, TrajectoryPrices
from marginal_rl.cli import main as cli
from marginal_rl.grid import load_grid
from marginal_rl.report import RESULT_COLUMNS
from marginal_rl.rollout.types import Trajectory
from marginal_rl.train.config import ConfigError, load_config
from marginal_rl.train.store import StepStore, trajectory_rows
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for `marginal-rl train`: resolves the config the way it does, notes that it ran, writes config.yaml and a
# summary whose numbers depend on the seed (tokens to target = 100·(seed + 1) for arm `fast`, 300·(seed + 1) else).
FAKE_RUNNER = '''
import json, sys, yaml
from marginal_rl.train.config import config_to_dict, load_config
args = sys.argv[1:]
cfg = load_config([args[1]], args[2:])
with open({calls!r}, "a") as f:
    f.write(cfg.output_dir + "\\n")
from pathlib import Path
out = Path(cfg.output_dir)
out.mkdir(parents=True, exist_ok=True)
(out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
ttt = (100 if cfg.budget.policy == "marginal" else 300) * (cfg.seed + 1)
hist = [{{"step": 0, "tokens": 0, "seconds": 0.5, "eval/reward": 0.3}},
        {{"step": 5, "tokens": 2 * ttt, "seconds": 2.0, "eval/reward": 0.45}}]
(out / "summary.json").write_text(json.dumps({{
    "initial_eval_reward": 0.3, "final_eval_reward": 0.45, "best_eval_reward": 0.45, "tokens_to_target": ttt,
    "target_reward": 0.42, "target_delta": 0.1, "tokens_to_target_delta": ttt, "steps": 5,
    "tokens": {{"total": 2 * ttt, "rollout": ttt, "train": ttt}}, "wall_seconds": 2.0, "eval_history": hist,
    "ledger": {{"tokens_by_fate": {{"trained": ttt, "zero_signal": 0, "dropped_price": 0, "dropped_stale": 0}}}}}}))
'''


@pytest.fixture
def fake_grid(tmp_path, monkeypatch):
    calls = tmp_path / "calls.txt"
    runner = tmp_path / "fake_train.py"
    runner.write_text(FAKE_RUNNER.format(calls=str(calls)))
    monkeypatch.setattr(ablate, "RUNNERS", {"ours": [sys.executable, str(runner)], "trl": [sys.executable, str(runner)]})
    spec = {"base": str(ROOT / "configs" / "quickstart.yaml"), "output_dir": str(tmp_path / "grid"), "seeds": [0, 1],
            "overrides": {"log.report_to": "none"},
            "arms": {"none": {"budget.policy": "none"}, "fast": {"budget": {"policy": "marginal"}}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path, calls


def _calls(calls: Path) -> list[str]:
    return calls.read_text().split() if calls.exists() else []


def test_grid_runs_everything_then_resumes_skipping_finished_runs(fake_grid, capsys):
    path, calls = fake_grid
    assert cli(["ablate", "--config", str(path), "--parallel", "2"]) == 0
    assert len(_calls(calls)) == 4
    out = path.parent / "grid"
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == RESULT_COLUMNS
    assert {(r["arm"], r["seed"], r["tokens_to_target"]) for r in rows} == {
        ("none", "0", "300"), ("none", "1", "600"), ("fast", "0", "100"), ("fast", "1", "200")}
    summary = (out / "summary.md").read_text()
    assert "| none | 2 | 2/2 | 450 [300, 600]" in summary  # median of 300 and 600
    assert "baseline /" not in summary  # ratios are against the `marginal` arm, which this grid has not
    assert (out / "reward_vs_tokens.png").stat().st_size > 1000 and (out / "reward_vs_wall.png").is_file()
    assert (out / "report.html").is_file() and (out / "tokens_by_fate_per_arm.png").is_file()

    # Interrupted grid: one run lost its summary (killed mid-run) and left a stray file behind.
    half = out / "fast" / "seed1"
    (half / "summary.json").unlink()
    (half / "partial.tmp").write_text("x")
    calls.unlink()
    assert cli(["ablate", "--config", str(path)]) == 0
    assert _calls(calls) == [str(half)]  # only the unfinished run ran again...
    assert not (half / "partial.tmp").exists()  # ...from a clean directory
    assert "4 runs (3 finished, 1 to run)" in capsys.readouterr().out


def test_a_changed_arm_reruns_only_that_arm(fake_grid):
    path, calls = fake_grid
    assert cli(["ablate", "--config", str(path)]) == 0
    spec = yaml.safe_load(path.read_text())
    spec["arms"]["fast"]["budget"]["token_budget"] = 1000
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    calls.unlink()
    assert cli(["ablate", "--config", str(path)]) == 0
    assert sorted(_calls(calls)) == sorted(str(path.parent / "grid" / "fast" / f"seed{s}") for s in (0, 1))


def test_arms_runs_only_the_named_arms_and_names_a_missing_one(fake_grid, capsys):
    path, calls = fake_grid
    assert cli(["ablate", "--config", str(path), "--arms", "fast"]) == 0
    assert sorted(_calls(calls)) == sorted(str(path.parent / "grid" / "fast" / f"seed{s}") for s in (0, 1))
    assert "grid grid: 2 runs (0 finished, 2 to run)" in capsys.readouterr().out
    assert cli(["ablate", "--config", str(path), "--arms", "fast,nope"]) == 2
    assert "--arms: grid" in (err := capsys.readouterr().err) and "no arm(s) ['nope']; its arms: ['none', 'fast']" in err
    assert cli(["ablate", "--config", str(path), "--arms", "none"]) == 0  # the report then covers both arms
    with (path.parent / "grid" / "results.csv").open() as f:
        assert {r["arm"] for r in csv.DictReader(f)} == {"none", "fast"}
    assert len(_calls(calls)) == 4


def test_a_key_added_to_the_schema_since_the_run_does_not_force_a_rerun(fake_grid):
    path, calls = fake_grid
    assert cli(["ablate", "--config", str(path)]) == 0
    _, runs = load_grid(path)
    recorded = runs[0].dir / "config.yaml"
    cfg = yaml.safe_load(recorded.read_text())
    del cfg["rollout"]["eval_samples"]  # as if the run predates the key: it takes its default
    recorded.write_text(yaml.safe_dump(cfg))
    assert ablate.is_finished(runs[0])
    cfg["rollout"]["old_key"] = 1  # a key the schema no longer has: the recorded run cannot be trusted
    recorded.write_text(yaml.safe_dump(cfg))
    assert not ablate.is_finished(runs[0])


def test_bad_grid_exits_2_naming_the_arm_and_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"base": str(ROOT / "configs" / "quickstart.yaml"), "output_dir": str(tmp_path),
                                    "arms": {"typo": {"budget.kapa_rollout": 1}}}))
    assert cli(["ablate", "--config", str(path), "--dry-run"]) == 2
    assert "arm typo: unknown key 'budget.kapa_rollout' (did you mean 'budget.kappa_rollout'?)" in capsys.readouterr().err


def test_trl_config_mapping_matches_our_grpo():
    cfg = load_config([str(ROOT / "configs" / "bench_arith.yaml")], ["algo.num_iterations=2", "train.lr=3e-4",
                                                                      "train.max_steps=150", "train.max_tokens=0",
                                                                      "train.eval_every_tokens=0"])
    kw = train_trl.grpo_config_kwargs(cfg)
    # one generation batch (32 prompts x 8 samples) per optimiser step, no accumulation
    assert kw["per_device_train_batch_size"] == 256 and kw["gradient_accumulation_steps"] == 1
    assert kw["steps_per_generation"] == 1 and kw["num_generations"] == 8
    assert kw["max_steps"] == 300  # 150 rollouts, each trained twice: TRL counts an optimiser step per iteration
    # loss normalised by the generation batch's completion-token count; group-std advantages; no KL; constant lr
    assert (kw["loss_type"], kw["scale_rewards"], kw["beta"]) == ("dapo", "group", 0.0)
    assert (kw["learning_rate"], kw["lr_scheduler_type"], kw["weight_decay"], kw["max_grad_norm"]) == (
        3e-4, "constant", 0.0, 1.0)
    assert (kw["max_completion_length"], kw["temperature"], kw["use_vllm"], kw["bf16"]) == (8, 1.0, False, False)


@pytest.mark.parametrize(("override", "key"), [("algo.name=ppo", "algo.name"),
                                                ("rollout.max_staleness=1", "rollout.max_staleness")])
def test_trl_refuses_what_it_cannot_match(override, key):
    cfg = load_config([str(ROOT / "configs" / "bench_arith.yaml")], [override, "rollout.min_group_size=2"])
    with pytest.raises(ConfigError, match=key):
        train_trl.check_supported(cfg)


def _traj(k: int, group: str, reward: float, prompt: int = 5, completion: int = 3) -> Trajectory:
    return Trajectory(traj_id=f"t{k}", prompt_id=group, group_id=group, step=0, behavior_version=0,
                      prompt_ids=[1] * prompt, completion_ids=[2] * completion, completion_mask=[1] * completion,
                      behavior_logprobs=[0.0] * completion, reward=reward, finish_reason="eos")


def test_report_reads_tokens_by_use_and_fate_from_the_store(tmp_path):
    # one step: group a (rewards 1, 0: trained), group b (0, 0: zero signal); 8 rollout tokens per trajectory
    trajs = [_traj(0, "a", 1.0), _traj(1, "a", 0.0), _traj(2, "b", 0.0), _traj(3, "b", 0.0)]
    decisions = [TrajectoryDecision("trained"), TrajectoryDecision("trained"), TrajectoryDecision("zero_signal"),
                 TrajectoryDecision("zero_signal")]
    StepStore(tmp_path / "trajectories").write(0, trajectory_rows(trajs, TrajectoryPrices.of(decisions),
                                                                  [1.0, -1.0, 0.0, 0.0], 1))
    hist = [{"step": 0, "tokens": 0, "seconds": 1.0, "eval/reward": 0.3},
            {"step": 1, "tokens": 48, "seconds": 2.0, "eval/reward": 0.5}]
    (tmp_path / "summary.json").write_text(json.dumps({
        "algo": "grpo", "policy": "zero_var", "steps": 1, "world_size": 1, "wall_seconds": 2.0,
        "initial_eval_reward": 0.3, "final_eval_reward": 0.5, "best_eval_reward": 0.5, "target_reward": 0.4,
        "tokens_to_target": 48, "tokens": {"rollout": 32, "train": 16, "total": 48}, "eval_history": hist}))
    out = subprocess.run([sys.executable, "-m", "marginal_rl", "report", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "target 0.4 reached after 48 tokens" in out.stdout
    assert "tokens by use (store): prompt 20, policy 12, observation 0, verify 0, train 16" in out.stdout
    assert "wasted rollout tokens (not trained on): 16 (50.0%)" in out.stdout  # group b: 2 x (5 + 3) of 32
    assert (tmp_path / "reward_vs_tokens.png").stat().st_size > 1000


@pytest.mark.slow
def test_report_on_a_tiny_finished_run(tmp_path, policy_cache):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "marginal_rl", "train", "--config", str(ROOT / "configs" / "quickstart.yaml"),
           *tiny_overrides(policy_cache, str(run)), "train.max_steps=2", "budget.policy=zero_var"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    out = subprocess.run([sys.executable, "-m", "marginal_rl", "report", str(run)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    s = json.loads((run / "summary.json").read_text())
    assert f"{s['steps']} steps" in out.stdout and "tokens by use (store)" in out.stdout
    assert "zero_signal" in out.stdout or "trained" in out.stdout
    assert "wasted rollout tokens" in out.stdout
    assert (run / "reward_vs_tokens.png").stat().st_size > 1000
