"""The plain-HTTP shard downloader behind `picochat download --base-url URL` (a user's own file server).

Hugging Face datasets go through `huggingface_hub` instead (see picochat.download); this path is for any
web server that serves numbered parquet files. Every shard is streamed into `<name>.part` next to its
final name, resumed with an HTTP Range request after a dropped connection, verified (size, parquet magic
and footer, and a sha256 the server sends as ETag or X-Linked-ETag) and only then renamed, so a reader
never sees a half-written shard. Connection errors, 5xx and 429 answers and corrupt transfers are retried
with exponential back-off. Only the standard library speaks HTTP (urllib).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pyarrow.parquet as pq
from tqdm import tqdm

from picochat import __version__
from picochat.common import PicochatError
from picochat.dataset import resolve_data_dir
from picochat.retry import MAX_BACKOFF_SECONDS, Retry, with_retries

DEFAULT_FILENAME = "shard_{index:05d}.parquet"
PARQUET_MAGIC = b"PAR1"
CHUNK_BYTES = 1 << 20
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")
T = TypeVar("T")


_NETWORK_HINT = "check the network connection and --base-url"
_SERVER_HINT = "the server is failing or rate-limiting; try again later"
_CORRUPT_HINT = "the server sent a damaged or different file; check --base-url and --filename, or retry later"


@dataclass
class _Shard:
    index: int
    url: str
    path: Path
    moved: int = 0  # bytes received for this shard in this run, over all attempts

    @property
    def part(self) -> Path:
        return self.path.with_name(self.path.name + ".part")


@dataclass
class _Expected:
    """What the server promised about the whole file."""

    size: int | None
    sha256: str | None


class _Progress:
    """One byte-counting bar over all shards. Until every shard's size is known its total is an estimate
    (the known sizes plus their mean for each shard not started yet), which is what gives a useful ETA."""

    def __init__(self, num_shards: int):
        self.num_shards = num_shards
        self.expected: dict[int, int] = {}
        self.finished = 0
        self.lock = threading.Lock()
        self.bar = tqdm(desc="download", unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)
        self._show_shards()

    def expect(self, index: int, nbytes: int) -> None:
        with self.lock:
            self.expected[index] = nbytes
            known = sum(self.expected.values())
            self.bar.total = known + known // len(self.expected) * (self.num_shards - len(self.expected))
            self.bar.refresh()

    def update(self, nbytes: int) -> None:
        with self.lock:
            self.bar.update(nbytes)

    def shard_finished(self) -> None:
        with self.lock:
            self.finished += 1
            self._show_shards()

    def _show_shards(self) -> None:
        self.bar.set_postfix_str(f"{self.finished}/{self.num_shards} shards")

    def close(self) -> int:
        """Close the bar; returns the bytes received."""
        self.bar.close()
        return self.bar.n


@dataclass
class _Settings:
    retries: int
    backoff: float
    timeout: float
    token: str | None
    progress: _Progress
    stop: threading.Event = field(default_factory=threading.Event)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handling, plus two things the hub needs.

    The hub answers a resolve URL with a redirect to its CDN and puts the file's sha256 in that redirect's
    `X-Linked-ETag`, so every redirect's headers are appended to the request's `redirect_headers`. The
    token is only for the hub: it is dropped when the redirect leaves the original host.
    """

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            # The same list travels along the chain, so the caller's original request sees every hop.
            new.redirect_headers = getattr(req, "redirect_headers", [])
            new.redirect_headers.append(headers)
            if urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
                new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_RedirectHandler)


def shard_filename(template: str, index: int) -> str:
    """The remote file name of shard `index` from a template such as `shard_{index:05d}.parquet`."""
    try:
        name, other = template.format(index=index), template.format(index=index + 1)
    except (KeyError, IndexError, ValueError) as e:
        raise PicochatError(
            f"--filename {template!r} is not a valid template ({e}); write the shard number as {{index}}, "
            f"e.g. {DEFAULT_FILENAME}"
        ) from None
    if name == other:
        raise PicochatError(f"--filename {template!r} must contain {{index}} (e.g. {DEFAULT_FILENAME})")
    if not name.endswith(".parquet"):
        raise PicochatError(
            f"--filename {template!r} gives {name!r}; shards must be parquet files ending in .parquet"
        )
    return name


def _shard(index: int, base_url: str, template: str, dest: Path) -> _Shard:
    name = shard_filename(template, index)
    url = base_url.rstrip("/") + "/" + urllib.parse.quote(name)
    return _Shard(index, url, dest / Path(name).name)


# ---------------------------------------------------------------------------------------------
# Verification.


