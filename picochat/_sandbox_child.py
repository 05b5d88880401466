"""The process side of picochat.execution: lock this interpreter down, then run the untrusted code.

`picochat.execution.execute_code` starts this file as `python -I -S _sandbox_child.py` with an empty
environment, its own process group and, where `unshare` works, new network/PID/mount namespaces in
which /tmp, /var/tmp and /dev/shm are small private tmpfs mounts and every other mount is read-only
(MOUNT_SCRIPT in picochat/execution.py). It sends a one-line JSON config (which holds the code) on
stdin. Steps, in this order, because each needs the one before:

1. read the config, then point stdin at /dev/null (the code gets EOF, not our config);
2. write the code as `main.py` into the working directory (created here on the private /tmp when
   there are namespaces) and give both to the run's own user id;
3. import the stdlib modules typical model-written code needs (after step 5 a root-owned Python
   install under /root may be unreadable, so imports must happen while we still can);
4. lower resource limits (memory, CPU, file size, open files, processes, no core dumps), soft = hard
   so the code cannot raise them again;
5. if started as root, drop to the run's own unprivileged user id (one per run, chosen by the
   parent): file permissions then protect the host's files and the other runs' folders, RLIMIT_NPROC
   counts this run's processes only (root ignores it), and other processes' /proc/<pid>/environ is
   unreadable;
6. Python-level guards: process creation, exiting without a verdict (os._exit), killing,
   deleting/renaming files, writing outside the working directory (open, io.open, io.FileIO, os.open)
   and reading /proc are disabled, as are the hooks that could run code inside this harness (signal
   handlers, trace/profile functions, audit hooks); ctypes/socket/subprocess/multiprocessing and
   friends cannot be imported; exit/quit/help/... are removed from builtins;
7. run `main.py` (see `run`): the parent reads the verdict from this process's exit status, which
   is 0 only when the code ran to its end, and a report on the report pipe only says why it failed.

Only the standard library is used here, and only it is on the path: this file runs by path with
`-I -S`, so neither site-packages nor the picochat package (nor torch) is importable in the sandbox.
"""

import _io
import _signal
import builtins
import io
import json
import os
import posix
import resource
import signal
import sys
import threading
import traceback

# Modules the untrusted code may want, imported before privileges are dropped (step 2).
PRELOADED_MODULES = (
    "array", "base64", "binascii", "bisect", "calendar", "cmath", "collections", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "glob",
    "hashlib", "heapq", "itertools", "json", "linecache", "math", "numbers", "operator", "pathlib",
    "pprint", "queue", "random", "re", "secrets", "shutil", "statistics", "string", "struct",
    "textwrap", "time", "tokenize", "typing", "unicodedata", "zlib",
)  # fmt: skip

# Top-level modules that reach the network, spawn processes, call C directly or write files from C.
BLOCKED_MODULES = frozenset({
    "_ctypes", "_dbm", "_gdbm", "_multiprocessing", "_posixshmem", "_posixsubprocess", "_socket",
    "_sqlite3", "_ssl", "asyncio", "cffi", "ctypes", "dbm", "ftplib", "http", "imaplib",
    "multiprocessing", "poplib", "pty", "smtplib", "socket", "socketserver", "sqlite3", "ssl",
    "subprocess", "telnetlib", "urllib.request", "webbrowser", "xmlrpc",
})  # fmt: skip

# os/posix functions that start or signal processes, end this one without a verdict (_exit), escape
# the process group, change identity, make special files or memory-backed files, or destroy/alter
# existing files. (Creating files and folders is allowed inside the working directory.)
DISABLED_OS_FUNCTIONS = (
    "_exit", "chmod", "chown", "chroot", "execl", "execle", "execlp", "execlpe", "execv", "execve",
    "execvp", "execvpe", "fchmod", "fchown", "fork", "forkpty", "kill", "killpg", "lchmod", "lchown",
    "link", "memfd_create", "mkfifo", "mknod", "pidfd_open", "popen", "posix_spawn", "posix_spawnp",
    "remove", "removedirs", "removexattr", "rename", "renames", "replace", "rmdir", "setegid",
    "seteuid", "setgid", "setpgid", "setpgrp", "setregid", "setresgid", "setresuid", "setreuid",
    "setsid", "setuid", "setxattr", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
    "spawnvp", "spawnvpe", "symlink", "system", "truncate", "unlink", "utime",
)  # fmt: skip
DISABLED_SHUTIL_FUNCTIONS = ("chown", "move", "rmtree")
REMOVED_BUILTINS = ("breakpoint", "copyright", "credits", "exit", "help", "license", "quit")
# Ways to run code inside this harness after the code under test has failed, and so to change the
# verdict: a signal handler or trace function raising SystemExit(0) in `run`'s failure path, an audit
# hook raising in it. (threading's versions end up in sys.settrace/setprofile, guarded below.)
DISABLED_HOOKS = (
    (signal, "signal"), (_signal, "signal"), (sys, "settrace"), (sys, "setprofile"), (sys, "addaudithook"),
    (threading, "settrace"), (threading, "setprofile"),
)  # fmt: skip
MIN_RECURSION_LIMIT = 100  # a lower one could make the failure path's own calls raise RecursionError

