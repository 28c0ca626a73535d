"""The installed package: one namespace, no top-level `train`, `budget` or `rollout`, the console command."""

from __future__ import annotations

import subprocess
import sys


def test_one_namespace_and_no_top_level_train_budget_rollout(tmp_path):
    # from a folder with its own train.py (as many projects have), outside the checkout
    (tmp_path / "train.py").write_text("WHO = 'the user'\n")
    code = ("import importlib.util as u, train, marginal_rl.train.loop, marginal_rl.budget.allocator, "
            "marginal_rl.rollout.build; print(train.WHO, [u.find_spec(n) for n in ('budget', 'rollout')])")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "the user [None, None]"


def test_console_command_and_module_entry_point(tmp_path):
    for cmd in (["marginal-rl", "--help"], [sys.executable, "-m", "marginal_rl", "--help"]):
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "train-trl" in r.stdout and "build-policy" in r.stdout


def test_the_python_api():
    import marginal_rl as mrl

    assert set(mrl.__all__) == {"ConfigError", "RunConfig", "config_to_dict", "fit", "load_config"}
    cfg = mrl.load_config([], ["budget.policy=marginal", "budget.token_budget=2400"])
    assert cfg.budget.token_budget == 2400 and isinstance(cfg, mrl.RunConfig)


def test_imports_flow_one_way():
    """marginal_rl (CLI, API) -> train -> budget -> rollout: no module imports a layer above its own."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    above = {"rollout": ("marginal_rl.budget", "marginal_rl.train"), "budget": ("marginal_rl.train",),
             "train": ()}
    top = ("marginal_rl.cli", "marginal_rl.grid", "marginal_rl.report", "marginal_rl.trl_peer")
    bad = []
    for layer, forbidden in above.items():
        for path in (root / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if isinstance(node, ast.ImportFrom) and node.module == "marginal_rl":
                    names = [f"marginal_rl.{a.name}" for a in node.names]
                bad += [f"{path.relative_to(root)}: {n}" for n in names if n.startswith(forbidden + top)]
    assert not bad, bad