def parquet_problem(path: Path) -> str | None:
    """Why `path` is not a complete parquet file (magic at both ends, readable footer), or None if it is."""
    size = path.stat().st_size
    if size < 2 * len(PARQUET_MAGIC):
        return f"only {size} bytes, too small to be a parquet file"
    with open(path, "rb") as f:
        head = f.read(len(PARQUET_MAGIC))
        f.seek(-len(PARQUET_MAGIC), os.SEEK_END)
        tail = f.read()
    if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        where = "start" if head != PARQUET_MAGIC else "end"
        return f"not a parquet file (no {PARQUET_MAGIC.decode()} magic at its {where})"
    try:
        pq.read_metadata(path)
    except Exception as e:  # pyarrow raises several types for a damaged footer
        return f"unreadable parquet footer ({e})"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, expected: _Expected) -> str | None:
    """Why the downloaded file is not the one the server described, or None if it is."""
    size = path.stat().st_size
    if expected.size is not None and size != expected.size:
        return f"got {size} bytes but the server announced {expected.size} (Content-Length)"
    problem = parquet_problem(path)
    if problem is None and expected.sha256 is not None:
        actual = file_sha256(path)
        if actual != expected.sha256:
            problem = f"sha256 mismatch: the server announced {expected.sha256}, the file has {actual}"
    return problem


def _sha256_from(headers_chain: list) -> str | None:
    """The sha256 the server announced: the hub's X-Linked-ETag first (it is the LFS object id), else an
    ETag that is a sha256 (64 hex digits). Redirect responses come before the final one in the chain."""
    for name in ("X-Linked-ETag", "ETag"):
        for headers in headers_chain:
            value = (headers.get(name) or "").strip().removeprefix("W/").strip('"').lower()
            if _SHA256_HEX.fullmatch(value):
                return value
    return None


# ---------------------------------------------------------------------------------------------
# Fetching one shard.


