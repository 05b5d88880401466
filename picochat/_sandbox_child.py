"""The process side of picochat.execution: lock this interpreter down, then run the untrusted code.

`picochat.execution.execute_code` starts this file as `python -I -S _sandbox_child.py` in a fresh
temporary working directory (which holds the code as `main.py`), with an empty environment, its own
process group and, where `unshare` works, new network/PID/mount namespaces. It sends a one-line JSON
config on stdin. Steps, in this order, because each needs the one before:

1. read the config, then point stdin at /dev/null (the code gets EOF, not our config);
2. import the stdlib modules typical model-written code needs (after step 4 a root-owned Python
   install under /root may be unreadable, so imports must happen while we still can);
3. lower resource limits (memory, CPU, file size, open files, processes, no core dumps), soft = hard
   so the code cannot raise them again;
4. if started as root, drop to the unprivileged `nobody` user: file permissions then protect the
   host's files, RLIMIT_NPROC applies (root ignores it), and /proc/<pid>/environ of root processes
   is unreadable;
5. Python-level guards: process creation, killing, deleting/renaming files, writing outside the
   working directory and reading /proc are disabled; ctypes/socket/subprocess/multiprocessing and
   friends cannot be imported; exit/quit/help/... are removed from builtins;
6. run `main.py` and write one JSON result record (tagged with the parent's nonce) to the result
   pipe, so an early `sys.exit(0)` or `os._exit(0)` can never pass for a completed run.

Only the standard library is used here, and only it is on the path: this file runs by path with
`-I -S`, so neither site-packages nor the picochat package (nor torch) is importable in the sandbox.
"""

import builtins
import io
import json
import os
import posix
import resource
import signal
import sys
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

# os/posix functions that start or signal processes, escape the process group, change identity or
# destroy/alter existing files. (Creating files and folders is allowed inside the working directory.)
DISABLED_OS_FUNCTIONS = (
    "chmod", "chown", "chroot", "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp",
    "execvpe", "fchmod", "fchown", "fork", "forkpty", "kill", "killpg", "lchmod", "lchown", "link",
    "pidfd_open", "popen", "posix_spawn", "posix_spawnp", "remove", "removedirs", "removexattr",
    "rename", "renames", "replace", "rmdir", "setegid", "seteuid", "setgid", "setpgid", "setpgrp",
    "setregid", "setresgid", "setresuid", "setreuid", "setsid", "setuid", "setxattr", "spawnl",
    "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "symlink", "system",
    "truncate", "unlink", "utime",
)  # fmt: skip
DISABLED_SHUTIL_FUNCTIONS = ("chown", "move", "rmtree")
REMOVED_BUILTINS = ("breakpoint", "copyright", "credits", "exit", "help", "license", "quit")

MAX_FILE_BYTES = 16 * 2**20  # RLIMIT_FSIZE: the largest file the code may write
MAX_OPEN_FILES = 64
MAX_PROCESSES = 64  # RLIMIT_NPROC, counted per user (so it only bites after dropping root)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def read_config() -> dict:
    config = json.loads(sys.stdin.readline())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return config


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
    builtins.open = io.open = safe_open
    sys.modules["_io"].open = safe_open
    for name in REMOVED_BUILTINS:
        if hasattr(builtins, name):
            delattr(builtins, name)
    sys.meta_path.insert(0, BlockedImports())
    for name in list(sys.modules):
        if name.partition(".")[0] in BLOCKED_MODULES:
            del sys.modules[name]


def run_code(source: str) -> dict:
    """Run the code as __main__; return the error ('Type: message' or None) and what stopped it."""
    try:
        # The file name is relative to the working directory, so tracebacks can show source lines.
        exec(compile(source, "main.py", "exec"), {"__name__": "__main__"})
        return {"error": None, "memory_exceeded": False, "timed_out": False}
    except BaseException as exc:  # SystemExit counts as a failure too: the code did not run to its end
        outcome = {
            "error": f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
            "memory_exceeded": isinstance(exc, MemoryError),
            "timed_out": isinstance(exc, CpuTimeExceeded),
        }
        try:
            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        except MemoryError:  # the code's data (kept alive by the traceback) may still fill memory
            pass
        return outcome


def main() -> None:
    config = read_config()
    preload_modules()
    limit_resources(config["max_memory_bytes"], config["cpu_seconds"])
    if config["drop_to"] is not None:
        drop_privileges(*config["drop_to"])
    workdir = os.path.realpath(config["workdir"])
    os.chdir(workdir)
    with open("main.py", encoding="utf-8") as f:
        source = f.read()
    install_guards(workdir)
    outcome = run_code(source)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    record = {"nonce": config["nonce"], **outcome}
    os.write(config["result_fd"], (json.dumps(record) + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()
