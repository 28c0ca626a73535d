"""User reward functions with TRL's signature, named by dotted import path, so a TRL user's reward code drops in.

    def accuracy_reward(prompts, completions, answer, **kwargs) -> list[float | None]: ...

    funcs = load_reward_funcs(["my_rewards.format_reward", "my_rewards.accuracy_reward"], [0.5, 1.0])
    rewards = score_completions(funcs, prompts, completions, completion_ids, columns, prompt_ids=ids, step=3)

Each function is called once per batch with keyword arguments, as TRL's GRPOTrainer calls it: `prompts`,
`completions`, `completion_ids`, every other dataset column as a list aligned with the completions, and
`trainer_state` (an object with `global_step`), `log_extra` and `log_metric` (accepted and ignored here), so code that
takes `**kwargs` works unchanged. Conversational prompts (lists of {"role", "content"} messages) give conversational
completions, `[{"role": "assistant", "content": text}]`, as in TRL.

Combination (TRL's rule): reward = sum over functions of weight x value, where a function that returns None (or NaN)
for a completion is left out of that completion's sum; a completion that every function left out gets 0.0 (what
TRL's `nansum` gives). The full guide is docs/reward_functions.md.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import math
import numbers
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from marginal_rl.rollout.errors import RewardFunctionError, RewardTimeoutError, TaskError

PromptValue = str | list[dict[str, str]]  # plain text, or chat messages


@dataclass(frozen=True)
class RewardFunc:
    path: str  # the dotted path it was loaded from: how errors and metrics name it
    fn: Callable[..., Any]
    weight: float = 1.0


@dataclass(frozen=True)
class TrainerState:
    """The part of TRL's `trainer_state` a reward function can read here."""

    global_step: int


