"""The fix-a-failing-test environment: a buggy function, its failing tests, and an agent that edits until they pass.

Model-free parts only: task records, a generator of small graded bugs, the action parser, and the environment's
state machine. The tests always run in `rollout.sandbox.run_sandboxed`, never in this process. The action format,
the observations and the task mix are documented in docs/fix_test.md.

    env = FixTestEnv(task)
    text = env.reset()                     # first user message: code, tests, action format
    step = env.step("<edit>\\ndef f(x):\\n    return x + 3\\n</edit>")
    step = env.step("<submit/>")          # step.done, step.reward == 1.0 when the tests pass

Generated tasks (`generate_fix_tasks`), by difficulty; each is one expression in a one-line function:

    difficulty  family  share  bug (reference -> buggy)
    easy        op      20 %   arithmetic operator           x + 3      -> x - 3
    easy        cmp     20 %   flipped comparison            x < 4      -> x > 4,   x == 4 -> x != 4
    medium      const   15 %   constant off by one           x * 3      -> x * 4
    medium      bound   10 %   boundary off by one           x < 4      -> x <= 4   (a test sits on the boundary)
    medium      var     10 %   wrong variable                x * y      -> x * x
    hard        args    10 %   swapped operands              x - y      -> y - x
    hard        consts   8 %   swapped constants             x * 2 + 5  -> x * 5 + 2
    hard        paren    7 %   misplaced parentheses         (x + 2) * 3 -> x + 2 * 3
"""

from __future__ import annotations

import ast
import functools
import operator
import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from marginal_rl.rollout import harness
from marginal_rl.rollout.sandbox import SandboxError, SandboxResult, run_sandboxed
from marginal_rl.rollout.types import Prompt

ACTIONS = ("plan", "edit", "run_tests", "submit", "defer")
ACTION_FORMAT = "<plan>notes</plan>, <edit>the whole fixed code</edit>, <run_tests/>, <submit/> or <defer/>"
_OPEN_TAG = re.compile(r"<\s*(plan|edit|run_tests|submit|defer)\s*(/?)\s*>")
_FENCE = re.compile(r"^```[a-zA-Z]*\n(.*?)\n?```$", re.DOTALL)
_HARNESS_SOURCE = Path(harness.__file__).read_text(encoding="utf-8")
_SANDBOX_PATH = re.compile(r"/\S*?mrl-sandbox-[^/\s]+/")


@dataclass(frozen=True)
class FixTask:
    """One buggy function and the tests that expose the bug. Sources are complete Python modules."""

    task_id: str
    family: str  # bug kind, e.g. "op" or "humaneval-cmp"
    difficulty: str  # "easy" | "medium" | "hard" for generated tasks, "humaneval" for real problems
    entry_point: str  # name of the function the tests call
    buggy_source: str
    test_source: str  # top-level asserts (or a check() call) that fail on buggy_source and pass on reference_source
    reference_source: str
    description: str = ""  # shown to the agent above the code when not empty


@dataclass(frozen=True)
class Action:
    kind: str  # one of ACTIONS
    payload: str = ""  # plan text or edited source; "" for the other actions


@dataclass(frozen=True)
class ParseError:
    message: str  # what was wrong, phrased for the agent to read


@dataclass(frozen=True)
class StepResult:
    observation: str
    done: bool
    reward: float
    action: str  # one of ACTIONS, or "invalid" for a turn that did not parse
    verify: bool = False  # the agent asked for a test run (verification tokens, in ledger terms)
    tests_passed: bool | None = None  # outcome of the test run this turn caused, None when nothing ran
    finish_reason: str = ""  # "submit" | "defer" | "turns" when done, matching Trajectory.finish_reason


