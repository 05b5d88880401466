"""Checkpoints: save and load model + optimiser + run state as safetensors and JSON, never pickles.

A checkpoint is a folder `<checkpoint_dir>/step_<NNNNNN>/` holding
  - `model.safetensors`: the model's state dict;
  - `optim.safetensors` (written by rank 0: every rank holds the same state): every optimiser's state
    dict, its tensors flattened to string keys and the rest of the structure (param groups,
    hyperparameters) stored as JSON in the safetensors header;
  - `meta.json`: the caller's metadata (model config, training config, metrics...), the step, each
    rank's own state (data-loader position, RNG states) and the size + sha256 of every file above.
The folder is written under a hidden temporary name and renamed into place only once complete, so a
run killed mid-save never leaves a half-written `step_*` folder; files damaged later (a partial copy, a
full disk) are caught by the sizes and hashes and refused with a message saying what to do.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from picochat import checkpoint_checks as checks
from picochat.common import (
    PicochatError,
    atomic_write_json,
    autodetect_device_type,
    get_base_dir,
    write_failed,
)
from picochat.state_tree import flatten_state, unflatten_state

STAGES = ("imported", "base", "mid", "sft", "rl")  # imported: `picochat import` (hf_import.py)
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.safetensors"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_TMP_PREFIX = ".tmp_step_"
_OPTIM_FORMAT = "picochat-optim-v1"
_DIVERGED = "The run diverged (its loss turned NaN) before this save; lower the learning rate if it recurs."


class Checkpoint(NamedTuple):
    """What `load_checkpoint` returns; unpacks like nanochat's (model, optimiser, meta) triple."""

    model_state: dict[str, torch.Tensor] | None  # None when loaded with load_weights=False
    optim_state: Any  # whatever was saved (usually a list of optimiser state dicts), or None
    meta: dict[str, Any]  # includes "step", "path" and "rank_state" (this rank's own state)


# ---------------------------------------------------------------------------------------------
# Paths


def checkpoint_dir_for(stage: str, model_tag: str) -> Path:
    """$PICOCHAT_HOME/checkpoints/<stage>/<model_tag>: where a stage keeps one model's checkpoints."""
    if stage not in STAGES:
        raise PicochatError(f"unknown checkpoint stage {stage!r}; expected one of {', '.join(STAGES)}")
    return get_base_dir() / "checkpoints" / stage / model_tag


def step_dir(checkpoint_dir: str | Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"step_{step:06d}"


def list_steps(checkpoint_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints (folders with a meta.json) in `checkpoint_dir`, ascending."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / META_FILE).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def restore_optimizers(optimizers: list[torch.optim.Optimizer], ckpt: Checkpoint) -> None:
    """Load a checkpoint's optimiser states into `optimizers` (one state per optimiser, same order)."""
    path = Path(ckpt.meta["path"]) / OPTIM_FILE
    if not isinstance(ckpt.optim_state, list) or len(ckpt.optim_state) != len(optimizers):
        raise PicochatError(f"{ckpt.meta['path']} has no optimiser state for these optimisers; cannot resume")
    for opt, opt_state in zip(optimizers, ckpt.optim_state, strict=True):
        try:
            opt.load_state_dict(opt_state)
        except (KeyError, TypeError, ValueError, IndexError) as e:  # torch's own checks of the layout
            raise _damaged(path, f"does not fit this run's optimisers ({type(e).__name__}: {e})") from e


def check_resume(checkpoint_dir: str | Path, resume: bool, overwrite: bool) -> bool:
    """Whether a run continues the checkpoints in `checkpoint_dir` (--resume) or starts afresh.

    Refuses --resume with nothing to resume, and a fresh start that would replace an existing run
    unless `overwrite` says so: a run is never lost by a forgotten flag.
    """
    existing = list_steps(checkpoint_dir)
    if resume and not existing:
        raise PicochatError(f"--resume: no checkpoint in {checkpoint_dir}; drop --resume to start afresh")
    if existing and not resume and not overwrite:
        raise PicochatError(
            f"{checkpoint_dir} already holds checkpoints (latest step {existing[-1]}); pass --resume to "
            "continue that run, --overwrite to start afresh and replace them, or another --model-tag"
        )
    return resume


def find_model_tag(stage: str) -> str:
    """The default model tag of a stage: the deepest `d<N>` folder that holds a checkpoint."""
    root = get_base_dir() / "checkpoints" / stage
    tags = [p.name for p in root.iterdir() if p.is_dir() and list_steps(p)] if root.is_dir() else []
    if not tags:
        raise PicochatError(
            f"no {stage} checkpoints found under {root}; train one first (e.g. `picochat train {stage}`)"
        )
    depth_tags = [t for t in tags if re.fullmatch(r"d\d+", t)]
    if not depth_tags:
        raise PicochatError(
            f"no d<N> model tag under {root} (found {', '.join(sorted(tags))}); pass --model-tag explicitly"
        )
    return max(depth_tags, key=lambda t: int(t[1:]))


# ---------------------------------------------------------------------------------------------
# RNG states as JSON


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and current CUDA device) RNG states, as JSON-friendly values."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode("ascii")
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]))


