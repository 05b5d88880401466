"""The flags every training stage shares, defined once, and the one check of all stages' flag values.

Groups appear in every stage's --help in the same order: input and output, model, batch and horizon,
optimisation, evaluation/logging/checkpoints, runtime. A concept has one name everywhere
(`--num-iterations`, `--source`, `--device-batch-size`, `--max-new-tokens`). `check_args` turns a bad
value into one clear line (PicochatError: exit 1) before anything is loaded or allocated.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch

from picochat.common import PicochatError
from picochat.gpt import EXTRA_FIELDS, GPTConfig

GROUPS = (
    "input and output",
    "model",
    "batch and horizon",
    "optimisation",
    "evaluation, logging and checkpoints",
    "runtime",
)
DEVICE_TYPES = ("cpu", "cuda", "mps")
# Flags that count something: at least 1 (or -1 where -1 is the flag's "derive it" default).
POSITIVE = {
    "depth", "aspect_ratio", "head_dim", "n_kv_head", "max_seq_len", "device_batch_size",
    "total_batch_size", "num_iterations", "eval_tokens", "eval_batches", "examples_per_step",
    "num_samples", "max_new_tokens", "target_examples_per_step", "eval_metrics_examples",
    "core_metric_max_per_task", "target_flops",
}  # fmt: skip
# Flags that may be 0 (a period of 0 = at the end only; a rate or ratio of 0 = off).
NON_NEGATIVE = {
    "eval_every", "save_every", "keep_last", "max_minutes", "sample_every", "log_every", "grad_clip",
    "weight_decay", "warmup_ratio", "warmdown_ratio", "final_lr_frac", "embedding_lr", "unembedding_lr",
    "matrix_lr", "init_lr_frac", "target_param_data_ratio", "temperature", "top_k", "eval_examples",
    "core_metric_every", "eval_metrics_every", "warmup_steps", "muon_weight_decay", "muon_momentum_warmup",
}  # fmt: skip
FRACTIONS = {"muon_momentum", "muon_momentum_final", "normuon_beta2"}  # in [0, 1)
NEVER = {"core_metric_every", "eval_metrics_every"}  # periods where -1 means "never"


def groups(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """The shared argument groups of a stage's parser, created in the one order."""
    return {title: parser.add_argument_group(title) for title in GROUPS}


def add_input_args(group: argparse._ArgumentGroup, default_stage: str, stages: tuple[str, ...]) -> None:
    """-i/--stage, --model-tag, --step: the checkpoint a later stage starts from."""
    group.add_argument(
        "-i", "--stage", default=default_stage, choices=stages,
        help=f"stage of the checkpoint to start from (default: {default_stage})",
    )  # fmt: skip
    group.add_argument(
        "--model-tag", default=None, help="model tag to load and save under (default: the deepest d<N>)"
    )
    group.add_argument(
        "--step", type=int, default=None, help="step of the input checkpoint (default: latest)"
    )


def add_source_arg(group: argparse._ArgumentGroup, what: str) -> None:
    group.add_argument(
        "--source",
        choices=("bundled", "hub"),
        default="bundled",
        help=f"{what}: bundled copies (offline) or the Hugging Face hub",
    )


def add_horizon_args(group: argparse._ArgumentGroup, default_horizon: str) -> None:
    group.add_argument(
        "--num-iterations", type=int, default=-1, help=f"optimiser steps; -1 = {default_horizon}"
    )
    group.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop after this many minutes of training (counting earlier segments of a resumed run) and "
        "finish cleanly; the LR decay is fitted into the budget. 0 = no limit",
    )


def add_optim_args(
    group: argparse._ArgumentGroup, init_lr_frac: float | None, matrix_lr: float = 0.02
) -> None:
    """The learning rates of the Muon + AdamW groups, weight decay and gradient clipping."""
    group.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of the token embedding")
    group.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of the lm_head")
    group.add_argument(
        "--matrix-lr", type=float, default=matrix_lr, help="Muon LR of the transformer matrices"
    )
    group.add_argument("--weight-decay", type=float, default=0.0, help="weight decay of the AdamW groups")
    if init_lr_frac is not None:
        group.add_argument(
            "--init-lr-frac", type=float, default=init_lr_frac, help="scale every LR above by this factor"
        )
    group.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")


