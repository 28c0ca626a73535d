"""A user reward function that raises mid-run: the run stops with a message naming the function and the prompt, and
every step written before stays readable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]

REWARDS = '''
def flaky(prompts, completions, trainer_state=None, **columns):
    if trainer_state.global_step >= 2:
        raise RuntimeError("the grader service is down")
    return [float(c.strip() == a) for c, a in zip(completions, columns["answer"])]
'''


def test_raising_reward_function_stops_cleanly_and_keeps_the_store(tmp_path, policy_cache):
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "completion": str(a + b)} for a in range(8) for b in range(8)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "user_rewards.py").write_text(REWARDS)  # imported from the working directory, as a TRL user would
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "marginal_rl", "train", "task.name=dataset", "task.dataset=data.jsonl",
           "task.reward_funcs=[user_rewards.flaky]", f"output_dir={out}", f"model.cache_dir={policy_cache}/dataset",
           "model.hidden_size=32", "model.warm_start_steps=20", "rollout.prompts_per_step=4", "rollout.group_size=2",
           "rollout.max_new_tokens=4", "rollout.eval_samples=1", "train.max_steps=5", "train.eval_every=0",
           "log.report_to=none", "log.progress=false"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()
    message = "\n".join(last[-4:])
    assert "user_rewards.flaky" in message and "the grader service is down" in message
    assert "+" in message  # names the prompt it failed on
    assert "Traceback" not in r.stderr
    df = pd.read_parquet(out / "trajectories")  # steps 0 and 1 were written and stay readable
    assert sorted(df.step.unique()) == [0, 1]