def parse_action(text: str) -> Action | ParseError:
    """Read the one action in a turn. Text around the action tag is ignored; a second action tag is an error."""
    match = _OPEN_TAG.search(text)
    if match is None:
        return ParseError(f"no action found; use exactly one of {ACTION_FORMAT}")
    kind, self_closing = match.group(1), match.group(2) == "/"
    rest = text[match.end() :]
    payload = ""
    if kind in ("plan", "edit"):
        if self_closing:
            return ParseError(f"<{kind}/> is empty; write <{kind}>...</{kind}>")
        close = re.search(rf"<\s*/\s*{kind}\s*>", rest)
        if close is None:
            return ParseError(f"<{kind}> is not closed; end it with </{kind}>")
        payload, rest = rest[: close.start()], rest[close.end() :]
    elif not self_closing:  # tolerate <submit></submit> as well as <submit/>
        rest = re.sub(rf"^\s*<\s*/\s*{kind}\s*>", "", rest)
    second = _OPEN_TAG.search(rest)
    if second is not None:
        return ParseError(f"one action per turn; found <{kind}> and then <{second.group(1)}>")
    if kind == "edit":
        payload = payload.strip("\n").rstrip()
        fenced = _FENCE.match(payload.strip())
        if fenced is not None:  # chat models wrap code in markdown fences out of habit
            payload = fenced.group(1)
        if not payload.strip():
            return ParseError("the edit is empty; put the whole fixed code between <edit> and </edit>")
    return Action(kind, payload.strip() if kind == "plan" else payload)


def render_task(task: FixTask) -> str:
    """The first user message of an episode: the code, the failing tests and the action format."""
    description = f"{task.description}\n" if task.description else ""
    return (
        f"Fix the code so the tests pass.\n{description}"
        f"<code>\n{task.buggy_source.rstrip()}\n</code>\n"
        f"<tests>\n{task.test_source.rstrip()}\n</tests>\n"
        f"One action per turn: {ACTION_FORMAT}."
    )


def format_observation(obs: str) -> str:
    """Wrap an observation so it reads the same under any chat template, or none (plain text concatenation)."""
    return f"\n<observation>\n{obs}\n</observation>\n"


def to_prompt(task: FixTask) -> Prompt:
    """The task as a rollout Prompt record (what the pricers and the agent loop see)."""
    return Prompt(
        prompt_id=task.task_id,
        text=render_task(task),
        answer=task.reference_source,
        family=task.family,
        meta={"difficulty": task.difficulty, "entry_point": task.entry_point},
    )


def run_task_tests(task: FixTask, source: str, timeout_s: float = 2.0, memory_mb: int = 256) -> SandboxResult:
    """Run the task's tests against `source` in the sandbox. Passing means the harness exited 0 within the limits."""
    return run_tests(source, task.test_source, task.entry_point, task_context(task.buggy_source, task.entry_point),
                     timeout_s=timeout_s, memory_mb=memory_mb)


def run_tests(source: str, tests: str, entry_point: str, context: str = "", *, timeout_s: float = 2.0,
              memory_mb: int = 256) -> SandboxResult:
    """Run `tests` in the sandbox's trusted harness (rollout/harness.py): the tests in one process, `source` in a
    child process they call across pipes, the names in `context` (trusted code) shadowing the source's."""
    return run_sandboxed(harness_script(source, tests, entry_point, context), timeout_s=timeout_s, memory_mb=memory_mb)


def harness_script(source: str, tests: str, entry_point: str, context: str = "") -> str:
    """The script the sandbox runs: the harness file verbatim, then one call of its `main`."""
    return f"{_HARNESS_SOURCE}\n\nmain({source!r}, {tests!r}, {context!r}, {entry_point!r})\n"


@functools.lru_cache(maxsize=4096)  # every test run of a task asks for it again
def task_context(source: str, entry_point: str) -> str:
    """The task's own module minus the function to fix: the imports and helpers its tests may use (HumanEval's
    `poly`, `encode_shift`). They run in the tests' process, so an agent rewriting them changes nothing there."""
    tree = ast.parse(source)
    tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                                              and n.name == entry_point)]
    return ast.unparse(tree) + "\n" if tree.body else ""


