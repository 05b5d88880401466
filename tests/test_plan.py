"""`picochat plan`: its memory formula against what a real (small, CPU) model allocates, and its
figures against the base trainer's own batch plan."""

from __future__ import annotations

import argparse

import pytest
import torch

from picochat import plan
from picochat.common import PicochatError
from picochat.gpt import GPT, GPTConfig
from picochat.train import base, flags


def small_model(depth: int, seq_len: int, vocab: int = 1024) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=vocab, **base.model_shape(depth, 64, 64)))
    model.init_weights()
    return model


def saved_activation_bytes(model: GPT, rows: int) -> int:
    """Bytes of every distinct tensor storage autograd keeps for backward (weights excluded)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    idx = torch.randint(0, model.config.vocab_size, (rows, model.config.sequence_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx).backward()
    return sum(n for ptr, n in saved.items() if ptr not in weights)


# Sizes other than the one the constants were counted at (depth 2, 128 tokens, 2 rows).
@pytest.mark.parametrize("depth,seq_len,rows", [(3, 96, 3), (4, 160, 2), (6, 64, 1)])
def test_activation_formula_matches_the_tensors_autograd_saves_on_cpu_within_5_percent(depth, seq_len, rows):
    model = small_model(depth, seq_len)
    measured = saved_activation_bytes(model, rows)
    predicted = plan.activation_bytes(model.config, rows, compute_bytes=4)  # fp32 on the CPU
    assert predicted == pytest.approx(measured, rel=0.05)


def test_weights_gradients_and_optimizer_state_match_a_real_step_exactly():
    model = small_model(2, 32)
    optimizers = model.setup_optimizers()
    idx = torch.randint(0, 1024, (2, 32))
    model(idx, idx).backward()
    for opt in optimizers:
        opt.step()
    params = list(model.parameters())
    state = sum(
        t.numel() * t.element_size()
        for opt in optimizers
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.ndim > 0  # AdamW's step counter is a scalar
    )
    memory = plan.memory_bytes(model, rows=2, world_size=1, compute_bytes=4)
    assert memory["weights"] == sum(p.numel() * p.element_size() for p in params)
    assert memory["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in params)
    assert memory["optimizer"] == state
    assert plan.memory_bytes(model, 2, world_size=8)["gradients"] == 2 * memory["gradients"]  # DDP buckets


def args_for(*argv: str) -> argparse.Namespace:
    args = plan.build_parser().parse_args(list(argv))
    args.price = plan.GPUS[args.gpu].price if args.price is None else args.price
    return args


def test_plan_uses_the_base_trainers_horizon_and_batch():
    args = args_for("--depth", "12", "--nproc", "8", "--device-batch-size", "16")
    result = plan.make_run_plan(args)
    train_args = base.build_parser().parse_args(
        ["--depth", "12", "--max-seq-len", "2048", "--device-batch-size", "16"]
    )
    model = plan.build_model(12, 2048, 65536, architecture=flags.architecture_config(train_args, 2048))
    expected = base.make_plan(train_args, model, 65536, 8, "cuda")
    assert result["batch"] == expected
    assert result["tokens"] == expected.num_iterations * expected.total_batch_size
    assert result["flops"] == pytest.approx(expected.flops_per_token * result["tokens"])
    gpu_seconds = result["flops"] / (plan.DEFAULT_MFU * result["peak"])
    assert result["hours"] == pytest.approx(gpu_seconds / 8 / 3600)
    assert result["cost"] == pytest.approx(result["hours"] * 8 * plan.GPUS["h100"].price)


def test_plain_d26_on_h100_fits_at_16_rows_not_32_as_nanochat_found(capsys):
    """nanochat's experience was with the plain architecture (no value embeddings)."""
    assert plan.main(["--depth", "26", "--nproc", "8", "--gpu", "h100", "--plain"]) == 0
    out = capsys.readouterr().out
    for word in ("parameters", "tokens", "FLOPs", "h at 40% MFU", "memory per GPU", "fits", "cost", "$"):
        assert word in out
    assert "16 rows x 2048 tokens" in out  # the automatic choice: the largest that fits
    assert plan.main(["--depth", "26", "--device-batch-size", "16", "--check", "--plain"]) == 0
    with pytest.raises(
        PicochatError, match="device batch 32 needs about .* GiB per GPU.*lower --device-batch"
    ):
        plan.main(["--depth", "26", "--device-batch-size", "32", "--check", "--plain"])
    assert "DOES NOT FIT" in capsys.readouterr().out
    h200 = ["--depth", "26", "--device-batch-size", "32", "--gpu", "h200", "--check", "--plain"]
    assert plan.main(h200) == 0


def test_the_plan_sizes_the_architecture_train_base_would_build():
    """Value embeddings and a bigram table add parameters (and memory) but no scaling parameters; the
    attention output gates add n_head weights per channel and layer."""
    argv = ["--depth", "12", "--device-batch-size", "8"]
    default, plain = plan.make_run_plan(args_for(*argv)), plan.make_run_plan(args_for(*argv, "--plain"))
    train_args = base.build_parser().parse_args(["--depth", "12"])
    built = plan.build_model(12, 2048, 65536, architecture=flags.architecture_config(train_args, 2048))
    assert default["batch"].num_params == built.num_params() > plain["batch"].num_params
    gates = 12 * 768 * 12  # layers x width x heads
    assert default["batch"].scaling_params == pytest.approx(plain["batch"].scaling_params + gates, rel=1e-3)
    assert default["memory"]["weights"] == 4 * built.num_params() > plain["memory"]["weights"]
    no_table = plan.make_run_plan(args_for(*argv, "--bigram-embeds", "0"))
    assert no_table["batch"].num_params == default["batch"].num_params - 5 * 65536 * 768 - 1  # table, scale


def test_bad_plan_arguments_are_clear_errors():
    with pytest.raises(PicochatError, match="unknown --gpu"):
        plan.main(["--gpu", "tpu"])
    with pytest.raises(PicochatError, match="--mfu"):
        plan.main(["--mfu", "1.5"])
    with pytest.raises(PicochatError, match="--device-batch-size 3 must divide"):
        plan.main(["--device-batch-size", "3"])


def test_every_speedrun_command_is_accepted_by_its_own_parser(tmp_path, monkeypatch):
    """`runs/speedrun.sh --dry-run` (WITH_RL=1, real sizes): each printed command's flags parse with the
    argparse parser of the module it runs, so no stage dies on a misspelt flag hours into a rented run."""
    import importlib
    import os
    import shlex
    import subprocess

    from picochat.cli import resolve
    from picochat.common import REPO_DIR

    env = {**os.environ, "WITH_RL": "1", "PICOCHAT_HOME": str(tmp_path / "home")}
    done = subprocess.run(["bash", str(REPO_DIR / "runs" / "speedrun.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    commands = [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]
    modules = []
    for argv in commands:
        if argv[0].endswith("torchrun"):
            at = argv.index("-m")
            module, args = argv[at + 1], argv[at + 2 :]
        else:
            _, module, args = resolve(argv[1:])
        parser = importlib.import_module(module).build_parser()
        monkeypatch.setattr(parser, "error", lambda message, argv=argv: pytest.fail(f"{message}: {argv}"))
        parser.parse_args(args)
        modules.append(module)
    assert {"picochat.plan", "picochat.train.base", "picochat.evals.core", "picochat.train.rl"} <= {*modules}
