"""TRL-style reward functions by dotted path, and the `dataset` task: loading, calling, combining, errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from marginal_rl.rollout.build import BUILDERS, build_task
from marginal_rl.rollout.config import DatasetTaskConfig, RolloutConfig
from marginal_rl.rollout.dataset_task import DatasetTaskSet, build_dataset, read_rows, split_rows
from marginal_rl.rollout.errors import RewardFunctionError, RolloutError, TaskError
from marginal_rl.rollout.rewards import (
    RewardFunc,
    combine_rewards,
    import_reward_func,
    load_reward_funcs,
    score_completions,
)
from marginal_rl.train.config import ModelConfig
from marginal_rl.train.model import build_tiny_model, build_tokenizer

REWARDS_MODULE = '''
import numpy as np

calls = []

def record(prompts, completions, completion_ids, trainer_state, answer, **kwargs):
    calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                      step=trainer_state.global_step, answer=answer, kwargs=sorted(kwargs)))
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]

def half(completions, **kwargs):
    return [0.5] * len(completions)

def numpy_values(completions, **kwargs):
    return np.array([1, 0] * (len(completions) // 2), dtype=np.float32)

def none_for_odd(completions, **kwargs):
    return [None if k % 2 else 1.0 for k in range(len(completions))]

def nan_is_none(completions, **kwargs):
    return [float("nan")] * len(completions)

def fails_on_zero(completions, answer, **kwargs):
    return [1.0 / int(a) for a in answer]

def too_few(completions, **kwargs):
    return [1.0]

def a_string(completions, **kwargs):
    return ["yes"] * len(completions)

def infinite(completions, **kwargs):
    return [float("inf")] * len(completions)

def not_a_list(completions, **kwargs):
    return 1.0

def hangs(completions, **kwargs):
    import time
    time.sleep(60)

async def asynchronous(completions, **kwargs):
    return [2.0] * len(completions)

NOT_CALLABLE = 3
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding the reward module `mrl_test_rewards` (imported from cwd, as a user's would be)."""
    (tmp_path / "mrl_test_rewards.py").write_text(REWARDS_MODULE)
    (tmp_path / "mrl_broken_rewards.py").write_text("import mrl_missing_dependency\n")
    (tmp_path / "mrl_raising_rewards.py").write_text("raise RuntimeError('bad config in module')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("mrl_test_rewards", "mrl_broken_rewards", "mrl_raising_rewards"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def _funcs(*names: str, weights=()) -> list[RewardFunc]:
    return load_reward_funcs([f"mrl_test_rewards.{n}" for n in names], weights)


# --------------------------------------------------------------------------------------------- loading


def test_import_from_working_directory_and_colon_form(workdir):
    assert import_reward_func("mrl_test_rewards.half")(completions=["a"]) == [0.5]
    assert import_reward_func("mrl_test_rewards:half") is import_reward_func("mrl_test_rewards.half")


@pytest.mark.parametrize(("path", "message"), [
    ("mrl_no_such_module.f", "'mrl_no_such_module.f': no module named 'mrl_no_such_module'"),
    ("mrl_test_rewards.missing", "'mrl_test_rewards.missing': module 'mrl_test_rewards'"),
    ("mrl_test_rewards.NOT_CALLABLE", "'mrl_test_rewards.NOT_CALLABLE' is a int, not a function"),
    ("mrl_broken_rewards.f", "importing 'mrl_broken_rewards' failed: No module named 'mrl_missing_dependency'"),
    ("mrl_raising_rewards.f", "importing 'mrl_raising_rewards' raised RuntimeError: bad config in module"),
    ("nodots", "'nodots' is not a dotted path"),
])
def test_bad_paths_raise_task_error_naming_the_path(workdir, path, message):
    with pytest.raises(TaskError, match="task.reward_funcs") as info:
        import_reward_func(path)
    assert message in str(info.value)


def test_weights_default_to_one_and_must_match(workdir):
    assert [f.weight for f in _funcs("half", "numpy_values")] == [1.0, 1.0]
    assert [f.weight for f in _funcs("half", "numpy_values", weights=[0.5, 2])] == [0.5, 2.0]
    with pytest.raises(TaskError, match="expected 2 weights"):
        _funcs("half", "numpy_values", weights=[1.0])


# --------------------------------------------------------------------------------------------- combining


def test_combine_weighted_sum_with_none_excluded():
    f1 = [1.0, None, 0.5, None]
    f2 = [0.0, 1.0, None, None]
    # 0.5*1 + 2*0 = 0.5 | only f2: 2*1 = 2 | only f1: 0.5*0.5 = 0.25 | nobody: 0.0 (TRL's nansum of nothing)
    assert combine_rewards([f1, f2], [0.5, 2.0]) == [0.5, 2.0, 0.25, 0.0]


def test_score_passes_trl_keywords_and_combines(workdir):
    funcs = _funcs("record", "numpy_values", "none_for_odd", "nan_is_none", "asynchronous", weights=[1, 10, 100, 5, 0.5])
    import mrl_test_rewards
    prompts = ["p0", "p1"]
    rewards, values = score_completions(funcs, prompts, ["abc", "de"], [[1, 2, 3], [4, 5]],
                                        {"answer": ["3", "2"], "level": [1, 2]}, prompt_ids=["a", "b"], step=7)
    # record: lengths 3, 2 | numpy: 1, 0 | none_for_odd: 1, None | nan: None, None | async: 2, 2
    assert values == [[3.0, 2.0], [1.0, 0.0], [1.0, None], [None, None], [2.0, 2.0]]
    # 3 + 10*1 + 100*1 + 0.5*2 = 114 ; 2 + 0 + 0.5*2 = 3
    assert rewards == [114.0, 3.0]
    (call,) = mrl_test_rewards.calls
    assert call["prompts"] == prompts and call["completions"] == ["abc", "de"]
    assert call["completion_ids"] == [[1, 2, 3], [4, 5]] and call["step"] == 7 and call["answer"] == ["3", "2"]
    assert call["kwargs"] == ["level", "log_extra", "log_metric"]


def test_conversational_prompts_give_conversational_completions(workdir):
    funcs = _funcs("record")
    import mrl_test_rewards

    chat = [[{"role": "user", "content": "hi"}]]
    rewards, _ = score_completions(funcs, chat, ["hello"], None, {"answer": ["x"]}, prompt_ids=["a"], step=0)
    assert rewards == [5.0]
    assert mrl_test_rewards.calls[-1]["completions"] == [[{"role": "assistant", "content": "hello"}]]


# --------------------------------------------------------------------------------------------- errors while scoring


def test_raising_function_names_itself_and_the_failing_prompt(workdir):
    with pytest.raises(RewardFunctionError) as info:
        score_completions(_funcs("fails_on_zero"), ["ok", "What is 1 - 1?", "ok"], ["a", "b", "c"], None,
                          {"answer": ["1", "0", "2"]}, prompt_ids=["row-0", "row-1", "row-2"], step=0)
    message = str(info.value)
    assert "'mrl_test_rewards.fails_on_zero' raised ZeroDivisionError" in message
    assert "prompt 'row-1' ('What is 1 - 1?')" in message and "completion 'b'" in message
    assert isinstance(info.value, RolloutError)  # what the trainer catches at its boundary
    assert isinstance(info.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize(("name", "message"), [
    ("too_few", "returned 1 values for 2 completions"),
    ("a_string", "returned 'yes' (str) for prompt 'a'"),
    ("infinite", "returned inf (float) for prompt 'a'"),
    ("not_a_list", "returned a float; expected a list of 2 floats"),
])
def test_bad_return_values_are_clear_errors(workdir, name, message):
    with pytest.raises(RewardFunctionError, match=f"reward function 'mrl_test_rewards.{name}'") as info:
        score_completions(_funcs(name), ["p", "q"], ["a", "b"], None, {}, prompt_ids=["a", "b"], step=0)
    assert message in str(info.value)


def test_a_hung_reward_function_times_out_naming_itself_and_is_not_retried(workdir):
    import time

    from marginal_rl.rollout.errors import RewardTimeoutError

    t0 = time.monotonic()
    with pytest.raises(RewardTimeoutError, match=r"'mrl_test_rewards.hangs' did not return within 0.5 s "
                                                 r"\(task.reward_timeout_s\) on a batch of 3 completions, first "
                                                 r"prompt 'a'"):
        score_completions(_funcs("half", "hangs"), ["p", "q", "r"], ["x", "y", "z"], None, {},
                          prompt_ids=["a", "b", "c"], step=0, timeout_s=0.5)
    assert time.monotonic() - t0 < 3  # one timeout, not one per completion
    rewards, _ = score_completions(_funcs("half", "asynchronous"), ["p"], ["x"], None, {}, prompt_ids=["a"], step=0,
                                   timeout_s=5)
    assert rewards == [2.5]  # a function that returns in time (async too) is unaffected


# --------------------------------------------------------------------------------------------- the dataset task


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_read_rows_jsonl_parquet_and_saved_dataset(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(5)]
    assert read_rows(_write_jsonl(tmp_path / "d.jsonl", rows)) == {"train": rows}
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert read_rows(str(tmp_path / "d.parquet")) == {"train": rows}
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(tmp_path / "saved"))
    assert read_rows(str(tmp_path / "saved")) == {"train": rows[:3], "test": rows[3:]}


def test_dataset_errors_name_the_problem(tmp_path, workdir):
    with pytest.raises(TaskError, match=r"task.dataset: '.*nowhere.jsonl' does not exist"):
        read_rows(str(tmp_path / "nowhere.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(TaskError, match=r"bad.jsonl:2: not valid JSON"):
        read_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "a"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(TaskError, match=r"latin1.jsonl:2: not UTF-8 text"):
        read_rows(str(tmp_path / "latin1.jsonl"))
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(TaskError, match=r"garbage.parquet: not a readable parquet file"):
        read_rows(str(tmp_path / "garbage.parquet"))
    (tmp_path / "x.csv").write_text("prompt\na\n")
    with pytest.raises(TaskError, match="expected a .jsonl or .parquet file"):
        read_rows(str(tmp_path / "x.csv"))
    no_prompt = _write_jsonl(tmp_path / "np.jsonl", [{"question": "a", "answer": "1"}] * 4)
    with pytest.raises(TaskError, match=r"no `prompt` column \(columns: question, answer\)"):
        build_task(DatasetTaskConfig(dataset=no_prompt, reward_funcs=["mrl_test_rewards.half"]),
                   RolloutConfig())
    bad_prompt = _write_jsonl(tmp_path / "bp.jsonl", [{"prompt": "a"}] * 3 + [{"prompt": 5}])
    with pytest.raises(TaskError, match="row 3: `prompt` must be a string or"):
        build_task(DatasetTaskConfig(dataset=bad_prompt, reward_funcs=["mrl_test_rewards.half"],
                              eval_dataset=bad_prompt), RolloutConfig())


def test_split_is_deterministic_disjoint_and_ten_percent():
    rows = [{"prompt": str(i)} for i in range(50)]
    train, eval_ = split_rows(rows, seed=3)
    assert (len(train), len(eval_)) == (45, 5)
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in eval_)
    assert split_rows(rows, seed=3) == (train, eval_) and split_rows(rows, seed=4) != (train, eval_)
    assert [int(r["prompt"]) for r in train] == sorted(int(r["prompt"]) for r in train)  # file order kept
    with pytest.raises(TaskError, match="cannot be split"):
        split_rows(rows[:1], seed=0)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer(["What is 1 + 2? <answer>3</answer> user: assistant:"] * 20, vocab_size=300)
    return build_tiny_model(ModelConfig(hidden_size=32, num_heads=2), tokenizer, seed=0).eval(), tokenizer


@pytest.mark.parametrize("chat_template", [False, True])
def test_dataset_rollout_scores_with_completion_ids(tmp_path, workdir, tiny, chat_template):
    model, tokenizer = tiny
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 2?"}], "answer": str(i + 2), "completion": "x"}
            for i in range(10)]
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    task = build_task(DatasetTaskConfig(dataset=path, reward_funcs=["mrl_test_rewards.record",
                                                                                "mrl_test_rewards.half"],
                                 reward_weights=[0.0, 1.0]), RolloutConfig())
    assert isinstance(task, DatasetTaskSet) and BUILDERS["dataset"] is build_dataset
    import mrl_test_rewards

    assert (len(task.train), len(task.eval)) == (9, 1)
    assert task.train[0].meta == {"answer": "2"}  # `completion` is not a reward keyword, as in TRL
    assert task.demonstrations()[0] == ("user: What is 0 + 2?\nassistant: ", "x")
    tokenizer.chat_template = "{% for m in messages %}<|bos|>{{ m['content'] }}{% endfor %}<|bos|>" if chat_template else None
    try:
        torch.manual_seed(0)
        trajectories = task.rollout(model, tokenizer, [(task.train[0], 2), (task.train[3], 1)],
                                    RolloutConfig(max_new_tokens=5), step=4, version=2, temperature=1.0)
    finally:
        tokenizer.chat_template = None
    assert [t.reward for t in trajectories] == [0.5, 0.5, 0.5]  # 0 x record + 1 x half
    call = mrl_test_rewards.calls[-1]
    assert call["completion_ids"] == [t.completion_ids for t in trajectories]
    third = task.train[3]  # one row is held out for eval, so it is not necessarily row 3
    assert call["answer"] == ["2", "2", third.meta["answer"]] and call["step"] == 4
    assert call["prompts"][2] == [{"role": "user", "content": f"What is {int(third.meta['answer']) - 2} + 2?"}]
    expected = "<|bos|>What is 0 + 2?<|bos|>" if chat_template else "user: What is 0 + 2?\nassistant: "
    assert trajectories[0].prompt_text == expected
    assert trajectories[0].prompt_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert [t.group_id for t in trajectories] == ["s4-g0", "s4-g0", "s4-g1"]


def test_eval_dataset_and_tiny_without_completions(tmp_path, workdir):
    train = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"q{i}"} for i in range(4)])
    held = _write_jsonl(tmp_path / "held.jsonl", [{"prompt": "e0"}, {"prompt": "e1"}])
    task = build_task(DatasetTaskConfig(dataset=train, eval_dataset=held,
                                 reward_funcs=["mrl_test_rewards.half"]), RolloutConfig())
    assert [p.text for p in task.train] == ["q0", "q1", "q2", "q3"] and [p.text for p in task.eval] == ["e0", "e1"]
    assert task.reward(task.eval, ["a", "b"]) == [0.5, 0.5]
    with pytest.raises(TaskError, match="a tiny policy needs a string `completion` column"):
        task.demonstrations()


