"""Nested optimiser state <-> (named tensors, JSON tree), so checkpoints hold it without pickles.

picochat.checkpoint stores the tensors in a safetensors file and the tree (param groups, hyperparameters,
the nesting) as JSON in that file's header.
"""

from __future__ import annotations

from typing import Any

import torch


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tuples, tensors, scalars) into named tensors + a JSON tree.

    Tensors become {"__tensor__": name} in the tree, with names made from their path ("0/state/3/exp_avg").
    Dicts whose keys are not all strings (torch optimiser states are keyed by parameter index) become
    {"__items__": [[key, value], ...]} and tuples {"__tuple__": [...]}, so unflattening is exact.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            if path in tensors:
                raise ValueError(f"two tensors in the optimiser state map to the same name {path!r}")
            tensors[path] = x
            return {"__tensor__": path}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {k: encode(v, f"{path}/{k}") for k, v in x.items()}
            return {"__items__": [[_plain_key(k, path), encode(v, f"{path}/{k}")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [encode(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [encode(v, f"{path}/{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(
            f"cannot store {type(x).__name__} at {path!r} in a checkpoint (tensors and JSON only)"
        )

    return tensors, encode(obj, "")


def _plain_key(key: Any, path: str) -> Any:
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    raise TypeError(f"cannot store a dict key of type {type(key).__name__} at {path!r} in a checkpoint")


def unflatten_state(tensors: dict[str, torch.Tensor], tree: Any) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(tree, list):
        return [unflatten_state(tensors, v) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__items__" in tree:
            return {k: unflatten_state(tensors, v) for k, v in tree["__items__"]}
        if "__tuple__" in tree:
            return tuple(unflatten_state(tensors, v) for v in tree["__tuple__"])
        return {k: unflatten_state(tensors, v) for k, v in tree.items()}
    return tree
