"""Retrying a failed download attempt: one loop for the hub and the plain-HTTP downloaders.

An attempt either returns, raises `Retry` (worth repeating: a network error, HTTP 5xx/429, a damaged or
different file) or raises anything else (final: a missing file, a refused token, a full disk), which
passes straight through. Attempts are repeated up to `retries` times, waiting `backoff` seconds doubled
after each failure (capped at MAX_BACKOFF_SECONDS), or what the server asked for in Retry-After.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from tqdm import tqdm

from picochat.common import PicochatError

MAX_BACKOFF_SECONDS = 60.0
T = TypeVar("T")


class Retry(Exception):
    """A failed attempt worth repeating; `hint` tells the user what to do if every attempt fails, and
    `retry_after` is the wait the server asked for (seconds), if it asked."""

    def __init__(self, message: str, hint: str = "", retry_after: float | None = None):
        super().__init__(message)
        self.hint = hint
        self.retry_after = retry_after


def backoff_delay(backoff: float, retry: int) -> float:
    """Seconds to wait before retry number `retry` (1, 2, ...): backoff, 2 x backoff, 4 x ..., capped."""
    return min(backoff * 2 ** (retry - 1), MAX_BACKOFF_SECONDS)


def with_retries(
    attempt: Callable[[], T],
    what: str,
    retries: int,
    backoff: float,
    stop: threading.Event | None = None,
) -> T:
    """`attempt()`'s result, calling it again after each `Retry` it raises, at most `retries` more times.

    Each retry is announced as "<what>: <reason>; retry i/n in s". Setting `stop` (Ctrl-C in another
    thread) ends the wait at once. If every attempt fails, raises PicochatError naming `what`, the number
    of attempts, the last reason and its hint.
    """
    stop = stop or threading.Event()
    error = Retry("no attempt made")
    for retry in range(retries + 1):
        if retry:
            delay = error.retry_after or backoff_delay(backoff, retry)
            tqdm.write(f"{what}: {error}; retry {retry}/{retries} in {delay:.1f}s")
            if stop.wait(delay):
                raise PicochatError("download interrupted; run the same command again to resume")
        try:
            return attempt()
        except Retry as e:
            error = e
    hint = f"; {error.hint}" if error.hint else ""
    raise PicochatError(
        f"{what} failed after {retries + 1} attempts: {error}{hint} (rerun the same command to try again: "
        "finished downloads are kept, partial ones resume)"
    )