def _bytes_tensor(b64: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# Saving


def _dist_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Own, contiguous CPU copies: safetensors refuses tensors that share storage (views, tied weights).
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        out[name] = (t.cpu() if t.device.type != "cpu" else t.clone()).contiguous()
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """Write + fsync a safetensors file; return its {"size", "sha256"} record for meta.json."""
    save_file(_to_cpu(tensors), str(path), metadata=metadata)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    checkpoint_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor] | None,
    optim_state: Any,
    meta: dict[str, Any],
    *,
    rank_state: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write `<checkpoint_dir>/step_<step>/` atomically and return its path.

    Call it on every rank when running distributed (it synchronises them); rank 0 writes the model,
    meta.json and the optimiser state (replicated on every rank, see picochat.optim).
    `rank_state` (JSON: data-loader position, RNG states) is gathered from every rank into
    meta["ranks"]. `meta` must hold "model_config" for `load_model` to rebuild the model.
    `keep_last=K` deletes all but the K most recent checkpoints afterwards.
    """
    rank, world_size = _dist_world()
    root = Path(checkpoint_dir)
    tmp = root / f"{_TMP_PREFIX}{step:06d}"
    with _naming_save_errors(tmp, step_dir(root, step)):
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(f"{_TMP_PREFIX}*"):  # left behind by a run killed while saving
                shutil.rmtree(stale)
            tmp.mkdir()
        _barrier(world_size)

        files: dict[str, dict] = {}
        if rank == 0:
            if model_state is None:
                raise ValueError("rank 0 must pass the model state to save_checkpoint")
            files[MODEL_FILE] = _write_safetensors(tmp / MODEL_FILE, model_state, {"format": "pt"})
        if optim_state is not None and rank == 0:
            tensors, tree = flatten_state(optim_state)
            header = {"format": _OPTIM_FORMAT, "structure": json.dumps(tree)}
            files[OPTIM_FILE] = _write_safetensors(tmp / OPTIM_FILE, tensors, header)

        gathered: list[Any] = [(rank_state, files)]
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, (rank_state, files))
        if rank == 0:
            all_files = {name: rec for _, rank_files in gathered for name, rec in rank_files.items()}
            full_meta = {
                **meta,
                "step": step,
                "world_size": world_size,
                "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "ranks": [state for state, _ in gathered],
                "files": all_files,
            }
            atomic_write_json(tmp / META_FILE, full_meta)
            _fsync_dir(tmp)
            _publish(tmp, step_dir(root, step))
            if keep_last:
                for old in list_steps(root)[:-keep_last]:
                    shutil.rmtree(step_dir(root, old))
    _barrier(world_size)
    return step_dir(root, step)


@contextlib.contextmanager
def _naming_save_errors(tmp: Path, final: Path) -> Iterator[None]:
    """A save the environment refuses (read-only folder, full disk) is one line naming the checkpoint;
    the partial save is removed, and the published checkpoints were never touched."""
    try:
        yield
    except (OSError, SafetensorError, PicochatError) as e:
        cause = e.__cause__ if isinstance(e, PicochatError) else e  # from common.naming_write_errors
        if not isinstance(cause, (OSError, SafetensorError)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(final, cause) from e


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder into place, replacing an older save of the same step."""
    old = None
    if final.exists():
        old = final.with_name(f"{_TMP_PREFIX}old_{final.name}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------
# Loading


def _resolve_step(checkpoint_dir: Path, step: int | None) -> Path:
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise PicochatError(
            f"no complete checkpoint in {checkpoint_dir}; train one first, or check PICOCHAT_HOME "
            f"(currently {get_base_dir()})"
        )
    if step is None:
        return step_dir(checkpoint_dir, steps[-1])
    if step not in steps:
        raise PicochatError(
            f"no complete checkpoint for step {step} in {checkpoint_dir}; available steps: "
            f"{', '.join(map(str, steps))}"
        )
    return step_dir(checkpoint_dir, step)


_CUT_SHORT = "It was probably cut short by a full disk or a partial copy, or edited by hand."


def _damaged(path: Path, problem: str, cause: str = _CUT_SHORT) -> PicochatError:
    folder = path.parent
    earlier = [s for s in list_steps(folder.parent) if step_dir(folder.parent, s) != folder]
    fallback = f"the previous checkpoint (step {earlier[-1]})" if earlier else "a fresh run"
    return PicochatError(
        f"checkpoint file {path} {problem}. {cause} "
        f"Fix: copy the checkpoint again from its source, or delete {folder} to fall back to {fallback}."
    )


def _checked(path: Path, check: Any, *args: Any, cause: str = _CUT_SHORT) -> Any:
    """Run one of picochat.checkpoint_checks on what `path` holds; its ValueError names the file."""
    try:
        return check(*args)
    except ValueError as e:
        raise _damaged(path, str(e), cause) from e


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, f"cannot be read as JSON ({e})") from e
    _checked(path, checks.check_meta_structure, meta)
    return meta


