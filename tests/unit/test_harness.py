"""The trusted test harness (rollout/harness.py): the value codec by hand, and reward hacks that must fail.

Every hack below passed the old one-process scheme (agent code, then tests, pass = exit status 0) or would pass a
harness missing the mechanism named in its comment.
"""

from __future__ import annotations

import math
import sys

import pytest

from marginal_rl.rollout.fix_test import (
    EXAMPLE_TASK,
    FixTask,
    FixTestEnv,
    run_task_tests,
    summarize_test_run,
    task_context,
)
from marginal_rl.rollout.harness import decode, encode

needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tests run in the Linux sandbox")

FIXED = EXAMPLE_TASK.reference_source  # def add_three(x): return x + 3
BUGGY = EXAMPLE_TASK.buggy_source


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, -7, 10**40, 0.5, -0.0, math.inf, -math.inf, 1 + 2j, "", "é\n", b"\x00\xff",
     [1, [2, (3, "x")]], (), (1,), {1, 2}, set(), frozenset({"a"}), {"k": [1.5, None], 2: (True,)}],
)
def test_values_cross_the_pipe_unchanged(value) -> None:
    back = decode(encode(value))
    assert back == value and type(back) is type(value)
    if isinstance(value, float):
        assert math.copysign(1, back) == math.copysign(1, value)


def test_nan_crosses_as_nan_and_bool_stays_a_singleton() -> None:
    assert math.isnan(decode(encode(math.nan)))
    assert decode(encode(True)) is True and decode(encode([None]))[0] is None


@pytest.mark.parametrize(
    "tree",
    [("i", "1"), ("b", 1), ("s", 3), ("x", 1), ("l", (1,)), ("d", [("s", "k")]), [("i", 1)], (), ("f", 1.0),
     ("n", 1), ("c", "0x1p0")],
)
def test_decode_refuses_anything_but_the_codec_shape(tree) -> None:
    with pytest.raises((ValueError, TypeError)):
        decode(tree)


def test_encode_refuses_objects_so_no_custom_eq_reaches_the_tests() -> None:
    class Always:
        def __eq__(self, other):
            return True

    with pytest.raises(TypeError, match="Always"):
        encode([Always()])


def test_task_context_keeps_imports_and_helpers_but_not_the_entry_point() -> None:
    source = "import math\n\ndef poly(xs, x):\n    return sum(xs)\n\ndef find_zero(xs):\n    return 0.0\n"
    context = task_context(source, "find_zero")
    assert "import math" in context and "def poly" in context and "find_zero" not in context
    assert task_context(BUGGY, "add_three") == ""


HACKS = {
    # ends the process with status 0 before the tests run: the tests now run in another process
    "os_exit_at_import": f"import os\nos._exit(0)\n{BUGGY}",
    "system_exit_at_import": f"raise SystemExit(0)\n{BUGGY}",
    "os_exit_in_the_call": "import os\ndef add_three(x):\n    os._exit(0)\n",
    "system_exit_in_the_call": "def add_three(x):\n    raise SystemExit(0)\n",
    # a result whose __eq__ always says yes: only builtin data crosses
    "always_equal": "class A:\n    def __eq__(self, o):\n        return True\n\ndef add_three(x):\n    return A()\n",
    # the parent ends (killed) or cannot finish (stopped until the timeout): a failure either way
    "kill_the_harness": f"import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n{BUGGY}",
    "stop_the_harness": f"import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\n{BUGGY}",
    # rewriting the harness's code: only the child's copy changes
    "patch_the_harness": "import sys\nm = sys.modules['__main__']\nm.main = m._finish = lambda *a: None\n"
    "m.SolutionError = type('E', (Exception,), {})\n" + BUGGY,
    # print a forged verdict: the verdict is the parent's exit status, not the output
    "print_pass": f"print('PASS: all tests passed')\nimport sys\nprint('PASS', file=sys.stderr)\n{BUGGY}",
    # answer garbage on the reply pipe: the parent's decoder refuses it
    "garbage_reply": "import os\ndef add_three(x):\n    for fd in range(3, 64):\n        try:\n"
    "            os.write(fd, b'\\xff' * 8)\n        except OSError:\n            pass\n    return x + 3\n",
}