def summarize_test_run(result: SandboxResult, max_chars: int = 300) -> str:
    """A short verdict for the agent: PASS, or FAIL with the failing line and the exception."""
    if result.ok:
        return "PASS: all tests passed"
    if result.timed_out:
        return "FAIL: timed out"
    lines = [line for line in _SANDBOX_PATH.sub("", result.stderr).splitlines() if line.strip()]
    error = lines[-1].strip() if lines else f"exit status {result.returncode} ({result.killed_reason or 'no output'})"
    # The traceback's last `File ...` line is followed by the failing source line (then, on 3.11+, carets).
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith('File "')]
    where = ""
    if frames and frames[-1] + 1 < len(lines) - 1:
        where = lines[frames[-1] + 1].strip() + " -> "
    text = f"FAIL: {where}{error}"
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


class FixTestEnv:
    """One episode of fixing `task`. `reset()` then `step(turn_text)` until `done`; never raises on model output."""

    def __init__(
        self,
        task: FixTask,
        timeout_s: float = 2.0,
        memory_mb: int = 256,
        defer_reward: float = 0.0,
        max_turns: int = 8,
        max_observation_chars: int = 300,
    ) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns: expected an integer >= 1, got {max_turns}")
        self.task = task
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.defer_reward = defer_reward
        self.max_turns = max_turns
        self.max_observation_chars = max_observation_chars
        self.source = task.buggy_source
        self.turns = 0
        self.done = False

    def reset(self) -> str:
        self.source = self.task.buggy_source
        self.turns = 0
        self.done = False
        return render_task(self.task)

    def step(self, turn_text: str) -> StepResult:
        if self.done:
            raise RuntimeError("step() after the episode ended; call reset()")
        self.turns += 1
        result = self._apply(parse_action(turn_text))
        if not result.done and self.turns >= self.max_turns:
            self.done = True
            return StepResult(
                observation=f"{result.observation}\nturn limit reached",
                done=True,
                reward=0.0,
                action=result.action,
                verify=result.verify,
                tests_passed=result.tests_passed,
                finish_reason="turns",
            )
        self.done = result.done
        return result

    def _apply(self, action: Action | ParseError) -> StepResult:
        if isinstance(action, ParseError):
            return StepResult(observation=f"invalid action: {action.message}", done=False, reward=0.0, action="invalid")
        if action.kind == "plan":
            return StepResult(observation="ok", done=False, reward=0.0, action="plan")
        if action.kind == "edit":
            return StepResult(observation=self._edit(action.payload), done=False, reward=0.0, action="edit")
        if action.kind == "run_tests":
            result = self._test()
            if isinstance(result, str):
                return StepResult(result, done=False, reward=0.0, action="run_tests", verify=True, tests_passed=False)
            obs = summarize_test_run(result, self.max_observation_chars)
            return StepResult(obs, done=False, reward=0.0, action="run_tests", verify=True, tests_passed=result.ok)
        if action.kind == "submit":
            result = self._test()
            passed = not isinstance(result, str) and result.ok
            verdict = result if isinstance(result, str) else "tests pass" if passed else "tests fail"
            obs = f"submitted: {verdict}"
            return StepResult(obs, True, float(passed), "submit", tests_passed=passed, finish_reason="submit")
        return StepResult("deferred", True, self.defer_reward, "defer", finish_reason="defer")

    def _test(self) -> SandboxResult | str:
        """The test run on the current code, or what kept the sandbox from running it: a broken sandbox scores as
        failing tests, so no step raises (the warning keeps a broken sandbox from passing unnoticed)."""
        try:
            return run_task_tests(self.task, self.source, self.timeout_s, self.memory_mb)
        except (SandboxError, OSError) as exc:
            warnings.warn(f"FixTestEnv: sandbox failure scored as failing tests: {exc}", RuntimeWarning, stacklevel=4)
            return f"sandbox error: {exc}"[: self.max_observation_chars]

    def _edit(self, source: str) -> str:
        """Replace the whole code with `source` if it parses and still defines the entry point; say why not if not."""
        try:
            tree = ast.parse(source)
        except SyntaxError as exc:  # the agent's code is data here: its syntax error is an observation, not a crash
            return f"edit rejected: SyntaxError: {exc.msg} (line {exc.lineno}); code unchanged"
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
        if self.task.entry_point not in defined:
            return f"edit rejected: the code must define {self.task.entry_point}(); code unchanged"
        self.source = source
        return f"edit applied ({len(source.splitlines())} lines)"


