"""Mid-training and SFT: rows and masks, real tiny runs (loss falls, checkpoints reload), exact resume
(reading the weights once), cumulative tokens and FLOPs on every metrics line."""

from __future__ import annotations

import json
import re

import pytest
import torch
from post_fixtures import make_home

from picochat.checkpoint import checkpoint_dir_for, list_steps, load_model
from picochat.common import PicochatError, get_base_dir
from picochat.tasks import GSM8K, SimpleSpelling, TaskMixture
from picochat.train import mid, sft
from picochat.train.chat_train import IGNORE, PackedRows, PaddedRows

MID_FLAGS = ["--device-batch-size", "2", "--max-seq-len", "128", "--eval-every", "10", "--eval-tokens", "512"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    tokenizer, _ = make_home("base")
    return tokenizer


def small_mixture():
    return TaskMixture([GSM8K("train", stop=6), SimpleSpelling("train", 6)])


def expected_targets(ids: list[int], mask: list[int]) -> list[int]:
    return [t if m else IGNORE for t, m in zip(ids[1:], mask[1:], strict=True)]


def test_packed_rows_are_the_masked_stream(home):
    tok, task = home, small_mixture()
    stream_ids, stream_mask = [], []
    for conv in task:
        ids, mask = tok.render_conversation(conv, max_tokens=4 * 32)
        stream_ids += ids
        stream_mask += mask
    rows = PackedRows(tok, task, list(range(len(task))), 2, 32, torch.device("cpu"))
    for b in range(3):
        x, y = next(rows)
        for r in range(2):
            start = (2 * b + r) * 32
            assert x[r].tolist() == stream_ids[start : start + 32]
            assert y[r].tolist() == expected_targets(
                stream_ids[start : start + 33], stream_mask[start : start + 33]
            )
    assert (y == IGNORE).any() and (y != IGNORE).any(), "user turns masked, assistant turns trained"


def test_padded_rows_hold_one_conversation_each_and_never_train_on_padding(home):
    tok, task = home, small_mixture()
    rows = PaddedRows(tok, task, list(range(len(task))), 3, 64, torch.device("cpu"))
    x, y = next(rows)
    for r in range(3):
        ids, mask = tok.render_conversation(task[r], max_tokens=65)
        n = len(ids) - 1
        assert x[r, :n].tolist() == ids[:-1]
        assert y[r, :n].tolist() == expected_targets(ids, mask)
        assert (y[r, n:] == IGNORE).all(), "padding is never a target"
    assert x.shape[1] <= 64


def metrics(run: str) -> list[dict]:
    return [
        json.loads(line)
        for line in (get_base_dir() / "runs" / run / "metrics.jsonl").read_text().splitlines()
    ]


def train_losses(run: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run) if r["kind"] == "train"}


def compute_columns(run: str) -> list[tuple]:
    """(kind, step, cumulative tokens, cumulative FLOPs) of every metrics line."""
    return [(r["kind"], r["step"], r["tokens"], r["flops"]) for r in metrics(run)]


def test_mid_then_sft_train_and_save_reloadable_checkpoints(home):
    assert mid.main([*MID_FLAGS, "--num-iterations", "20"]) == 0
    losses = list(train_losses("mid_d2").values())
    assert len(losses) == 20 and sum(losses[-4:]) < sum(losses[:4]) - 0.5, losses
    model, _, meta = load_model("mid", "d2")
    assert meta["step"] == 20 and model.config.n_layer == 2

    flags = ["--device-batch-size", "2", "--target-examples-per-step", "4", "--max-seq-len", "128"]
    flags += ["--num-iterations", "4", "--eval-tokens", "512", "--eval-metrics-examples", "2"]
    assert sft.main(flags) == 0
    assert list_steps(checkpoint_dir_for("sft", "d2")) == [4]
    section = json.loads((get_base_dir() / "report" / "sft.json").read_text())
    assert section["input"]["stage"] == "mid" and section["steps"] == 4
    assert len(section["samples"]) == 4 and {"ARC-Easy", "GSM8K"} <= {
        k.removeprefix("accuracy_") for k in section if k.startswith("accuracy_")
    }