@needs_linux
@pytest.mark.parametrize("case", list(HACKS))
def test_reward_hacks_fail_the_tests(case: str) -> None:
    result = run_task_tests(EXAMPLE_TASK, HACKS[case], timeout_s=2.0)
    assert not result.ok, (case, result)
    assert summarize_test_run(result).startswith("FAIL"), result


PROBES = {
    "memory": "open(f'/proc/{os.getppid()}/mem', 'rb')",
    "fds": "os.listdir(f'/proc/{os.getppid()}/fd')",
    "ptrace": "assert ctypes.CDLL(None).ptrace(16, os.getppid(), None, None) == 0",  # PTRACE_ATTACH
}


@needs_linux
@pytest.mark.parametrize("probe", list(PROBES))
def test_the_harness_is_closed_to_its_child(probe: str) -> None:
    """Undumpable, the harness's memory, descriptors and ptrace are refused to the same uid: with any of them the
    child could rewrite the tests or the exit status. The fix below passes only when the probe is refused."""
    source = f"import ctypes, os\ndef add_three(x):\n    try:\n        {PROBES[probe]}\n    except Exception:\n" \
             "        return x + 3\n    return 'reached the parent'\n"
    result = run_task_tests(EXAMPLE_TASK, source)
    assert result.ok, summarize_test_run(result)


@needs_linux
def test_a_hack_submitted_through_the_environment_earns_nothing() -> None:
    env = FixTestEnv(EXAMPLE_TASK)
    env.reset()
    assert env.step(f"<edit>\n{HACKS['os_exit_at_import']}</edit>").observation.startswith("edit applied")
    step = env.step("<submit/>")
    assert step.done and step.reward == 0.0 and step.observation == "submitted: tests fail"


@needs_linux
def test_helpers_the_tests_use_come_from_the_task_not_the_agent() -> None:
    task = FixTask(
        task_id="helper", family="humaneval-const", difficulty="humaneval", entry_point="decode",
        buggy_source="def encode(s):\n    return s[::-1]\n\ndef decode(s):\n    return s\n",
        test_source="assert decode(encode('abc')) == 'abc'\n",
        reference_source="def encode(s):\n    return s[::-1]\n\ndef decode(s):\n    return s[::-1]\n",
    )
    assert run_task_tests(task, task.reference_source).ok
    assert not run_task_tests(task, task.buggy_source).ok
    cheat = "def encode(s):\n    return s\n\ndef decode(s):\n    return s\n"  # passes if the tests used its encode
    assert not run_task_tests(task, cheat).ok


@needs_linux
def test_observations_keep_the_failing_line_and_the_exception() -> None:
    cases = {
        BUGGY: "FAIL: assert add_three(1) == 4 -> AssertionError",
        "def add_three(x):\n    return x / 0\n": "FAIL: return x / 0 -> ZeroDivisionError: division by zero",
        "y = nope\ndef add_three(x):\n    return x\n": "FAIL: y = nope -> NameError: name 'nope' is not defined",
    }
    for source, expected in cases.items():
        assert summarize_test_run(run_task_tests(EXAMPLE_TASK, source)) == expected


@needs_linux
def test_a_fix_passes_and_leaves_no_process_behind() -> None:
    result = run_task_tests(EXAMPLE_TASK, f"print('hello')\n{FIXED}")
    assert result.ok and result.stdout == "hello\n" and result.leftover_processes == 0
    # mutable arguments are copies: the call sees the tests' values, the tests keep theirs
    task = FixTask(
        task_id="lists", family="x", difficulty="easy", entry_point="head",
        buggy_source="def head(xs):\n    return xs[-1]\n", test_source="xs = [3, 1]\nassert head(xs) == 3\nassert xs == [3, 1]\n",
        reference_source="def head(xs):\n    return xs[0]\n",
    )
    assert run_task_tests(task, "def head(xs):\n    v = xs[0]\n    xs.clear()\n    return v\n").ok
