"""The trusted test harness: the tests run in one process and call the agent's code in another.

This file is shipped verbatim into the sandbox as the script (`harness_script`), followed by one call of `main`.
It imports nothing from the package. Why two processes (docs/fix_test.md, "Test harness"): when the agent's code
and the tests share a process, the code runs first and can end the process with status 0 (`os._exit(0)`) or
rewrite anything the tests use, so a passing exit status proves nothing. Here:

- the harness makes itself undumpable (`PR_SET_DUMPABLE 0`: the same uid can no longer ptrace it or read its
  /proc/<pid>/mem or fds), then forks; the child closes every descriptor but its two pipe ends and runs the
  agent's code as `__main__`;
- the parent runs the tests with each function of the agent's module replaced by a proxy that sends the call's
  arguments down a pipe and reads the result back. Values cross as a tagged tree of builtin types (None, bool,
  int, float, complex, str, bytes, list, tuple, set, frozenset, dict) that the parent rebuilds itself, so no object
  of the agent's (and no `__eq__` of its choosing) ever reaches the tests;
- names the tests use besides the entry point (helpers of a HumanEval prompt) come from the task's own code
  (`context`), not from the agent's, so rewriting a helper cannot change what the tests check;
- the verdict is the parent's exit status: 0 only when the tests ran to the end. The child ending early, dying,
  hanging (the sandbox's timeout), or answering garbage fails the run.

On failure the parent prints a traceback in the interpreter's shape (the failing test line, then the agent's
frames, then the exception), which `summarize_test_run` turns into the observation.
"""

import ast
import ctypes
import linecache
import os
import sys
import time
import traceback

SOLUTION_FILE = "solution.py"
TESTS_FILE = "tests.py"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_PR_SET_DUMPABLE = 4


class SolutionError(Exception):
    """The agent's code raised (or its process ended); `lines` is its traceback, as the child formatted it."""

    def __init__(self, lines):
        super().__init__(lines[-1] if lines else "the solution failed")
        self.lines = lines


def encode(value, depth=0):
    """A value as a tree of tuples, strings and numbers that `ast.literal_eval` reads back; TypeError if not data."""
    if depth > 200:
        raise TypeError("value nested more than 200 levels deep")
    if value is None:
        return ("n",)
    if isinstance(value, bool):
        return ("b", bool(value))
    if isinstance(value, int):
        return ("i", int(value))
    if isinstance(value, float):
        return ("f", float.hex(float(value)))
    if isinstance(value, complex):
        return ("c", float.hex(value.real), float.hex(value.imag))
    if isinstance(value, str):
        return ("s", str(value))
    if isinstance(value, bytes):
        return ("y", bytes(value))
    for tag, kind in (("l", list), ("t", tuple), ("S", set), ("F", frozenset)):
        if isinstance(value, kind):
            return (tag, [encode(item, depth + 1) for item in value])
    if isinstance(value, dict):
        return ("d", [(encode(k, depth + 1), encode(v, depth + 1)) for k, v in value.items()])
    raise TypeError(f"cannot pass a value of type {type(value).__name__} between the tests and the solution")


_SCALARS = {"b": bool, "i": int, "s": str, "y": bytes}
_CONTAINERS = {"l": list, "t": tuple, "S": set, "F": frozenset}


def decode(tree):
    """Rebuild a value from `encode`'s tree using builtin constructors only; ValueError on anything else."""
    if not isinstance(tree, tuple) or not tree or not isinstance(tree[0], str):
        raise ValueError("malformed value")
    tag, args = tree[0], tree[1:]
    if tag == "n" and not args:
        return None
    if tag in _SCALARS and len(args) == 1 and type(args[0]) is _SCALARS[tag]:
        return args[0]
    if tag == "f" and len(args) == 1 and type(args[0]) is str:
        return float.fromhex(args[0])
    if tag == "c" and len(args) == 2 and all(type(a) is str for a in args):
        return complex(float.fromhex(args[0]), float.fromhex(args[1]))
    if tag in _CONTAINERS and len(args) == 1 and type(args[0]) is list:
        return _CONTAINERS[tag](decode(item) for item in args[0])
    if tag == "d" and len(args) == 1 and type(args[0]) is list:
        pairs = args[0]
        if not all(type(p) is tuple and len(p) == 2 for p in pairs):
            raise ValueError("malformed dict")
        return {decode(k): decode(v) for k, v in pairs}
    raise ValueError(f"malformed value (tag {tag!r})")


def send(fd, message):
    data = repr(message).encode("utf-8", "surrogatepass")
    os.write(fd, len(data).to_bytes(8, "little"))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def receive(fd):
    """One message, or None at end of file; ValueError on a malformed or oversized one."""
    header = _read_exactly(fd, 8)
    if header is None:
        return None
    size = int.from_bytes(header, "little")
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {size} bytes")
    data = _read_exactly(fd, size)
    if data is None:
        raise ValueError("message cut short")
    return ast.literal_eval(data.decode("utf-8", "surrogatepass"))


