"""Prompt clusters for the pooled evidence of prompts without a family (`budget.pool_clusters`, marginal policy).

The pooled prior (docs/budget.md, "Pooled evidence") needs groups of prompts that share a pass rate to first order.
The built-in tasks label them and a dataset may (`task.group_column`); without either, prompts are grouped here by
their surface template, which is what sets the difficulty of templated data (the operation and the operands' sizes:
`12+34=` and `56+78=` alike, `123+456=` not). Pure functions of the texts, deterministic across processes and runs
(no salted hashing, a seeded generator), so every rank and every resumed run computes the same clusters.

Features of a prompt, over its tokens (runs of letters, runs of digits, or one other character, lower-cased):

    shape   each token by its shape: letters -> a, digits -> 9 (`bfjai` -> `aaaaa`, `9482` -> `9999`)
    word    a run of letters that at least `min_df` of the prompts contain (at least 2 prompts), as itself: the
            words a template repeats (`rev`, `count`, `in`); rarer words and every number are content and count by
            their shape only (other characters, `+` or `=`, are their own shape)
    pair    each pair of adjacent tokens, each as its word if kept and its shape otherwise (the order: `99+9=`)

weighted tf-idf (idf = ln((1 + N)/(1 + df)) + 1) and scaled to unit length, over the `max_features` features most
prompts share. Identical rows are one point weighing their count; k-means++ with `restarts` seeded restarts keeps
the lowest within-cluster sum of squares; with at most k distinct rows each is its own cluster.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

TOKEN = re.compile(r"[a-z]+|[0-9]+|\S")


def _shape(token: str) -> str:
    return re.sub(r"[0-9]", "9", re.sub(r"[a-z]", "a", token))


def prompt_features(texts: Sequence[str], min_df: float = 0.01, max_features: int = 1024) -> np.ndarray:
    """(N, F) float32: each prompt's unit-length tf-idf vector over its shape, word and pair features (module
    docstring), F <= max_features (the features most prompts contain; ties by name)."""
    tokens = [TOKEN.findall(t.lower()) for t in texts]
    n = len(texts)
    df = Counter(tok for toks in tokens for tok in set(toks))
    kept = {tok for tok, c in df.items() if c >= max(2, min_df * n) and tok.isalpha()}
    bags = []
    for toks in tokens:
        keys = [f"w:{t}" if t in kept else f"s:{_shape(t)}" for t in toks]
        bag = Counter(f"s:{_shape(t)}" for t in toks)
        bag.update(k for k in keys if k.startswith("w:"))
        bag.update(f"p:{a} {b}" for a, b in itertools.pairwise(keys))
        bags.append(bag)
    feature_df = Counter(f for bag in bags for f in bag)
    vocab = sorted(feature_df, key=lambda f: (-feature_df[f], f))[:max_features]
    column = {f: j for j, f in enumerate(vocab)}
    idf = np.array([np.log((1 + n) / (1 + feature_df[f])) + 1 for f in vocab], dtype=np.float32)
    x = np.zeros((n, len(vocab)), dtype=np.float32)
    for i, bag in enumerate(bags):
        for f, c in bag.items():
            if f in column:
                x[i, column[f]] = c
    x *= idf
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def kmeans(points: np.ndarray, weights: np.ndarray, k: int, seed: int, restarts: int = 4,
           max_iter: int = 100) -> np.ndarray:
    """(M,) cluster of each point: weighted k-means (Lloyd) from k-means++ seeds, the best of `restarts` runs by
    within-cluster sum of squares. Needs more distinct points than k."""
    rng = np.random.default_rng(seed)
    sq = (points * points).sum(1)
    best, best_cost = None, np.inf
    for _ in range(restarts):
        centres = [points[rng.choice(len(points), p=weights / weights.sum())]]
        d2 = np.maximum(sq - 2 * points @ centres[0] + centres[0] @ centres[0], 0)
        for _ in range(1, k):
            p = weights * d2
            centres.append(points[rng.choice(len(points), p=p / p.sum())])
            d2 = np.minimum(d2, np.maximum(sq - 2 * points @ centres[-1] + centres[-1] @ centres[-1], 0))
        c = np.stack(centres)
        labels = None
        for _ in range(max_iter):
            dist = sq[:, None] - 2 * points @ c.T + (c * c).sum(1)[None, :]
            new = dist.argmin(1)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            for j in range(k):
                member = labels == j
                if member.any():  # an emptied centre stays where it was
                    c[j] = np.average(points[member], axis=0, weights=weights[member])
        cost = float((weights * np.maximum(dist[np.arange(len(points)), labels], 0)).sum())
        if cost < best_cost - 1e-9:
            best, best_cost = labels, cost
    return best


def cluster_prompts(texts: Sequence[str], k: int, seed: int = 0, min_df: float = 0.01) -> list[int]:
    """Cluster of each text, 0..k-1 (fewer when the texts have fewer than k distinct feature rows), numbered by
    decreasing size, ties by first appearance."""
    if k < 1:
        raise ValueError(f"cluster_prompts: expected k >= 1 clusters, got {k}")
    if not texts:
        return []
    x = prompt_features(texts, min_df)
    rows, inverse, counts = np.unique(x, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if len(rows) <= k:
        labels = np.arange(len(rows))
    else:
        labels = kmeans(rows.astype(np.float64), counts.astype(np.float64), k, seed)
    per_prompt = labels[inverse]
    sizes = Counter(per_prompt.tolist())
    first_seen = {}
    for i, c in enumerate(per_prompt.tolist()):
        first_seen.setdefault(c, i)
    order = sorted(sizes, key=lambda c: (-sizes[c], first_seen[c]))
    rank = {c: r for r, c in enumerate(order)}
    return [rank[c] for c in per_prompt.tolist()]