def add_recipe_args(group: argparse._ArgumentGroup) -> None:
    """Pretraining's optimiser, schedule, data and systems switches (measured in docs/recipe.md)."""
    group.add_argument(
        "--warmup-steps", type=int, default=0, help="LR warm-up steps; 0 = use --warmup-ratio instead"
    )
    group.add_argument("--muon-momentum", type=float, default=0.95, help="Muon momentum after its warm-up")
    group.add_argument(
        "--muon-momentum-warmup", type=int, default=300, help="steps of Muon momentum warm-up from 0.85"
    )
    group.add_argument(
        "--muon-momentum-final",
        type=float,
        default=-1.0,
        help="Muon momentum at the end, reached linearly over the LR warm-down; -1 = keep --muon-momentum",
    )
    group.add_argument(
        "--muon-weight-decay",
        type=float,
        default=0.0,
        help="cautious weight decay of the Muon matrices (decays with a cosine to 0 over the run; 0 = off)",
    )
    group.add_argument(
        "--ns",
        choices=("jordan", "polar"),
        default="jordan",
        help="Muon's Newton-Schulz coefficients: jordan (fixed quintic) or polar (Polar Express)",
    )
    group.add_argument(
        "--normuon-beta2",
        type=float,
        default=0.0,
        help="NorMuon: EMA rate of each neuron's update size, used to equalise them (0 = off; 0.95 typical)",
    )
    group.add_argument(
        "--batch-scaling",
        choices=("off", "on"),
        default="off",
        help="on: every LR times sqrt(total batch / 2^19) and the Muon weight decay scaled to keep the "
        "reference's B/(lr*wd*D) (the identity at nanochat's batch and horizon)",
    )
    group.add_argument(
        "--packing",
        choices=("stream", "bestfit"),
        default="stream",
        help="training rows: stream (documents end to end, cut every T tokens) or bestfit (rows start at "
        "a document start, filled best-fit; a long document's rest goes into later rows)",
    )
    group.add_argument(
        "--prefetch",
        choices=("off", "on"),
        default="off",
        help="on: assemble (and on CUDA copy) the next batch in a thread during forward and backward",
    )
    group.add_argument(
        "--gc",
        choices=("on", "freeze"),
        default="on",
        help="Python's garbage collector: on, or freeze (collect, freeze and disable it after step 1)",
    )


# The architecture switches: flag --x-y sets GPTConfig field x_y (picochat.gpt describes each one).
ARCHITECTURE_FIELDS = (
    "value_embeds", "resid_scalars", "rope_theta", "qk_scale", "vocab_multiple", "window_pattern",
    "short_window", "smear", "bigram_embeds", "attn_gate",
)  # fmt: skip


def add_architecture_args(group: argparse._ArgumentGroup) -> None:
    """The model's architecture extras: the adopted ones on (docs/recipe.md), the rest off."""
    group.add_argument(
        "--plain", action="store_true",
        help="the plain NanoChat architecture, the one vLLM/SGLang serve natively: every extra below off "
        "(value embeddings, smear, QK scale 1, ...), whatever else is given; --rope-theta still applies",
    )  # fmt: skip
    group.add_argument(
        "--value-embeds", action=argparse.BooleanOptionalAction, default=True,
        help="value embeddings (adopted): every other layer (the last included) adds a gated token "
        "embedding to V",
    )  # fmt: skip
    group.add_argument(
        "--resid-scalars", action="store_true",
        help="learnable per-layer scalars before each block: x = resid_lambda * x + x0_lambda * x0",
    )  # fmt: skip
    group.add_argument(
        "--smear", action=argparse.BooleanOptionalAction, default=True,
        help="smear (adopted): add a gated share of the previous token's embedding to each token's, "
        "before the first block",
    )  # fmt: skip
    group.add_argument(
        "--bigram-embeds", type=positive(int, zero=True), default=5, metavar="K",
        help="a hashed (previous token, token) embedding table of K times the vocabulary's rows, added to "
        "each token's input embedding (adopted: 5; 0 = none)",
    )  # fmt: skip
    group.add_argument(
        "--attn-gate", action=argparse.BooleanOptionalAction, default=True,
        help="attention output gates (adopted): each head's output times 2 * sigmoid(W x) of the layer's "
        "input (1 at init)",
    )  # fmt: skip
    group.add_argument("--rope-theta", type=positive(float), default=10000.0, help="rotary base")
    group.add_argument(
        "--qk-scale", type=positive(float), default=1.3,
        help="multiply the attention logits by this after QK-norm (adopted: 1.3; 1 = the usual "
        "1/sqrt(head_dim))",
    )  # fmt: skip
    group.add_argument(
        "--vocab-multiple", type=positive(int), default=1,
        help="pad the embedding and lm_head rows to a multiple of this (e.g. 64; padding is never sampled)",
    )  # fmt: skip
    group.add_argument(
        "--window-pattern", type=_window_pattern, default="SSSL",
        help="sliding-window attention per layer, tiled: S = short window, L = full context (adopted: "
        "SSSL; the last layer is always L; L or '' = all full)",
    )  # fmt: skip
    group.add_argument(
        "--short-window", type=positive(int, zero=True), default=0,
        help="tokens a short-window layer sees, itself included (0 = a sixty-fourth of --max-seq-len, "
        "the adopted default; the checkpoint records the number)",
    )  # fmt: skip


