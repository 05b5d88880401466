"""Base pretraining: the depth dial, the LR schedule, bits per byte, and real tiny training runs."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torchrun import run_torchrun

from picochat.common import REPO_DIR as REPO
from picochat.common import PicochatError
from picochat.evals.bpb import evaluate_bpb
from picochat.train.base import build_parser
from picochat.train.schedule import lr_multiplier, muon_momentum
from picochat.train.sizing import batch_plan, model_shape

# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_depth_dial_shapes():
    assert model_shape(4, 64, 64) == {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_kv_head": 4}
    assert model_shape(20, 64, 128) == {"n_layer": 20, "n_embd": 1280, "n_head": 10, "n_kv_head": 10}
    assert model_shape(3, 50, 64)["n_embd"] == 192  # 150 rounded up to whole heads of 64
    assert model_shape(4, 64, 64, n_kv_head=2)["n_kv_head"] == 2
    with pytest.raises(PicochatError, match="must divide"):
        model_shape(4, 64, 64, n_kv_head=3)


def test_device_batch_only_changes_accumulation():
    assert batch_plan(4096, 8, 512, 1) == (4096, 8, 1)
    assert batch_plan(4096, 2, 512, 1) == (4096, 2, 4)
    assert batch_plan(4096, 2, 512, 2) == (4096, 2, 2)
    assert batch_plan(2**19, -1, 2048, 8) == (2**19, 32, 1)
    with pytest.raises(PicochatError, match="multiple of max_seq_len"):
        batch_plan(1000, 1, 512, 1)
    with pytest.raises(PicochatError, match="--device-batch-size 3 must divide"):
        batch_plan(4096, 3, 512, 1)


def test_lr_schedule_warmup_constant_warmdown():
    lrs = [lr_multiplier(s, 100, 0.1, 0.2, 0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0  # linear warm-up over 10 steps
    assert all(lr == 1.0 for lr in lrs[10:81])
    assert lrs[90] == pytest.approx(0.5) and lrs[99] == pytest.approx(0.05)  # linear warm-down
    assert lr_multiplier(100, 100, 0.0, 0.2, 0.1) == pytest.approx(0.1)  # ends at final_lr_frac
    assert (
        muon_momentum(0) == 0.85 and muon_momentum(150) == pytest.approx(0.9) and muon_momentum(10**6) == 0.95
    )


def _plan(argv: list[str]):
    from picochat.gpt import GPT, GPTConfig
    from picochat.train import flags
    from picochat.train.sizing import make_plan

    parser = build_parser()
    args = flags.parse(parser, ["--max-seq-len", "64", "--total-batch-size", "1024", *argv])
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=64, vocab_size=512, **model_shape(2, 64, 64)))
    return make_plan(args, model, 512, 1, "cpu")


def test_horizon_from_target_flops_and_which_rule_wins():
    ratio = _plan([])
    assert ratio.num_iterations == 20 * ratio.scaling_params // 1024
    flops = _plan(["--target-flops", "1e12"])
    assert flops.num_iterations == int(1e12 // (flops.flops_per_token * 1024))
    assert flops.target_tokens == int(1e12 / flops.flops_per_token)
    assert _plan(["--target-flops", "1e12", "--num-iterations", "7"]).num_iterations == 7  # steps win
    for bad in ("0", "-5", "nan"):
        with pytest.raises(PicochatError, match="--target-flops"):
            _plan(["--target-flops", bad])


def test_recipe_schedules():
    from picochat.train.schedule import batch_lr_scale, batch_weight_decay, weight_decay_multiplier

    assert [lr_multiplier(s, 100, 0.5, 0.0, 0.0, warmup_steps=4) for s in range(5)] == [0.25, 0.5, 0.75, 1, 1]
    # nanochat 2026: 0.85 -> 0.97 over 400 steps, then down to 0.90 over the warm-down
    m = [muon_momentum(s, 1000, 0.97, 400, 0.90, 0.5) for s in (0, 200, 400, 500, 750, 1000)]
    assert m == pytest.approx([0.85, 0.91, 0.97, 0.97, 0.935, 0.90])
    assert muon_momentum(1000, 1000, 0.97, 400) == 0.97  # no final value: the peak stays
    assert weight_decay_multiplier(0, 100) == 1 and weight_decay_multiplier(50, 100) == pytest.approx(0.5)
    assert weight_decay_multiplier(100, 100) == pytest.approx(0)
    # the batch rules are the identity at nanochat's batch and horizon (GPU speedrun settings stay)
    assert batch_lr_scale(2**19) == 1 and batch_weight_decay(0.28, 2**19, 1e9, 1e9) == pytest.approx(0.28)
    assert batch_lr_scale(2**13) == pytest.approx(1 / 8)
    assert batch_weight_decay(0.28, 2**13, 2e9, 1e9) == pytest.approx(0.28 / 8 / 2)
    for flag, bad in (("--muon-momentum", "1.0"), ("--normuon-beta2", "-0.1"), ("--muon-weight-decay", "-1")):
        with pytest.raises(PicochatError, match=flag):
            _plan([flag, bad])


def test_every_flag_has_help():
    for action in build_parser()._actions:
        assert action.help, action.option_strings


class _FixedLoss(torch.nn.Module):
    """Per-token loss 1 + target/10 nats, nonzero on every token, to check the bpb arithmetic by hand."""

    def forward(self, idx, targets, loss_reduction="mean"):
        assert loss_reduction == "none"
        return 1 + targets.float() / 10


FAULTS_PER_STEP = """
import resource, sys, torch
from picochat.common import keep_freed_memory
from picochat.gpt import GPT, GPTConfig
if sys.argv[1] == "kept":
    assert keep_freed_memory()
