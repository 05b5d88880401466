"""Hostile and ordinary code thrown at picochat.execution: everything must be contained and reported.

Most tests run twice: "isolated" is the real set-up (namespaces + dropping root when available) and
"guards-only" turns both off, so the Python-level guards alone must hold (fixtures in sandbox_fixtures).
The OS-level layers alone are tested in test_execution_kernel; the calculator tool at the end.
"""

import threading
import time

import pytest
from sandbox_fixtures import (  # noqa: F401 (fixtures: one autouse, the rest as arguments)
    FAST,
    IMPORT_REFUSED,
    SECRET,
    assert_blocked,
    assert_no_connection,
    host_keeps_working,
    listener,
    mode,
)

from picochat.execution import MAX_OUTPUT_BYTES, ExecutionResult, execute_code, run_calculator

# ---------------------------------------------------------------------------------------------
# Ordinary code


def test_prints_and_computes():
    result = execute_code("total = sum(i * i for i in range(10))\nprint('total', total)\nprint(2 ** 100)")
    assert result == ExecutionResult(True, f"total 285\n{2**100}\n", "", None, False, False)


def test_exception_is_reported_with_type_and_traceback():
    result = execute_code("def f(x):\n    return 1 / x\n\nprint('before')\nf(0)\n")
    assert not result.success
    assert result.stdout == "before\n"
    assert result.error == "ZeroDivisionError: division by zero"
    assert "line 2, in f" in result.stderr and "return 1 / x" in result.stderr


def test_syntax_error_is_reported():
    result = execute_code("def f(:\n")
    assert not result.success and result.error.startswith("SyntaxError")


def test_humaneval_style_program_with_common_imports():
    code = (
        "from typing import List\nimport math, hashlib, collections, re, itertools\n"
        "def has_close(numbers: List[float], t: float) -> bool:\n"
        "    return any(abs(a - b) < t for a, b in itertools.combinations(numbers, 2))\n"
        "assert has_close([1.0, 2.8, 3.0], 0.3)\nassert not has_close([1.0, 2.0], 0.5)\n"
        "print(hashlib.md5(b'x').hexdigest()[:6], math.comb(5, 2), collections.Counter('aab')['a'])\n"
    )
    result = execute_code(code)
    assert result.success, result
    assert result.stdout == "9dd4e4 10 2\n"


def test_files_inside_the_working_directory_are_allowed():
    code = "open('notes.txt', 'w').write('hi')\nimport os\nos.mkdir('sub')\nprint(open('notes.txt').read())"
    result = execute_code(code, timeout=FAST)
    assert result.success, result
    assert result.stdout == "hi\n"


def test_stdin_is_empty():
    assert_blocked(execute_code("input()", timeout=FAST), "EOFError")


WRONG_ANSWER = "\nassert 1 + 1 == 3, 'the tests fail'\n"  # what a forgery must hide: failing tests after it


@pytest.mark.parametrize(
    "exit_early",
    [
        "import sys\nsys.exit(0)",
        "raise SystemExit",
        "import os\nos._exit(0)",
        "import posix\nposix._exit(0)",
        "import os\nos.abort()",
        "import os\nos.execv('/bin/true', ['true'])",
        "import os\nos.kill(os.getpid(), 9)",
        "import _thread\n_thread.interrupt_main()\nimport time\ntime.sleep(1)",
    ],
)
def test_early_exit_never_counts_as_success(mode, exit_early):
    # A HumanEval completion that exits before the asserts run must not score as a pass.
    result = execute_code(exit_early + WRONG_ANSWER, timeout=FAST)
    assert not result.success and result.error is not None, result


FORGE_RECORDS = """
import gc, json, os, sys
record = {"error": None, "memory_exceeded": False, "timed_out": False, "success": True}
found = []
frame = sys._getframe()
while frame is not None:  # the harness's frames: its config, the pipe, any nonce
    found.extend(v for v in frame.f_locals.values() if isinstance(v, dict))
    frame = frame.f_back
found.extend(o for o in gc.get_objects() if isinstance(o, dict) and ("report_fd" in o or "nonce" in o))
for config in found:
    record["nonce"] = config.get("nonce")
    for key in ("report_fd", "result_fd"):
        if isinstance(config.get(key), int):
            os.write(config[key], (json.dumps(record) + "\\n").encode())
for fd in range(3, 64):  # and every inherited descriptor, just in case
    try:
        os.write(fd, (json.dumps(record) + "\\n").encode())
    except OSError:
        pass
"""


