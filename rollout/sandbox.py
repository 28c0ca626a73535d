"""Run untrusted Python source (model-written code, dataset tests) in a constrained subprocess.

    result = run_sandboxed("print(1 + 1)", timeout_s=2.0, memory_mb=256)
    assert result.returncode == 0 and result.stdout == "2\\n"

Layout of one call (threat model and limits in docs/sandbox.md):

    this process ──► supervisor (python -I -S, own session, child subreaper; when allowed: new network, IPC
                     │            and mount namespaces, all mounts read-only but the workdir and a private /dev/shm)
                     └─► child (setsid, rlimits, unprivileged uid when root, seccomp filter, python -I main.py)
                            └─► anything it forks, detached or not: reparented to the supervisor, killed at the end

The supervisor is trusted code: it waits for the child with a wall-clock limit, then kills every process left in
its subtree. A child subreaper sees every orphan the code leaves behind, so "no child left" means "no descendant
left", however the code detached (double fork, setsid). The namespaces die with the supervisor's subtree, and with
them every SysV IPC object and /dev/shm file the code made. This process kills the supervisor's session and every
process of the sandbox uid as a backstop if the supervisor itself does not finish in time.

Everything the caller acts on comes out of band: the child's wait status and the supervisor's report on a private
pipe, never the child's output. A failure before the child's exec reaches the supervisor on a close-on-exec pipe.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache

# Per-call uids come from a range far above any real account, so the RLIMIT_NPROC count and `kill(-1)` cover
# exactly one sandbox and concurrent sandboxes cannot signal each other.
_UID_BASE = 2_000_000_000
_UID_SPAN = 1_000_000
_NOBODY = 65534
_GRACE_S = 2.0  # how long past timeout_s the parent waits for the supervisor before killing it
_MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"
_SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

# The child's seccomp filter, per machine (syscall numbers from the kernel's tables; no filter elsewhere). Always
# refused: socket(AF_UNIX) and datagram socketpair() (filesystem sockets reach outside any namespace; a read-only
# mount does not stop connect()), io_uring (it makes sockets without passing the filter), kernel keys (a uid's
# keyring outlives its processes). Without an IPC namespace, SysV IPC and POSIX message queues are refused too.
_SECCOMP = {
    "x86_64": {
        "arch": 0xC000003E, "x32": True, "socket": 41, "socketpair": 53,
        "refused": [425, 248, 249, 250],  # io_uring_setup, add_key, request_key, keyctl
        # shmget shmat shmctl semget semop semctl msgget msgsnd msgrcv msgctl semtimedop mq_open mq_unlink
        "refused_without_ipc_ns": [29, 30, 31, 64, 65, 66, 68, 69, 70, 71, 220, 240, 241],
    },
    "aarch64": {
        "arch": 0xC00000B7, "x32": False, "socket": 198, "socketpair": 199,
        "refused": [425, 217, 218, 219],
        "refused_without_ipc_ns": [194, 196, 195, 190, 193, 191, 186, 189, 188, 187, 192, 180, 181],  # same order
    },
}

# Runs as `python -I -S -c _SUPERVISOR <json config>`; stdlib only, no site, so it starts in ~10 ms.
_SUPERVISOR = r"""
import ctypes, errno, json, os, resource, select, signal, struct, sys, time
cfg = json.loads(sys.argv[1])
status_fd = cfg["status_fd"]
os.set_inheritable(status_fd, False)
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 36, 38, 22, 2
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET = 0x20000, 0x08000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_PRIVATE = 2, 4, 4096, 1 << 18
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 1  # 442 on every 64-bit arch


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s failed: %s" % (what, os.strerror(err)))


class MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def mount_setattr(path, flags, **attr):
    # Changes only the bits asked for, so per-mount flags a container locked (nosuid, nodev, ...) stay as they are.
    a = MountAttr(**attr)
    check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(a), ctypes.c_size_t(32)),
          "mount_setattr(%s, %s)" % (path, attr))


def mount(source, target, fstype, flags, options):
    check(libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                     options and options.encode()), "mount(%s on %s)" % (fstype or "bind", target))


