"""Fault injection (`pytest -m faults`): kill -9 at random moments with resume, corrupt checkpoints, a full disk, and
hostile model code through the agent environment. Each must end with the run's records intact: a resumed run equals
an uninterrupted one row for row and weight for weight.

The default test run does two kill trials; `pytest -m slow` runs the long form (ten). Each trial prints one line
(kills, launches, rows lost, rows duplicated) that the summary quotes; run with `-s` to see them."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from marginal_rl.rollout.build import build_task
from marginal_rl.train import loop
from marginal_rl.train.checkpoint import list_checkpoints
from marginal_rl.train.config import load_config
from marginal_rl.train.model import resolve_policy_path
from marginal_rl.train.store import StorageError
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[2]
KILL_RUN = ["budget.policy=marginal", "train.max_steps=6", "train.save_every=1", "train.eval_every=3", "train.lr=1e-3"]


def _launch(cache: str, out: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "marginal_rl", "train", *tiny_overrides(cache, str(out)), *KILL_RUN, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env, cwd=ROOT)


def _rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "trajectories").drop(columns=["actions"])


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, policy_cache):
    """The uninterrupted run, and how long it took with the tiny policy already cached (the kill times are drawn
    over that span)."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    cfg = load_config([], tiny_overrides(policy_cache, str(out)) + KILL_RUN)
    resolve_policy_path(cfg.model, build_task(cfg.task, cfg.rollout), cfg.seed)
    t0 = time.monotonic()
    proc = _launch(policy_cache, out, [])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return out, time.monotonic() - t0


def _kill_trials(reference, policy_cache, tmp_path, trials: int, seed: int) -> None:
    ref_out, ref_seconds = reference
    ref_rows, ref_weights = _rows(ref_out), _weights(ref_out)
    rng = random.Random(seed)
    for trial in range(trials):
        out = tmp_path / f"trial{trial}"
        kills = launches = 0
        while not (out / "summary.json").is_file():
            resume = ["train.resume_from=latest"] if list_checkpoints(out) else ["train.overwrite=true"]
            proc = _launch(policy_cache, out, resume)
            launches += 1
            if kills < 3:  # a kill at any moment of the run: start-up, a step, a checkpoint, the final write
                try:
                    proc.wait(timeout=rng.uniform(0.1, ref_seconds))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    kills += 1
            _, err = proc.communicate(timeout=600)
            assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]
        rows = _rows(out)
        key = ["step", "traj_id"]
        lost = len(ref_rows.merge(rows[key].drop_duplicates(), on=key, how="left", indicator=True)
                   .query("_merge == 'left_only'"))
        duplicated = int(rows.duplicated(key).sum())
        print(f"kill trial {trial}: {kills} kill(s), {launches} launch(es), {len(rows)} rows, {lost} lost, "
              f"{duplicated} duplicated")
        assert lost == 0 and duplicated == 0
        pd.testing.assert_frame_equal(ref_rows, rows)
        weights = _weights(out)
        assert all(torch.equal(ref_weights[k], weights[k]) for k in ref_weights)
        assert json.loads((out / "summary.json").read_text())["tokens"] == \
            json.loads((ref_out / "summary.json").read_text())["tokens"]


def test_kill_9_at_random_moments_then_resume_loses_and_duplicates_nothing(reference, policy_cache, tmp_path):
    _kill_trials(reference, policy_cache, tmp_path, trials=2, seed=0)


