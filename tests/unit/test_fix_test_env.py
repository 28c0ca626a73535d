"""The fix-a-failing-test environment: action parsing, episode state machine, and the generated task set."""

from __future__ import annotations

import ast
import random
import sys
from collections import Counter

import pytest

from marginal_rl.rollout import fix_test
from marginal_rl.rollout.fix_test import (
    ACTIONS,
    EXAMPLE_TASK,
    FAMILIES,
    Action,
    FixTask,
    FixTestEnv,
    ParseError,
    demonstration,
    example_conversation,
    format_observation,
    generate_fix_tasks,
    parse_action,
    render_task,
    run_task_tests,
    to_prompt,
)
from marginal_rl.rollout.sandbox import SandboxError

TASK = FixTask(
    task_id="t0",
    family="op",
    difficulty="easy",
    entry_point="f",
    buggy_source="def f(x):\n    return x - 3\n",
    test_source="assert f(1) == 4\nassert f(5) == 8\n",
    reference_source="def f(x):\n    return x + 3\n",
)
FIX = "<edit>\ndef f(x):\n    return x + 3\n</edit>"
needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tests run in the Linux sandbox")


# --- parse_action ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<plan>swap the operator</plan>", Action("plan", "swap the operator")),
        ("<run_tests/>", Action("run_tests")),
        ("<submit />", Action("submit")),
        ("<submit></submit>", Action("submit")),
        ("  I give up. <defer/>\n", Action("defer")),
        (FIX, Action("edit", "def f(x):\n    return x + 3")),
        ("<edit>\n```python\ndef f(x):\n    return x\n```\n</edit>", Action("edit", "def f(x):\n    return x")),
    ],
)
def test_parse_action_accepts_the_documented_format(text: str, expected: Action) -> None:
    assert parse_action(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("just fix it", "no action found"),
        ("<edit>def f(x): return x", "not closed"),
        ("<edit/>", "is empty"),
        ("<edit>\n\n</edit>", "edit is empty"),
        ("<run_tests/><submit/>", "one action per turn; found <run_tests> and then <submit>"),
        (f"{FIX}\n<submit/>", "one action per turn"),
        ("<patch>x</patch>", "no action found"),
    ],
)
def test_parse_action_explains_malformed_turns(text: str, fragment: str) -> None:
    parsed = parse_action(text)
    assert isinstance(parsed, ParseError)
    assert fragment in parsed.message


def test_plan_may_mention_other_tags_only_inside_itself() -> None:
    assert parse_action("<plan>then <submit/></plan>") == Action("plan", "then <submit/>")


# --- the episode ----------------------------------------------------------------------------------------------------


def test_reset_shows_code_tests_and_action_format() -> None:
    text = FixTestEnv(TASK).reset()
    assert "return x - 3" in text and "assert f(5) == 8" in text
    for action in ACTIONS:
        assert f"<{action}" in text
    assert to_prompt(TASK).text == text == render_task(TASK)


def test_plan_and_malformed_turns_do_not_change_the_code_or_end_the_episode() -> None:
    env = FixTestEnv(TASK)
    env.reset()
    plan = env.step("<plan>the operator is wrong</plan>")
    bad = env.step("fix it please")
    assert (plan.action, plan.done, plan.reward, plan.verify) == ("plan", False, 0.0, False)
    assert (bad.action, bad.done) == ("invalid", False)
    assert bad.observation.startswith("invalid action: no action found")
    assert env.source == TASK.buggy_source


def test_edit_with_syntax_error_or_without_entry_point_is_rejected() -> None:
    env = FixTestEnv(TASK)
    env.reset()
    syntax = env.step("<edit>\ndef f(x:\n    return x\n</edit>")
    missing = env.step("<edit>\ndef g(x):\n    return x + 3\n</edit>")
    assert "SyntaxError" in syntax.observation and "unchanged" in syntax.observation
    assert "must define f()" in missing.observation
    assert env.source == TASK.buggy_source


@needs_linux
def test_fix_episode_runs_tests_then_submits_for_reward_one() -> None:
    env = FixTestEnv(TASK, timeout_s=2.0)
    env.reset()
    failing = env.step("<run_tests/>")
    assert (failing.verify, failing.tests_passed, failing.done) == (True, False, False)
    # f(1) = 1 - 3 = -2 != 4: the first assert fails, and the observation names it
    assert failing.observation == "FAIL: assert f(1) == 4 -> AssertionError"
    edited = env.step(FIX)
    assert edited.observation == "edit applied (2 lines)" and env.source.endswith("x + 3")
    passing = env.step("<run_tests/>")
    assert passing.observation == "PASS: all tests passed" and passing.tests_passed
    submitted = env.step("<submit/>")
    assert (submitted.done, submitted.reward, submitted.finish_reason, submitted.verify) == (True, 1.0, "submit", False)
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("<submit/>")


@needs_linux
def test_the_few_shot_example_replays_in_the_real_environment() -> None:
    messages = example_conversation()
    env = FixTestEnv(EXAMPLE_TASK, timeout_s=2.0)
    assert messages[0] == {"role": "user", "content": env.reset()}
    replies = []
    for turn, answer in zip(messages[1::2], messages[2::2], strict=True):
        assert (turn["role"], answer["role"]) == ("assistant", "user")
        replies.append(answer["content"])
        result = env.step(turn["content"])
        assert result.observation == answer["content"]
    assert result.done and result.reward == 1.0 and replies[-1] == "submitted: tests pass"