def _verify(folder: Path, name: str, meta: dict[str, Any]) -> Path:
    """Check that one listed file exists with the recorded size and sha256, and parses as safetensors."""
    path = folder / name
    record = meta["files"].get(name)
    if record is None:
        raise _damaged(folder / META_FILE, f"does not list {name}")
    if not path.is_file():
        raise _damaged(path, "is missing")
    size = path.stat().st_size
    if size != record["size"]:
        raise _damaged(path, f"is truncated or damaged ({size} bytes, expected {record['size']})")
    if _sha256(path) != record["sha256"]:
        raise _damaged(path, "is corrupt (its sha256 does not match the one recorded in meta.json)")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise _damaged(path, f"is not a valid safetensors file ({e})") from e
    return path


def load_checkpoint(
    checkpoint_dir: str | Path,
    step: int | None = None,
    device: str | torch.device = "cpu",
    *,
    load_optim: bool = True,
    load_weights: bool = True,
) -> Checkpoint:
    """Load (and verify) the checkpoint of `step`, or the latest complete one when step is None.

    Refuses, with a PicochatError naming the file and the fix, a checkpoint whose files are missing,
    truncated, corrupt or unparsable, whose meta.json lacks a field or has a wrong type, whose
    optimiser structure is malformed, or whose weights or optimiser state are not finite.
    `load_weights=False` (optimiser-only restore, for a run whose model was already loaded from this
    checkpoint) neither reads nor hashes model.safetensors: the weights are read once per resume.
    When distributed, each rank gets its own entry of meta["ranks"] as meta["rank_state"].
    """
    rank, _ = _dist_world()
    folder = _resolve_step(Path(checkpoint_dir), step)
    meta = _read_meta(folder)
    model_state = None
    if load_weights:
        model_path = _verify(folder, MODEL_FILE, meta)
        model_state = load_file(str(model_path), device=str(device))
        _checked(model_path, checks.check_finite, model_state, cause=_DIVERGED)

    optim_state = None
    if load_optim and OPTIM_FILE in meta["files"]:
        optim_state = _load_optim(_verify(folder, OPTIM_FILE, meta), device)

    ranks = meta.get("ranks") or [None]
    meta["rank_state"] = ranks[rank] if rank < len(ranks) else None
    meta["path"] = str(folder)
    return Checkpoint(model_state, optim_state, meta)


def _load_optim(path: Path, device: str | torch.device) -> Any:
    """The optimiser state of a verified optim.safetensors: its tensors put back into the JSON tree of
    the header. A header that does not describe the tensors (edited, or another format) is refused."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if header.get("format") != _OPTIM_FORMAT or not isinstance(header.get("structure"), str):
        raise _damaged(path, "has no picochat optimiser structure in its header")
    tensors = load_file(str(path), device=str(device))
    try:
        state = unflatten_state(tensors, json.loads(header["structure"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        problem = f"has a malformed optimiser structure in its header ({type(e).__name__}: {e})"
        raise _damaged(path, problem) from e
    _checked(path, checks.check_finite, tensors, cause=_DIVERGED)
    return state


def verified_config(ckpt: Checkpoint) -> Any:
    """The GPTConfig of a checkpoint loaded with its weights, after checking that meta.json's
    model_config is well-formed and describes exactly those tensors (one line naming the file if not)."""
    folder = Path(ckpt.meta["path"])
    config = _checked(folder / META_FILE, checks.model_config, ckpt.meta.get("model_config"))
    _checked(folder / MODEL_FILE, checks.check_weights_match, config, ckpt.model_state)
    return config


def load_model(
    stage: str,
    model_tag: str | None = None,
    step: int | None = None,
    device: str | torch.device | None = None,
    phase: str = "eval",
) -> tuple[Any, Any, dict[str, Any]]:
    """Rebuild a GPT from `$PICOCHAT_HOME/checkpoints/<stage>/<model_tag>/` -> (model, tokenizer, meta).

    model_tag defaults to the deepest `d<N>`; step to the latest. phase "eval" or "train" sets the mode.
    """
    from picochat.gpt import GPT
    from picochat.tokenizer import get_tokenizer

    if phase not in ("eval", "train"):
        raise ValueError(f"phase must be 'eval' or 'train', not {phase!r}")
    model_tag = model_tag or find_model_tag(stage)
    device = torch.device(device if device is not None else autodetect_device_type())
    ckpt = load_checkpoint(checkpoint_dir_for(stage, model_tag), step, device, load_optim=False)
    config = verified_config(ckpt)
    state = ckpt.model_state
    if device.type != "cuda":  # bf16 weights saved on a GPU are slow or unsupported elsewhere
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    with torch.device(device):
        model = GPT(config)
    model.load_state_dict(state, strict=True)
    model.train(phase == "train")
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise PicochatError(
            f"the tokenizer in {get_base_dir() / 'tokenizer'} has {tokenizer.get_vocab_size()} tokens "
            f"but the model was trained with vocab_size {config.vocab_size}; point PICOCHAT_HOME at the "
            "tokenizer the model was trained with"
        )
    return model, tokenizer, ckpt.meta