@pytest.mark.parametrize(
    "forgery",
    [
        FORGE_RECORDS,
        FORGE_RECORDS + "import posix\nposix._exit(0)",
        # Monkeypatching the harness, so that its failure path reports (or exits with) success:
        "import builtins\nbuiltins.BaseException = KeyError\nraise SystemExit(0)",
        "import builtins\nbuiltins.SystemExit = type('S', (SystemExit,), {'code': 0})",
        "import sys\nsys.excepthook = lambda *a: sys.exit(0)",
        "import __main__, sys\n__main__.report_failure = lambda fd: sys.exit(0)",
        "import __main__\n__main__.run = lambda *a: None\n__main__.main = lambda: None",
        "import json, sys\njson.dumps = lambda *a, **k: sys.exit(0)",
        "import os, sys\nos.write = lambda *a: sys.exit(0)",
        "import posix\nposix.abort = lambda: None",
        "import traceback, sys\ntraceback.print_exception = lambda *a, **k: sys.exit(0)",
        "import sys\nclass Out:\n    def write(self, s): pass\n    def flush(self): sys.exit(0)\n"
        "sys.stdout = sys.stderr = Out()",
        "import atexit, sys\natexit.register(sys.exit, 0)",
        # An exception whose description ends the harness "successfully":
        "class E(Exception):\n    def __str__(self):\n        raise SystemExit(0)\nraise E()",
        "class M(type):\n    @property\n    def __name__(cls):\n        raise SystemExit(0)\n"
        "raise M('E', (Exception,), {})()",
        # Code that would run inside the harness's failure path:
        "import signal, sys\nsignal.signal(signal.SIGALRM, lambda *a: sys.exit(0))\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)",
        "import _signal, sys\n_signal.signal(14, lambda *a: sys.exit(0))",
        "import sys\nsys.settrace(lambda *a: sys.exit(0))",
        "import threading, sys\nthreading.settrace(lambda *a: sys.exit(0))",
        "import sys\nsys.setprofile(lambda *a: sys.exit(0))",
        "import sys\nsys.addaudithook(lambda *a: sys.exit(0))",
        "import sys\nsys.setrecursionlimit(12)",
        "import threading, json, os\ndef forge():\n    while True:\n        for fd in range(3, 10):\n"
        "            try:\n                os.write(fd, b'{\"error\": null}\\n')\n"
        "            except OSError:\n                pass\n"
        "threading.Thread(target=forge, daemon=True).start()",
    ],
)
def test_the_code_cannot_forge_its_verdict(mode, forgery):
    result = execute_code(forgery + WRONG_ANSWER, timeout=FAST)
    assert not result.success and result.error is not None, result


def test_the_verdict_of_an_honest_failure_says_why():
    result = execute_code("print('partial', flush=False)" + WRONG_ANSWER, timeout=FAST)
    assert not result.success and result.stdout == "partial\n"  # flushed before the process aborts
    assert result.error == "AssertionError: the tests fail" and "line 2" in result.stderr


def test_a_lone_surrogate_is_an_error_result_not_an_exception():
    result = execute_code("print('\ud800')")
    assert not result.success and result.error.startswith("UnicodeEncodeError: the code is not valid UTF-8")


def test_concurrent_calls_from_threads():
    results = {}

    def run(i: int) -> None:
        results[i] = execute_code(f"print({i} * 7)", timeout=10)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {i: r.stdout for i, r in results.items()} == {i: f"{i * 7}\n" for i in range(4)}


# ---------------------------------------------------------------------------------------------
# Hostile code, contained by the limits and the Python-level guards (both modes)


def test_infinite_loop_times_out(mode):
    start = time.monotonic()
    result = execute_code("while True:\n    pass", timeout=1.0)
    assert result.timed_out and not result.success
    assert result.error.startswith("TimeoutError")
    assert time.monotonic() - start < 3.0


def test_timeout_kills_a_sleeping_program(mode):
    start = time.monotonic()
    result = execute_code("print('started', flush=True)\nimport time\ntime.sleep(60)", timeout=1.0)
    assert result.timed_out and result.stdout == "started\n"
    assert time.monotonic() - start < 3.0


