"""The sandbox's kernel layers: the Python guards are undone first on purpose, and the OS-level layers
(namespaces, a user per run, private tmpfs views, process limits) must still contain the code."""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from sandbox_fixtures import (  # noqa: F401 (fixtures: one autouse, the rest as arguments)
    FAST,
    REAL_POSIX,
    SECRET,
    assert_blocked,
    host_keeps_working,
    listener,
    mode,
    needs_kernel_layers,
)

from picochat import _sandbox_child as execution_child
from picochat import execution
from picochat.execution import execute_code


@needs_kernel_layers
def test_kernel_runs_each_run_as_its_own_user():
    code = REAL_POSIX + "print(posix.getuid(), posix.getgid(), posix.getpid())"
    first, second = (execute_code(code, timeout=FAST).stdout.split() for _ in range(2))
    assert first[2] == second[2] == "1"  # PID 1 of its own PID namespace
    assert int(first[0]) in execution.RUN_IDS and int(second[0]) in execution.RUN_IDS
    assert first[0] == first[1] and first[0] != second[0]  # unprivileged, and not shared between runs


@needs_kernel_layers
def test_a_checkout_under_tmp_keeps_the_kernel_layers(tmp_path):
    """/tmp becomes a private tmpfs in the sandbox. A picochat under /tmp (a fresh clone there, say) used
    to make the probe fail, so every run silently lost its namespaces; now its folder is bound back
    read-only and nothing else of the host's /tmp is visible."""
    checkout = tmp_path / "clone"  # pytest's tmp_path is under /tmp
    shutil.copytree(Path(execution.__file__).parent, checkout / "picochat")
    (checkout / "secret.txt").write_text("host file")
    code = REAL_POSIX + (
        "print(posix.getpid())\n"
        f"print(posix.access({str(checkout / 'secret.txt')!r}, posix.F_OK))\n"
        f"print(posix.access({str(checkout / 'picochat' / 'execution.py')!r}, posix.W_OK))\n"
    )
    probe = "import picochat.execution as e, sys\nr = e.execute_code(sys.argv[1], timeout=10)\n"
    probe += "print(r.stdout + r.stderr)"
    done = subprocess.run(
        [sys.executable, "-c", probe, code], cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout.split() == ["1", "False", "False"], (
        done.stdout + done.stderr
    )  # PID namespace, hidden, ro


@needs_kernel_layers
def test_kernel_caps_processes_and_kills_them_all_at_the_end():
    marker = f"29.{random.randrange(10**6):06d}"  # a unique `sleep` argument to find leftovers by
    code = REAL_POSIX + (
        "forked = failed = 0\n"
        "for _ in range(200):\n"
        "    try:\n        pid = posix.fork()\n    except OSError:\n        failed += 1\n        continue\n"
        "    if pid == 0:\n"
        f"        try:\n            posix.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "        finally:\n            posix._exit(0)\n"
        "    forked += 1\n"
        "print(forked, failed)\n"
    )
    result = execute_code(code, timeout=5.0)
    assert result.success, result
    forked, failed = map(int, result.stdout.split())
    assert forked < 64 and failed > 0  # RLIMIT_NPROC holds once root is dropped
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", marker]]
    for process in leftovers:  # clean up before failing, so a broken sandbox does not leak sleepers
        process.kill()
    assert leftovers == []


@pytest.fixture
def host_folder():
    """A folder outside /tmp (which the sandbox replaces with a private one) that any user can reach
    (unlike /root), removed afterwards. Only the root-only kernel tests use it."""
    parent = next(p for p in ("/srv", "/opt", "/var/lib") if os.path.isdir(p))
    folder = tempfile.mkdtemp(prefix=".picochat-test-", dir=parent)
    os.chmod(folder, 0o755)
    yield Path(folder)
    shutil.rmtree(folder)


@needs_kernel_layers
def test_kernel_protects_files(host_folder):
    victim = host_folder / "data.txt"
    victim.write_text("original content")
    shared = host_folder / "world-writable.txt"
    shared.write_text("original content")
    shared.chmod(0o666)
    os.chmod(host_folder, 0o777)  # even a folder anyone may write to
    code = REAL_POSIX + f"posix.unlink({str(victim)!r})"
    assert_blocked(execute_code(code, timeout=FAST), "Read-only file system")
    for attack in (f"posix.open({str(shared)!r}, posix.O_WRONLY | posix.O_TRUNC)",
                   f"posix.open({str(host_folder / 'new.txt')!r}, posix.O_WRONLY | posix.O_CREAT)",
                   f"type(open('main.py', 'rb').raw)({str(shared)!r}, 'w')"):  # fmt: skip
        assert_blocked(execute_code(REAL_POSIX + attack, timeout=FAST), "Read-only file system")
    assert victim.read_text() == shared.read_text() == "original content"
    assert sorted(p.name for p in host_folder.iterdir()) == ["data.txt", "world-writable.txt"]


LEAVE_A_FILE = """
import glob
marker = "picochat-sandbox-marker-{tag}"
for folder in ("/tmp", "/var/tmp", "/dev/shm"):
    real_file_io = type(open("main.py", "rb").raw)  # the unguarded io.FileIO, as an attacker would find it
    with real_file_io(f"{{folder}}/{{marker}}", "w") as f:
        f.write(b"persist")
print(sorted(glob.glob("/tmp/picochat-exec-*") + glob.glob("/tmp/picochat-sandbox-marker-*")))
"""


@needs_kernel_layers
def test_kernel_gives_each_run_a_private_tmp_that_vanishes():
    tag = f"{random.randrange(10**9)}"
    result = execute_code(LEAVE_A_FILE.format(tag=tag), timeout=FAST)
    assert result.success, result  # the writes succeed, on the run's own tmpfs
    assert result.stdout == f"['/tmp/picochat-sandbox-marker-{tag}']\n"  # no other run's folder in sight
    for folder in ("/tmp", "/var/tmp", "/dev/shm"):
        assert not os.path.exists(f"{folder}/picochat-sandbox-marker-{tag}")


TRY_EVERY_MOUNT = """
import errno, json, stat
table = posix.read(posix.open("/proc/self/mounts", 0), 1 << 20).decode()
points = {{line.split()[1].replace(chr(92) + "040", " ") for line in table.splitlines()}}
outcome = {{}}
for point in sorted(points | set({host_points!r})):
    try:
        is_dir = stat.S_ISDIR(posix.stat(point).st_mode)
    except FileNotFoundError:  # unmounted (/sys), and nothing of it left in the read-only folder below
        outcome[point] = "unreachable"
        continue
    targets = [point + "/.picochat-probe"] if is_dir else [point]
    if point == "/proc":  # procfs has no files to create: write one of its own instead
        targets.append("/proc/self/comm")
    for target in targets:
        try:
            posix.close(posix.open(target, posix.O_WRONLY | posix.O_CREAT))
            outcome[target] = "written"
        except OSError as exc:
            outcome[target] = errno.errorcode[exc.errno]
print(json.dumps(outcome))
"""


@needs_kernel_layers
def test_kernel_makes_every_other_mount_read_only(monkeypatch):
    """Besides the private /tmp, /var/tmp and /dev/shm, no mount the host has (or the sandbox sees) can
    be written, even by code running as root there (the per-run user id is switched off here, so only
    the mount flags stand in the way): each refuses with EROFS, or is not there at all (/sys)."""
    host_points = sorted({line.split()[1].replace("\\040", " ") for line in open("/proc/self/mounts")})
    monkeypatch.setattr(execution, "_unprivileged_ids", lambda: None)
    code = REAL_POSIX + TRY_EVERY_MOUNT.format(host_points=host_points)
    result = execute_code(code, timeout=FAST)
    assert result.success, result
    outcome = json.loads(result.stdout)
    private = {f"{p}/.picochat-probe" for p in execution.PRIVATE_TMP_SIZES if os.path.isdir(p)}
    assert {t for t, how in outcome.items() if how == "written"} == private, outcome
    refused = {t: how for t, how in outcome.items() if t not in private}
    assert len(refused) >= len(host_points) - len(private) and "/proc/self/comm" in refused, outcome
    assert refused.pop("/proc/.picochat-probe", "ENOENT") == "ENOENT"  # procfs: nothing to create
    assert set(refused.values()) <= {"EROFS", "unreachable"} and "EROFS" in refused.values(), refused
    for point in host_points:  # and the host's mounts were not touched
        assert not os.path.exists(f"{point}/.picochat-probe")


@needs_kernel_layers
@pytest.mark.parametrize("folder", ["/dev/shm", "/tmp"])
def test_kernel_caps_the_memory_held_by_tmp_files(folder):
    # tmpfs pages are RAM outside the address-space limit: the private mounts are small.
    code = REAL_POSIX + (
        "written = 0\nfor i in range(8):\n"
        f"    fd = posix.open('{folder}/fill%d' % i, posix.O_WRONLY | posix.O_CREAT)\n"
        "    for _ in range(15):\n        written += posix.write(fd, bytes(2**20))\n"
    )
    assert_blocked(execute_code(code, timeout=FAST), "No space left on device")


def test_concurrent_runs_cannot_write_into_each_others_folders(mode):
    victim_code = "import os, time\ntime.sleep(2.5)\nprint(sorted(os.listdir('.')))"
    intruder_code = (
        "import glob, io, os\nhits = []\n"
        "for folder in glob.glob('/tmp/picochat-exec-*') + glob.glob('/tmp/run*'):\n"
        "    if os.path.realpath(folder) == os.getcwd():\n        continue\n"
        "    for write in (lambda p: open(p, 'w'), lambda p: io.FileIO(p, 'w'),\n"
        "                  lambda p: os.open(p, os.O_WRONLY | os.O_CREAT)):\n"
        "        try:\n            write(folder + '/intruder')\n            hits.append(folder)\n"
        "        except OSError:\n            pass\n"
        "print(hits)\n"
    )
    results = {}
    victim = threading.Thread(target=lambda: results.update(victim=execute_code(victim_code, timeout=FAST)))
    victim.start()
    time.sleep(1.0)  # the victim's folder exists by now
    results["intruder"] = execute_code(intruder_code, timeout=FAST)
    victim.join()
    assert results["intruder"].stdout == "[]\n", results["intruder"]
    assert results["victim"].stdout == "['main.py']\n", results["victim"]


@needs_kernel_layers
def test_kernel_fork_bomb_does_not_starve_a_concurrent_run():
    bomb = REAL_POSIX + (
        "import time\nforked = 0\nfor _ in range(200):\n    try:\n        pid = posix.fork()\n"
        "    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(6)\n        posix._exit(0)\n    forked += 1\n"
        "print(forked, flush=True)\ntime.sleep(4)\n"
    )
    neighbour = REAL_POSIX + (
        "ok = 0\nfor _ in range(8):\n    pid = posix.fork()\n    if pid == 0:\n        posix._exit(0)\n"
        "    ok += posix.waitpid(pid, 0)[1] == 0\nprint(ok)\n"
    )
    results = {}
    bomber = threading.Thread(target=lambda: results.update(bomb=execute_code(bomb, timeout=8.0)))
    bomber.start()
    time.sleep(2.0)  # the bomb holds every process its limit allows by now
    results["neighbour"] = execute_code(neighbour, timeout=FAST)
    bomber.join()
    assert 0 < int(results["bomb"].stdout.split()[0]) < execution_child.MAX_PROCESSES, results["bomb"]
    assert results["neighbour"].success and results["neighbour"].stdout == "8\n", results["neighbour"]


@needs_kernel_layers
def test_kernel_leaves_only_a_loopback_interface(listener):
    # The socket module cannot even be loaded as `nobody` here, so look at the namespace directly.
    result = execute_code(REAL_POSIX + "print(posix.read(posix.open('/proc/net/dev', 0), 1 << 16).decode())")
    assert result.success, result
    interfaces = [line.split(":")[0].strip() for line in result.stdout.splitlines() if ":" in line]
    assert interfaces == ["lo"]


@needs_kernel_layers
def test_kernel_hides_the_parent_environment(monkeypatch):
    monkeypatch.setenv("PICOCHAT_SECRET", SECRET)
    code = REAL_POSIX + (
        "import os\nfor entry in os.listdir('/proc'):\n    try:\n"
        "        fd = posix.open(f'/proc/{entry}/environ', posix.O_RDONLY)\n"
        "        print(posix.read(fd, 1 << 16))\n    except OSError as exc:\n        print(exc)\n"
    )
    result = execute_code(code, timeout=FAST)
    assert result.success, result
    assert SECRET not in result.stdout + result.stderr
