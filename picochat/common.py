"""Shared plumbing: artifact paths, atomic file writes, device/dtype choice and distributed set-up.

Every stage imports from here so that paths, logging and process-group handling behave the same
on a 2-core laptop and on a multi-node GPU cluster launched with torchrun.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# The repository's bundled offline data (tokenizer corpus, eval sets, chat data).
REPO_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("PICOCHAT_DATA", REPO_DIR / "data"))


class PicochatError(RuntimeError):
    """An error caused by bad input or a missing artifact; the CLI prints it without a traceback."""


def get_base_dir() -> Path:
    """Root folder for every artifact a run writes (PICOCHAT_HOME, default ~/.cache/picochat)."""
    base = Path(os.environ.get("PICOCHAT_HOME", Path.home() / ".cache" / "picochat")).expanduser()
    with naming_write_errors(base):
        base.mkdir(parents=True, exist_ok=True)
    return base


# ---------------------------------------------------------------------------------------------
# Atomic writes: a reader (or a crash) never sees a half-written file under its final name. A write
# the environment refuses (read-only folder, full disk) is one PicochatError line naming the path.


_UMASK = os.umask(0)
os.umask(_UMASK)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def write_failed(path: str | Path, error: Exception) -> PicochatError:
    """The one-line error for a failed write of `path` (`error`: an OSError, or a library's error text)."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    if getattr(error, "errno", None) in _DISK_FULL or "os error 28" in reason:  # 28: ENOSPC from Rust
        fix = "free some space there, or point PICOCHAT_HOME at a disk with room"
    else:
        fix = "make it writable, or point PICOCHAT_HOME at a writable folder"
    return PicochatError(f"cannot write {path}: {reason}; {fix}")


@contextlib.contextmanager
def naming_write_errors(path: str | Path) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into `write_failed`'s one line."""
    try:
        yield
    except OSError as e:
        raise write_failed(path, e) from e


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder, fsync, then rename over it."""
    path = Path(path)
    with naming_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # the old file, if any, is still intact under `path`
                os.unlink(tmp)
            raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line with a single write + fsync, so a crash loses at most this line.

    A failed append (a full disk) truncates the file back to its previous size (and removes it if this
    call created it) before raising `write_failed`'s one line: no partial line is ever left behind.
    """
    path = Path(path)
    line = (json.dumps(record, default=str) + "\n").encode("utf-8")
    with naming_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(line):  # a nearly full disk takes part of a write, then refuses
                    written += os.write(fd, line[written:])
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):  # the write error is the one to report
                    os.ftruncate(fd, size)
                    if created:
                        os.unlink(path)
                raise
        finally:
            os.close(fd)


def require_writable_home() -> Path:
    """$PICOCHAT_HOME, after checking that a file can be written there; call it before long work.

    A read-only or full $PICOCHAT_HOME would otherwise be found only at the first checkpoint or report
    write, after the work is done. Raises `write_failed`'s one line naming the folder and the fix.
    """
    base = get_base_dir()
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".write-check-")
        try:
            os.write(fd, b"picochat")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise write_failed(base, e) from e
    return base


# ---------------------------------------------------------------------------------------------
# Devices, dtypes and distributed training.


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_dtype(device_type: str) -> torch.dtype:
    """bf16 autocast where the hardware supports it; plain fp32 on CPU (bf16 matmuls are slow there)."""
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast_context(device: torch.device) -> Any:
    """Mixed precision for forward passes where `compute_dtype` picks bf16, else nothing."""
    dtype = compute_dtype(device.type)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device.type, dtype=dtype)


def is_distributed() -> bool:
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def get_rank() -> int:
    return int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only, so torchrun logs are not repeated N times."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def pass_bar(iterable: Any, desc: str, total: int | None = None) -> Any:
    """`iterable` wrapped in a transient tqdm bar on rank 0 when stdout is a terminal; in a log file
    or pipe (and on other ranks) the plain iterable, so validation passes add nothing noisy to logs."""
    if get_rank() != 0 or not sys.stdout.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets: no allocation is its own
# mmap, and the heap is trimmed only past 1 GB of free memory at its top (grown 64 MB at a time).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_ALLOCATOR_SETTINGS = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20}


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A CPU training step frees its activations after the backward and allocates them again in the
    next forward. With glibc's defaults the large ones are each their own mmap (or trim the heap top),
    so every step page-faults them all in again: 8-50k faults per step measured at depth 4 (4 KB
    each, zeroed by the kernel). Serving every allocation from the heap and trimming it only past
    1 GB of free memory takes that to zero after the first steps; the peak memory is unchanged. (When
    the heap cannot grow, glibc still falls back to mmap.) Best-effort: returns False where there is
    no glibc (macOS, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in _ALLOCATOR_SETTINGS.items())
    except (OSError, AttributeError):
        return False


def init_runtime(device_type: str = "") -> tuple[bool, int, int, int, torch.device]:
    """Pick the device and join the process group when launched by torchrun.

    Returns (distributed, rank, local_rank, world_size, device). NCCL on CUDA, gloo on CPU.
    """
    keep_freed_memory()
    device_type = device_type or autodetect_device_type()
    distributed = is_distributed()
    rank, local_rank, world_size = get_rank(), int(os.environ.get("LOCAL_RANK", 0)), get_world_size()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_type)
    if distributed and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None)
        dist.barrier()
    if device_type == "cpu" and distributed:
        # Split the machine's cores between the local processes instead of oversubscribing them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return distributed, rank, local_rank, world_size, device


def cleanup_runtime() -> None:
    """Leave the process group. The barrier first makes every rank finish its collectives, so that no
    rank tears gloo/NCCL down while another still talks to it (that hangs or aborts at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_runtime(device_type: str = "") -> Iterator[tuple[int, int, torch.device]]:
    """`init_runtime` for a stage's main(): yields (rank, world_size, device) and leaves the process
    group cleanly at the end. When an error propagates, the group is left as it is: the failing rank
    exits at once and torchrun stops the others (a barrier there would wait for them forever)."""
    require_writable_home()  # before any long work (loading data, training)
    _, rank, _, world_size, device = init_runtime(device_type)
    from picochat.multinode import require_shared_home  # multi-node: every node must see PICOCHAT_HOME

    require_shared_home(device)
    yield rank, world_size, device
    cleanup_runtime()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_cli(main_fn: Any) -> None:
    """Entry for `python -m picochat.<stage>`: run main() and turn a PicochatError into a clean exit."""
    import sys

    try:
        sys.exit(int(main_fn() or 0))
    except PicochatError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


# The --bf16-head flag's help, shared by `picochat chat` and `picochat serve` (picochat.decode_head).
BF16_HEAD_HELP = (
    "decode with a bf16 copy of the lm_head (CPU): on a CPU with AVX512-BF16 or AMX about 2x faster "
    "for the head, at the cost of logits from bf16-rounded weights (a greedy reply may differ where two "
    "tokens nearly tie); refused with one line on a CPU without bf16"
)
