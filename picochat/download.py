"""`picochat download`: pretraining parquet shards into `$PICOCHAT_HOME/base_data/`.

Two datasets are known by name (`--dataset`), both numbered shards of ~250M characters with a `text`
column, repackaged for nanochat:
  - climbmix (default): NVIDIA's ClimbMix, `karpathy/climbmix-400b-shuffle`, 6543 shards, the data
    of nanochat's current leaderboard runs (it beat FineWeb-Edu clearly in nanochat's experiments);
  - fineweb-edu: HuggingFace's FineWeb-Edu, `karpathy/fineweb-edu-100b-shuffle`, 1823 shards.
Any other dataset laid out the same way works with `--repo`, `--filename` and `--num-shards-total`. The
last shard of a dataset is the validation split, so it is always fetched too (unless `--no-val`).

Hub datasets go through huggingface_hub's `hf_hub_download` with `local_dir` = the destination, which
gives resumable partial files (under `<dest>/.cache/huggingface/`), HF_ENDPOINT (a mirror), HF_HUB_OFFLINE
(only what is already there), HF_TOKEN (gated or private datasets) and faster transports when installed.
picochat then checks every shard (parquet magic and footer, and its sha256 against the ETag the hub
announced, which is the file's LFS object id), deletes and re-fetches a damaged one, and retries failed
attempts with exponential back-off; a missing file or a refused token fails at once with a hint.
A user's own web server (`--base-url`) is served by the plain-HTTP downloader in picochat.http_download.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm

from picochat.common import PicochatError, run_cli
from picochat.dataset import resolve_data_dir
from picochat.http_download import (
    DEFAULT_FILENAME,
    download_shards,
    file_sha256,
    parquet_problem,
    prepare_dest,
    raise_failures,
    run_all,
    shard_filename,
)
from picochat.report import record
from picochat.retry import Retry, with_retries
from picochat.tasks.loading import hub_endpoint

DATASETS = {  # name -> (hub dataset repository, number of shards)
    "climbmix": ("karpathy/climbmix-400b-shuffle", 6543),
    "fineweb-edu": ("karpathy/fineweb-edu-100b-shuffle", 1823),
}
DEFAULT_DATASET = "climbmix"
_SHA256_HEX = frozenset("0123456789abcdef")
_HUB_NETWORK_HINT = "check the network connection (or HF_ENDPOINT, if you use a mirror)"
_HUB_DAMAGED_HINT = "the hub sent a damaged or different file; try again later"

# ---------------------------------------------------------------------------------------------
# Which shards


def shard_indices(shards: int, num_shards_total: int, with_val: bool = True) -> list[int]:
    """Shards 0..shards-1 (-1: all of them), plus the last one (the validation split) when `with_val`."""
    if num_shards_total < 1:
        raise PicochatError(f"--num-shards-total must be at least 1, got {num_shards_total}")
    if shards < -1 or shards > num_shards_total:
        raise PicochatError(
            f"--shards {shards} is out of range: the dataset has {num_shards_total} shards "
            "(--num-shards-total); pass a number up to that, or -1 for all of them"
        )
    indices = list(range(num_shards_total if shards == -1 else shards))
    if with_val and num_shards_total - 1 not in indices:
        indices.append(num_shards_total - 1)
    return indices


# ---------------------------------------------------------------------------------------------
# Through huggingface_hub


def hub_error(error: Exception, what: str) -> str | None:
    """The message for an error worth no retry (missing file, refused token, offline), or None."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    statuses = [getattr(getattr(e, "response", None), "status_code", None) for e in chain]
    if any(isinstance(e, GatedRepoError) for e in chain) or {401, 403} & set(statuses):
        return (
            f"{what}: access refused; for a gated or private dataset set HF_TOKEN to a token that may read it"
        )
    if constants.HF_HUB_OFFLINE or any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return f"{what} is not downloaded yet and HF_HUB_OFFLINE is set; unset it to download"
    if any(isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)) for e in chain):
        return f"{what}: no such dataset or revision on the hub; check --dataset/--repo and --revision"
    if 404 in statuses or any(
        isinstance(e, EntryNotFoundError) and isinstance(e, HfHubHTTPError) for e in chain
    ):
        return (
            f"{what}: not found (HTTP 404); check --repo, --filename, and that the dataset has "
            "--num-shards-total shards"
        )
    if not any(isinstance(e, (HfHubHTTPError, OSError)) for e in chain):
        raise error  # a bug, not a download problem
    return None


def _hub_problem(path: Path, dest: Path, name: str) -> str | None:
    """Why the downloaded shard is damaged (parquet check, sha256 vs the announced ETag), or None."""
    from huggingface_hub._local_folder import read_download_metadata  # what hf_hub_download recorded

    problem = parquet_problem(path)
    metadata = read_download_metadata(dest, name)
    etag = metadata.etag if metadata is not None else ""
    if problem is None and len(etag) == 64 and set(etag) <= _SHA256_HEX:
        actual = file_sha256(path)
        if actual != etag:
            problem = f"sha256 mismatch: the hub announced {etag}, the file has {actual}"
    return problem


def _hub_one(
    index: int, repo: str, name: str, revision: str, dest: Path, retries: int, backoff: float
) -> Path:
    """Fetch and check one shard, retried with exponential back-off (picochat.retry); PicochatError if
    it fails. A damaged shard is deleted and fetched again from scratch (`force_download`)."""
    from huggingface_hub import hf_hub_download

    what = f"shard {index} ({name} of {repo})"
    force = False

    def attempt() -> Path:
        nonlocal force
        try:
            path = hf_hub_download(
                repo,
                name,
                repo_type="dataset",
                revision=revision,
                local_dir=dest,
                endpoint=hub_endpoint(),
                force_download=force,
            )
        except Exception as e:  # huggingface_hub raises many types; hub_error sorts them
            final = hub_error(e, what)
            if final is not None:
                raise PicochatError(final) from e
            force = False  # a broken transfer resumes from its partial file
            raise Retry(f"{type(e).__name__}: {e}".splitlines()[0], _HUB_NETWORK_HINT) from e
        problem = _hub_problem(Path(path), dest, name)
        if problem is not None:
            Path(path).unlink()  # never leave a damaged shard under its final name
            force = True
            raise Retry(problem, _HUB_DAMAGED_HINT)
        return Path(path)

    return with_retries(attempt, what, retries, backoff)