EXAMPLE_TASK = FixTask(
    task_id="example", family="op", difficulty="easy", entry_point="add_three",
    buggy_source="def add_three(x):\n    return x - 3\n", test_source="assert add_three(1) == 4\nassert add_three(5) == 8\n",
    reference_source="def add_three(x):\n    return x + 3\n",
)


def example_conversation() -> list[dict[str, str]]:
    """One solved episode as chat messages (EXAMPLE_TASK: plan, edit, run_tests, submit), shown to chat models before
    their task (`task.few_shot`), so that a small instruct model sees the action format used once. Its observations
    are the environment's own words (a unit test replays it in the real environment)."""
    turns = ["<plan>The tests expect x + 3, the code subtracts.</plan>", *demonstration(EXAMPLE_TASK)]
    observations = ["ok", "edit applied (2 lines)", "PASS: all tests passed"]
    messages = [{"role": "user", "content": render_task(EXAMPLE_TASK)}]
    for k, turn in enumerate(turns):
        messages.append({"role": "assistant", "content": turn})
        if k < len(observations):
            messages.append({"role": "user", "content": observations[k]})
    messages.append({"role": "user", "content": "submitted: tests pass"})
    return messages


def demonstration(task: FixTask) -> list[str]:
    """The ideal turns for `task`: write the reference fix, check it, submit. For a supervised warm start."""
    return [f"<edit>\n{task.reference_source.rstrip()}\n</edit>", "<run_tests/>", "<submit/>"]


# --- generated tasks ------------------------------------------------------------------------------------------------