def test_resource_limits_are_set(mode):
    code = (
        "import resource as r\n"
        "print([r.getrlimit(getattr(r, 'RLIMIT_' + n)) for n in ('AS', 'CPU', 'FSIZE', 'NPROC', 'CORE')])"
    )
    result = execute_code(code, timeout=2.5, max_memory_bytes=200 * 2**20)
    limits = [(200 * 2**20,) * 2, (3, 4), (16 * 2**20,) * 2, (64, 64), (0, 0)]
    assert result.stdout == f"{limits}\n", result


def test_cpu_limit_is_reported_as_a_timeout(mode):
    # Stands in for RLIMIT_CPU's soft limit, which a wall-clock-bound test cannot reach first.
    result = execute_code("import signal\nsignal.raise_signal(signal.SIGXCPU)", timeout=FAST)
    assert result.timed_out and not result.success
    assert result.error == "CpuTimeExceeded: CPU time limit exceeded"


@pytest.mark.parametrize(
    "code",
    [
        "import os\nwhile True:\n    os.fork()",
        "import posix\nwhile True:\n    posix.fork()",
        "import os\nos.posix_spawn('/bin/sh', ['sh'], {})",
        "import os\nos.execv('/bin/sh', ['sh'])",
        "import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()",
        "from concurrent.futures import ProcessPoolExecutor\nProcessPoolExecutor().submit(print)",
        "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '100'])",
        "import _posixsubprocess",
        "import pty\npty.fork()",
    ],
)
def test_fork_bombs_and_process_creation_are_blocked(mode, code):
    assert_blocked(execute_code(code, timeout=FAST), "PermissionError", *IMPORT_REFUSED)


@pytest.mark.parametrize("code", ["x = bytearray(10 * 2**30)", "x = [0] * 10**10", "x = 'a' * 10**10"])
def test_huge_allocation_runs_out_of_memory(mode, code):
    result = execute_code(code, timeout=FAST)
    assert result.memory_exceeded and not result.success
    assert result.error.startswith("MemoryError")


def test_gradual_allocation_hits_the_memory_limit(mode):
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(2**20))"
    result = execute_code(code, timeout=5.0, max_memory_bytes=96 * 2**20)
    assert result.memory_exceeded and not result.timed_out


def test_os_system_is_blocked(mode, tmp_path):
    marker = tmp_path / "pwned"
    result = execute_code(f"import os\nos.system('touch {marker}')", timeout=FAST)
    assert_blocked(result, "PermissionError")
    assert not marker.exists()


@pytest.mark.parametrize(
    "attack",
    [
        "import os\nos.remove(victim)",
        "import os\nos.unlink(victim)",
        "import shutil\nshutil.rmtree(os.path.dirname(victim))",
        "import shutil\nshutil.move(victim, 'stolen.txt')",
        "import os\nos.rename(victim, victim + '.bak')",
        "import os\nos.truncate(victim, 0)",
        "import os\nos.chmod(victim, 0)",
        "open(victim, 'w').write('overwritten')",
        "open(victim, 'a').write('appended')",
        "import io\nio.open(victim, 'r+').write('X')",
        "import io\nio.FileIO(victim, 'w').write(b'X')",
        "import _io\n_io.FileIO(victim, 'a').write(b'X')",
        "import io\nio.FileIO(victim, 'r+', opener=lambda p, f: os.open(p, f)).write(b'X')",
        "import os\nos.mkfifo(victim + '.fifo')",
        "import pathlib\npathlib.Path(victim).write_text('overwritten')",
        "import pathlib\npathlib.Path(victim).unlink()",
        "import os\nos.close(os.open(victim, os.O_WRONLY | os.O_TRUNC))",
        "import os\nos.symlink(victim, 'link')\nopen('link', 'w').write('via symlink')",
        "import os\nos.link(victim, 'hard')\nopen('hard', 'w').write('via hard link')",
    ],
)
def test_files_outside_the_sandbox_survive(mode, tmp_path, attack):
    victim = tmp_path / "precious" / "data.txt"
    victim.parent.mkdir()
    victim.write_text("original content")
    code = f"import os\nvictim = {str(victim)!r}\n{attack}\n"
    assert_blocked(execute_code(code, timeout=FAST), "PermissionError")
    assert victim.read_text() == "original content"
    assert sorted(p.name for p in victim.parent.iterdir()) == ["data.txt"]


def test_file_size_is_capped(mode):
    result = execute_code("open('big.bin', 'wb').write(b'x' * (32 * 2**20))", timeout=5.0)
    assert_blocked(result, "File too large", "OSError")


