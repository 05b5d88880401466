"""A read-only $PICOCHAT_HOME or a full disk: one PicochatError line naming the path, never a raw
OSError/SafetensorError; the checkpoints already published stay loadable, a failed metrics append leaves
no partial line, and a stage that writes checks $PICOCHAT_HOME at start-up, before any work.

As root (CI) the read-only folder and the full disk are real: small tmpfs mounts. Without root the
read-only folder is a chmod-ed one and the full-disk tests are skipped (only root can mount).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from picochat.checkpoint import list_steps, load_checkpoint, save_checkpoint
from picochat.common import (
    PicochatError,
    append_jsonl,
    atomic_write_json,
    get_base_dir,
    require_writable_home,
)

ROOT = os.geteuid() == 0


def _mount_tmpfs(folder, options: str):
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    return folder


@pytest.fixture
def read_only(tmp_path):
    folder = tmp_path / "ro"
    if ROOT:  # root ignores permission bits, so only a read-only mount refuses it
        yield _mount_tmpfs(folder, "ro,size=64k")
        subprocess.run(["umount", "--lazy", str(folder)], check=True)
    else:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


@pytest.fixture
def small_disk(tmp_path):
    if not ROOT:
        pytest.skip("a full filesystem needs root to mount a small tmpfs")
    yield _mount_tmpfs(tmp_path / "small", "size=64k")
    subprocess.run(["umount", "--lazy", str(tmp_path / "small")], check=True)


def one_line(err: pytest.ExceptionInfo, path, *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"cannot write {path}"), message
    assert all(f in message for f in fragments), message


def test_read_only_home_is_one_line_naming_the_path(read_only, monkeypatch):
    with pytest.raises(PicochatError) as err:
        atomic_write_json(read_only / "report" / "base.json", {"x": 1})
    one_line(err, read_only / "report" / "base.json", "point PICOCHAT_HOME at a writable folder")
    with pytest.raises(PicochatError) as err:
        append_jsonl(read_only / "metrics.jsonl", {"step": 1})
    one_line(err, read_only / "metrics.jsonl", "writable")
    monkeypatch.setenv("PICOCHAT_HOME", str(read_only / "home"))
    with pytest.raises(PicochatError) as err:
        get_base_dir()
    one_line(err, read_only / "home", "writable")
    with pytest.raises(PicochatError) as err:
        save_checkpoint(read_only / "ckpt", 1, {"w": torch.ones(3)}, None, {})
    one_line(err, read_only / "ckpt" / "step_000001", "writable")
    assert os.listdir(read_only) == []


def test_full_disk_keeps_the_published_checkpoints(small_disk):
    folder = small_disk / "ckpt"
    save_checkpoint(folder, 1, {"w": torch.ones(8)}, [{"state": {0: {"m": torch.ones(8)}}}], {"a": 1})
    with pytest.raises(PicochatError) as err:  # 400 kB of weights on a 64 kB disk
        save_checkpoint(folder, 2, {"w": torch.zeros(100_000)}, None, {"a": 2})
    one_line(err, folder / "step_000002", "No space left on device", "free some space there")
    assert list_steps(folder) == [1] and sorted(os.listdir(folder)) == ["step_000001"]  # partial save removed
    ckpt = load_checkpoint(folder)
    assert ckpt.meta["a"] == 1 and torch.equal(ckpt.model_state["w"], torch.ones(8))


def test_full_disk_for_json_and_metrics(small_disk):
    big = {"text": "x" * 100_000}
    (small_disk / "summary.json").write_text('{"old": true}')
    with pytest.raises(PicochatError) as err:
        atomic_write_json(small_disk / "summary.json", big)
    one_line(err, small_disk / "summary.json", "No space left on device", "free some space")
    assert (small_disk / "summary.json").read_text() == '{"old": true}'  # the old file is intact
    assert sorted(os.listdir(small_disk)) == ["summary.json"]  # and no temp file is left
    with pytest.raises(PicochatError) as err:
        append_jsonl(small_disk / "metrics.jsonl", big)
    one_line(err, small_disk / "metrics.jsonl", "No space left on device")


def test_a_failed_append_leaves_the_file_as_it_was(small_disk):
    metrics = small_disk / "metrics.jsonl"
    append_jsonl(metrics, {"step": 1, "loss": 3.0})
    before = metrics.read_bytes()
    filler = small_disk / "filler"
    with pytest.raises(OSError):  # fill the disk, so that the next line fits only in part
        with open(filler, "wb") as f:
            while True:
                f.write(bytes(4096))
                f.flush()
    with pytest.raises(PicochatError) as err:
        append_jsonl(metrics, {"step": 2, "text": "x" * 20_000})  # longer than the page it could take
    one_line(err, metrics, "No space left on device", "free some space there")
    assert metrics.read_bytes() == before  # truncated back: no partial line
    with pytest.raises(PicochatError):
        append_jsonl(small_disk / "new.jsonl", {"text": "x" * 20_000})
    assert not (small_disk / "new.jsonl").exists()  # a file the failed append created is removed
    filler.unlink()
    append_jsonl(metrics, {"step": 2})
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Start-up check: a stage that writes refuses an unwritable $PICOCHAT_HOME before any work


def test_unwritable_home_is_refused_before_any_work(read_only, monkeypatch, capsys):
    from picochat import cli, common

    monkeypatch.setenv("PICOCHAT_HOME", str(read_only))
    with pytest.raises(PicochatError) as err:
        require_writable_home()
    one_line(err, read_only, "point PICOCHAT_HOME at a writable folder")

    started = []
    monkeypatch.setattr(common, "init_runtime", lambda *a: started.append("runtime"))
    with pytest.raises(PicochatError) as err, common.distributed_runtime("cpu"):  # torchrun -m ... stages
        started.append("work")
    one_line(err, read_only, "writable")

    class Stage:  # stands in for every stage module: it must never be started
        @staticmethod
        def main(argv, prog):
            started.append(prog)
            return 0

    monkeypatch.setattr(cli.importlib, "import_module", lambda name: Stage)
    for words in sorted(cli.WRITERS):
        assert cli.main([*words, "--device-type", "cpu"]) == 1
        assert capsys.readouterr().err.strip() == f"picochat {' '.join(words)}: error: {err.value}"
    assert started == []
    assert cli.main(["train", "base", "--help"]) == 0  # --help still works there
    assert cli.main(["chat", "-p", "hi"]) == 0  # and commands that only read are not checked
    assert started == ["picochat train base", "picochat chat"]
    assert os.listdir(read_only) == []


def test_writable_home_check_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    assert require_writable_home() == tmp_path / "home"
    assert os.listdir(tmp_path / "home") == []