def confine_filesystem(workdir, shm_mb):
    # Private first, so nothing below propagates to the caller's mount namespace. The workdir gets its own mount
    # so that it alone can be made writable again; /dev/shm gets a fresh tmpfs that dies with the namespace,
    # unless the workdir itself lives there (TMPDIR=/dev/shm): the tmpfs would hide it, so /dev/shm stays read-only.
    mount_setattr("/", AT_RECURSIVE, propagation=MS_PRIVATE)
    mount(workdir, workdir, None, MS_BIND, None)
    mount_setattr("/", AT_RECURSIVE, attr_set=MOUNT_ATTR_RDONLY)
    mount_setattr(workdir, 0, attr_clr=MOUNT_ATTR_RDONLY)
    shm = os.path.realpath("/dev/shm")
    if os.path.isdir(shm) and not os.path.realpath(workdir).startswith(shm + "/"):
        mount("tmpfs", shm, "tmpfs", MS_NOSUID | MS_NODEV, "size=%dm,nr_inodes=4096,mode=1777" % shm_mb)


def seccomp_program(spec, refused):
    # Classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}; little-endian, so the low
    # word of args[0] is at offset 16 and of args[1] at 24. Another ABI (i386 on x86_64, x32) kills the process.
    def op(code, k, jt=0, jf=0):
        return struct.pack("=HBBI", code, jt, jf, k)
    LD, JEQ, JGE, AND, RET = 0x20, 0x15, 0x35, 0x54, 0x06
    ALLOW, KILL, REFUSE = 0x7FFF0000, 0x80000000, 0x00050000 | errno.EACCES
    prog = [op(LD, 4), op(JEQ, spec["arch"], 1, 0), op(RET, KILL), op(LD, 0)]
    if spec["x32"]:
        prog += [op(JGE, 0x40000000, 0, 1), op(RET, KILL)]
    for nr in refused:
        prog += [op(JEQ, nr, 0, 1), op(RET, REFUSE)]
    prog += [
        op(JEQ, spec["socket"], 2, 0), op(JEQ, spec["socketpair"], 5, 0), op(RET, ALLOW),
        op(LD, 16), op(JEQ, 1, 0, 1), op(RET, REFUSE), op(RET, ALLOW),  # socket(AF_UNIX, ...) is refused
        op(LD, 24), op(AND, 0xF), op(JEQ, 1, 1, 0), op(RET, REFUSE), op(RET, ALLOW),  # socketpair: SOCK_STREAM only
    ]
    return b"".join(prog)


def report(**fields):
    os.write(status_fd, json.dumps(fields).encode())