torch.manual_seed(0)
model = GPT(GPTConfig(sequence_len=256, vocab_size=4096, n_layer=2, n_head=2, n_kv_head=2, n_embd=128))
model.init_weights()
optimizers = model.setup_optimizers()
batch = torch.randint(0, 4096, (4, 257))
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(batch[:, :-1], batch[:, 1:]).backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults[3:])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_freed_memory_stops_training_steps_page_faulting():
    """With glibc's defaults every step hands its activations back to the kernel and faults them in
    again; init_runtime's keep_freed_memory makes the steps after the first few fault (almost) never.
    Steps 4-10 of a small model are counted."""
    faults = {}
    for mode in ("default", "kept"):
        cmd = [sys.executable, "-c", FAULTS_PER_STEP, mode]
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        faults[mode] = [int(n) for n in out.stdout.split()]
    # Measured over steps 4-10: 14-30k in all by default; 0-2 per step kept, with at most one step
    # that still grows the heap (4k faults).
    assert sum(faults["default"]) > 5000 and statistics.median(faults["kept"]) < 50, faults


def test_bpb_excludes_special_tokens_by_hand():
    token_bytes = torch.tensor([0, 1, 2, 3], dtype=torch.int32)  # token 0 is special: no bytes
    targets = torch.tensor([[1, 0, 3], [2, -1, 0]])  # -1 is masked out
    batches = iter([(torch.zeros_like(targets), targets)])
    # Only tokens 1, 3 and 2 count: (1.1 + 1.3 + 1.2) nats over 1 + 3 + 2 bytes.
    expected = 3.6 / (math.log(2) * 6)
    assert evaluate_bpb(_FixedLoss(), batches, 1, token_bytes) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# Distributed: two processes take one micro-batch each = one process accumulating both


