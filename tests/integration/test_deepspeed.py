"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (gloo, DeepSpeed's CPU accelerator): one update equals the DDP
update for the same global batch, a non-finite step is skipped on every rank, and the documented `accelerate launch`
runs the trainer with world_size 2 and the same trajectories and weights as DDP.

Needs the optional extra (`pip install -e .[deepspeed]`); skipped without it. The first DeepSpeed process on a machine
JIT-builds a small communication op (about 40 s on 2 cores, cached under ~/.cache/torch_extensions afterwards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.ddp_update import fixed_batch, tiny_model
from tests.integration.test_invariance import _torchrun

pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install -e .[deepspeed]")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="module")
def ddp_one_process(tmp_path_factory):
    cache = {}

    def weights(*algo: str) -> dict:  # () GRPO, ("ppo",)
        if algo not in cache:
            cache[algo] = _torchrun(1, tmp_path_factory.mktemp("ddp") / "one.pt", 10_000, "ddp", *algo)
        return cache[algo]

    return weights


@pytest.mark.parametrize(("mode", "algo"), [
    pytest.param("zero2", (), id="zero2-grpo"), pytest.param("zero3", (), id="zero3-grpo"),
    pytest.param("zero2", ("ppo",), marks=pytest.mark.slow, id="zero2-ppo"),
    pytest.param("zero3", ("ppo",), marks=pytest.mark.slow, id="zero3-ppo"),
])
def test_one_zero_update_equals_the_ddp_update(mode, algo, ddp_one_process, tmp_path):
    """2 processes, several token-balanced micro-batches each, 2 epochs (two engine steps), the update clipped by the
    engine: the same weights as one DDP process taking the whole batch in one micro-batch. PPO: the value head, a
    submodule of the policy under DeepSpeed, gets the same update as DDP's separate head."""
    trajs, _ = fixed_batch()
    longest = max(t.tokens_prompt + t.tokens_completion for t in trajs)
    zero = _torchrun(2, tmp_path / "zero.pt", longest, mode, *algo)
    ddp = ddp_one_process(*algo)
    metrics = json.loads((tmp_path / "zero.json").read_text())
    start = tiny_model().state_dict()
    assert sorted(zero) == sorted(ddp)
    assert all(not torch.equal(start[k], zero[k]) for k in start if "embed" not in k)  # the engine stepped
    assert metrics["train/nonfinite"] == 0.0 and metrics["optim/grad_norm"] > 0.05  # clipped (train.max_grad_norm)
    for k in zero:
        torch.testing.assert_close(zero[k], ddp[k], rtol=1e-5, atol=1e-6)
    if algo:
        assert any(v.abs().sum() > 0 for k, v in zero.items() if k.startswith("rl_value_head."))  # the head learnt


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3"])
def test_a_nonfinite_step_is_skipped_on_every_rank(mode, tmp_path):
    """One rank's statistics are non-finite (its loss and gradients are not): the update is skipped everywhere. Under
    DeepSpeed the engine would have stepped inside the last backward; the NaN loss routes it through its overflow
    skip instead. (Under DDP the decision was rank-local before: the ranks' weights diverged.)"""
    weights = _torchrun(2, tmp_path / "w.pt", 10_000, mode, "nonfinite")
    metrics = json.loads((tmp_path / "w.json").read_text())
    assert metrics["train/nonfinite"] == 1.0
    start = tiny_model().state_dict()
    for k in weights:
        torch.testing.assert_close(weights[k], start[k], rtol=0, atol=0)


def _launch(config: str, out: Path, cache: str, extra: list[str]) -> dict:
    from tests.conftest import tiny_overrides

    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ROOT / "configs/accelerate" / config),
           "--num_processes", "2", "--mixed_precision", "no", "-m", "marginal_rl", "train",
           "--config", str(ROOT / "configs/quickstart.yaml"), *tiny_overrides(cache, str(out)), *extra]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    r = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_accelerate_launch_zero2_and_zero3_match_ddp(tmp_path, policy_cache):
    """The shipped launcher configs on 2 CPU processes, with what ZeRO-3 must gather for: rollouts from a lagging
    snapshot generated ahead in a thread, a KL reference, evaluation with the trained model, `final/` weights."""
    import pandas as pd
    from safetensors.torch import load_file

    extra = ["train.max_steps=4", "train.eval_every=2", "rollout.max_staleness=1", "rollout.async_rollout=true",
             "algo.kl_coef=0.05", "budget.policy=marginal"]
    runs = {c: _launch(c, tmp_path / c, policy_cache, extra)
            for c in ("cpu_2proc.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml")}
    ddp = tmp_path / "cpu_2proc.yaml"
    trajectories = pd.read_parquet(ddp / "trajectories").sort_values("traj_id")
    weights = load_file(ddp / "final" / "model.safetensors")
    for config in ("deepspeed_zero2.yaml", "deepspeed_zero3.yaml"):
        assert runs[config]["world_size"] == 2
        other = pd.read_parquet(tmp_path / config / "trajectories").sort_values("traj_id")
        assert other.traj_id.tolist() == trajectories.traj_id.tolist()
        assert [list(x) for x in other.completion_ids] == [list(x) for x in trajectories.completion_ids]
        final = load_file(tmp_path / config / "final" / "model.safetensors")
        for k in weights:
            torch.testing.assert_close(final[k], weights[k], rtol=1e-4, atol=1e-5)