def _request(shard: _Shard, offset: int, token: str | None) -> urllib.request.Request:
    request = urllib.request.Request(shard.url, headers={"User-Agent": f"picochat/{__version__}"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    request.redirect_headers = []
    return request


def _http_error(shard: _Shard, error: urllib.error.HTTPError) -> Exception:
    """The exception for an HTTP error status: retried for 5xx/429, final for the rest."""
    status = f"HTTP {error.code} {error.reason}"
    if error.code >= 500 or error.code == 429:
        retry_after = error.headers.get("Retry-After", "")
        wait = min(float(retry_after), MAX_BACKOFF_SECONDS) if retry_after.isdigit() else None
        return Retry(f"{status} from {shard.url}", _SERVER_HINT, retry_after=wait)
    if error.code == 416:  # our .part is longer than the file: it cannot be resumed, start over
        shard.part.unlink(missing_ok=True)
        return Retry(f"{status} from {shard.url}: the partial file does not fit; restarting", _CORRUPT_HINT)
    if error.code == 404:
        hint = "check --repo, --base-url and --filename, and that the dataset has --num-shards-total shards"
    elif error.code in (401, 403):
        hint = "if the dataset is gated or private, set HF_TOKEN to a token that may read it"
    else:
        hint = "check --base-url"
    return PicochatError(f"shard {shard.index}: {status} for {shard.url}; {hint}")


def _open(shard: _Shard, offset: int, settings: _Settings) -> tuple[http.client.HTTPResponse, list]:
    """Send the request; returns the response and every response header set along the redirect chain."""
    request = _request(shard, offset, settings.token)
    try:
        response = _OPENER.open(request, timeout=settings.timeout)
    except urllib.error.HTTPError as e:
        e.close()
        raise _http_error(shard, e) from e
    except (OSError, http.client.HTTPException) as e:  # URLError, refused, reset, timeout, bad status line
        raise Retry(f"could not fetch {shard.url}: {getattr(e, 'reason', e)}", _NETWORK_HINT) from e
    return response, [*request.redirect_headers, response.headers]


def _start_offset(shard: _Shard, response: http.client.HTTPResponse, offset: int) -> tuple[int, int | None]:
    """Where the body starts in the file and the file's full size (None if the server does not say)."""
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if (response.status or 200) != 206:  # a full body: the server ignored our Range request, if any
        if offset:
            tqdm.write(f"shard {shard.index}: the server ignored the resume request; restarting from byte 0")
        return 0, length
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if match is None or int(match.group(1)) != offset:
        shard.part.unlink(missing_ok=True)
        raise Retry(
            f"{shard.url} answered the resume request with the wrong range "
            f"({response.headers.get('Content-Range')!r} for bytes={offset}-); restarting",
            _CORRUPT_HINT,
        )
    total = match.group(2)
    if total.isdigit():
        return offset, int(total)
    return offset, None if length is None else offset + length


def _fetch(shard: _Shard, settings: _Settings) -> _Expected:
    """One attempt: continue (or restart) `shard.part` from the server; returns what the server promised."""
    offset = shard.part.stat().st_size if shard.part.exists() else 0
    response, chain = _open(shard, offset, settings)
    with response:
        start, size = _start_offset(shard, response, offset)
        if size is not None:
            settings.progress.expect(shard.index, shard.moved + size - start)
        with open(shard.part, "ab" if start else "wb") as f:
            while not settings.stop.is_set():
                try:
                    block = response.read(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as e:  # reset, timeout, incomplete read
                    raise Retry(f"connection to {shard.url} broke: {e}", _NETWORK_HINT) from e
                if not block:
                    break
                f.write(block)
                shard.moved += len(block)
                settings.progress.update(len(block))
            f.flush()
            os.fsync(f.fileno())
    if settings.stop.is_set():
        raise PicochatError("download interrupted; run the same command again to resume")
    received = shard.part.stat().st_size
    if size is not None and received < size:
        raise Retry(f"connection to {shard.url} closed after {received} of {size} bytes", _NETWORK_HINT)
    return _Expected(size, _sha256_from(chain))


def _attempt(shard: _Shard, settings: _Settings) -> Path:
    """Fetch, verify and rename one shard: its path, Retry if the attempt is worth repeating."""
    try:
        expected = _fetch(shard, settings)
        problem = _verify(shard.part, expected)
        if problem is None:
            os.replace(shard.part, shard.path)
            settings.progress.shard_finished()
            return shard.path
        shard.part.unlink()  # a corrupt body is useless for resuming
    except OSError as e:  # the network errors became Retry, so this is the local disk
        raise PicochatError(
            f"shard {shard.index}: cannot write {shard.part}: {e}; free disk space or pick another --dest"
        ) from e
    raise Retry(f"{shard.path.name} from {shard.url}: {problem}", _CORRUPT_HINT)


def _download_one(shard: _Shard, settings: _Settings) -> Path:
    """One shard, retried with exponential back-off (picochat.retry); PicochatError if it fails."""
    return with_retries(
        lambda: _attempt(shard, settings),
        f"shard {shard.index}",
        settings.retries,
        settings.backoff,
        settings.stop,
    )


# ---------------------------------------------------------------------------------------------
# Many shards.


def _existing(shard: _Shard) -> bool:
    """True if the shard is already downloaded and valid; a corrupt final file is deleted for re-download."""
    if not shard.path.exists():
        return False
    problem = parquet_problem(shard.path)
    if problem is None:
        return True
    tqdm.write(f"shard {shard.index}: {shard.path} is damaged ({problem}); downloading it again")
    shard.path.unlink()
    return False


def prepare_dest(dest: str | Path | None) -> Path:
    """The destination folder (default $PICOCHAT_HOME/base_data), created if needed."""
    dest = Path(dest) if dest is not None else resolve_data_dir("hub")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PicochatError(f"cannot create the destination folder {dest}: {e}; pick another --dest") from e
    return dest


def run_all(
    job: Callable[[T], object],
    items: Sequence[T],
    workers: int,
    stop: threading.Event | None = None,
    done: Callable[[], None] | None = None,
) -> list[str]:
    """Run `job(item)` for every item on `workers` threads; returns the messages of the PicochatErrors raised
    (one per failed item). `done()` is called after each item. On Ctrl-C, `stop` is set (jobs notice it at
    their next block or back-off wait, partial files stay for resuming) and queued items are dropped."""
    failures: list[str] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(job, item) for item in items]
        try:
            for future in as_completed(futures):
                try:
                    future.result()
                except PicochatError as e:
                    failures.append(str(e))
                if done is not None:
                    done()
        except KeyboardInterrupt:
            if stop is not None:
                stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return failures


def raise_failures(failures: list[str]) -> None:
    if failures:
        raise PicochatError(f"{len(failures)} shard(s) failed:\n  " + "\n  ".join(sorted(failures)))


def download_shards(
    indices: list[int],
    base_url: str,
    filename: str = DEFAULT_FILENAME,
    dest: str | Path | None = None,
    workers: int = 4,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    token: str | None = None,
) -> list[Path]:
    """Download the shards `indices` (skipping valid ones already in `dest`) in parallel; returns their paths.

    `base_url` is the folder URL the names from the `filename` template are appended to; `dest` defaults to
    `$PICOCHAT_HOME/base_data`. An attempt that fails (connection error, 5xx/429, corrupt file) is repeated
    up to `retries` times, waiting `backoff` seconds doubled after each failure. `token` (default: the
    HF_TOKEN environment variable) is sent as a bearer token. Prints a summary line; raises PicochatError
    naming every shard that failed.
    """
    if workers < 1 or retries < 0 or backoff < 0 or timeout <= 0:
        raise PicochatError("--workers and --timeout must be positive, --retries and --backoff not negative")
    dest = prepare_dest(dest)
    token = os.environ.get("HF_TOKEN") if token is None else token
    shards = [_shard(i, base_url, filename, dest) for i in indices]
    todo = [s for s in shards if not _existing(s)]
    started = time.monotonic()
    settings = _Settings(retries, backoff, timeout, token, _Progress(len(todo)))
    try:
        failures = run_all(lambda shard: _download_one(shard, settings), todo, workers, settings.stop)
    finally:
        received = settings.progress.close()
    seconds = time.monotonic() - started
    downloaded, present = len(todo) - len(failures), len(shards) - len(todo)
    print(
        f"{downloaded + present}/{len(shards)} shards in {dest}: {downloaded} downloaded "
        f"({received / 1e6:.1f} MB in {seconds:.1f}s, {received / 1e6 / max(seconds, 1e-9):.1f} MB/s), "
        f"{present} already present, {len(failures)} failed",
        flush=True,
    )
    raise_failures(failures)
    return [s.path for s in shards]