def import_reward_func(path: str) -> Callable[..., Any]:
    """The callable at `path` ("package.module.func" or "package.module:func"), imported from the working directory
    or the installed packages. Raises TaskError naming the path when it cannot be found or is not callable."""
    module_name, _, attr = path.rpartition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise TaskError(f"task.reward_funcs: {path!r} is not a dotted path like `my_rewards.accuracy_reward`")
    cwd = os.getcwd()
    if cwd not in sys.path:  # reward modules live next to the config, like TRL scripts; installed packages win clashes
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(f"{e.name}.")):
            raise TaskError(f"task.reward_funcs: {path!r}: no module named {module_name!r} in the working directory "
                            f"({cwd}) or the installed packages") from None
        raise TaskError(f"task.reward_funcs: {path!r}: importing {module_name!r} failed: {e}") from e
    except Exception as e:  # user code ran at import: report it as theirs, with the traceback chained
        raise TaskError(f"task.reward_funcs: {path!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        raise TaskError(f"task.reward_funcs: {path!r}: module {module_name!r} ({module.__file__}) has no {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise TaskError(f"task.reward_funcs: {path!r} is a {type(fn).__name__}, not a function")
    return fn


def load_reward_funcs(funcs: Sequence[str | Callable[..., Any]], weights: Sequence[float] = ()) -> list[RewardFunc]:
    """Every reward function: a dotted path is imported, a callable (the Python API) taken as it is, named by its
    qualified name. `weights` default to 1.0 each."""
    if not funcs:
        raise TaskError("task.reward_funcs: expected at least one reward function (a dotted path, or a callable "
                        "through the Python API)")
    if weights and len(weights) != len(funcs):
        raise TaskError(f"task.reward_weights: expected {len(funcs)} weights (one per reward function), got {len(weights)}")
    weights = list(weights) or [1.0] * len(funcs)
    out = []
    for f, w in zip(funcs, weights, strict=True):
        if isinstance(f, str):
            out.append(RewardFunc(f, import_reward_func(f), float(w)))
        elif callable(f):
            out.append(RewardFunc(getattr(f, "__qualname__", type(f).__name__), f, float(w)))  # partials have none
        else:
            raise TaskError(f"task.reward_funcs: {f!r} is a {type(f).__name__}, not a dotted path or a function")
    return out


def combine_rewards(values: Sequence[Sequence[float | None]], weights: Sequence[float]) -> list[float]:
    """Per completion: sum of weight x value over the functions that gave a value (None = no opinion); 0.0 when
    none did. `values[f][i]` is function f's value for completion i."""
    if not values:
        return []
    out = []
    for i in range(len(values[0])):
        given = [(w, v[i]) for w, v in zip(weights, values, strict=True) if v[i] is not None]
        out.append(float(sum(w * x for w, x in given)))
    return out


def score_completions(funcs: Sequence[RewardFunc], prompts: Sequence[PromptValue], completions: Sequence[str],
                      completion_ids: Sequence[list[int]] | None, columns: dict[str, list], *,
                      prompt_ids: Sequence[str], step: int, timeout_s: float | None = None,
                      ) -> tuple[list[float], list[list[float | None]]]:
    """(combined rewards, each function's checked values) for a batch of completions of `prompts`.

    Raises RewardFunctionError naming the function and a prompt it failed on when a function raises, returns the
    wrong number of values, or returns something that is not a number or None; RewardTimeoutError when one call
    takes longer than `timeout_s`."""
    chat = bool(prompts) and not isinstance(prompts[0], str)
    completions_in: list = [[{"role": "assistant", "content": c}] for c in completions] if chat else list(completions)
    values = []
    for f in funcs:
        raw = _call(f, list(prompts), completions_in, completion_ids, columns, prompt_ids, step, timeout_s)
        values.append(_check(f, raw, prompts, prompt_ids))
    return combine_rewards(values, [f.weight for f in funcs]), values


def _invoke(f: RewardFunc, prompts: list, completions: list, completion_ids, columns: dict[str, list], step: int):
    out = f.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, trainer_state=TrainerState(step),
               log_extra=_ignore, log_metric=_ignore, **columns)
    return asyncio.run(out) if inspect.iscoroutine(out) else out  # TRL accepts async reward functions too


def _within(timeout_s: float | None, fn: Callable[[], Any], f: RewardFunc, prompt_ids: Sequence[str]) -> Any:
    """fn() on a daemon thread, waiting at most `timeout_s`: a hung reward function cannot be killed from inside the
    process, but it no longer stops the run forever (the thread is left behind; the run ends with the error)."""
    if timeout_s is None:
        return fn()
    done: dict[str, Any] = {}

    def target() -> None:
        try:
            done["value"] = fn()
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            done["error"] = e

    thread = threading.Thread(target=target, name=f"reward {f.path}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RewardTimeoutError(f"reward function {f.path!r} did not return within {timeout_s:g} s "
                                 f"(task.reward_timeout_s) on a batch of {len(prompt_ids)} completions, first prompt "
                                 f"{prompt_ids[0]!r}")
    if "error" in done:
        raise done["error"]
    return done["value"]


def _call(f: RewardFunc, prompts: list, completions: list, completion_ids, columns: dict[str, list],
          prompt_ids: Sequence[str], step: int, timeout_s: float | None):
    try:
        call = functools.partial(_invoke, f, prompts, completions, completion_ids, columns, step)
        return _within(timeout_s, call, f, prompt_ids)
    except RewardTimeoutError:
        raise  # not retried one completion at a time: each would hang as long
    except Exception as batch_error:  # user code: find the completion it fails on and say so
        culprit = _first_failing(f, prompts, completions, completion_ids, columns, prompt_ids, step, timeout_s)
        if culprit is None:
            where = f"a batch of {len(prompts)} completions (each alone scored fine); first prompt {prompt_ids[0]!r}"
            error = batch_error
        else:
            k, error = culprit
            where = f"prompt {prompt_ids[k]!r} ({_preview(prompts[k])}), completion {_preview(completions[k])}"
        raise RewardFunctionError(
            f"reward function {f.path!r} raised {type(error).__name__}: {error} on {where}"
        ) from error


def _first_failing(f: RewardFunc, prompts: list, completions: list, completion_ids, columns: dict[str, list],
                   prompt_ids: Sequence[str], step: int, timeout_s: float | None) -> tuple[int, Exception] | None:
    for k in range(len(prompts)):
        one = functools.partial(_invoke, f, prompts[k : k + 1], completions[k : k + 1],
                                None if completion_ids is None else completion_ids[k : k + 1],
                                {name: col[k : k + 1] for name, col in columns.items()}, step)
        try:
            _within(timeout_s, one, f, prompt_ids[k : k + 1])
        except Exception as e:  # noqa: BLE001  (any error of user code is what we are looking for)
            return k, e
    return None


def _check(f: RewardFunc, raw: Any, prompts: Sequence[PromptValue], prompt_ids: Sequence[str]) -> list[float | None]:
    if isinstance(raw, (str, bytes, dict)) or not isinstance(raw, (Sequence, np.ndarray)):
        raise RewardFunctionError(
            f"reward function {f.path!r} returned a {type(raw).__name__}; expected a list of {len(prompts)} floats "
            f"(or None), one per completion")
    if len(raw) != len(prompts):
        raise RewardFunctionError(
            f"reward function {f.path!r} returned {len(raw)} values for {len(prompts)} completions; expected one per "
            f"completion")
    out: list[float | None] = []
    for k, v in enumerate(raw):
        number = float(v) if isinstance(v, (numbers.Real, np.integer, np.floating, np.bool_)) else None
        if v is None or (number is not None and math.isnan(number)):
            out.append(None)
        elif number is not None and math.isfinite(number):
            out.append(number)
        else:
            raise RewardFunctionError(
                f"reward function {f.path!r} returned {v!r} ({type(v).__name__}) for prompt {prompt_ids[k]!r} "
                f"({_preview(prompts[k])}); expected a finite float or None")
    return out


def _preview(value: PromptValue | list, limit: int = 120) -> str:
    text = value if isinstance(value, str) else " | ".join(f"{m['role']}: {m['content']}" for m in value)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _ignore(*args: Any, **kwargs: Any) -> None:
    """Stands in for TRL's log_extra / log_metric callbacks."""