MAX_FILE_BYTES = 16 * 2**20  # RLIMIT_FSIZE: the largest file the code may write
MAX_OPEN_FILES = 64
MAX_PROCESSES = 64  # RLIMIT_NPROC, counted per user id: a run's own one after dropping root
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def read_config() -> dict:
    config = json.loads(sys.stdin.readline())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return config


def prepare_workdir(workdir: str, code: str, owner: list | None) -> str:
    """Create the working directory with the code as main.py, owned by the run's user (if any)."""
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    path = os.path.join(workdir, "main.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(code)
    if owner is not None:
        for target in (workdir, path):
            os.chown(target, *owner)
    return os.path.realpath(workdir)


def preload_modules() -> None:
    for name in PRELOADED_MODULES:
        __import__(name)


def limit_resources(max_memory_bytes: int, cpu_seconds: int) -> None:
    limits = {
        resource.RLIMIT_AS: max_memory_bytes,
        resource.RLIMIT_DATA: max_memory_bytes,
        resource.RLIMIT_FSIZE: MAX_FILE_BYTES,
        resource.RLIMIT_NOFILE: MAX_OPEN_FILES,
        resource.RLIMIT_NPROC: MAX_PROCESSES,
        resource.RLIMIT_CORE: 0,
    }
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))
    # Soft limit -> SIGXCPU (handled below), hard limit one second later -> SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    # A handler is needed anyway: as PID 1 of a new namespace a default-action SIGXCPU is ignored.
    signal.signal(signal.SIGXCPU, on_cpu_limit)


class CpuTimeExceeded(Exception):
    """Raised in the running code when RLIMIT_CPU's soft limit is reached."""


def on_cpu_limit(signum, frame) -> None:
    raise CpuTimeExceeded("CPU time limit exceeded")


def drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise RuntimeError("could not drop root privileges")