isolate_network = bool(cfg["isolate_network"])
namespaced = libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | (CLONE_NEWNET if isolate_network else 0)) == 0
spec = cfg["seccomp"]
try:
    check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
    if namespaced:
        confine_filesystem(cfg["workdir"], cfg["shm_mb"])
    fprog = None
    if spec is not None:
        code = seccomp_program(spec, spec["refused"] + ([] if namespaced else spec["refused_without_ipc_ns"]))
        bpf = ctypes.create_string_buffer(code, len(code))
        fprog = SockFprog(len(code) // 8, ctypes.addressof(bpf))
except Exception as exc:
    report(start_error="sandbox: could not set up the sandbox: %s: %s" % (type(exc).__name__, exc))
    sys.exit(0)
uid = cfg["uid"]
kill_by_uid = cfg["dedicated_uid"]
exec_error_r, exec_error_w = os.pipe()  # close-on-exec: EOF means the exec happened, bytes mean it did not
start = time.monotonic()
pid = os.fork()
if pid == 0:
    # A forked child must never fall back into the supervisor's code: any failure ends it here.
    try:
        try:
            os.setsid()
            for name, value in cfg["limits"]:
                resource.setrlimit(getattr(resource, name), tuple(value))
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            os.chdir(cfg["workdir"])
            if fprog is not None:  # last: the filter then covers only the exec and the code
                check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
                check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp filter")
            os.execve(cfg["python"], [cfg["python"], "-I", "-B", "main.py"], cfg["env"])
        except BaseException as exc:
            os.write(exec_error_w, ("%s: %s" % (type(exc).__name__, exc)).encode()[:1000])
    finally:
        os._exit(127)
os.close(exec_error_w)

pidfd = os.pidfd_open(pid)
ready, _, _ = select.select([pidfd], [], [], cfg["timeout_s"])
timed_out = not ready
if timed_out:
    os.kill(pid, signal.SIGKILL)
_, wait_status = os.waitpid(pid, 0)
child_wall_s = time.monotonic() - start
exec_error = os.read(exec_error_r, 4096).decode("utf-8", "replace")  # the child is gone: no writer is left


def kill_uid():
    # kill(-1) walks the task list under a lock that fork also needs, so it catches a fork bomb in one sweep.
    helper = os.fork()
    if helper == 0:
        os.setuid(uid)
        os.kill(-1, signal.SIGKILL)
        os._exit(0)
    os.waitpid(helper, 0)


def descendants():
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(int(data.rsplit(b")", 1)[1].split()[1]), []).append(int(name))
    out, stack = [], [os.getpid()]
    while stack:
        for child in children.get(stack.pop(), ()):
            out.append(child)
            stack.append(child)
    return out


leftover = set()
while True:
    try:
        reaped, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break  # a subreaper with no children has no descendants
    if reaped:
        continue
    if kill_by_uid:
        kill_uid()
    for p in descendants():
        leftover.add(p)
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.001)
report(
    wait_status=wait_status, timed_out=timed_out, leftover=len(leftover), child_wall_s=child_wall_s,
    start_error=exec_error and "sandbox: could not start the child: %s" % exec_error,
    net_isolated=namespaced and isolate_network, ipc_isolated=namespaced, fs_readonly=namespaced,
    seccomp=fprog is not None,
)
"""


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the code in it): unsupported OS, no usable interpreter, supervisor crash."""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run. `returncode` follows subprocess: negative signal number when killed.

    Every field but `stdout`, `stderr` and `stderr_hint` comes from the kernel or the supervisor, never from the
    code's output. The isolation flags say what was in effect (docs/sandbox.md says what each one stops).
    """

    returncode: int
    timed_out: bool
    stdout: str
    stderr: str
    killed_reason: str = ""  # "" | wall_time | cpu_time | file_size | signal:<NAME or number> | supervisor_lost
    wall_s: float = 0.0  # seconds this call took, process start and cleanup included
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    leftover_processes: int = 0  # processes still alive when the main one ended, all killed before returning
    network_isolated: bool = False  # the code ran in an empty network namespace
    ipc_isolated: bool = False  # ... in its own IPC namespace: SysV IPC and message queues died with it
    fs_readonly: bool = False  # ... with every mount read-only but its workdir and a private /dev/shm tmpfs
    seccomp: bool = False  # ... under the seccomp filter (no AF_UNIX sockets, io_uring, kernel keys)
    # "" | memory | file_size: read from the code's own stderr (a MemoryError or EFBIG traceback), so the code can
    # forge it; for logs only, never for control decisions
    stderr_hint: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run_sandboxed(
    source: str,
    timeout_s: float,
    memory_mb: int,
    *,
    max_processes: int = 16,
    max_file_mb: int = 16,
    max_open_files: int = 64,
    max_output_bytes: int = 64 * 1024,
    isolate_network: bool = True,
    interpreter: str | None = None,
) -> SandboxResult:
    """Run `source` as a script in a fresh temporary directory under time, memory, process and file limits.

    Returns when the code and every process it started are gone. Output past `max_output_bytes` per stream is
    read and discarded, so a print bomb costs time (bounded by the timeout) but not memory. When this process
    is root the code runs as a fresh unprivileged uid in its own network, IPC and read-only mount namespaces;
    otherwise as the current user, and then `max_processes` is added to the processes the user already runs,
    because RLIMIT_NPROC counts per user. Raises SandboxError only when the sandbox itself could not start the
    code (never because of anything the code does), ValueError for bad limits.
    """
    if not sys.platform.startswith("linux"):
        raise SandboxError(f"run_sandboxed needs Linux (prctl, /proc, pidfd); this is {sys.platform}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s}")
    if memory_mb < 16:
        raise ValueError(f"memory_mb: expected at least 16 (the interpreter needs it to start), got {memory_mb}")
    if max_processes < 1 or max_file_mb < 1 or max_open_files < 8 or max_output_bytes < 0:
        raise ValueError(
            f"limits: expected max_processes >= 1, max_file_mb >= 1, max_open_files >= 8, max_output_bytes >= 0; got "
            f"{max_processes}, {max_file_mb}, {max_open_files}, {max_output_bytes}"
        )
    start = time.monotonic()
    uid = _sandbox_uid() if os.geteuid() == 0 else None
    dedicated_uid = uid is not None and uid != _NOBODY  # only then may everything the uid runs or owns be killed
    python = interpreter or _child_interpreter(uid is not None)
    workdir = tempfile.mkdtemp(prefix="mrl-sandbox-")
    status_r, status_w = os.pipe()
    try:
        script = os.path.join(workdir, "main.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(source)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(script, uid, uid)
        nproc = max_processes if uid is not None else _count_own_processes() + max_processes
        cpu_s = math.ceil(timeout_s) + 1  # wall clock is the real limit; CPU time catches spinning forks early
        config = {
            "status_fd": status_w,
            "timeout_s": timeout_s,
            "uid": uid,
            "dedicated_uid": dedicated_uid,
            "workdir": workdir,
            "python": python,
            "isolate_network": isolate_network,
            "shm_mb": max_file_mb,
            "seccomp": _SECCOMP.get(os.uname().machine),
            "env": {"PATH": _MINIMAL_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir},
            "limits": [
                ("RLIMIT_CPU", (cpu_s, cpu_s + 1)),
                ("RLIMIT_AS", (memory_mb << 20, memory_mb << 20)),
                ("RLIMIT_NPROC", (nproc, nproc)),
                ("RLIMIT_FSIZE", (max_file_mb << 20, max_file_mb << 20)),
                ("RLIMIT_NOFILE", (max_open_files, max_open_files)),
                ("RLIMIT_CORE", (0, 0)),
            ],
        }
        supervisor = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _SUPERVISOR, json.dumps(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(status_w,),
            start_new_session=True,
            env={"PATH": _MINIMAL_PATH, "LANG": "C.UTF-8"},
            cwd=workdir,
        )
        os.close(status_w)
        status_w = -1
        deadline = start + timeout_s + _GRACE_S
        out, err, out_cut, err_cut = _read_capped(supervisor, deadline, max_output_bytes)
        try:
            supervisor.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_everything(supervisor, uid if dedicated_uid else None)
        status = _read_status(status_r)
    finally:
        os.close(status_r)
        if status_w >= 0:
            os.close(status_w)
        _remove_tree(workdir)
        if dedicated_uid:
            _remove_files_of(uid)
    stderr = err.decode("utf-8", errors="replace")
    if status is None:  # the supervisor overran or was killed: report what we know, never a silent success
        timed_out = time.monotonic() >= deadline
        return SandboxResult(
            returncode=-signal.SIGKILL,
            timed_out=timed_out,
            stdout=out.decode("utf-8", errors="replace"),
            stderr=stderr,
            killed_reason="wall_time" if timed_out else "supervisor_lost",
            wall_s=time.monotonic() - start,
            stdout_truncated=out_cut,
            stderr_truncated=err_cut,
        )
    if status["start_error"]:
        raise SandboxError(status["start_error"])
    wait_status = status["wait_status"]
    if os.WIFSIGNALED(wait_status):
        returncode = -os.WTERMSIG(wait_status)
    else:
        returncode = os.WEXITSTATUS(wait_status)
    return SandboxResult(
        returncode=returncode,
        timed_out=status["timed_out"],
        stdout=out.decode("utf-8", errors="replace"),
        stderr=stderr,
        killed_reason=_killed_reason(returncode, status["timed_out"]),
        wall_s=time.monotonic() - start,
        stdout_truncated=out_cut,
        stderr_truncated=err_cut,
        leftover_processes=status["leftover"],
        network_isolated=status["net_isolated"],
        ipc_isolated=status["ipc_isolated"],
        fs_readonly=status["fs_readonly"],
        seccomp=status["seccomp"],
        stderr_hint=_stderr_hint(returncode, stderr),
    )


def _read_capped(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    """Drain stdout and stderr until both close or the deadline passes, keeping at most `cap` bytes of each."""
    assert proc.stdout is not None and proc.stderr is not None
    kept = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    cut = dict.fromkeys(kept, False)
    with selectors.DefaultSelector() as sel:
        for fd in kept:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in sel.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                room = cap - len(kept[key.fd])
                kept[key.fd] += chunk[: max(room, 0)]
                cut[key.fd] = cut[key.fd] or len(chunk) > room
    proc.stdout.close()
    proc.stderr.close()
    out_fd, err_fd = list(kept)
    return bytes(kept[out_fd]), bytes(kept[err_fd]), cut[out_fd], cut[err_fd]


def _read_status(fd: int) -> dict | None:
    """The supervisor's report; called once it has exited, so the pipe's write end is closed and reads end."""
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    return json.loads(data) if data else None


def _kill_everything(supervisor: subprocess.Popen, uid: int | None) -> None:
    """Backstop when the supervisor overran: kill its session and every process of `uid` (a dedicated uid or None)."""
    try:
        os.killpg(supervisor.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    supervisor.wait()
    if uid is None:
        return
    for _ in range(100):
        pids = [p for p in _pids() if _real_uid(p) == uid]
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _real_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _count_own_processes() -> int:
    me = os.getuid()
    return sum(_real_uid(p) == me for p in _pids())


def _killed_reason(returncode: int, timed_out: bool) -> str:
    """Why the code ended, from the wait status and the supervisor's clock alone (a signal the code sent itself
    reads the same as one from the kernel, but it can only ever label the result, not break the caller)."""
    if timed_out:
        return "wall_time"
    if returncode == -signal.SIGXCPU:
        return "cpu_time"
    if returncode == -signal.SIGXFSZ:
        return "file_size"  # only when the code restored SIGXFSZ's default: CPython ignores it (write() gets EFBIG)
    if returncode < 0:
        try:
            return f"signal:{signal.Signals(-returncode).name}"
        except ValueError:  # real-time signals other than SIGRTMIN/SIGRTMAX have no name
            return f"signal:{-returncode}"
    return ""


def _stderr_hint(returncode: int, stderr: str) -> str:
    """Which limit the code's own traceback names: RLIMIT_AS and RLIMIT_FSIZE fail a call inside the code, which
    sees MemoryError or EFBIG like any other error. Forgeable, hence kept apart from killed_reason."""
    if returncode == 0:
        return ""
    lines = stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    if last.startswith("MemoryError"):
        return "memory"
    if "[Errno 27] File too large" in last:
        return "file_size"
    return ""


def _sandbox_uid() -> int:
    """A fresh uid for this call when the user namespace maps the high range, else nobody."""
    with open("/proc/self/uid_map", encoding="ascii") as f:
        ranges = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
    if any(inside <= _UID_BASE and _UID_BASE + _UID_SPAN <= inside + count for inside, _, count in ranges):
        return _UID_BASE + secrets.randbelow(_UID_SPAN)
    return _NOBODY


@cache
def _child_interpreter(drop_privileges: bool) -> str:
    """An interpreter the child can execute: ours, unless a dropped uid cannot reach it (e.g. under /root)."""
    candidates = [sys.executable]
    if drop_privileges:
        candidates += [p for p in (shutil.which("python3", path=_MINIMAL_PATH),) if p]
    for path in candidates:
        if not drop_privileges or _others_can_run(path):
            return os.path.realpath(path)
    raise SandboxError(
        f"no Python interpreter that an unprivileged uid can run (tried {candidates}); pass interpreter=..."
    )


def _others_can_run(path: str) -> bool:
    """True when 'other' users can traverse to and execute `path` and read its installation prefix."""
    real = os.path.realpath(path)
    prefix = os.path.dirname(os.path.dirname(real))  # <prefix>/bin/python3 -> <prefix> (holds lib/pythonX.Y)
    if not os.stat(real).st_mode & stat.S_IXOTH:
        return False
    directory = os.path.dirname(real)
    while True:
        mode = os.stat(directory).st_mode
        if not mode & stat.S_IXOTH or (directory == prefix and not mode & stat.S_IROTH):
            return False
        if directory == "/":
            return True
        directory = os.path.dirname(directory)


def _remove_files_of(uid: int) -> None:
    """Delete what the sandbox uid left in the world-writable directories, so a run leaves no trace behind."""
    for directory in _SHARED_WRITABLE:
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            try:
                owner = entry.stat(follow_symlinks=False).st_uid
            except FileNotFoundError:  # other users' files come and go while we scan
                continue
            if owner != uid:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def _remove_tree(path: str) -> None:
    # Sandboxed code may leave directories without permissions; as non-root we must restore them to delete them.
    if os.geteuid() != 0:
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                full = os.path.join(root, d)
                if not os.path.islink(full):
                    os.chmod(full, stat.S_IRWXU)
    shutil.rmtree(path)
