"""scripts/free_probe_figures.py: the oracle diagnostic's figures with the probe's tokens taken off the x-axis,
checked by hand on a two-seed grid written here."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("free_probe_figures", ROOT / "scripts" / "free_probe_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(path: Path, tokens, probe, rewards) -> None:
    path.mkdir(parents=True)
    tokens, probe = [1000 * t for t in tokens], [1000 * p for p in probe]  # k = 1,000 tokens
    hist = [{"step": i, "tokens": t, "tokens_probe": p, "eval/reward": r}
            for i, (t, p, r) in enumerate(zip(tokens, probe, rewards, strict=True))]
    (path / "summary.json").write_text(json.dumps({
        "eval_history": hist, "steps": 10, "tokens": {"total": tokens[-1], "probe": probe[-1]},
        "ledger": {"groups": 4, "zero_signal_groups": 1}}))


def test_tokens_to_the_target_are_read_off_the_probe_free_axis(tmp_path, capsys):
    # the baseline reaches start + 0.05 at 200k and 300k tokens; the arm at 200k and 400k tokens in all, of which the
    # probe's 150k and 300k: at 50k and 100k probe-free tokens. B = min(300k, 350k): ratios 200/50 and 300/100
    _run(tmp_path / "base" / "seed0", [0, 100, 200, 300], [0] * 4, [0.3, 0.32, 0.36, 0.4])
    _run(tmp_path / "base" / "seed1", [0, 100, 200, 300], [0] * 4, [0.3, 0.31, 0.33, 0.36])
    _run(tmp_path / "arm" / "seed0", [0, 200, 400, 800], [0, 150, 300, 450], [0.3, 0.36, 0.4, 0.4])
    _run(tmp_path / "arm" / "seed1", [0, 200, 400, 800], [0, 150, 300, 450], [0.3, 0.33, 0.36, 0.4])
    assert _script().main([str(tmp_path), "--arms", "arm", "--baselines", "base"]) == 0
    out = capsys.readouterr().out
    assert "budget B = 300,000" in out
    assert f"base / arm, tokens to start + 0.05: {math.sqrt(12):.2f}x [3.00, 4.00] (2 seeds)" in out
    assert "(B = 300,000)" in out  # the pair's own budget
    assert "arm: 2 seeds, probe share 0.562, probe-free tokens/step 35000, zero-signal groups 0.25" in out
    assert "| 0 | 0.300 | 50k | 200k |" in out and "| 1 | 0.300 | 100k | 300k |" in out


def test_a_missing_arm_is_named(tmp_path, capsys):
    _run(tmp_path / "base" / "seed0", [0, 100], [0, 0], [0.3, 0.4])
    assert _script().main([str(tmp_path), "--arms", "nope", "--baselines", "base"]) == 2
    assert f"no finished runs under {tmp_path / 'nope'}" in capsys.readouterr().err