WORKER = Path(__file__).with_name("ddp_steps_worker.py")
WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_two_processes_match_one_with_accumulation(tmp_path):
    single, double = tmp_path / "single.safetensors", tmp_path / "double.safetensors"
    subprocess.run([sys.executable, str(WORKER), str(single), "2"], check=True, env=WORKER_ENV, timeout=300)
    run_torchrun([str(WORKER), str(double), "1"], WORKER_ENV, timeout=150)

    with safe_open(single, "pt") as a, safe_open(double, "pt") as b:
        losses_a, losses_b = json.loads(a.metadata()["losses"]), json.loads(b.metadata()["losses"])
        assert losses_a == pytest.approx(losses_b, rel=1e-5)
        assert losses_a[-1] < losses_a[0]
        for name in a.keys():
            torch.testing.assert_close(a.get_tensor(name), b.get_tensor(name), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_accumulation_all_reduces_once_per_step(tmp_path, compiled):
    """With 2 micro-batches per rank, DDP all-reduces each gradient bucket once per step (no_sync on the
    first micro-batch), also when the model is torch.compile(DDP(model))."""
    out = tmp_path / "out.safetensors"
    run_torchrun([str(WORKER), str(out), "2", *(["compile"] if compiled else [])], WORKER_ENV, timeout=300)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    from ddp_steps_worker import STEPS

    assert int(meta["buckets"]) >= 1
    assert int(meta["allreduces"]) == STEPS * int(meta["buckets"])


# ---------------------------------------------------------------------------------------------
# The real trainer, end to end on a tiny model and a tiny corpus


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    """A PICOCHAT_HOME with a tiny tokenizer, a 3-shard corpus folder, and the flags of a tiny run."""
    from post_fixtures import tokenizer_and_shards

    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    shards = tmp_path / "shards"
    tokenizer_and_shards(shards)
    flags = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64"]
    flags += ["--device-batch-size", "2", "--total-batch-size", "256", "--num-iterations", "12"]
    flags += ["--eval-every", "6", "--eval-tokens", "512", "--sample-every", "0", "--save-every", "6"]
    return [*flags, "--source", str(shards)]


# Every switch of docs/recipe.md on at once: the resumed run must still match the uninterrupted one.
RECIPE_SWITCHES = ["--packing", "bestfit", "--muon-weight-decay", "0.2", "--ns", "polar", "--gc", "freeze"]
RECIPE_SWITCHES += ["--normuon-beta2", "0.95", "--warmup-steps", "2", "--muon-momentum-final", "0.9"]
RECIPE_SWITCHES += ["--prefetch", "on"]


def run_losses(tag: str) -> dict[int, float]:
    from picochat.common import get_base_dir

    lines = (get_base_dir() / "runs" / tag / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.mark.parametrize("switches", [[], RECIPE_SWITCHES], ids=["defaults", "recipe-switches"])
def test_training_loss_falls_and_a_killed_run_resumes_exactly(tiny_run, monkeypatch, switches):
    from picochat.checkpoint import checkpoint_dir_for, list_steps
    from picochat.train import base

    tiny_run = [*tiny_run, *switches]

    assert base.main([*tiny_run, "--model-tag", "whole"]) == 0
    whole = run_losses("whole")
    assert sorted(whole) == list(range(1, 13))
    assert sum(list(whole.values())[-3:]) < sum(list(whole.values())[:3]) - 0.5, whole
    assert list_steps(checkpoint_dir_for("base", "whole")) == [6, 12]

    real_step = base.BaseTrainer.step

    def killed_at_step_9(self):  # the process dies mid-run, after the step-6 checkpoint
        if self.state.step == 9:
            raise KeyboardInterrupt
        real_step(self)

    monkeypatch.setattr(base.BaseTrainer, "step", killed_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        base.main([*tiny_run, "--model-tag", "killed"])
    monkeypatch.setattr(base.BaseTrainer, "step", real_step)
    assert list_steps(checkpoint_dir_for("base", "killed")) == [6]
    with pytest.raises(PicochatError, match="--resume"):
        base.main([*tiny_run, "--model-tag", "killed"])  # never silently overwrites a run

    assert base.main([*tiny_run, "--model-tag", "killed", "--resume"]) == 0
    resumed = run_losses("killed")
    assert sorted(resumed) == list(range(1, 13))
    assert list(resumed.values()) == pytest.approx(list(whole.values()), rel=1e-5)
