"""Any prompt dataset plus TRL-style reward functions: `task.name: dataset`.

    task:
      name: dataset
      dataset: examples/countdown_small.jsonl     # .jsonl, .parquet, or a `datasets.save_to_disk` directory
      reward_funcs: [examples.rewards.format_reward, examples.rewards.accuracy_reward]
      reward_weights: [0.5, 1.0]

The dataset needs a `prompt` column: plain text, or chat messages (a list of {"role", "content"}) rendered with the
policy's chat template (`add_generation_prompt=True`) when it has one, else as "role: content" lines ending in
"assistant: ". Every other column is passed to the reward functions as a keyword list. Eval split: `task.eval_dataset`
when set, else the "test" split of a saved DatasetDict, else a deterministic 10 % of the rows (seeded by `task.seed`).
Single-turn: one completion per sample, scored by rollout/rewards.py. A tiny policy warm-starts on a string
`completion` column when there is one. Guide: docs/reward_functions.md.
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marginal_rl.rollout.config import DatasetTaskConfig, RolloutConfig
from marginal_rl.rollout.errors import TaskError
from marginal_rl.rollout.generator import decode_completion, encode_prompt, sample
from marginal_rl.rollout.rewards import PromptValue, RewardFunc, load_reward_funcs, score_completions
from marginal_rl.rollout.tasks import TaskSet
from marginal_rl.rollout.types import Prompt, Trajectory

EVAL_FRACTION = 0.1
NOT_REWARD_KWARGS = ("prompt", "completion", "completion_ids")  # as in TRL: the rest become keyword lists


def read_rows(path: str, key: str = "task.dataset") -> dict[str, list[dict]]:
    """Rows of a local dataset by split name ("train", plus "test" when a saved DatasetDict has one)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TaskError(f"{key}: {path!r} does not exist (expected a .jsonl or .parquet file or a datasets directory)")
    if p.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(p))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise TaskError(f"{key}: {path!r} is a directory but not one written by datasets.save_to_disk ({e})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise TaskError(f"{key}: {path!r} holds splits {list(loaded)}; expected a 'train' split")
            return {name: loaded[name].to_list() for name in ("train", "test") if name in loaded}
        return {"train": loaded.to_list()}
    if p.suffix in (".jsonl", ".json"):
        rows = []
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            line = p.read_bytes()[: e.start].count(b"\n") + 1
            raise TaskError(f"{key}: {path}:{line}: not UTF-8 text (byte {e.start}: {e.reason}); save the file as "
                            f"UTF-8") from None
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{key}: {path}:{n}: not valid JSON ({e.msg}); expected one object per line") from None
            if not isinstance(row, dict):
                raise TaskError(f"{key}: {path}:{n}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
        return {"train": rows}
    if p.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return {"train": pq.read_table(p).to_pylist()}
        except (pa.ArrowException, OSError) as e:
            raise TaskError(f"{key}: {path}: not a readable parquet file ({e})") from None
    raise TaskError(f"{key}: {path!r}: expected a .jsonl or .parquet file or a datasets directory, got {p.suffix!r}")


def _check_prompt(value: object, where: str) -> PromptValue:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise TaskError(f"{where}: `prompt` must be a string or a non-empty list of {{'role', 'content'}} messages, "
                    f"got {value!r:.120}")


def to_prompts(rows: Sequence[dict], id_prefix: str, where: str, group_column: str = "family",
               answer_column: str = "") -> tuple[list[Prompt], dict[str, PromptValue]]:
    """Prompt records (meta = the columns passed to reward functions; family = the `group_column` value; answer =
    the `answer_column` value, which every row must have as a non-empty string when it is named) and the raw prompt
    values by prompt_id."""
    if not rows:
        raise TaskError(f"{where}: no rows")
    columns = list(dict.fromkeys(k for row in rows for k in row))  # rows of a .jsonl file may omit keys
    if "prompt" not in columns:
        raise TaskError(f"{where}: no `prompt` column (columns: {', '.join(columns)})")
    prompts, raw = [], {}
    for i, row in enumerate(rows):
        pid = f"{id_prefix}{i}"
        raw[pid] = _check_prompt(row.get("prompt"), f"{where} row {i}")
        meta = {k: row.get(k) for k in columns if k not in NOT_REWARD_KWARGS}
        family = row.get(group_column) if group_column else None  # optional, as the built-in tasks' families
        answer = row.get(answer_column, "") if answer_column else ""
        if answer_column and not (isinstance(answer, str) and answer):
            raise TaskError(f"{where} row {i}: task.answer_column={answer_column!r} needs a non-empty string, got "
                            f"{answer!r:.80}")
        prompts.append(Prompt(prompt_id=pid, text=_plain_text(raw[pid]), meta=meta,
                              family=family if isinstance(family, str) else "", answer=answer))
    return prompts, raw


def _plain_chat(messages: list[dict[str, str]]) -> str:
    """A chat prompt for a tokenizer without a chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def render_prompt(tokenizer, value: PromptValue) -> str:
    if isinstance(value, str):
        return value
    if tokenizer.chat_template is not None:
        return tokenizer.apply_chat_template(value, add_generation_prompt=True, tokenize=False)
    return _plain_chat(value)


@dataclass
class DatasetTaskSet(TaskSet):
    """Single-turn rollouts of dataset prompts scored by user reward functions (rollout/rewards.py)."""

    funcs: list[RewardFunc] = field(default_factory=list)
    raw_prompts: dict[str, PromptValue] = field(default_factory=dict)
    reward_timeout_s: float | None = None

    def rollout(self, model, tokenizer, allocation: Sequence[tuple[Prompt, int]], cfg: RolloutConfig, *, step: int,
                version: int, temperature: float, id_prefix: str = "") -> list[Trajectory]:
        flat = [(g, p) for g, (p, n) in enumerate(allocation) for _ in range(n)]
        if not flat:
            return []
        rendered = {p.prompt_id: render_prompt(tokenizer, self.raw_prompts[p.prompt_id]) for p, _ in allocation}
        encoded = {pid: self._encode(tokenizer, pid, text) for pid, text in rendered.items()}
        samples = sample(model, tokenizer, [encoded[p.prompt_id] for _, p in flat], cfg.max_new_tokens, temperature,
                         cfg.top_p, cfg.batch_size)
        texts = [decode_completion(tokenizer, s.completion_ids) for s in samples]
        rewards, values = self.score([p for _, p in flat], texts, [s.completion_ids for s in samples], step)
        names = [f.path for f in self.funcs]
        return [
            Trajectory(
                traj_id=f"{id_prefix}s{step}-{k}", prompt_id=p.prompt_id, group_id=f"{id_prefix}s{step}-g{g}",
                step=step, behavior_version=version, prompt_ids=s.prompt_ids, completion_ids=s.completion_ids,
                completion_mask=[1] * len(s.completion_ids), behavior_logprobs=s.logprobs, reward=r,
                finish_reason=s.finish_reason, prompt_text=rendered[p.prompt_id], completion_text=text, family=p.family,
                rewards={name: math.nan if v[k] is None else v[k] for name, v in zip(names, values, strict=True)},
            )
            for k, ((g, p), s, text, r) in enumerate(zip(flat, samples, texts, rewards, strict=True))
        ]

    def _encode(self, tokenizer, prompt_id: str, rendered: str) -> list[int]:
        chat = tokenizer.chat_template is not None and not isinstance(self.raw_prompts[prompt_id], str)
        return encode_prompt(tokenizer, rendered, chat=chat)

    def prompt_ids(self, tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
        return [self._encode(tokenizer, p.prompt_id, render_prompt(tokenizer, self.raw_prompts[p.prompt_id]))
                for p in prompts]

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str], completion_ids: Sequence[list[int]] | None,
              step: int) -> tuple[list[float], list[list[float | None]]]:
        return score_prompts(self.funcs, self.raw_prompts, prompts, completions, completion_ids, step,
                             self.reward_timeout_s)


def score_prompts(funcs: Sequence[RewardFunc], raw_prompts: dict[str, PromptValue], prompts: Sequence[Prompt],
                  completions: Sequence[str], completion_ids: Sequence[list[int]] | None = None,
                  step: int = -1, timeout_s: float | None = None) -> tuple[list[float], list[list[float | None]]]:
    """(combined rewards, each function's values) of `completions`, each function called once with the prompts'
    columns as keyword lists."""
    names = dict.fromkeys(k for p in prompts for k in p.meta)
    columns = {name: [p.meta.get(name) for p in prompts] for name in names}
    return score_completions(funcs, [raw_prompts[p.prompt_id] for p in prompts], completions, completion_ids, columns,
                             prompt_ids=[p.prompt_id for p in prompts], step=step, timeout_s=timeout_s)


def _combined_rewards(funcs: Sequence[RewardFunc], raw_prompts: dict[str, PromptValue], prompts: Sequence[Prompt],
                      completions: Sequence[str], timeout_s: float | None = None) -> list[float]:
    return score_prompts(funcs, raw_prompts, prompts, completions, timeout_s=timeout_s)[0]


def split_rows(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """A deterministic EVAL_FRACTION of the rows (at least one) held out for eval, the rest in file order."""
    if len(rows) < 2:
        raise TaskError(f"task.dataset: {len(rows)} row(s) cannot be split into train and eval; add rows or set "
                        f"task.eval_dataset")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(EVAL_FRACTION * len(rows)))])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def build_dataset(cfg: DatasetTaskConfig, rollout_cfg: RolloutConfig,
                  reward_funcs: Sequence[Callable[..., Any]] = ()) -> DatasetTaskSet:
    """The dataset task; `reward_funcs` (callables, from the Python API) are scored after those that
    `task.reward_funcs` names, with `task.reward_weights` over both."""
    funcs = load_reward_funcs([*cfg.reward_funcs, *reward_funcs], cfg.reward_weights)
    splits = read_rows(cfg.dataset)
    name = Path(cfg.dataset).stem
    if cfg.eval_dataset:
        train_rows, eval_rows = splits["train"], read_rows(cfg.eval_dataset, "task.eval_dataset")["train"]
    elif "test" in splits:
        train_rows, eval_rows = splits["train"], splits["test"]
    else:
        train_rows, eval_rows = split_rows(splits["train"], cfg.seed)
    train, raw = to_prompts(train_rows, f"{name}-", f"task.dataset {cfg.dataset!r}", cfg.group_column,
                            cfg.answer_column)
    eval_, raw_eval = to_prompts(eval_rows, f"{name}-eval-", f"task.eval_dataset {cfg.eval_dataset or cfg.dataset!r}",
                                 cfg.group_column)
    raw_prompts = {**raw, **raw_eval}
    demos = [(_plain_text(row["prompt"]), row["completion"]) for row in train_rows
             if isinstance(row.get("completion"), str)]
    return DatasetTaskSet(
        train=train, eval=eval_,
        reward=functools.partial(_combined_rewards, funcs, raw_prompts, timeout_s=cfg.reward_timeout_s),
        demonstrations=functools.partial(_demonstrations, demos, cfg.dataset),
        key={"name": "dataset", "dataset": cfg.dataset, "eval_dataset": cfg.eval_dataset, "seed": cfg.seed},
        funcs=funcs, raw_prompts=raw_prompts, reward_timeout_s=cfg.reward_timeout_s,
    )


def _plain_text(value: PromptValue) -> str:
    return value if isinstance(value, str) else _plain_chat(value)


def _demonstrations(pairs: list[tuple[str, str]], path: str) -> list[tuple[str, str]]:
    """(prompt, completion) pairs for the tiny policy's warm start: the dataset's own `completion` column, if any."""
    if not pairs:
        raise TaskError(f"task.dataset {path!r}: a tiny policy needs a string `completion` column to warm-start on; "
                        f"add one or set model.path to a pretrained policy (e.g. smollm2) or a model directory")
    return pairs
