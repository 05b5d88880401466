"""A read-only $PICOCHAT_HOME or a full disk: one PicochatError line naming the path, never a raw
OSError/SafetensorError, and the checkpoints already published stay loadable.

As root (CI) the read-only folder and the full disk are real: small tmpfs mounts. Without root the
read-only folder is a chmod-ed one and the full-disk tests are skipped (only root can mount).
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from picochat.checkpoint import list_steps, load_checkpoint, save_checkpoint
from picochat.common import PicochatError, append_jsonl, atomic_write_json, get_base_dir

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