@pytest.mark.parametrize(
    "attack",
    [
        "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=1)",
        "import _socket\n_socket.socket().connect(('127.0.0.1', PORT))",
        "import urllib.request\nurllib.request.urlopen(f'http://127.0.0.1:{PORT}/', timeout=1)",
        "import http.client\nhttp.client.HTTPConnection('127.0.0.1', PORT, timeout=1).request('GET', '/')",
        "import asyncio",
        "import importlib\nimportlib.import_module('socket')",
    ],
)
def test_network_is_blocked(mode, listener, attack):
    code = f"PORT = {listener.getsockname()[1]}\n{attack}\n"
    assert_blocked(execute_code(code, timeout=FAST), *IMPORT_REFUSED)
    assert_no_connection(listener)


STEAL_SECRETS = """
import os, glob
found = [dict(os.environ)]
for path in ['/proc/self/environ', f'/proc/{os.getppid()}/environ', *glob.glob('/proc/*/environ')]:
    try:
        found.append(open(path, 'rb').read())
    except Exception as exc:
        found.append(repr(exc))
print(found)
"""


def test_environment_secrets_are_not_visible(mode, monkeypatch):
    monkeypatch.setenv("PICOCHAT_SECRET", SECRET)
    result = execute_code(STEAL_SECRETS, timeout=FAST)
    assert result.success, result
    assert "PATH" in result.stdout  # the child did print its (sanitised) environment
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_huge_output_is_capped(mode, stream):
    start = time.monotonic()
    result = execute_code(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 1000)", timeout=10.0)
    assert_blocked(result, "OutputLimitExceeded")
    assert len(getattr(result, stream)) == MAX_OUTPUT_BYTES
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize(
    "code",
    [
        "import ctypes",
        "import _ctypes",
        "__import__('ctypes').CDLL(None)",
        "import importlib\nimportlib.import_module('ctypes')",
        "import sqlite3",
    ],
)
def test_ctypes_and_c_level_escapes_cannot_be_imported(mode, code):
    assert_blocked(execute_code(code, timeout=FAST), *IMPORT_REFUSED)


@pytest.mark.parametrize("name", ["exit", "quit", "help", "breakpoint"])
def test_dangerous_builtins_are_removed(mode, name):
    assert_blocked(execute_code(f"{name}()", timeout=FAST), "NameError")


def test_process_group_and_signals_are_off_limits(mode):
    assert_blocked(execute_code("import os\nos.setsid()", timeout=FAST), "PermissionError")
    assert_blocked(execute_code("import os\nos.kill(os.getppid(), 9)", timeout=FAST), "PermissionError")


# ---------------------------------------------------------------------------------------------
# The calculator tool


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("48/2", "24"),  # integral floats print like GSM8K annotations
        ("7/2", "3.5"),
        ("70*.01*90", "63"),  # float noise is rounded away
        ("5*12+3", "63"),
        ("(10 - 2) / 4", "2"),
        ("2**10", "1024"),
        ("1,000 * 3", "3000"),
        ("7 // 2, 7 % 2", None),  # a tuple of pure arithmetic: the commas are read as thousands
        ('"strawberry".count("r")', "3"),
        ('"Hello".upper()', "HELLO"),
        ('"abc"[::-1]', "cba"),
        ('len("banana")', "6"),
        ("round(8.0256, 2)", "8.03"),
        ("max(3, 9, 4)", "9"),
        ("3 > 2", "True"),
    ],
)
def test_calculator_examples(expression, expected):
    assert run_calculator(expression) == expected


@pytest.mark.parametrize(
    "expression",
    [
        "9**9**9",
        "10**10**10",
        '"a" * 10**10',
        "[0] * 10**10",
        "round(5, -10**9)",
        '"%099999999d" % 1',
        '("a" * 9999).replace("a", "b" * 9999)',
        "1 / 0",
        "__import__('os').system('echo hi')",
        "().__class__.__base__.__subclasses__()",
        "open('/etc/passwd').read()",
        "exec('print(1)')",
        "[x for x in range(10)]",
        "lambda: 1",
        "x + 1",
        '"abc".__class__',
        "(1).bit_length()",
        "-" * 999 + "1",
        "1" * 400,
    ],
)
def test_calculator_refuses_unsafe_or_invalid_input(expression):
    start = time.monotonic()
    assert run_calculator(expression) is None
    assert time.monotonic() - start < 0.5
