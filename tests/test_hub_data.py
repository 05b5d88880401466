"""Hub data through huggingface_hub, against a local server that speaks the hub's download protocol.

`HF_ENDPOINT` points at the server: HEAD and GET on /datasets/<repo>/resolve/<revision>/<file>, answered
with X-Repo-Commit, ETag (the sha256, as for LFS files), Content-Length and Range support. The server
injects the faults a download must survive: a cut transfer, 500/429, a damaged body, a wrong sha256, 404.
Only loopback traffic.
"""

from __future__ import annotations

import hashlib
import io
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat import download
from picochat.common import PicochatError
from picochat.dataset import list_parquet_files, resolve_data_dir
from picochat.tasks import loading
from picochat.tasks.arc import ARC
from picochat.tasks.gsm8k import GSM8K
from picochat.tasks.humaneval import HumanEval
from picochat.tasks.mmlu import MMLU
from picochat.tasks.smoltalk import SmolTalk

REPO = "karpathy/climbmix-400b-shuffle"
COMMIT = "c" * 40


def parquet_bytes(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def shard(index: int) -> bytes:
    return parquet_bytes([{"text": f"shard {index} document {j} " + "word " * (j % 13)} for j in range(200)])


@dataclass
class Request:
    method: str
    path: str  # repo/file, e.g. "karpathy/climbmix-400b-shuffle/shard_00000.parquet"
    range: str | None


@dataclass
class FakeHub:
    """files: "repo/path" -> bytes. faults["repo/path"] lists actions for that file's next requests (HEAD
    or GET), used up in order: "ok", "500", "429", "404", "cut" (GET: half the body, then hang up),
    "bad-magic" (GET: damaged bytes), "wrong-sha" (HEAD: announce a sha256 the file does not have)."""

    files: dict[str, bytes]
    faults: dict[str, list[str]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def gets(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path and r.method == "GET"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self.answer(with_body=False)

    def do_GET(self) -> None:
        self.answer(with_body=True)

    def answer(self, with_body: bool) -> None:
        hub: FakeHub = self.server.hub
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        prefix, _, rest = path.partition("/datasets/")
        repo_and_file = ""
        if not prefix and "/resolve/" in rest:
            repo, _, tail = rest.partition("/resolve/")
            repo_and_file = repo + "/" + tail.split("/", 1)[1]
        hub.requests.append(Request(self.command, repo_and_file, self.headers.get("Range")))
        data = hub.files.get(repo_and_file)
        pending = hub.faults.get(repo_and_file, [])
        action = pending.pop(0) if pending else "ok"
        if data is None or action in ("500", "429", "404"):
            status = 404 if data is None else int(action)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            if status == 404:
                self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return
        sha = "0" * 64 if action == "wrong-sha" else hashlib.sha256(data).hexdigest()
        body = b"XXXX" + data[4:] if action == "bad-magic" else data
        start = (
            int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if self.headers["Range"] else 0
        )
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{sha}"')
        self.send_header("Content-Length", str(len(body) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if with_body:
            rest = body[start:]
            self.wfile.write(rest[: len(rest) // 2] if action == "cut" else rest)
            if action == "cut":
                self.close_connection = True


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.hub = FakeHub({f"{REPO}/shard_{i:05d}.parquet": shard(i) for i in range(3)} | {
        f"{REPO}/shard_06542.parquet": shard(6542)
    })  # fmt: skip
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    loading.hub_rows.cache_clear()
    yield server.hub
    loading.hub_rows.cache_clear()
    server.shutdown()
    server.server_close()


def fetch(indices, dest, **kwargs):
    return download.hub_download_shards(
        indices, REPO, dest=dest, **({"retries": 2, "backoff": 0.01} | kwargs)
    )


def test_command_downloads_climbmix_shards_and_its_validation_shard(hub, capsys):
    assert download.main(["--shards", "3"]) == 0
    dest = resolve_data_dir("hub")
    names = [p.name for p in list_parquet_files(dest)]
    assert names == [
        "shard_00000.parquet",
        "shard_00001.parquet",
        "shard_00002.parquet",
        "shard_06542.parquet",
    ]
    for name in names:
        assert (dest / name).read_bytes() == hub.files[f"{REPO}/{name}"]
    assert "4/4 shards of karpathy/climbmix-400b-shuffle" in capsys.readouterr().out
    assert not list(dest.glob("*.incomplete")) and not list(dest.glob("*.part"))
    # A second run finds every shard in place and transfers nothing.
    before = len([r for r in hub.requests if r.method == "GET"])
    assert download.main(["--shards", "3"]) == 0
    assert len([r for r in hub.requests if r.method == "GET"]) == before


def test_cut_transfer_resumes_with_a_range_request(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256)  # real shards span many 10 MB chunks
    name = f"{REPO}/shard_00001.parquet"
    hub.faults[name] = ["ok", "cut"]  # the HEAD is fine, the first GET breaks halfway
    fetch([1], tmp_path / "d")
    assert (tmp_path / "d" / "shard_00001.parquet").read_bytes() == hub.files[name]
    ranges = [r.range for r in hub.gets(name)]
    assert len(ranges) == 2 and ranges[0] is None
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(hub.files[name]) // 2  # only the missing part was fetched again


@pytest.mark.parametrize("faults", [["500"], ["429"], ["ok", "500"]])
def test_server_errors_are_retried(hub, tmp_path, faults):
    name = f"{REPO}/shard_00000.parquet"
    hub.faults[name] = list(faults)
    fetch([0], tmp_path / "d")
    assert (tmp_path / "d" / "shard_00000.parquet").read_bytes() == hub.files[name]


@pytest.mark.parametrize("faults", [["ok", "bad-magic"], ["wrong-sha"]])
def test_damaged_or_wrong_file_is_deleted_and_fetched_again(hub, tmp_path, faults):
    name = f"{REPO}/shard_00002.parquet"
    hub.faults[name] = list(faults)
    fetch([2], tmp_path / "d")
    assert (tmp_path / "d" / "shard_00002.parquet").read_bytes() == hub.files[name]
    assert len(hub.gets(name)) == 2


def test_always_wrong_sha_fails_and_leaves_no_shard(hub, tmp_path):
    name = f"{REPO}/shard_00000.parquet"
    hub.faults[name] = ["wrong-sha", "ok"] * 10
    with pytest.raises(PicochatError, match=r"shard 0 .* failed after 3 attempts: sha256 mismatch.*rerun"):
        fetch([0], tmp_path / "d")
    assert not (tmp_path / "d" / "shard_00000.parquet").exists()


def test_missing_shard_fails_at_once_with_a_hint(hub, tmp_path):
    with pytest.raises(PicochatError, match=r"shard 7 .*not found .*--num-shards-total"):
        fetch([7], tmp_path / "d")
    assert len([r for r in hub.requests if r.path.endswith("shard_00007.parquet")]) == 1  # no retry


def test_offline_mode_uses_what_is_there_and_explains_the_rest(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    fetch([0], tmp_path / "d")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.requests)
    assert fetch([0], tmp_path / "d")[0].name == "shard_00000.parquet"
    with pytest.raises(PicochatError, match="HF_HUB_OFFLINE is set"):
        fetch([1], tmp_path / "d")
    assert len(hub.requests) == seen  # no network at all


def test_post_training_and_eval_tasks_load_from_the_hub(hub):
    mc = {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "math"}
    arc = {"question": "Sky?", "choices": {"text": ["red", "blue"], "label": ["A", "B"]}, "answerKey": "B"}
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    gsm = {"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}
    code = {"prompt": "def f():\n", "canonical_solution": "    return 1\n", "test": "assert f() == 1",
            "entry_point": "f", "task_id": "HumanEval/0"}  # fmt: skip
    files = {
        "cais/mmlu/all/auxiliary_train-00000-of-00001.parquet": [{"train": mc}],  # nested, as on the hub
        "cais/mmlu/all/test-00000-of-00001.parquet": [mc, mc | {"answer": 2}],
        "allenai/ai2_arc/ARC-Challenge/test-00000-of-00001.parquet": [arc],
        "openai/gsm8k/main/train-00000-of-00001.parquet": [gsm],
        "openai/openai_humaneval/openai_humaneval/test-00000-of-00001.parquet": [code],
        "HuggingFaceTB/smol-smoltalk/data/test-00000-of-00001.parquet": [chat] * 5,
    } | {
        f"HuggingFaceTB/smol-smoltalk/data/train-{i:05d}-of-00004.parquet": [chat] * (i + 1) for i in range(4)
    }
    hub.files.update({path: parquet_bytes(rows) for path, rows in files.items()})
    assert MMLU("all", "train", "hub").num_examples() == 1
    assert MMLU("all", "test", "hub").num_examples() == 2
    assert MMLU("all", "test", "hub")[1]["messages"][-1]["content"] == "C"
    assert ARC("ARC-Challenge", "test", "hub")[0]["messages"][-1]["content"] == "B"
    assert "####" in str(GSM8K("train", "hub")[0]["messages"][-1]["content"])
    assert HumanEval("hub")[0]["entry_point"] == "f"
    assert SmolTalk("train", "hub").num_examples() == 1 + 2 + 3 + 4
    assert SmolTalk("test", "hub").num_examples() == 5
    fetched = {r.path for r in hub.requests if r.method == "GET"}
    assert fetched == set(files)


def test_task_files_retry_server_errors_and_fail_at_once_when_missing(hub, monkeypatch):
    monkeypatch.setattr(loading, "HUB_BACKOFF", 0.01)
    gsm = {"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}
    name = "openai/gsm8k/main/test-00000-of-00001.parquet"
    hub.files[name] = parquet_bytes([gsm])
    hub.faults[name] = ["500", "429"]  # the hub has a bad moment: two failed attempts, then the file
    assert GSM8K("test", "hub").num_examples() == 1
    assert len([r for r in hub.requests if r.path == name]) >= 3
    missing_file = r"could not download main/train-00000-of-00001.parquet .*bundled"
    with pytest.raises(PicochatError, match=missing_file):
        GSM8K("train", "hub").num_examples()  # not on this hub: a 404, never retried
    missing = "openai/gsm8k/main/train-00000-of-00001.parquet"
    assert len([r for r in hub.requests if r.path == missing]) == 1
