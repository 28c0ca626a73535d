"""Config: precedence, validation of bad input (exit status 2, one line, no traceback), every shipped config."""

import subprocess
import sys
from pathlib import Path

import pytest

from marginal_rl.train.config import (
    TRL_KEYS,
    ConfigError,
    config_from_dict,
    config_to_dict,
    describe_keys,
    load_config,
    parse_override,
)

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
    cfg = load_config([], ["task.name=dataset", "task.dataset=d.jsonl", "task.reward_funcs=[a.b, c.d]",
                           "task.reward_weights=[1, 0.5]"])
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
        ("train.lr=nan", "train.lr: expected a learning rate in (0, 1], got nan"),
        ("train.lr=1e30", "train.lr: expected a learning rate in (0, 1], got 1e+30"),
        ("train.weight_decay=-1", "train.weight_decay: expected a number >= 0"),
        ("seed=-1", "seed: expected an integer >= 0, got -1"),
        ("budget.thompson=false", "unknown key 'budget.thompson': replaced by budget.posterior (thompson: true is "
                                  "posterior: thompson, false is posterior: mean)"),
    ],
)
def test_bad_config_names_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config([], [override])
    assert needle in str(e.value)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["task.dataset=d.jsonl", "task.reward_funcs=[a.b]"],
         "task.dataset: read only by task.name=dataset; this run has task.name=arith"),
        (["task.source=humaneval"], "task.source: read only by task.name=fix_test; this run has task.name=arith"),
        (["task.name=dataset", "task.dataset=d.jsonl", "task.num_train=8"],
         "task.num_train: read only by task.name=arith or task.name=fix_test; this run has task.name=dataset"),
        (["budget.token_budget=2400"], "budget.token_budget: read only by budget.policy=marginal; this run has "
                                       "budget.policy=zero_var"),
        (["budget.policy=none", "budget.keep_fraction=0.3"], "budget.keep_fraction: read only by budget.policy=max_var"),
        (["budget.policy=marginal", "budget.explore_prob=0.3"], "budget.explore_prob: read only by budget.policy=prior"),
        (["budget.policy=prior", "budget.pool_dispersion=true"],
         "budget.pool_dispersion: read only by budget.policy=marginal"),
        (["budget.policy=none", "budget.dispersion_source=probes"],
         "budget.dispersion_source: read only by budget.policy=marginal"),
        (["algo.vf_coef=1.0"], "algo.vf_coef: read only by algo.name=ppo; this run has algo.name=grpo"),
    ],
)
def test_a_key_of_another_variant_names_the_variant_that_reads_it(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config([], overrides)
    assert needle in str(e.value)


def test_a_recorded_config_with_a_renamed_key_reads_as_the_new_key():
    # a run recorded before budget.thompson became budget.posterior is still the run the grid asks for
    for old, new in ((True, "thompson"), (False, "mean")):
        d = config_to_dict(load_config([], ["budget.policy=marginal", f"budget.posterior={new}"]))
        del d["budget"]["posterior"]
        d["budget"]["thompson"] = old
        assert config_from_dict(d).budget.posterior == new


def test_each_variant_reads_its_own_keys():
    cfg = load_config([], ["task.name=fix_test", "task.source=humaneval", "budget.policy=max_var",
                           "budget.keep_fraction=0.25", "algo.name=ppo", "algo.lam=0.9"])
    assert (cfg.task.name, cfg.task.source, cfg.task.num_train) == ("fix_test", "humaneval", 512)
    assert (cfg.budget.policy, cfg.budget.keep_fraction) == ("max_var", 0.25)
    assert (cfg.algo.name, cfg.algo.lam) == ("ppo", 0.9)
    # written flat, as YAML has it, name key first; and read back to the same config
    d = config_to_dict(cfg)
    assert list(d["budget"])[:2] == ["policy", "value"] and d["budget"]["keep_fraction"] == 0.25
    assert "token_budget" not in d["budget"] and "dataset" not in d["task"]
    assert config_from_dict(d) == cfg


@pytest.mark.parametrize(("trl_name", "ours"), sorted(TRL_KEYS.items()))
def test_trl_names_point_to_our_key(trl_name, ours):
    for key in (trl_name, f"train.{trl_name}" if not ours.startswith("train.") else f"rollout.{trl_name}"):
        with pytest.raises(ConfigError) as e:
            load_config([], [f"{key}=1"])
        assert f"unknown key '{key}' (TRL's GRPOConfig name; here it is '{ours}')" in str(e.value)


def test_trl_table_matches_trl_and_our_keys_and_the_docs():
    import dataclasses

    from trl import GRPOConfig

    trl_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert set(TRL_KEYS) <= trl_fields, set(TRL_KEYS) - trl_fields  # names of the installed TRL
    ours = {key for key, _, _, _ in describe_keys()}
    assert set(TRL_KEYS.values()) <= ours
    doc = (ROOT / "docs" / "configuration.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2].strip(" `")
            for line in doc.splitlines() if line.startswith("| `")}
    assert {k: v.split(" ")[0].strip("`") for k, v in rows.items()} == TRL_KEYS


def test_an_output_dir_that_is_a_file_is_refused_before_any_model(tmp_path):
    f = tmp_path / "run"
    f.write_text("not a directory")
    with pytest.raises(ConfigError, match=f"output_dir: '{f}' exists and is not a directory"):
        load_config([], [f"output_dir={f}"])


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
        ["budget.token_budget=2400"],
        ["learning_rate=1e-4"],
    ],
)
def test_cli_bad_config_exits_2_with_one_line(args):
    r = subprocess.run([sys.executable, "-m", "marginal_rl", "train", "--config", "configs/quickstart.yaml", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("config error: ")
    assert "Traceback" not in r.stderr


def test_cli_help_lists_every_key_with_doc():
    r = subprocess.run([sys.executable, "-m", "marginal_rl", "train", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    for key, _, _, doc in describe_keys():
        assert key in r.stdout and doc, f"{key} missing from --help or has no doc"


@pytest.mark.parametrize("command", ["train", "train-trl", "eval", "build-policy", "ablate", "report"])
def test_every_subcommand_has_help(command):
    r = subprocess.run(["marginal-rl", command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(f"usage: marginal-rl {command}")


def test_cli_dry_run_prints_resolved_config():
    r = subprocess.run([sys.executable, "-m", "marginal_rl", "train", "--config", "configs/quickstart.yaml",
                        "--dry-run", "train.max_steps=9"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "max_steps: 9" in r.stdout


CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_validates(path):
    if path.parent.name == "accelerate":  # launcher configs: validated by accelerate's own loader
        from accelerate.commands.config.config_args import ClusterConfig

        assert ClusterConfig.from_yaml_file(str(path)).num_processes >= 1
    elif path.parent.name == "ablations":  # grids: every arm × seed resolved by the run config loader
        from marginal_rl.grid import load_grid

        assert load_grid(path)[1]
    elif path.name.startswith("warm_start"):  # the warm-start stage's own schema (marginal-rl warm-start)
        from marginal_rl.train.config import WarmStartConfig

        cfg = load_config([str(path)], cls=WarmStartConfig)
        assert cfg.output_dir and all(Path(p).is_file() for p in cfg.demos.holdout)
    else:
        assert load_config([str(path)]).output_dir