def disabled(name: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")

    return refuse


def is_inside(path, folder: str) -> bool:
    real = os.path.realpath(os.fsdecode(path))
    return real == folder or real.startswith(folder + os.sep)


def check_path(path, writing: bool, workdir: str) -> None:
    """Writes must stay inside the working directory; nothing under /proc may be opened."""
    if isinstance(path, int):  # an already-open file descriptor
        return
    if writing and not is_inside(path, workdir):
        raise PermissionError(f"writing outside the sandbox working directory is not allowed: {path!r}")
    if is_inside(path, "/proc"):
        raise PermissionError(f"reading /proc is not allowed in the sandbox: {path!r}")


def guarded_open(real_open, workdir: str):
    def open(file, mode="r", *args, **kwargs):
        check_path(file, any(flag in mode for flag in "wax+"), workdir)
        return real_open(file, mode, *args, **kwargs)

    return open


def guarded_file_io(real_file_io, workdir: str):
    class FileIO(real_file_io):
        def __init__(self, file, mode="r", closefd=True, opener=None):
            if opener is not None:
                raise PermissionError("io.FileIO with an opener is disabled in the sandbox")
            check_path(file, any(flag in mode for flag in "wax+"), workdir)
            super().__init__(file, mode, closefd)

    return FileIO


def guarded_recursion_limit(real_setrecursionlimit):
    def setrecursionlimit(limit):
        if limit < MIN_RECURSION_LIMIT:
            raise ValueError(f"the sandbox keeps the recursion limit at {MIN_RECURSION_LIMIT} or more")
        real_setrecursionlimit(limit)

    return setrecursionlimit


def guarded_os_open(real_os_open, workdir: str):
    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is not None:
            raise PermissionError("os.open with dir_fd is disabled in the sandbox")
        check_path(path, bool(flags & WRITE_FLAGS), workdir)
        return real_os_open(path, flags, mode)

    return os_open


def guarded_mkdir(real_mkdir, workdir: str):
    def mkdir(path, mode=0o777, *, dir_fd=None):
        if dir_fd is not None:
            raise PermissionError("os.mkdir with dir_fd is disabled in the sandbox")
        check_path(path, True, workdir)
        return real_mkdir(path, mode)

    return mkdir


class BlockedImports:
    """A meta-path finder consulted before all others: it covers `import`, __import__ and importlib."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in BLOCKED_MODULES or name.partition(".")[0] in BLOCKED_MODULES:
            raise ImportError(f"importing {name!r} is not allowed in the sandbox")
        return None


def install_guards(workdir: str) -> None:
    import shutil

    for module in (os, posix):
        for name in DISABLED_OS_FUNCTIONS:
            if hasattr(module, name):
                setattr(module, name, disabled(f"os.{name}"))
        module.open = guarded_os_open(posix.open, workdir)
        module.mkdir = guarded_mkdir(posix.mkdir, workdir)
    for name in DISABLED_SHUTIL_FUNCTIONS:
        setattr(shutil, name, disabled(f"shutil.{name}"))
    safe_open = guarded_open(io.open, workdir)
    builtins.open = io.open = _io.open = safe_open
    io.FileIO = _io.FileIO = guarded_file_io(_io.FileIO, workdir)
    for module, name in DISABLED_HOOKS:
        setattr(module, name, disabled(f"{module.__name__}.{name}"))
    sys.setrecursionlimit = guarded_recursion_limit(sys.setrecursionlimit)
    for name in REMOVED_BUILTINS:
        if hasattr(builtins, name):
            delattr(builtins, name)
    sys.meta_path.insert(0, BlockedImports())
    for name in list(sys.modules):
        if name.partition(".")[0] in BLOCKED_MODULES:
            del sys.modules[name]


def describe(exc: BaseException) -> dict:
    """What the parent reports for a failed run: 'Type: message' and what stopped it."""
    message = str(exc)
    return {
        "error": f"{type(exc).__name__}: {message}" if message else type(exc).__name__,
        "memory_exceeded": isinstance(exc, MemoryError),
        "timed_out": isinstance(exc, CpuTimeExceeded),
    }


def report_failure(report_fd: int) -> None:
    """Print the code's traceback and send why it failed; never raises (the exception is the code's,
    so its message, its class and anything it touches may be hostile or exhaust memory)."""
    exc = sys.exc_info()[1]
    try:
        outcome = describe(exc)
    except:  # noqa: E722
        outcome = {"error": "Exception (its description raised another)", "memory_exceeded": False,
                   "timed_out": False}  # fmt: skip
    try:
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
    except:  # noqa: E722
        pass
    for stream in (sys.stdout, sys.stderr):  # abort() does not flush them
        try:
            stream.flush()
        except:  # noqa: E722
            pass
    try:
        os.write(report_fd, (json.dumps(outcome) + "\n").encode())
    except:  # noqa: E722
        pass


def run(source: str, report_fd: int) -> None:
    """Run the code as __main__. Returning means it ran to its end; on any failure the process aborts.

    The verdict is this process's exit status (0 only after a normal return), so nothing the code can
    write decides it. The failure path is built so that the code cannot divert it either: a bare
    `except:` looks up no name (a rebound builtins.BaseException could not dodge it), `abort` is a
    local bound before the code runs (a fast local that Python code cannot rebind), and abort() ends
    the process at once, skipping sys.excepthook, atexit and interpreter shutdown, all of which the
    code can replace. The hooks that could run code in between are disabled by install_guards.
    """
    abort = posix.abort  # as PID 1 of a PID namespace abort() ends in SIGSEGV: also a non-zero status
    try:
        # The file name is relative to the working directory, so tracebacks can show source lines.
        exec(compile(source, "main.py", "exec"), {"__name__": "__main__"})
    except:  # noqa: E722  (SystemExit counts as a failure too: the code did not run to its end)
        try:
            report_failure(report_fd)
        finally:
            abort()


def main() -> None:
    config = read_config()
    workdir = prepare_workdir(config["workdir"], config["code"], config["drop_to"])
    preload_modules()
    limit_resources(config["max_memory_bytes"], config["cpu_seconds"])
    if config["drop_to"] is not None:
        drop_privileges(*config["drop_to"])
    os.chdir(workdir)
    install_guards(workdir)
    run(config["code"], config["report_fd"])
    # Falling off the end: the interpreter flushes stdout/stderr and exits with status 0.


if __name__ == "__main__":
    main()
