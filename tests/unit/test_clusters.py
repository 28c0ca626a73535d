"""Prompt clusters for the pooled evidence of prompts without a family (budget/clusters.py, budget.pool_clusters)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from marginal_rl.budget.clusters import cluster_prompts, prompt_features
from marginal_rl.budget.policies import budget_config as BudgetConfig
from marginal_rl.rollout.tasks import generate_arith
from marginal_rl.rollout.types import Prompt
from marginal_rl.train.config import ConfigError, load_config
from marginal_rl.train.loop import build_families


def test_features_by_hand():
    # "rev ab=" and "rev cd=": tokens rev, ab|cd, =. `rev` is in both prompts (>= 2, >= 1 %): a word; `ab`, `cd` are
    # in one each: content, by shape `aa`. Features of each: s:aaa, s:aa, s:= (shapes), w:rev, p:w:rev s:aa,
    # p:s:aa s:= -> the same six, each in both prompts (idf = ln(3/3) + 1 = 1), count 1: each coordinate 1/√6
    x = prompt_features(["rev ab=", "rev cd="])
    assert x.shape == (2, 6) and np.allclose(x, 1 / np.sqrt(6))
    # a number is never a word, however common: "7+8=" x 3 share no `w:` feature; shapes s:9 (twice), s:+, s:=,
    # pairs p:s:9 s:+, p:s:+ s:9, p:s:9 s:=: six features, s:9 counted twice -> norm √(4 + 5) = 3 and s:9 = 2/3
    x = prompt_features(["7+8=", "7+9=", "7+1="])
    assert x.shape == (3, 6) and np.isclose(x[0].max(), 2 / 3) and np.allclose(x[0], x[2])


def test_templates_are_clusters_and_the_closest_merge_first():
    texts = ["3+4=", "5+6=", "12+3=", "45+6=", "12*34=", "56*78=", "rev abc=", "rev xyz=", "rev hello="]
    # six distinct templates (1+1 digits, 2+1, 2*2, rev of 3 letters, rev of 5): with k >= 6 each is a cluster,
    # numbered by size (ties: first appearance)
    assert cluster_prompts(texts, k=8) == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    # with k = 2 the arithmetic (digits and an operator) and the `rev` prompts separate
    two = cluster_prompts(texts, k=2)
    assert len(set(two[:6])) == 1 and len(set(two[6:])) == 1 and two[0] != two[6]
    assert cluster_prompts(texts, k=1) == [0] * len(texts) and cluster_prompts([], k=3) == []
    with pytest.raises(ValueError, match="k >= 1"):
        cluster_prompts(texts, k=0)


def test_clusters_recover_the_arithmetic_families():
    # the built-in task's six families are six templates; the clusters find them exactly, at k = 6 and with room to
    # spare (k = 12: an empty cluster is not returned)
    train, _ = generate_arith(1000, 10, seed=0)
    for k in (6, 12):
        labels = cluster_prompts([p.text for p in train], k)
        pairs = Counter(zip(labels, (p.family for p in train), strict=True))
        assert len(pairs) == len(set(labels)) == 6, pairs  # each cluster holds one family and each family one cluster


def test_clusters_do_not_depend_on_the_process_or_its_hash_seed():
    code = ("from marginal_rl.rollout.tasks import generate_arith; from marginal_rl.budget.clusters import "
            "cluster_prompts; t, _ = generate_arith(400, 10, 0); "
            "print(cluster_prompts([p.text for p in t] + ['rev ab=', 'rev cd=', 'count a in xyz='], 3, seed=1))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("0", "123")}
    assert len(outs) == 1


def test_pool_clusters_needs_a_reader_and_is_a_count():
    assert BudgetConfig("marginal", pool_clusters=8, pool_strength=4).pool_clusters == 8
    assert BudgetConfig("marginal", pool_clusters=8, family_half_samples=64).pool_clusters == 8
    with pytest.raises(ValueError, match="pool_clusters: .*set budget.pool_strength"):
        BudgetConfig("marginal", pool_clusters=8)
    with pytest.raises(ValueError, match="pool_clusters: expected an integer >= 0"):
        BudgetConfig("marginal", pool_clusters=-1, pool_strength=4)
    with pytest.raises(ConfigError, match="budget.pool_clusters: read only by budget.policy=marginal"):
        load_config([], ["budget.policy=none", "budget.pool_clusters=8"])


def _cfg(pool_clusters: int, task: str = "dataset"):
    return SimpleNamespace(budget=BudgetConfig("marginal", pool_strength=4, pool_clusters=pool_clusters),
                           task=SimpleNamespace(name=task), seed=0)


def test_build_families_clusters_only_the_prompts_without_a_family():
    prompts = [Prompt("a", "3+4="), Prompt("b", "5+6="), Prompt("c", "rev abc="), Prompt("d", "rev xyz=", family="f")]
    task = SimpleNamespace(train=prompts)
    assert build_families(_cfg(0), task) == ({"d": "f"}, [])
    families, clusters = build_families(_cfg(4), task)
    assert families == {"a": "cluster-0", "b": "cluster-0", "c": "cluster-1", "d": "f"}
    assert clusters == [{"cluster": "cluster-0", "prompts": 2, "first": "3+4="},
                        {"cluster": "cluster-1", "prompts": 1, "first": "rev abc="}]
    labelled = SimpleNamespace(train=[Prompt("d", "rev xyz=", family="f")])
    with pytest.raises(ConfigError, match="every training prompt .* has a family.*task.group_column: ''"):
        build_families(_cfg(4), labelled)
    with pytest.raises(ConfigError, match="task.name=arith has a family, so there is nothing to cluster$"):
        build_families(_cfg(4, "arith"), labelled)
