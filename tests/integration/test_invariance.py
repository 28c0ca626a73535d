"""The update does not depend on how the batch is split: 1×4 vs 4×1 micro-batches, and 2 processes vs 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.integration.ddp_update import fixed_batch, tiny_model, updated_weights

HERE = Path(__file__).resolve().parent


def test_one_microbatch_equals_many():
    trajs, _ = fixed_batch()
    longest = max(t.tokens_prompt + t.tokens_completion for t in trajs)
    one = updated_weights(10_000)[0]  # the whole batch in one micro-batch
    many = updated_weights(longest)[0]  # about one sequence per micro-batch
    start = tiny_model().state_dict()
    assert all(not torch.equal(start[k], one[k]) for k in one if "embed" not in k)  # the update did something
    for k in one:
        torch.testing.assert_close(one[k], many[k], rtol=1e-5, atol=1e-6)


def test_every_loss_type_is_independent_of_the_split_and_they_differ():
    trajs, _ = fixed_batch()
    longest = max(t.tokens_prompt + t.tokens_completion for t in trajs)
    dapo = updated_weights(10_000)[0]
    for loss_type in ("grpo", "dr_grpo"):
        one, many = updated_weights(10_000, loss_type=loss_type)[0], updated_weights(longest, loss_type=loss_type)[0]
        for k in one:
            torch.testing.assert_close(one[k], many[k], rtol=1e-5, atol=1e-6)
        assert any(not torch.allclose(one[k], dapo[k]) for k in one)  # another normalisation, another update


def _torchrun(nproc: int, out: Path, mbt: int, *mode: str) -> dict:
    """The weights after ddp_update.py's one train_step on `nproc` processes; `mode`: [ddp|zero2|zero3] [nonfinite]."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    if mode and mode[0] != "ddp":
        del env["ACCELERATE_USE_CPU"]  # it would turn DeepSpeed into plain DDP (train/zero.py refuses it)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        str(HERE / "ddp_update.py"), str(out), str(mbt), *mode], env=env, timeout=300,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


def test_two_processes_equal_one(tmp_path):
    one = _torchrun(1, tmp_path / "one.pt", 10_000)
    two = _torchrun(2, tmp_path / "two.pt", 10_000)
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-5, atol=1e-6)


def test_accelerate_launch_two_cpu_processes(tmp_path, policy_cache):
    """The documented multi-process command on a CPU machine: world_size 2, rollouts sharded, one writer."""
    import json

    import pandas as pd

    from tests.conftest import tiny_overrides

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "marginal_rl", "train", "--config", str(HERE.parents[1] / "configs" / "quickstart.yaml"),
           *tiny_overrides(policy_cache, str(out)), "train.max_steps=2"]
    r = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    df = pd.read_parquet(out / "trajectories")
    assert summary["world_size"] == 2
    assert set(df.traj_id.str[:3]) == {"r0-", "r1-"}  # both ranks generated their share
    assert df.traj_id.is_unique and summary["tokens"]["rollout"] == int(df.tokens_rollout.sum())

    # the same starting weights evaluate to the same numbers on one process: sampled and greedy, every family
    from marginal_rl.cli import main

    one = tmp_path / "one"
    assert main(["train", "--config", str(HERE.parents[1] / "configs" / "quickstart.yaml"),
                 *tiny_overrides(policy_cache, str(one)), "train.max_steps=1"]) == 0
    start_one = json.loads((one / "summary.json").read_text())["eval_history"][0]
    start_two = summary["eval_history"][0]
    evals = {k: v for k, v in start_one.items() if k.startswith("eval/")}
    assert len(evals) > 2 and evals == {k: v for k, v in start_two.items() if k.startswith("eval/")}


def test_the_likelihood_probe_plans_alike_on_two_processes_and_one(tmp_path, policy_cache):
    """Each rank probes its share and every rank sees every result: step 0's plan (made before anything is sampled,
    so the same on any number of processes) probes and prices alike on two CPU processes and on one."""
    import pandas as pd

    from tests.conftest import tiny_overrides

    keys = ["budget.policy=marginal", "budget.probe_strength=16", "budget.token_budget=600", "train.max_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plans = []
    two_processes = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    for launch, name in ((two_processes, "two"), ([sys.executable], "one")):
        cmd = [*launch, "-m", "marginal_rl", "train", *tiny_overrides(policy_cache, str(tmp_path / name)), *keys]
        r = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        plans.append(pd.read_parquet(tmp_path / name / "prompts"))
    two, one = plans
    assert two.probed.any() and two.probed.equals(one.probed) and two.samples.equals(one.samples)
    pd.testing.assert_series_equal(two.pass_rate, one.pass_rate, rtol=1e-5)


def test_pilot_then_commit_on_two_processes_joins_each_group_across_ranks(tmp_path, policy_cache):
    """Each rank draws its share of the pilots, every rank prices the same top-up, each draws its share of the rest:
    every prompt's samples end in one group of the size the plan records, whichever ranks drew them."""
    import pandas as pd

    from tests.conftest import tiny_overrides

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "marginal_rl", "train", *tiny_overrides(policy_cache, str(out)), "budget.policy=marginal",
           "budget.pilot_samples=2", "budget.token_budget=600", "train.max_steps=2"]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    df, prompts = pd.read_parquet(out / "trajectories"), pd.read_parquet(out / "prompts")
    assert df.traj_id.is_unique and {"r0-", "r1-"} <= set(df.traj_id.str[:3])
    assert df.traj_id.str.contains("-u").any()  # some groups were grown after their pilot
    groups = df.groupby(["step", "prompt_id"]).agg(n=("traj_id", "size"), ids=("group_id", "nunique"))
    assert (groups.ids == 1).all()
    sampled = prompts[prompts.samples > 0].set_index(["step", "prompt_id"])
    assert groups.n.to_dict() == sampled.samples.to_dict()