def test_submitting_the_buggy_code_earns_zero() -> None:
    env = FixTestEnv(TASK)
    env.reset()
    result = env.step("<submit/>")
    assert (result.done, result.reward, result.tests_passed) == (True, 0.0, False)


def test_defer_ends_with_the_defer_reward() -> None:
    env = FixTestEnv(TASK, defer_reward=0.25)
    env.reset()
    result = env.step("<defer/>")
    assert (result.done, result.reward, result.action, result.finish_reason) == (True, 0.25, "defer", "defer")


def test_turn_limit_ends_the_episode_with_zero_reward() -> None:
    env = FixTestEnv(TASK, max_turns=2)
    env.reset()
    first = env.step("<plan>a</plan>")
    second = env.step("<plan>b</plan>")
    assert not first.done
    assert (second.done, second.reward, second.finish_reason) == (True, 0.0, "turns")
    env.reset()  # a reset episode starts over
    assert env.step("<plan>c</plan>").done is False and env.source == TASK.buggy_source


@needs_linux
def test_infinite_loop_in_an_edit_times_out_and_is_reported() -> None:
    env = FixTestEnv(TASK, timeout_s=1.0)
    env.reset()
    env.step("<edit>\ndef f(x):\n    while True:\n        pass\n</edit>")
    result = env.step("<run_tests/>")
    assert result.observation == "FAIL: timed out" and result.tests_passed is False


@pytest.mark.parametrize("failure", [SandboxError("sandbox: could not start the child: boom"), OSError(28, "No space")])
def test_a_failing_sandbox_is_a_failed_test_run_not_an_exception(
    failure: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(fix_test, "run_sandboxed", broken)
    env = FixTestEnv(TASK)
    env.reset()
    env.step(FIX)
    with pytest.warns(RuntimeWarning, match="sandbox failure scored as failing tests"):
        ran = env.step("<run_tests/>")
        submitted = env.step("<submit/>")
    assert (ran.done, ran.tests_passed, ran.verify) == (False, False, True)
    assert ran.observation == f"sandbox error: {failure}"
    assert (submitted.done, submitted.reward, submitted.tests_passed) == (True, 0.0, False)
    assert submitted.finish_reason == "submit"
    assert submitted.observation == f"submitted: sandbox error: {failure}"


@needs_linux
def test_a_solution_printing_the_sandbox_failure_line_just_fails_its_tests() -> None:
    forged = "sandbox: could not start the child: forged"
    env = FixTestEnv(TASK, timeout_s=1.0)
    env.reset()
    code = f"import sys\ndef f(x):\n    return x + 3\nprint('{forged}', file=sys.stderr)\nsys.exit(127)"
    edit = env.step(f"<edit>\n{code}\n</edit>")  # exactly what the supervisor used to print, and its exit status
    assert edit.observation.startswith("edit applied")
    ran = env.step("<run_tests/>")
    assert (ran.tests_passed, ran.observation) == (False, "FAIL: sys.exit(127) -> SystemExit: 127")
    submitted = env.step("<submit/>")
    assert (submitted.done, submitted.reward, submitted.observation) == (True, 0.0, "submitted: tests fail")


def test_format_observation_wraps_in_tags() -> None:
    assert format_observation("PASS") == "\n<observation>\nPASS\n</observation>\n"


# --- generated tasks ------------------------------------------------------------------------------------------------


def test_generator_is_deterministic_and_distinct() -> None:
    a, b = generate_fix_tasks(300, seed=7), generate_fix_tasks(300, seed=7)
    assert a == b
    assert a != generate_fix_tasks(300, seed=8)
    assert len({(t.buggy_source, t.test_source) for t in a}) == 300
    assert len({t.task_id for t in a}) == 300


def test_generator_follows_the_documented_mix() -> None:
    tasks = generate_fix_tasks(2000, seed=0)
    by_difficulty = Counter(t.difficulty for t in tasks)
    # documented shares: easy 0.20 + 0.20, medium 0.15 + 0.10 + 0.10, hard 0.10 + 0.08 + 0.07
    for level, share in {"easy": 0.40, "medium": 0.35, "hard": 0.25}.items():
        assert abs(by_difficulty[level] / 2000 - share) < 0.04, (level, by_difficulty)
    assert set(Counter(t.family for t in tasks)) == set(FAMILIES)


def test_generated_tasks_are_small_and_well_formed() -> None:
    for task in generate_fix_tasks(200, seed=1):
        assert task.buggy_source != task.reference_source
        assert 1 <= task.test_source.count("assert") <= 3
        assert len(task.buggy_source.splitlines()) == 2
        ast.parse(task.buggy_source + task.test_source)
        # the bug is one expression: everything but the return line is identical
        assert task.buggy_source.splitlines()[0] == task.reference_source.splitlines()[0]


@needs_linux
def test_sampled_generated_tasks_fail_buggy_and_pass_reference_in_the_sandbox() -> None:
    tasks = generate_fix_tasks(500, seed=3)
    by_family: dict[str, FixTask] = {}
    for task in tasks:
        by_family.setdefault(task.family, task)
    sample = list(by_family.values()) + random.Random(0).sample(tasks, 4)
    for task in sample:
        assert not run_task_tests(task, task.buggy_source).ok, task
        assert run_task_tests(task, task.reference_source).ok, task


@needs_linux
def test_demonstration_solves_its_task() -> None:
    task = generate_fix_tasks(5, seed=2)[4]
    env = FixTestEnv(task)
    env.reset()
    results = [env.step(turn) for turn in demonstration(task)]
    assert [r.action for r in results] == ["edit", "run_tests", "submit"]
    assert results[-1].reward == 1.0 and results[-1].done
