"""Write the second benchmark task: single-turn string puzzles in graded families, as a `task.name=dataset` dataset.

    python scripts/make_string_task.py                      # -> examples/bench_strings/{train,eval}.jsonl

Families (share of rows), easiest first: rev3 (reverse 3 letters), dup3 (double each of 3 letters), max5 (the largest
of 5 digits), sort4 (sort 4 digits), rev5 (reverse 5 letters), count (how often a letter occurs in 7 letters). Every
row has `prompt`, `answer`, `family` and a `completion` for the tiny policy's warm start: the answer, except that a
per-family share of them end with a stray "." that the exact-match reward (examples/string_rewards.py) rejects, so the
warm-started policy is right sometimes, as on the arithmetic task. The task was built for benchmark v2 to check the
arithmetic figures on a task no budget knob was tuned on (docs/benchmarks.md); rerunning the script with the same
seed writes the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections.abc import Callable
from pathlib import Path

Make = Callable[[random.Random], tuple[str, str]]


def _letters(r: random.Random, n: int) -> str:
    return "".join(r.choice(string.ascii_lowercase[:12]) for _ in range(n))  # 12 letters: a small vocabulary


def _digits(r: random.Random, n: int) -> str:
    return "".join(r.choice(string.digits) for _ in range(n))


def _rev(n: int) -> Make:
    def make(r: random.Random) -> tuple[str, str]:
        s = _letters(r, n)
        return f"rev {s}=", s[::-1]
    return make


def _dup(r: random.Random) -> tuple[str, str]:
    s = _letters(r, 3)
    return f"dup {s}=", "".join(c + c for c in s)


def _max(r: random.Random) -> tuple[str, str]:
    s = _digits(r, 5)
    return f"max {' '.join(s)}=", max(s)


def _sort(r: random.Random) -> tuple[str, str]:
    s = _digits(r, 4)
    return f"sort {s}=", "".join(sorted(s))


def _count(r: random.Random) -> tuple[str, str]:
    s, c = _letters(r, 7), r.choice("abcd")
    return f"count {c} in {s}=", str(s.count(c))


# family -> (share of rows, share of warm-start completions with a stray ".", generator)
FAMILIES: dict[str, tuple[float, float, Make]] = {
    "rev3": (0.2, 0.1, _rev(3)),
    "dup3": (0.15, 0.3, _dup),
    "max5": (0.15, 0.3, _max),
    "sort4": (0.2, 0.4, _sort),
    "rev5": (0.15, 0.4, _rev(5)),
    "count": (0.15, 0.4, _count),
}


def generate(num_train: int, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Distinct prompts in the family mix; the eval rows share no prompt with the train rows."""
    rng = random.Random(seed)
    names = list(FAMILIES)
    weights = [FAMILIES[n][0] for n in names]
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < num_train + num_eval:
        family = rng.choices(names, weights)[0]
        _, hedge, make = FAMILIES[family]
        prompt, answer = make(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        completion = answer + "." if rng.random() < hedge else answer
        rows.append({"prompt": prompt, "answer": answer, "family": family, "completion": completion})
    return rows[:num_train], rows[num_train:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("examples/bench_strings"), help="output directory")
    p.add_argument("--train", type=int, default=3000, help="training rows")
    p.add_argument("--eval", type=int, default=256, help="held-out eval rows")
    p.add_argument("--seed", type=int, default=7, help="generator seed")
    args = p.parse_args()
    train, eval_ = generate(args.train, args.eval, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", eval_)):
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