_ARITH: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_CMP: dict[str, Callable[[int, int], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True)
class _Bug:
    """A reference and a buggy expression over parameters, with trusted Python twins to compute test values."""

    params: tuple[str, ...]
    reference: str
    buggy: str
    reference_fn: Callable[..., object]
    buggy_fn: Callable[..., object]
    boundary: tuple[int, ...] = field(default=())  # an input the tests must include (where the bug shows)


def _bug_op(r: random.Random) -> _Bug:
    c = r.randint(1, 9)
    good, bad = r.sample(list(_ARITH), 2)
    return _Bug(("x",), f"x {good} {c}", f"x {bad} {c}", lambda x: _ARITH[good](x, c), lambda x: _ARITH[bad](x, c))


def _bug_cmp(r: random.Random) -> _Bug:
    c = r.randint(0, 9)
    good = r.choice(["<", ">", "=="])
    bad = {"<": ">", ">": "<", "==": "!="}[good]
    return _Bug(("x",), f"x {good} {c}", f"x {bad} {c}", lambda x: _CMP[good](x, c), lambda x: _CMP[bad](x, c))


def _bug_const(r: random.Random) -> _Bug:
    c = r.randint(2, 9)
    d = c + r.choice([-1, 1])
    op = r.choice(list(_ARITH))
    return _Bug(("x",), f"x {op} {c}", f"x {op} {d}", lambda x: _ARITH[op](x, c), lambda x: _ARITH[op](x, d))


def _bug_bound(r: random.Random) -> _Bug:
    c = r.randint(1, 9)
    good = r.choice(["<", "<=", ">", ">="])
    bad = {"<": "<=", "<=": "<", ">": ">=", ">=": ">"}[good]
    ref, bug = (lambda x: _CMP[good](x, c)), (lambda x: _CMP[bad](x, c))
    return _Bug(("x",), f"x {good} {c}", f"x {bad} {c}", ref, bug, boundary=(c,))


def _bug_var(r: random.Random) -> _Bug:
    symbol = r.choice(list(_ARITH))
    op = _ARITH[symbol]
    wrong = r.choice(["x", "y"])

    def buggy(x: int, y: int) -> int:
        v = x if wrong == "x" else y
        return op(v, v)

    return _Bug(("x", "y"), f"x {symbol} y", f"{wrong} {symbol} {wrong}", op, buggy)


def _bug_args(r: random.Random) -> _Bug:
    flip = r.random() < 0.5  # the reference is y - x half the time, so "always x - y" is not a fix to memorise

    def reference(x: int, y: int) -> int:
        return y - x if flip else x - y

    def buggy(x: int, y: int) -> int:
        return x - y if flip else y - x

    good, bad = ("y - x", "x - y") if flip else ("x - y", "y - x")
    return _Bug(("x", "y"), good, bad, reference, buggy)


def _bug_consts(r: random.Random) -> _Bug:
    a, b = r.sample(range(2, 10), 2)
    return _Bug(("x",), f"x * {a} + {b}", f"x * {b} + {a}", lambda x: x * a + b, lambda x: x * b + a)


def _bug_paren(r: random.Random) -> _Bug:
    a, b = r.randint(1, 9), r.randint(2, 9)
    return _Bug(("x",), f"(x + {a}) * {b}", f"x + {a} * {b}", lambda x: (x + a) * b, lambda x: x + a * b)


FAMILIES: dict[str, tuple[str, float, Callable[[random.Random], _Bug]]] = {
    "op": ("easy", 0.20, _bug_op),
    "cmp": ("easy", 0.20, _bug_cmp),
    "const": ("medium", 0.15, _bug_const),
    "bound": ("medium", 0.10, _bug_bound),
    "var": ("medium", 0.10, _bug_var),
    "args": ("hard", 0.10, _bug_args),
    "consts": ("hard", 0.08, _bug_consts),
    "paren": ("hard", 0.07, _bug_paren),
}


def _function(params: tuple[str, ...], expr: str) -> str:
    return f"def f({', '.join(params)}):\n    return {expr}\n"


def _tests(bug: _Bug, r: random.Random) -> str | None:
    """1-3 asserts on small inputs, at least one of which the buggy expression fails; None if none found."""
    inputs = [bug.boundary] if bug.boundary else []
    for _ in range(50):
        if inputs:
            break
        args = tuple(r.randint(0, 9) for _ in bug.params)
        if bug.reference_fn(*args) != bug.buggy_fn(*args):
            inputs.append(args)
    if not inputs:
        return None
    count = r.choice([1, 2, 3])
    for _ in range(50):
        if len(inputs) >= count:
            break
        args = tuple(r.randint(0, 9) for _ in bug.params)
        if args not in inputs:
            inputs.append(args)
    r.shuffle(inputs)
    return "".join(f"assert f({', '.join(map(str, a))}) == {bug.reference_fn(*a)!r}\n" for a in inputs)


def generate_fix_tasks(n: int, seed: int) -> list[FixTask]:
    """`n` distinct small bug-fix tasks drawn from the family mix above; the same (n, seed) gives the same list."""
    rng = random.Random(seed)
    names = list(FAMILIES)
    weights = [FAMILIES[name][1] for name in names]
    seen: set[tuple[str, str]] = set()
    tasks: list[FixTask] = []
    for _ in range(100 * n):
        if len(tasks) == n:
            break
        family = rng.choices(names, weights)[0]
        difficulty, _, make = FAMILIES[family]
        bug = make(rng)
        tests = _tests(bug, rng)
        buggy = _function(bug.params, bug.buggy)
        if tests is None or (buggy, tests) in seen:
            continue
        seen.add((buggy, tests))
        tasks.append(
            FixTask(
                task_id=f"fix-{family}-{len(tasks)}",
                family=family,
                difficulty=difficulty,
                entry_point="f",
                buggy_source=buggy,
                test_source=tests,
                reference_source=_function(bug.params, bug.reference),
            )
        )
    if len(tasks) < n:
        raise ValueError(
            f"n: the generator ran out of distinct tasks after {len(tasks)}; expected at most ~5000, got {n}"
        )
    return tasks