def _read_exactly(fd, n):
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _register_source(filename, source):
    """Let tracebacks show lines of code that lives in no file."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)


def _solution_lines(exc):
    """The agent's frames of `exc` and its last line, as the interpreter prints them."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == SOLUTION_FILE]
    return [*traceback.format_list(frames), *traceback.format_exception_only(type(exc), exc)]


def run_child(requests, replies, solution):
    """The agent's side: run its module, then answer calls until the parent closes the pipe."""
    _register_source(SOLUTION_FILE, solution)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(solution, SOLUTION_FILE, "exec"), namespace)
    except BaseException as exc:  # the agent's module failing is an answer for the parent, not a crash here
        send(replies, ("load_error", _solution_lines(exc)))
        return
    names = [n for n, v in namespace.items() if callable(v) and not n.startswith("__")]
    send(replies, ("ready", names))
    while (request := receive(requests)) is not None:
        name, args, kwargs = request
        try:
            result = namespace[name](*decode(args), **decode(kwargs))
            reply = ("ok", encode(result))
        except BaseException as exc:
            reply = ("error", _solution_lines(exc))
        sys.stdout.flush()
        send(replies, reply)


class Solution:
    """The parent's handle on the child: `call(name, args, kwargs)` or SolutionError."""

    def __init__(self, pid, requests, replies):
        self.pid, self.requests, self.replies = pid, requests, replies

    def _reply(self):
        try:
            reply = receive(self.replies)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
            raise SolutionError([f"the solution's process sent a malformed reply ({type(exc).__name__})\n"]) from None
        if reply is None:
            _, status = os.waitpid(self.pid, 0)
            how = f"exit status {os.waitstatus_to_exitcode(status)}"
            raise SolutionError([f"SolutionExited: the solution's process ended ({how}) instead of answering\n"])
        if not (isinstance(reply, tuple) and len(reply) == 2 and isinstance(reply[0], str)):
            raise SolutionError(["the solution's process sent a malformed reply\n"])
        return reply

    def start(self):
        """The names the agent's module defines; SolutionError if it failed to load."""
        kind, payload = self._reply()
        if kind == "ready" and isinstance(payload, list) and all(isinstance(n, str) for n in payload):
            return payload
        raise SolutionError(_lines(payload) if kind == "load_error" else ["unexpected first reply\n"])

    def call(self, name, args, kwargs):
        try:
            send(self.requests, (name, encode(args), encode(kwargs)))
        except BrokenPipeError:
            pass  # the child is gone: the reply read says how
        kind, payload = self._reply()
        if kind == "ok":
            try:
                return decode(payload)
            except (ValueError, TypeError, RecursionError) as exc:
                raise SolutionError([f"the solution's process sent a malformed value ({exc})\n"]) from None
        raise SolutionError(_lines(payload) if kind == "error" else ["malformed reply\n"])


def _lines(payload):
    if isinstance(payload, list) and all(isinstance(line, str) for line in payload):
        return payload
    return ["the solution's process sent a malformed error\n"]


def proxy(solution, name):
    def call(*args, **kwargs):
        return solution.call(name, args, kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def start_solution(solution_source):
    """Fork the child that runs the agent's code; the parent keeps only its ends of the two pipes."""
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(req_w)
        os.close(rep_r)
        os.closerange(3, min(req_r, rep_w))
        os.closerange(max(req_r, rep_w) + 1, 1 << 16)
        if abs(req_r - rep_w) > 1:
            os.closerange(min(req_r, rep_w) + 1, max(req_r, rep_w))
        try:
            run_child(req_r, rep_w, solution_source)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    os.close(req_r)
    os.close(rep_w)
    return Solution(pid, req_w, rep_r)


def main(solution_source, tests_source, context_source, entry_point):
    """Run the tests against the agent's code; exit 0 only when they all pass."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        print(f"harness: prctl(PR_SET_DUMPABLE) failed (errno {ctypes.get_errno()})", file=sys.stderr)
        sys.exit(3)
    solution = start_solution(solution_source)
    _register_source(TESTS_FILE, tests_source)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        names = solution.start()
        exec(compile(context_source, "context.py", "exec"), namespace)
        for name in {*names, entry_point} - set(namespace):  # the task's own helpers are never replaced
            namespace[name] = proxy(solution, name)
        exec(compile(tests_source, TESTS_FILE, "exec"), namespace)
    except BaseException as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == TESTS_FILE]
        lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
        lines += exc.lines if isinstance(exc, SolutionError) else traceback.format_exception_only(type(exc), exc)
        sys.stdout.flush()
        sys.stderr.write("".join(lines))
        sys.stderr.flush()
        _finish(solution, 1)
    sys.stdout.flush()
    _finish(solution, 0)


def _finish(solution, status):
    """Close the child's request pipe, give it a moment to end (one that does not is the sandbox's to kill), exit."""
    os.close(solution.requests)
    for _ in range(50):
        try:
            if os.waitpid(solution.pid, os.WNOHANG)[0]:
                break
        except ChildProcessError:
            break
        time.sleep(0.001)
    os._exit(status)
