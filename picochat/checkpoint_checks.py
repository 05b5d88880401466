"""Consistency checks of a checkpoint being loaded: meta.json's structure, its model_config against the
weights, and finite weights.

Each check raises ValueError saying what is wrong; picochat.checkpoint turns that into one PicochatError
line naming the file and the fix. A checkpoint is refused rather than half-used: a meta.json edited by
hand (or written by another version) that disagrees with the weights would otherwise fail deep inside
torch, and NaN/inf weights would let a run train or chat on with `loss=nan`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch


def check_meta_structure(meta: Any) -> None:
    """The fields picochat.checkpoint reads from meta.json exist and have the right types."""
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise ValueError("has no file list (not a picochat checkpoint?)")
    for name, record in meta["files"].items():
        if not isinstance(record, dict) or not isinstance(record.get("size"), int):
            raise ValueError(f"has no size for {name}")
        if not isinstance(record.get("sha256"), str):
            raise ValueError(f"has no sha256 for {name}")
    expected = {"step": int, "world_size": int, "ranks": list}
    for key, kind in expected.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise ValueError(f'has "{key}": {value!r}, expected {kind.__name__}')


def check_finite(state: dict[str, torch.Tensor]) -> None:
    """Every floating-point tensor is free of NaN and inf."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"holds non-finite values (NaN or inf) in {name}")


def model_config(raw: Any) -> Any:
    """meta.json's model_config as a GPTConfig: known keys only, each of its field's type."""
    from picochat.gpt import GPTConfig

    if not isinstance(raw, dict):
        raise ValueError(f"has model_config {raw!r}, expected an object of GPTConfig fields")
    fields = {f.name: type(f.default) for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"has unknown model_config keys {', '.join(unknown)} (known: {', '.join(fields)})")
    for key, value in raw.items():
        if fields[key] in (bool, str):  # architecture switches; GPTConfig checks their values
            if not isinstance(value, fields[key]):
                raise ValueError(f"has model_config {key}={value!r}, expected {fields[key].__name__}")
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (fields[key] is int and not isinstance(value, int)) or not math.isfinite(value):
            raise ValueError(f"has model_config {key}={value!r}, expected {fields[key].__name__}")
        if value < 0 or (value == 0 and GPTConfig.__dataclass_fields__[key].default != 0):
            raise ValueError(f"has model_config {key}={value!r}, expected a positive number")
    try:
        return GPTConfig(**raw)
    except ValueError as e:
        raise ValueError(f"has an impossible model_config ({e})") from e


def check_weights_match(config: Any, state: dict[str, torch.Tensor]) -> None:
    """The weights are exactly the tensors (names and shapes) of a GPT of `config`.

    The reference model is built on the meta device, so a bogus config (n_layer 1000) allocates nothing.
    """
    from picochat.gpt import GPT

    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(n for n in set(expected) & set(state) if tuple(state[n].shape) != expected[n])
    if missing or unexpected or wrong:
        problems = [
            f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
            f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, not {expected[wrong[0]]}" if wrong else "",
        ]
        raise ValueError(f"disagree with meta.json's model_config ({'; '.join(p for p in problems if p)})")