def test_killed_mid_run_resumes_with_the_same_losses(home, monkeypatch, capsys):
    from picochat import checkpoint
    from picochat.train import chat_train

    flags = [*MID_FLAGS, "--num-iterations", "8", "--save-every", "4"]
    assert mid.main([*flags, "--model-tag", "d2", "--run", "whole"]) == 0
    whole = train_losses("whole")
    columns = compute_columns("whole")
    last_line = re.search(r"^step 8/8 \|.*$", capsys.readouterr().out, re.MULTILINE).group(0)
    _, _, tokens, flops = [c for c in columns if c[0] == "train"][-1]
    assert f"| tokens {tokens:,} | FLOPs {flops:.3g} |" in last_line, last_line
    summary = json.loads((get_base_dir() / "runs" / "whole" / "summary.json").read_text())
    per_token, steps = summary["flops_per_token"], [c for c in columns if c[0] == "train"]
    assert [c[1] for c in steps] == list(range(1, 9)) and per_token > 0
    assert all(0 < a[2] < b[2] for a, b in zip(steps, steps[1:], strict=False)), steps  # tokens only grow
    assert all(flops == pytest.approx(tokens * per_token) for _, _, tokens, flops in columns)
    assert (summary["tokens"], summary["flops"]) == (steps[-1][2], steps[-1][3])
    assert json.loads((get_base_dir() / "report" / "mid.json").read_text())["flops"] == summary["flops"]

    real_forward_backward = chat_train.ChatTrainer.forward_backward

    def dies_at_step_6(self):
        if self.state.step == 5:
            raise KeyboardInterrupt
        return real_forward_backward(self)

    monkeypatch.setattr(chat_train.ChatTrainer, "forward_backward", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        mid.main([*flags, "--run", "killed", "--overwrite"])
    monkeypatch.setattr(chat_train.ChatTrainer, "forward_backward", real_forward_backward)
    assert list_steps(checkpoint_dir_for("mid", "d2")) == [4]
    with pytest.raises(PicochatError, match="--resume"):
        mid.main([*flags, "--run", "killed"])
    weight_reads = []
    real_load_file = checkpoint.load_file

    def counting_load_file(path, **kwargs):
        weight_reads.extend([path] if path.endswith(checkpoint.MODEL_FILE) else [])
        return real_load_file(path, **kwargs)

    monkeypatch.setattr(checkpoint, "load_file", counting_load_file)
    assert mid.main([*flags, "--run", "killed", "--resume"]) == 0
    assert len(weight_reads) == 1  # optimiser-only restore: the weights are read once
    resumed = train_losses("killed")
    assert sorted(resumed) == list(range(1, 9))
    assert list(resumed.values()) == pytest.approx(list(whole.values()), rel=1e-5)
    again = compute_columns("killed")  # tokens and FLOPs continue across the resume
    assert [c[:3] for c in again] == [c[:3] for c in columns]
    assert [c[3] for c in again] == pytest.approx([c[3] for c in columns], rel=1e-9)


@pytest.mark.parametrize("stage", ["mid", "sft"])
def test_device_batch_size_changes_memory_not_the_update(home, stage):
    """The gradient is the token-weighted mean over the whole step: device batch 1 (4 micro-batches)
    and 4 (one) give the same losses, validation loss and weights."""
    module = {"mid": mid, "sft": sft}[stage]
    batch = ["--total-batch-size", "512"] if stage == "mid" else ["--target-examples-per-step", "4"]
    common = ["-i", "base", *batch, "--max-seq-len", "128", "--num-iterations", "2", "--eval-every", "0"]
    common += ["--eval-tokens", "1024", "--overwrite", "--init-lr-frac", "1.0"]
    if stage == "sft":
        common += ["--eval-metrics-every", "-1"]
    results = []
    for device_batch in ("1", "4"):
        run = f"{stage}_b{device_batch}"
        assert module.main([*common, "--device-batch-size", device_batch, "--run", run]) == 0
        model, _, _ = load_model(stage, "d2")
        summary = json.loads((get_base_dir() / "runs" / run / "summary.json").read_text())
        results.append((train_losses(run), summary["final_val_loss"], model.state_dict()))
    (losses_1, val_1, weights_1), (losses_4, val_4, weights_4) = results
    assert list(losses_1.values()) == pytest.approx(list(losses_4.values()), rel=1e-5)
    assert val_1 == pytest.approx(val_4, rel=1e-5)
    # AdamW's normalisation magnifies float rounding on rare tokens: a row seen once moves by about
    # lr whatever its gradient's size (on this 2-core host one embedding entry differed by 9.8e-4).
    for name, w in weights_1.items():
        torch.testing.assert_close(w, weights_4[name], rtol=1e-3, atol=2e-3)


def test_missing_input_checkpoint_is_a_clear_error(home):
    with pytest.raises(PicochatError, match="sft|checkpoint"):
        sft.main(["-i", "sft", "--num-iterations", "1"])