def test_reward_funcs_as_callables(tmp_path, workdir):
    # the Python API: callables after the dotted paths, weighted together; 0.5·half + 2·length = 0.25 + 2·len
    train = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"q{i}"} for i in range(4)])
    held = _write_jsonl(tmp_path / "held.jsonl", [{"prompt": "e0"}])

    def length(prompts, completions, **columns):
        return [float(len(c)) for c in completions]

    cfg = DatasetTaskConfig(dataset=train, eval_dataset=held, reward_funcs=["mrl_test_rewards.half"],
                            reward_weights=[0.5, 2.0])
    task = build_task(cfg, RolloutConfig(), reward_funcs=[length])
    assert [f.path for f in task.funcs] == ["mrl_test_rewards.half",
                                            "test_reward_funcs_as_callables.<locals>.length"]
    assert task.reward(task.eval, ["abc"]) == [0.25 + 6.0]
    only = build_task(DatasetTaskConfig(dataset=train, eval_dataset=held), RolloutConfig(), reward_funcs=[length])
    assert only.reward(only.eval, ["ab"]) == [2.0]
    with pytest.raises(TaskError, match="expected at least one reward function"):
        build_task(DatasetTaskConfig(dataset=train, eval_dataset=held), RolloutConfig())
    with pytest.raises(TaskError, match="task.reward_weights: expected 1 weights"):
        build_task(DatasetTaskConfig(dataset=train, eval_dataset=held, reward_weights=[1.0, 2.0]), RolloutConfig(),
                   reward_funcs=[length])
    with pytest.raises(TaskError, match="is a int, not a dotted path or a function"):
        build_task(DatasetTaskConfig(dataset=train, eval_dataset=held), RolloutConfig(), reward_funcs=[3])
    from marginal_rl.rollout.config import ArithTaskConfig

    with pytest.raises(TaskError, match="only task.name=dataset scores with reward functions"):
        build_task(ArithTaskConfig(), RolloutConfig(), reward_funcs=[length])


def test_shipped_example_rewards(monkeypatch):
    """examples/rewards.py on the shipped arithmetic prompts, as configs/dataset_example.yaml uses them."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    rows = read_rows("examples/arithmetic_small.jsonl")["train"]
    assert len(rows) >= 40 and all(isinstance(r["prompt"], list) for r in rows)
    funcs = load_reward_funcs(["examples.rewards.format_reward", "examples.rewards.accuracy_reward"], [0.5, 1.0])
    right = f"<answer>{rows[0]['answer']}</answer>"
    completions = [right, "<answer>-1</answer>", "the answer is " + rows[0]["answer"]]
    rewards, values = score_completions(funcs, [rows[0]["prompt"]] * 3, completions, None,
                                        {"answer": [rows[0]["answer"]] * 3}, prompt_ids=["a", "b", "c"], step=0)
    assert values == [[1.0, 1.0, 0.0], [1.0, 0.0, None]]
    assert rewards == [1.5, 0.5, 0.0]