def hub_download_shards(
    indices: list[int],
    repo: str,
    filename: str = DEFAULT_FILENAME,
    dest: str | Path | None = None,
    revision: str = "main",
    workers: int = 4,
    retries: int = 5,
    backoff: float = 1.0,
) -> list[Path]:
    """Download shards `indices` of the hub dataset `repo` into `dest` (default $PICOCHAT_HOME/base_data)
    in parallel, each checked; prints a summary and raises PicochatError naming every shard that failed."""
    if workers < 1 or retries < 0 or backoff < 0:
        raise PicochatError("--workers must be positive, --retries and --backoff not negative")
    dest = prepare_dest(dest)
    names = {i: shard_filename(filename, i) for i in indices}
    started = time.monotonic()
    with tqdm(total=len(names), unit="shard") as bar:
        failures = run_all(
            lambda item: _hub_one(item[0], repo, item[1], revision, dest, retries, backoff),
            list(names.items()),
            workers,
            done=bar.update,
        )
    paths = [dest / name for name in names.values()]
    size = sum(p.stat().st_size for p in paths if p.exists())
    print(
        f"{len(paths) - len(failures)}/{len(paths)} shards of {repo} in {dest} ({size / 1e6:.1f} MB, "
        f"{time.monotonic() - started:.1f}s), {len(failures)} failed",
        flush=True,
    )
    raise_failures(failures)
    return paths


# ---------------------------------------------------------------------------------------------
# The command.

EPILOG = """\
Examples:
  %(prog)s --shards 8                       ClimbMix shards 0-7 and its validation shard
  %(prog)s --dataset fineweb-edu --shards 240
  %(prog)s --repo me/my-corpus --num-shards-total 120 --filename part_{index:04d}.parquet --shards -1
  %(prog)s --base-url https://example.com/corpus --num-shards-total 120 --shards -1 --dest ~/corpus
Shard numbers are zero-padded so that name order is shard order: the last file by name is the validation
split. Environment: HF_TOKEN (gated or private datasets), HF_ENDPOINT (a hub mirror), HF_HUB_OFFLINE=1
(use only what is already downloaded). Run the same command again after an interruption: finished shards
are checked and kept, partial ones resume. Shards already on disk need no download: give their folder as
--source where a stage takes one."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Download pretraining parquet shards (NVIDIA ClimbMix by default) from the Hugging Face\n"
        "hub, or any HTTP server: in parallel, resuming partial files, retrying failures, checking each.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--shards", "-n", type=int, default=8, help="download shards 0..N-1; -1 = every shard (default: 8)"
    )
    parser.add_argument(
        "--no-val", action="store_true", help="do not also download the last shard, the validation split"
    )
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default=DEFAULT_DATASET,
        help="a known dataset: sets --repo and --num-shards-total (default: %(default)s)",
    )
    parser.add_argument("--repo", default=None, help="any hub dataset repository instead of --dataset's")
    parser.add_argument("--revision", default="main", help="hub branch, tag or commit (default: main)")
    parser.add_argument(
        "--num-shards-total",
        type=int,
        default=None,
        help="how many shards the dataset has; the last is the validation split (default: --dataset's)",
    )
    parser.add_argument(
        "--base-url",
        default=None,
        help="download from this folder URL of your own server with plain HTTP instead of the hub",
    )
    parser.add_argument(
        "--filename",
        default=DEFAULT_FILENAME,
        help="shard name template, {index} is the shard number (default: %(default)s)",
    )
    parser.add_argument(
        "--dest",
        default=None,
        help="folder to save into (default: $PICOCHAT_HOME/base_data, read by --source hub)",
    )
    parser.add_argument("--workers", type=int, default=4, help="shards downloaded at once (default: 4)")
    parser.add_argument(
        "--retries",
        type=int,
        default=5,
        help="extra attempts per shard after a network error, HTTP 5xx/429 or a damaged file (default: 5)",
    )
    parser.add_argument(
        "--backoff",
        type=float,
        default=1.0,
        help="seconds to wait before the first retry, doubled for each next one (default: 1)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="--base-url: seconds without data before an attempt fails (hub: HF_HUB_DOWNLOAD_TIMEOUT)",
    )
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    repo, num_shards = DATASETS[args.dataset]
    repo = args.repo or repo
    num_shards = args.num_shards_total if args.num_shards_total is not None else num_shards
    indices = shard_indices(args.shards, num_shards, with_val=not args.no_val)
    dest = Path(args.dest).expanduser() if args.dest else resolve_data_dir("hub")
    if args.base_url:
        source = args.base_url
        paths = download_shards(
            indices,
            args.base_url,
            args.filename,
            dest,
            args.workers,
            args.retries,
            args.backoff,
            args.timeout,
        )
    else:
        source = f"hub:{repo}@{args.revision}"
        paths = hub_download_shards(
            indices, repo, args.filename, dest, args.revision, args.workers, args.retries, args.backoff
        )
    size = sum(path.stat().st_size for path in paths)
    record("download", {"source": source, "dest": str(dest), "shards": len(paths), "bytes": size})
    return 0


if __name__ == "__main__":
    run_cli(main)
