"""picochat.download against a real local HTTP server that serves small parquet shards and injects faults."""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat import cli, download
from picochat.common import PicochatError
from picochat.dataset import list_parquet_files, resolve_data_dir

NUM_SHARDS = 5


def parquet_bytes(index: int) -> bytes:
    """A small real parquet shard with a `text` column; every shard has different content."""
    table = pa.table({"text": [f"shard {index} document {j}: " + "word " * (j % 17) for j in range(300)]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@dataclass
class Seen:
    name: str
    range: str | None
    authorization: str | None
    cdn: bool


@dataclass
class FakeHub:
    """What the server serves and how it misbehaves. `faults[name]` lists actions for the next hub requests
    of that file, used up in order: "500"/"429" (error status), "cut" (send half the body, then hang up),
    "bad-magic" (damaged first bytes), "wrong-sha" (announce a sha256 the body does not have)."""

    files: dict[str, bytes]
    url: str = ""
    faults: dict[str, list[str]] = field(default_factory=dict)
    honor_range: bool = True
    redirect_to: str | None = None  # like the hub: 302 to this origin's /cdn/, sha256 in X-Linked-ETag
    seen: list[Seen] = field(default_factory=list)

    def hub_requests(self, name: str) -> list[Seen]:
        return [s for s in self.seen if s.name == name and not s.cdn]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        hub: FakeHub = self.server.hub
        path = urllib.parse.unquote(self.path)
        cdn = path.startswith("/cdn/")
        name = path.removeprefix("/cdn/").lstrip("/")
        hub.seen.append(Seen(name, self.headers.get("Range"), self.headers.get("Authorization"), cdn))
        data = hub.files.get(name)
        if data is None:
            self.send_error(404)
            return
        pending = hub.faults.get(name, [])
        action = pending.pop(0) if pending and not cdn else "ok"
        if action in ("500", "429"):
            self.send_error(int(action))
            return
        sha = "0" * 64 if action == "wrong-sha" else hashlib.sha256(data).hexdigest()
        if hub.redirect_to and not cdn:
            self.send_response(302)
            self.send_header("Location", f"{hub.redirect_to}/cdn/{name}")
            self.send_header("X-Linked-ETag", f'"{sha}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"XXXX" + data[4:] if action == "bad-magic" else data
        self.send_body(body, sha if not cdn else None, action == "cut")

    def send_body(self, body: bytes, sha: str | None, cut: bool) -> None:
        requested = self.headers.get("Range") if self.server.hub.honor_range else None
        start = int(requested.removeprefix("bytes=").rstrip("-")) if requested else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        if sha:
            self.send_header("ETag", f'"{sha}"')
        self.end_headers()
        rest = body[start:]
        self.wfile.write(rest[: len(rest) // 2] if cut else rest)  # a cut ends the connection early


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    files = {f"shard_{i:05d}.parquet": parquet_bytes(i) for i in range(NUM_SHARDS)}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.hub = FakeHub(files, url=f"http://127.0.0.1:{server.server_port}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.hub
    server.shutdown()
    server.server_close()


def fetch(hub: FakeHub, dest, indices, **kwargs):
    options = dict(workers=2, retries=2, backoff=0.001, timeout=5.0) | kwargs
    return download.download_shards(indices, hub.url, dest=dest, **options)


def assert_identical(hub: FakeHub, dest, indices) -> None:
    for i in indices:
        name = f"shard_{i:05d}.parquet"
        assert (dest / name).read_bytes() == hub.files[name], name
        assert pq.read_table(dest / name).num_rows == 300
    assert not list(dest.glob("*.part"))


def test_command_downloads_shards_and_val_into_base_data(hub, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "secret")
    args = ["--base-url", hub.url, "--num-shards-total", str(NUM_SHARDS), "--shards", "3"]
    assert download.main(args) == 0
    dest = resolve_data_dir("hub")
    assert [p.name for p in list_parquet_files(dest)] == [f"shard_{i:05d}.parquet" for i in (0, 1, 2, 4)]
    assert_identical(hub, dest, [0, 1, 2, 4])
    assert len(hub.seen) == 4 and {s.authorization for s in hub.seen} == {"Bearer secret"}
    assert "4/4 shards" in capsys.readouterr().out
    recorded = json.loads((tmp_path / "home" / "report" / "download.json").read_text())
    assert recorded["shards"] == 4
    assert recorded["bytes"] == sum(len(hub.files[p.name]) for p in list_parquet_files(dest))


def test_hub_redirect_sha256_checked_and_token_kept_off_the_cdn(hub, tmp_path):
    hub.redirect_to = hub.url.replace("127.0.0.1", "localhost")  # another host, like the hub's CDN
    paths = fetch(hub, tmp_path / "d", [0, 1], token="secret")
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert_identical(hub, tmp_path / "d", [0, 1])
    assert {s.authorization for s in hub.seen if not s.cdn} == {"Bearer secret"}
    assert {s.authorization for s in hub.seen if s.cdn} == {None}


def test_interrupted_transfer_resumes_with_range(hub, tmp_path):
    name = "shard_00001.parquet"
    hub.faults[name] = ["cut"]
    fetch(hub, tmp_path / "d", [1])
    assert_identical(hub, tmp_path / "d", [1])
    half = len(hub.files[name]) // 2
    assert [s.range for s in hub.hub_requests(name)] == [None, f"bytes={half}-"]


@pytest.mark.parametrize("status", ["500", "429"])
def test_server_error_is_retried(hub, tmp_path, status):
    hub.faults["shard_00000.parquet"] = [status]
    fetch(hub, tmp_path / "d", [0])
    assert_identical(hub, tmp_path / "d", [0])
    assert len(hub.hub_requests("shard_00000.parquet")) == 2


@pytest.mark.parametrize(
    ("fault", "redirect", "message"),
    [
        ("bad-magic", False, "no PAR1 magic"),
        ("wrong-sha", False, "sha256 mismatch"),
        ("wrong-sha", True, "sha256 mismatch"),
    ],  # fmt: skip
)
def test_corrupt_shard_never_renamed_and_command_fails(hub, tmp_path, capsys, fault, redirect, message):
    name = "shard_00000.parquet"
    hub.faults[name] = [fault] * 10
    hub.redirect_to = hub.url if redirect else None
    dest = tmp_path / "d"
    argv = ["download", "--base-url", hub.url, "--num-shards-total", str(NUM_SHARDS), "--shards", "1",
            "--no-val", "--retries", "2", "--backoff", "0.001", "--dest", str(dest)]  # fmt: skip
    assert cli.main(argv) == 1
    error = capsys.readouterr().err
    assert "shard 0 failed after 3 attempts" in error and message in error
    assert f"{hub.url}/{name}" in error and "rerun" in error
    assert list(dest.iterdir()) == []  # neither the final name nor a .part file
    assert len(hub.hub_requests(name)) == 3


def test_server_ignoring_range_restarts_cleanly(hub, tmp_path):
    hub.honor_range = False
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "shard_00002.parquet.part").write_bytes(b"junk" * 100)  # would corrupt the shard if kept
    fetch(hub, dest, [2])
    assert_identical(hub, dest, [2])
    assert [s.range for s in hub.hub_requests("shard_00002.parquet")] == ["bytes=400-"]


def test_valid_shard_skipped_and_corrupt_one_fetched_again(hub, tmp_path):
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "shard_00000.parquet").write_bytes(hub.files["shard_00000.parquet"])
    (dest / "shard_00001.parquet").write_bytes(hub.files["shard_00001.parquet"][:-100])  # truncated
    fetch(hub, dest, [0, 1])
    assert_identical(hub, dest, [0, 1])
    assert [s.name for s in hub.seen] == ["shard_00001.parquet"]


def test_missing_shard_fails_at_once_with_a_hint(hub, tmp_path):
    with pytest.raises(PicochatError, match=r"shard 7: HTTP 404 .*--num-shards-total"):
        fetch(hub, tmp_path / "d", [7])
    assert len(hub.seen) == 1  # a 404 is not retried


def test_shard_selection_and_filename_template():
    assert download.shard_indices(-1, 4) == [0, 1, 2, 3]
    assert download.shard_indices(2, 10) == [0, 1, 9]
    assert download.shard_indices(2, 10, with_val=False) == [0, 1]
    assert download.shard_indices(0, 10) == [9]
    with pytest.raises(PicochatError, match="--shards 11 is out of range"):
        download.shard_indices(11, 10)
    assert download.shard_filename(download.DEFAULT_FILENAME, 42) == "shard_00042.parquet"
    for bad in ("shard_{i}.parquet", "shard.parquet", "shard_{index}.txt"):
        with pytest.raises(PicochatError, match="--filename"):
            download.shard_filename(bad, 0)


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        download.main(["--help"], prog="picochat download")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "ClimbMix" in text and "HF_TOKEN" in text
    actions = download.build_parser()._actions
    assert all(action.help for action in actions)
    assert all(option in text for action in actions for option in action.option_strings)


class RecordedWaits(threading.Event):
    """An Event whose waits return at once and are recorded; `stop_at` waits in, it reports Ctrl-C."""

    def __init__(self, stop_at: int = 0):
        super().__init__()
        self.waits: list[float] = []
        self.stop_at = stop_at

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return len(self.waits) == self.stop_at


def scripted(outcomes: list):
    """An attempt that raises or returns the outcomes in order, counting its calls."""

    def attempt():
        attempt.calls += 1
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    attempt.calls = 0
    return attempt


def test_one_retry_loop_backs_off_and_honours_retry_after():
    from picochat.retry import MAX_BACKOFF_SECONDS, Retry, backoff_delay, with_retries

    clock = RecordedWaits()
    attempt = scripted([Retry("HTTP 500"), Retry("HTTP 429", retry_after=7.0), Retry("cut"), "ok"])
    assert with_retries(attempt, "shard 3", retries=3, backoff=0.5, stop=clock) == "ok"
    assert clock.waits == [0.5, 7.0, 2.0]  # doubling back-off, except where the server said how long
    assert [backoff_delay(1.0, n) for n in (1, 2, 3, 8)] == [1.0, 2.0, 4.0, MAX_BACKOFF_SECONDS]


def test_one_retry_loop_gives_up_with_the_hint_and_never_retries_a_final_error():
    from picochat.retry import Retry, with_retries

    attempt = scripted([Retry("cut", "check the network")] * 3)
    given_up = r"^shard 3 failed after 3 attempts: cut; check the network \(rerun"
    with pytest.raises(PicochatError, match=given_up):
        with_retries(attempt, "shard 3", retries=2, backoff=0.0, stop=RecordedWaits())
    assert attempt.calls == 3
    attempt = scripted([PicochatError("HTTP 404"), "never reached"])
    with pytest.raises(PicochatError, match="HTTP 404"):
        with_retries(attempt, "shard 3", retries=5, backoff=0.0, stop=RecordedWaits())
    assert attempt.calls == 1
    attempt = scripted([Retry("HTTP 500"), Retry("HTTP 500"), "ok"])
    with pytest.raises(PicochatError, match="interrupted"):  # Ctrl-C during the second back-off wait
        with_retries(attempt, "shard 3", retries=5, backoff=0.0, stop=RecordedWaits(stop_at=2))
    assert attempt.calls == 2