# The adopted short window: this fraction of the sequence when --short-window is 0.
SHORT_WINDOW_FRACTION = 64


def architecture_config(args: argparse.Namespace, sequence_len: int) -> dict:
    """The GPTConfig fields set by `add_architecture_args`' flags (`--plain`: GPTConfig's defaults).

    A short window left at 0 is resolved here to its number of tokens, so a checkpoint's config says
    the window it was trained with, whatever later versions adopt."""
    plain = {name: GPTConfig.__dataclass_fields__[name].default for name in EXTRA_FIELDS}
    chosen = {name: getattr(args, name) for name in ARCHITECTURE_FIELDS}
    if "S" in chosen["window_pattern"] and not chosen["short_window"]:
        chosen["short_window"] = max(1, sequence_len // SHORT_WINDOW_FRACTION)
    return {**chosen, **plain} if args.plain else chosen


def default_architecture(sequence_len: int, plain: bool = False) -> dict:
    """The GPTConfig fields of `train base`'s default architecture at this context length, or of the
    plain one (benchmarks)."""
    parser = argparse.ArgumentParser()
    add_architecture_args(parser.add_argument_group())
    return architecture_config(parser.parse_args(["--plain"] if plain else []), sequence_len)


def positive(kind: type, zero: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite number of `kind`, above 0 (or at least 0 with `zero`)."""

    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"{text} must be {'>= 0' if zero else 'positive'}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def _window_pattern(text: str) -> str:
    if set(text.upper()) - set("SL"):
        raise argparse.ArgumentTypeError(f"{text!r} may hold only S (short window) and L (full context)")
    return text.upper()


def add_output_args(group: argparse._ArgumentGroup, stage: str, eval_every: int, save_every: int) -> None:
    """Evaluation and checkpoint cadence, logs, run name and resume."""
    group.add_argument(
        "--eval-every", type=int, default=eval_every, help="evaluate every N steps (0 = at the end only)"
    )
    group.add_argument(
        "--save-every", type=int, default=save_every, help="checkpoint every N steps (0 = at the end only)"
    )
    group.add_argument("--keep-last", type=int, default=0, help="keep only the last K checkpoints (0 = all)")
    group.add_argument(
        "--log-every",
        type=int,
        default=0,
        help="when stdout is not a terminal, a step line every N steps "
        "(0 = about 50 lines per run, and one every 30 s at least)",
    )
    group.add_argument(
        "--run", default=None, help="run name: metrics folder name, and logs to wandb if installed"
    )
    group.add_argument("--resume", action="store_true", help=f"continue the latest {stage} checkpoint")
    group.add_argument(
        "--overwrite",
        action="store_true",
        help=f"start afresh even if this model tag already has {stage} checkpoints",
    )


def add_runtime_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--device-type", default="", help="cuda | cpu | mps (default: autodetect)")


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Refuse impossible values with one line each: counts below 1, negative periods or rates, non-finite
    numbers, and a device this machine does not have. -1 is accepted where it is the flag's default."""
    for name, value in vars(args).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise PicochatError(f"{flag} {value} is not a finite number")
        derived = value == -1 and (parser.get_default(name) == -1 or name in NEVER)
        if name in POSITIVE and value < 1 and not derived:
            raise PicochatError(f"{flag} {value} must be at least 1")
        if name in NON_NEGATIVE and value < 0 and not derived:
            raise PicochatError(f"{flag} {value} cannot be negative")
        if name in FRACTIONS and not 0 <= value < 1 and not derived:
            raise PicochatError(f"{flag} {value} must be at least 0 and below 1")
    check_device_type(getattr(args, "device_type", ""))
    return args


def check_device_type(device_type: str) -> None:
    if not device_type:
        return
    if device_type not in DEVICE_TYPES:
        raise PicochatError(f"--device-type {device_type!r} is not one of {', '.join(DEVICE_TYPES)}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise PicochatError("--device-type cuda: no CUDA GPU is visible here; use --device-type cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise PicochatError("--device-type mps: MPS is not available here; use --device-type cpu")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, then `check_args`."""
    return check_args(parser.parse_args(argv), parser)


def check_memory(model: torch.nn.Module, device: torch.device, bytes_per_param: int) -> None:
    """Refuse, before allocating, a model whose weights, gradients and optimiser state cannot fit."""
    need = bytes_per_param * sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[0]
    else:
        have = _available_ram()
    if have and need > have:
        raise PicochatError(
            f"this model needs at least {need / 2**30:.1f} GiB for weights, gradients and optimiser state "
            f"but the {device.type} has {have / 2**30:.1f} GiB free; lower --depth (or --aspect-ratio)"
        )


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
