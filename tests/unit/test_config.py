"""Config: precedence, validation of bad input (exit status 2, one line, no traceback), every shipped config."""

import subprocess
import sys
from pathlib import Path

import pytest

from train.config import ConfigError, describe_keys, load_config, parse_override

ROOT = Path(__file__).resolve().parents[2]


def test_precedence_defaults_file_overrides(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("train:\n  max_steps: 7\n  lr: 1.0e-3\nbudget:\n  policy: none\n")
    b = tmp_path / "b.yaml"
    b.write_text("train:\n  lr: 2.0e-3\n")
    cfg = load_config([str(a), str(b)], ["train.lr=5e-4", "seed=3"])
    assert cfg.train.max_steps == 7  # file over default (100)
    assert cfg.budget.policy == "none"
    assert cfg.train.lr == 5e-4  # override over the later file (2e-3) over the earlier file (1e-3)
    assert cfg.seed == 3
    assert cfg.rollout.group_size == 8  # untouched default
    assert load_config([str(a), str(b)]).train.lr == 2e-3  # later file wins over earlier


def test_override_values_are_yaml():
    assert parse_override("task.reward_funcs=[a.b, c.d]") == {"task": {"reward_funcs": ["a.b", "c.d"]}}
    cfg = load_config([], ["task.reward_funcs=[a.b, c.d]", "task.reward_weights=[1, 0.5]"])
    assert cfg.task.reward_weights == [1.0, 0.5]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("budget.polcy=none", "unknown key 'budget.polcy' (did you mean 'budget.policy'?)"),
        ("trian.max_steps=3", "unknown key 'trian'"),
        ("train.max_steps=ten", "train.max_steps: expected an integer, got 'ten'"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("rollout.prompts_per_step=-4", "rollout.prompts_per_step: expected an integer >= 1, got -4"),
        ("rollout.group_size=1", "rollout.group_size: expected >= 2 with algo.name=grpo"),
        ("budget.policy=greedy", "budget.policy: expected one of"),
        ("algo.name=dpo", "algo.name: expected one of ['grpo', 'ppo']"),
        ("log.progress=maybe", "log.progress: expected true or false"),
        ("train=5", "train: expected a mapping"),
        ("model.dtype=float16", "model.dtype: float16 weights cannot be trained stably"),
        ("rollout.async_rollout=true", "rollout.async_rollout: the next step's rollouts are generated before"),
    ],
)
def test_bad_config_names_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config([], [override])
    assert needle in str(e.value)


def test_ppo_allows_group_of_one():
    assert load_config([], ["algo.name=ppo", "rollout.group_size=1", "rollout.min_group_size=1"]).rollout.group_size == 1


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([str(bad)])


@pytest.mark.parametrize(
    "args",
    [
        ["budget.polcy=none"],
        ["rollout.group_size=1"],
        ["train.micro_batch_tokens=-1"],
        ["--config", "configs/does_not_exist.yaml"],
    ],
)
def test_cli_bad_config_exits_2_with_one_line(args):
    r = subprocess.run([sys.executable, "scripts/train.py", "--config", "configs/quickstart.yaml", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("config error: ")
    assert "Traceback" not in r.stderr


def test_cli_help_lists_every_key_with_doc():
    r = subprocess.run([sys.executable, "scripts/train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for key, _, _, doc in describe_keys():
        assert key in r.stdout and doc, f"{key} missing from --help or has no doc"


def test_cli_dry_run_prints_resolved_config():
    r = subprocess.run([sys.executable, "scripts/train.py", "--config", "configs/quickstart.yaml", "--dry-run",
                        "train.max_steps=9"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "max_steps: 9" in r.stdout


CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_validates(path):
    if path.parent.name == "accelerate":  # launcher configs: validated by accelerate's own loader
        from accelerate.commands.config.config_args import ClusterConfig

        assert ClusterConfig.from_yaml_file(str(path)).num_processes >= 1
    elif path.parent.name == "ablations":  # grids: every arm × seed resolved by the run config loader
        from train.grid import load_grid

        assert load_grid(path)[1]
    else:
        assert load_config([str(path)]).output_dir