@pytest.mark.slow
def test_kill_9_long_form(reference, policy_cache, tmp_path):
    _kill_trials(reference, policy_cache, tmp_path, trials=10, seed=1)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one_and_the_run_comes_out_the_same(tmp_path,
                                                                                                   policy_cache):
    common = ["budget.policy=marginal", "train.max_steps=4", "train.save_every=2", "train.lr=1e-3"]

    def cfg(name: str, extra=()):
        return load_config([], tiny_overrides(policy_cache, str(tmp_path / name)) + common + list(extra))

    for name in ("full", "broken"):
        loop.train(cfg(name), build_task(cfg(name).task, cfg(name).rollout))
    (tmp_path / "broken" / "checkpoints" / "step-000004" / "manifest.json").write_bytes(b"\x00\xff garbage")
    (tmp_path / "broken" / "final" / "model.safetensors").unlink()
    resumed = cfg("broken", ["train.resume_from=latest"])
    with pytest.warns(UserWarning, match=r"skipping 1 broken checkpoint.*step-000004: manifest.json is corrupt"):
        loop.train(resumed, build_task(resumed.task, resumed.rollout))
    pd.testing.assert_frame_equal(_rows(tmp_path / "full"), _rows(tmp_path / "broken"))
    wa, wb = _weights(tmp_path / "full"), _weights(tmp_path / "broken")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: room for the config and the stores, not for a checkpoint of the tiny policy (~1.5 MB)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_during_a_checkpoint_names_the_directory_and_keeps_the_stores(small_disk, policy_cache):
    out = small_disk / "run"
    cmd = [sys.executable, "-m", "marginal_rl", "train", *tiny_overrides(policy_cache, str(out)),
           "budget.policy=none", "train.max_steps=3", "train.save_every=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"error: checkpoint step-000001: could not write under {out / 'checkpoints'} (no space left on the device")
    assert list((out / "checkpoints").iterdir()) == []  # the temporary checkpoint is gone
    assert sorted(pd.read_parquet(out / "trajectories").step.unique()) == [0]  # what was written stays readable


def test_the_same_failure_through_the_python_api_is_a_storage_error(small_disk, policy_cache):
    cfg = load_config([], tiny_overrides(policy_cache, str(small_disk / "run")) +
                      ["budget.policy=none", "train.max_steps=2", "train.save_every=1"])
    with pytest.raises(StorageError, match="no space left on the device"):
        loop.train(cfg, build_task(cfg.task, cfg.rollout))


# Model-written solutions: each defines f correctly, then misbehaves when the tests run it. Those whose process still
# reaches the tests and exits 0 pass them (the misbehaviour is contained, not punished); the rest fail.
PASSING = {"leaves a SysV segment", "writes outside its directory", "detaches a daemon"}
HOSTILE = {
    "forges the supervisor's failure line": "import sys\nprint('sandbox: could not start the child: x', "
                                            "file=sys.stderr)\nsys.exit(127)",
    "prints MemoryError": "import sys\nprint('MemoryError', file=sys.stderr)\nsys.exit(1)",
    "kills its parents": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(0, signal.SIGKILL)",
    "leaves a SysV segment": "import ctypes\nlibc = ctypes.CDLL(None)\nid_ = libc.shmget(0x6d726c31, 50 << 20, "
                             "0o1666)\naddr = libc.shmat(id_, None, 0)",
    "writes outside its directory": "for d in ('/run/lock', '/dev/shm', '/tmp', '/var/tmp'):\n    try:\n"
                                    "        open(d + '/mrl-faults-left', 'w').write('x')\n    except OSError:\n"
                                    "        pass",
    "detaches a daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                         "        time.sleep(60)\n    os._exit(0)",
    "fork-bombs": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "sleeps forever": "import time\ntime.sleep(60)",
}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux only")
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_solutions_are_scored_never_raise_and_leave_nothing_behind(case):
    from marginal_rl.rollout.fix_test import FixTask, FixTestEnv

    task = FixTask(task_id="t", family="op", difficulty="easy", entry_point="f", buggy_source="def f(x):\n    return x\n",
                   test_source="assert f(1) == 2\n", reference_source="def f(x):\n    return x + 1\n")
    env = FixTestEnv(task, timeout_s=1.0)
    env.reset()
    code = f"def f(x):\n    return x + 1\n\n{HOSTILE[case]}\n"
    assert env.step(f"<edit>\n{code}</edit>").observation.startswith("edit applied")
    ran = env.step("<run_tests/>")
    passes = case in PASSING
    assert ran.tests_passed is passes and ran.observation.startswith("PASS" if passes else "FAIL")
    submitted = env.step("<submit/>")
    assert (submitted.done, submitted.reward) == (True, float(passes))
    shm = Path("/proc/sysvipc/shm")
    assert not shm.exists() or "1836215345" not in shm.read_text()  # 0x6d726c31: the segment died with the call
    for d in ("/run/lock", "/dev/shm", "/tmp", "/var/tmp"):
        assert not Path(d, "mrl-faults-left").exists()
