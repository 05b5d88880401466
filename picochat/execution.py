"""Run untrusted, model-written Python: the chat model's calculator tool and HumanEval scoring.

`execute_code(code)` runs a program in a separate, locked-down process and reports what happened;
`run_calculator(expression)` evaluates one short expression for the chat engine's tool calls.

THIS IS A BEST-EFFORT SANDBOX, NOT A SECURITY BOUNDARY AGAINST A DETERMINED ATTACKER. It is meant
to contain the mistakes and accidents of model-written code (runaway loops, huge allocations, fork
bombs, stray file deletion, network calls, peeking at secrets), not code crafted to escape it.
Linux only (it relies on resource limits, /proc and `unshare`).

Why a fresh `python -I -S` subprocess (not multiprocessing): it shares nothing with the caller (no
inherited modules, threads, torch state or open files), `-I` ignores PYTHON* variables, user
site-packages and the current folder, `-S` leaves only the standard library importable (no
site-packages, no picochat, no torch), the child's environment can be replaced wholesale, and it can
be wrapped in `unshare`. Everything is set up in C by subprocess (no preexec_fn), so it is safe to
call from a threaded server.

What each run gets:
- a working directory of its own and an almost empty environment (no secrets or API keys from the
  caller; only PATH, LANG, HOME and TMPDIR pointing at the working directory);
- its own session/process group, killed as a whole (SIGKILL) when the run ends or times out;
- where `unshare` works (root, or unprivileged user namespaces): new network namespace (no network
  at all: just a loopback interface that is down), PID namespace (killing it kills every descendant),
  a private, read-only /proc, and a mount namespace in which every mount is read-only (/ and all the
  others: /dev, bind-mounted files, ...; /sys and its cgroup mounts are unmounted where the kernel
  allows, else read-only too; see MOUNT_SCRIPT) and /tmp, /var/tmp and /dev/shm are
  private tmpfs mounts of PRIVATE_TMP_SIZES (so at most that much RAM outside the memory limit); the
  working directory lives on that /tmp, so nothing the code writes outlives the run or is visible to
  another run (without `unshare`: a fresh host temp folder, deleted afterwards);
- resource limits: address space and data (`max_memory_bytes`), CPU seconds, 16 MB per written file,
  64 open files, 64 processes, no core dumps;
- when the caller is root: the code runs as a user id of its own (RUN_IDS, fresh for every run), so
  the kernel protects files it does not own and other runs' folders, RLIMIT_NPROC counts this run's
  processes only (a fork bomb cannot starve a concurrent run) and /proc/<pid>/environ of other
  processes is unreadable;
- Python-level guards (see picochat/_sandbox_child.py): no fork/exec/spawn/system/kill/setsid/_exit,
  no deleting, renaming, chmod-ing or linking files, no fifos/device nodes/memfds, no writing outside
  the working directory (open, io.FileIO, os.open, mkdir), no /proc reads, no signal handlers, trace,
  profile or audit hooks, no importing ctypes/socket/subprocess/multiprocessing/ssl/sqlite3/..., no
  exit/quit/help;
- a wall-clock limit (`timeout`, which includes interpreter start-up of roughly 30-50 ms) and
  stdout/stderr capped at MAX_OUTPUT_BYTES each (the run is killed when it writes more).

The verdict (`success`) is the child's exit status, read by this process from the kernel: 0 only when
the code ran to its end; every failure aborts the child (see `run` in picochat/_sandbox_child.py for
how that path is kept out of the code's reach). There is no secret or result record the code could
find (through frames, gc or inherited descriptors) and forge; the child's report pipe only explains a
failure (error text, memory/CPU flags) and can never turn one into a success.

What remains possible, because the tests run in the same process as the code under test:
- code that undoes the Python-level guards (a fresh `posix` module through `_imp`, say) can end its
  process with status 0 before its tests run (posix._exit(0)), which nothing outside the process can
  tell from a finished run; on Python 3.13+ (PEP 667) it could also rewrite the harness's local
  variables through frame.f_locals;
- code can make assert-based tests pass without solving the task: return objects that compare equal
  to anything, or rebind builtins the tests call (abs, len, isinstance, math functions);
- Python-level guards can be undone in general (closures, gc, re-importing modules, `type(f.raw)` for
  the real io.FileIO); without root the code runs as the caller's user, so only those guards stand
  between it and the caller's files, and RLIMIT_NPROC counts all of the caller's processes; without
  `unshare` there is no network isolation beyond the blocked imports, no private /tmp and no read-only
  mounts; reads of world-readable files are allowed; CPU and disk bandwidth are not
  throttled. When the caller is root and Python lives in a folder the run's user cannot read (e.g.
  /root/.pyenv), only the stdlib modules the child preloads are importable (PRELOADED_MODULES in
  picochat/_sandbox_child.py: math, re, collections, itertools, hashlib, ...).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import operator
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MAX_OUTPUT_BYTES = 64 * 1024  # per stream (stdout, stderr)
CHILD_SCRIPT = Path(__file__).with_name("_sandbox_child.py")
NAMESPACE_FLAGS = ("--net", "--pid", "--mount-proc", "--fork", "--kill-child")
EXIT_GRACE_SECONDS = 1.0  # how long a child that closed its pipes gets to finish exiting
# In the run's own mount namespace, before Python starts: /sys (with its cgroup mounts) is unmounted
# (nothing in a run needs it), every other mount (/, /dev, /proc, bind-mounted files, whatever the host
# has) becomes read-only, and /tmp, /var/tmp and /dev/shm become private tmpfs mounts (this much RAM at
# most) that vanish with the namespace; what was mounted there is hidden under them. A remount keeps the
# mount's nosuid/nodev/noexec/atime flags (clearing one would weaken it, and in a user namespace the
# kernel refuses it). A mount that cannot be remounted is unmounted, and one that can be neither aborts
# the set-up, so a run never starts with a writable mount left behind. Only the topmost mount at a path
# is reachable, so each path is handled once; the kernel writes a space, tab, newline or backslash in a
# path as \ooo octal, decoded with printf %b.
PRIVATE_TMP_SIZES = {"/tmp": "32m", "/var/tmp": "8m", "/dev/shm": "8m"}
PRIVATE_WORKDIR = "/tmp/run"  # on the private /tmp; without namespaces a fresh host temp folder
TMPFS_OPTIONS = "mode=1777,nosuid,nodev,noexec"
KEPT_MOUNT_FLAGS = ("nosuid", "nodev", "noexec", "noatime", "nodiratime", "relatime", "strictatime")
_HIDDEN = "|".join(f"{p}|{p}/*" for p in PRIVATE_TMP_SIZES)
# Its arguments: N, N kept folders, the command. A kept folder (the interpreter's, picochat's, under /tmp in
# a clone there) is opened first and bound back, read-only, at its own path once the tmpfs hides it.
MOUNT_SCRIPT = "\n".join(
    [
        "set -e",
        "keep=$1; shift; i=0; fd=3",
        'while [ "$i" -lt "$keep" ]; do',
        '  while [ -e "/proc/self/fd/$fd" ]; do fd=$((fd + 1)); done',  # not the report pipe's number
        r'  eval "exec $fd<\"\$1\"; kept$i=\$1; fd$i=$fd"',
        "  shift; i=$((i + 1))",
        "done",
        "make_ro() {",  # $1: a mount point, $2: its options; keep the flags a user namespace locks
        "  flags=",
        f"  for flag in {' '.join(KEPT_MOUNT_FLAGS)}; do",
        '    case ",$2," in *",$flag,"*) flags="$flags,$flag";; esac',
        "  done",
        '  mount -o "remount,bind,ro$flags" "$1" 2>/dev/null || umount --lazy "$1" 2>/dev/null ||',
        '    { echo "sandbox: cannot make $1 read-only" >&2; exit 1; }',
        "}",
        "umount --recursive --lazy /sys 2>/dev/null || true",  # else its mounts are made read-only below
        "mounts=$(cat /proc/self/mounts)",
        "seen=",
        'printf "%s\\n" "$mounts" | while read -r _ point _ options _; do',
        '  case " $seen " in *" $point "*) continue;; esac',
        '  seen="$seen $point"',
        '  case $point in *\\\\*)',
        '    point=$(printf "%b" "$(printf "%s" "$point" | sed "s/\\\\\\\\/\\\\\\\\0/g")");;',
        "  esac",
        f"  case $point in {_HIDDEN}) continue;; esac",
        '  case ",$options," in *,ro,*) continue;; esac',
        '  make_ro "$point" "$options"',
        "done",
        *(f"if [ -d {p} ]; then mount -t tmpfs -o size={n},{TMPFS_OPTIONS} tmpfs {p}; fi"
          for p, n in PRIVATE_TMP_SIZES.items()),
        "i=0",
        'while [ "$i" -lt "$keep" ]; do',
        r'  eval "dir=\$kept$i; fd=\$fd$i"',
        '  mkdir -p "$dir"',
        '  mount --no-canonicalize --bind "/proc/self/fd/$fd" "$dir"',
        '  eval "exec $fd<&-"',
        '  options=$(awk -v p="$dir" \'$2 == p { o = $4 } END { print o }\' /proc/self/mounts)',
        '  make_ro "$dir" "$options"',
        "  i=$((i + 1))",
        "done",
        'exec "$@"',
    ]
)  # fmt: skip
# When root, each run gets its own unprivileged user id from this range (no passwd entry): the
# kernel then keeps runs out of each other's folders and counts RLIMIT_NPROC per run.
RUN_IDS = range(3_000_000_000, 4_000_000_000)


@dataclass
class ExecutionResult:
    success: bool  # the code ran to its end without raising (sys.exit counts as an error)
    stdout: str
    stderr: str
    error: str | None  # "ExceptionType: message", or why the run was stopped
    timed_out: bool = False
    memory_exceeded: bool = False


def execute_code(code: str, timeout: float = 5.0, max_memory_bytes: int = 256 * 2**20) -> ExecutionResult:
    """Run `code` as a program in a sandboxed process (see the module docstring) and report the outcome."""
    try:
        code.encode("utf-8")
    except UnicodeEncodeError as e:  # e.g. a lone surrogate: no interpreter could even read it
        error = f"UnicodeEncodeError: the code is not valid UTF-8 text ({e.reason} at position {e.start})"
        return ExecutionResult(False, "", "", error)
    prefix = _namespace_prefix()
    if prefix:  # the child makes its folder on the private /tmp, which vanishes with the namespace
        folder = contextlib.nullcontext(PRIVATE_WORKDIR)
    else:
        folder = tempfile.TemporaryDirectory(prefix="picochat-exec-", ignore_cleanup_errors=True)
    with folder as workdir:
        config = {
            "workdir": workdir,
            "code": code,
            "max_memory_bytes": max_memory_bytes,
            "cpu_seconds": max(1, int(timeout + 1)),
            "drop_to": _unprivileged_ids(),
        }
        (stdout, stderr, report_data), stop_reason, returncode = _run_child(config, timeout, prefix)
    return _make_result(stdout, stderr, _parse_report(report_data), stop_reason, timeout, returncode)


def _run_child(
    config: dict, timeout: float, prefix: tuple[str, ...]
) -> tuple[tuple[bytes, bytes, bytes], str | None, int]:
    """Start the child and gather its output; afterwards its whole process group is always killed."""
    read_fd, write_fd = os.pipe()  # the report pipe: why the code failed (the verdict is the exit status)
    with open(read_fd, "rb", buffering=0):
        with open(write_fd, "wb", buffering=0):  # closed here once started, so only the child holds it
            proc = _start_child({**config, "report_fd": write_fd}, prefix)
        stop_reason = "error"
        try:
            outputs, stop_reason = _collect_output(proc, read_fd, time.monotonic() + timeout)
        finally:
            _end_process_group(proc, wait_first=stop_reason is None)
    return outputs, stop_reason, proc.returncode


def _start_child(config: dict, prefix: tuple[str, ...]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-I", "-S", str(CHILD_SCRIPT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(config["report_fd"],),
        cwd="/",
        env=_child_env(config["workdir"]),
        start_new_session=True,  # its own process group, so the whole group can be killed
    )
    try:  # one line, read by the child first thing (a long program may fill the pipe buffer meanwhile)
        proc.stdin.write((json.dumps(config) + "\n").encode())
        proc.stdin.close()
    except BrokenPipeError:  # the child died at start-up; its stderr says why
        pass
    return proc


def _child_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}


def _unprivileged_ids() -> tuple[int, int] | None:
    """A fresh (uid, gid) from RUN_IDS for one run when we are root (the child drops to it), else None."""
    if os.geteuid() != 0:
        return None
    run_id = RUN_IDS[secrets.randbelow(len(RUN_IDS))]
    return run_id, run_id


def _kept_folders() -> tuple[str, ...]:
    """The folders the child needs (interpreter, venv, picochat) that lie under a private-tmpfs path."""
    needed = {sys.prefix, sys.base_prefix, os.path.dirname(sys.executable), str(CHILD_SCRIPT.parent)}
    needed |= {os.path.realpath(p) for p in needed} | {os.path.dirname(os.path.realpath(sys.executable))}
    hidden = sorted(p for p in needed if any(p == t or p.startswith(t + "/") for t in PRIVATE_TMP_SIZES))
    return tuple(f for f in hidden if not any(f.startswith(k + "/") for k in hidden))  # outermost only


@functools.cache
def _namespace_prefix() -> tuple[str, ...]:
    """`unshare ...` to prepend to the child's command, or () when namespaces are not available here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    user_ns = () if os.geteuid() == 0 else ("--map-root-user",)
    kept = _kept_folders()
    prefix = (unshare, *user_ns, *NAMESPACE_FLAGS, "/bin/sh", "-c", MOUNT_SCRIPT, "sandbox")
    prefix += (str(len(kept)), *kept)
    try:
        probe = subprocess.run(
            [*prefix, sys.executable, "-I", "-S", "-c", "pass"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return prefix if probe.returncode == 0 else ()


def _collect_output(
    proc: subprocess.Popen, result_fd: int, deadline: float
) -> tuple[tuple[bytes, bytes, bytes], str | None]:
    """Read stdout, stderr and the result pipe until all close or the run must stop.

    Returns the three byte strings and None, or "timeout" / "overflow" when it stopped early.
    """
    fds = (proc.stdout.fileno(), proc.stderr.fileno(), result_fd)
    outputs = {fd: bytearray() for fd in fds}
    stop_reason = None
    with selectors.DefaultSelector() as selector:
        for fd in fds:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() and stop_reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stop_reason = "timeout"
                break
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                outputs[key.fd] += chunk
                if len(outputs[key.fd]) > MAX_OUTPUT_BYTES:
                    stop_reason = "overflow"
    return tuple(bytes(outputs[fd][:MAX_OUTPUT_BYTES]) for fd in fds), stop_reason


def _end_process_group(proc: subprocess.Popen, wait_first: bool) -> None:
    """SIGKILL the child's process group (and with it any leftovers), then reap the child."""
    if wait_first:  # the pipes closed, so the child is exiting: let it report its own exit status
        try:
            proc.wait(timeout=EXIT_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is already empty
        pass
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def _parse_report(data: bytes) -> dict | None:
    """The last well-formed report line. The code can write to the pipe too, but a report only
    describes a failure: it never makes a run succeed (see _make_result)."""
    report = None
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("error"), str):
            report = record
    return report


def _make_result(
    stdout: bytes,
    stderr: bytes,
    report: dict | None,
    stop_reason: str | None,
    timeout: float,
    returncode: int,
) -> ExecutionResult:
    success = stop_reason is None and returncode == 0  # the verdict: only the exit status decides it
    if success:
        error = None
    elif stop_reason == "timeout":
        error = f"TimeoutError: the code ran for more than {timeout:g} s"
    elif stop_reason == "overflow":
        error = f"OutputLimitExceeded: the code wrote more than {MAX_OUTPUT_BYTES} bytes to stdout or stderr"
    elif report is not None:
        error = report["error"]
    else:
        error = f"SandboxError: the process ended without reporting a result ({_describe_exit(returncode)})"
    failed_by = report if report is not None and not success else {}
    return ExecutionResult(
        success=success,
        stdout=stdout.decode("utf-8", errors="replace"),
        stderr=stderr.decode("utf-8", errors="replace"),
        error=error,
        timed_out=stop_reason == "timeout" or failed_by.get("timed_out") is True,
        memory_exceeded=failed_by.get("memory_exceeded") is True,
    )


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


# ---------------------------------------------------------------------------------------------
# The calculator tool. The engine calls it in the middle of generation, so it must be fast: instead
# of a ~40 ms sandboxed process it walks the expression's syntax tree itself, allowing only numbers,
# strings, arithmetic, comparisons, a few pure builtins and read-only string methods. No names,
# attributes or calls outside those lists can be reached, so there is nothing to escape to; the size
# checks below stop the remaining risk, expressions like 9**9**9 or "a"*10**10 that exhaust CPU or memory.

MAX_EXPRESSION_CHARS = 300
MAX_INT_BITS = 10_000  # about 3,000 decimal digits
MAX_SEQUENCE_LENGTH = 10_000  # characters of a string / items of a list

_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_COMPARISONS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_FUNCTIONS = {f.__name__: f for f in (abs, round, min, max, sum, len, int, float, str)}
_STRING_METHODS = frozenset({
    "capitalize", "count", "endswith", "find", "index", "isalpha", "isdigit", "lower", "lstrip",
    "replace", "rfind", "rstrip", "split", "startswith", "strip", "swapcase", "title", "upper",
})  # fmt: skip


class _Unsupported(ValueError):
    """The expression uses syntax the calculator does not allow, or would grow too large."""


def run_calculator(expression: str) -> str | None:
    """Evaluate a short Python expression like `48/2` or `"strawberry".count("r")`.

    Returns the result as text, or None if the expression is not allowed or fails. A float with an
    integral value is shown without its `.0` (`48/2` gives `24`), the way GSM8K's calculator annotations
    write results, and floats are rounded to 12 significant digits, so tool outputs at inference look
    like the ones the model was trained on.
    """
    expression = expression.strip()
    if len(expression) > MAX_EXPRESSION_CHARS:
        return None
    if re.fullmatch(r"[\d\s+\-*/%().,]*", expression):  # pure arithmetic: "1,000" means 1000
        expression = expression.replace(",", "")
    try:
        result = _evaluate(ast.parse(expression, mode="eval").body)
    except Exception:  # the contract is "None on any error", whatever the expression did
        return None
    if isinstance(result, float):
        result = float(f"{result:.12g}")  # hide float noise: 70*.01*90 gives 63, as GSM8K writes it
        if result.is_integer() and abs(result) < 1e15:
            return str(int(result))
    return str(result)


def _evaluate(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str, bool):
        return _checked(node.value)
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_evaluate(item) for item in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        _check_binary(node.op, left, right)
        return _checked(_BINARY_OPS[type(node.op)](left, right))
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARISONS for op in node.ops):
        values = [_evaluate(node.left), *(_evaluate(c) for c in node.comparators)]
        return all(
            _COMPARISONS[type(op)](a, b) for op, a, b in zip(node.ops, values[:-1], values[1:], strict=True)
        )
    if isinstance(node, ast.Subscript):
        return _checked(_evaluate(node.value)[_evaluate_index(node.slice)])
    if isinstance(node, ast.Call) and not node.keywords:
        return _checked(_call(node.func, [_evaluate(arg) for arg in node.args]))
    raise _Unsupported(f"not allowed in the calculator: {ast.dump(node)[:80]}")


def _evaluate_index(node: ast.AST):
    if isinstance(node, ast.Slice):
        parts = (node.lower, node.upper, node.step)
        return slice(*(None if part is None else _evaluate(part) for part in parts))
    return _evaluate(node)


def _call(func: ast.AST, args: list):
    if isinstance(func, ast.Name) and func.id in _FUNCTIONS:
        if func.id == "round" and len(args) == 2 and abs(args[1]) > 100:
            raise _Unsupported("round() to more than 100 digits")  # round(5, -10**9) computes 10**10**9
        return _FUNCTIONS[func.id](*args)
    if isinstance(func, ast.Attribute) and func.attr in _STRING_METHODS:
        target = _evaluate(func.value)
        if not isinstance(target, str):
            raise _Unsupported("methods are only allowed on strings")
        if func.attr == "replace" and len(args) >= 2:  # "a"*9999 .replace("a", "b"*9999) is huge
            if (len(target) + 1) * (len(args[1]) + 1) > MAX_SEQUENCE_LENGTH:
                raise _Unsupported("replace() result too long")
        return getattr(target, func.attr)(*args)
    raise _Unsupported("function not allowed in the calculator")


def _check_binary(op: ast.operator, left, right) -> None:
    """Refuse operations whose result would be too big *before* computing them."""
    if isinstance(op, ast.Pow) and isinstance(left, int) and isinstance(right, int) and right > 0:
        if max(left.bit_length(), 1) * right > MAX_INT_BITS:
            raise _Unsupported("power too large")
    if isinstance(op, ast.Mult):
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _Unsupported("product too large")
        elif isinstance(left, (str, list, tuple)) or isinstance(right, (str, list, tuple)):
            sequence, count = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if len(sequence) * max(count, 0) > MAX_SEQUENCE_LENGTH:
                raise _Unsupported("repetition too long")
    if isinstance(op, ast.Mod) and isinstance(left, str):
        raise _Unsupported("%-formatting is not allowed")  # "%099999999d" % 1 allocates gigabytes


def _checked(value):
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _Unsupported("integer too large")
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_SEQUENCE_LENGTH:
        raise _Unsupported("result too long")
    return value
