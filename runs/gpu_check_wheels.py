"""The exact wheels runs/gpu_check.sh needs on the GPU image, printed as `name==version` lines.

The GPU image has Python 3.12, torch 2.11 with CUDA, transformers (so huggingface_hub, numpy, packaging,
pyyaml, regex, requests, safetensors, tokenizers, tqdm), pyarrow, tiktoken and safetensors, and no
network. What picochat needs beyond that (rustbpe; fastapi, uvicorn and pydantic for `picochat serve`;
openai for the serve check; pytest for the test step; psutil) is listed here with everything those
depend on, each pinned to the version installed in this environment, the one picochat is tested with.
A pydantic pinned apart from its pydantic-core, say, fails at import, so versions are never left to pip.

    python runs/gpu_check_wheels.py > .whl/requirements.txt      (runs/gpu_wheels.sh does this)
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOTS = ("rustbpe", "fastapi", "uvicorn", "pydantic", "openai", "pytest", "psutil")
# In the GPU image already and never carried: torch and what must match it, transformers and its core
# requirements, pyarrow, tiktoken (and requests, which tiktoken needs). Anything else is carried even if
# the image may have it (idna, certifi, ...): a small wheel too many is harmless, one too few is not.
IN_IMAGE = frozenset(
    "torch triton numpy sympy mpmath networkx jinja2 markupsafe fsspec filelock setuptools "
    "transformers huggingface-hub hf-xet tokenizers safetensors pyyaml tqdm packaging "
    "pyarrow tiktoken regex requests".split()
)
# The image's interpreter: the markers (python_version etc.) that pick which requirements apply.
TARGET = default_environment() | {"python_version": "3.12", "python_full_version": "3.12.0", "extra": ""}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_pins(roots: tuple[str, ...] = ROOTS) -> list[str]:
    """`name==version` for `roots` and everything they require on Python 3.12 (not extras), minus what
    the image has, from this environment's installed versions; sorted by name."""
    pins: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = normalize(todo.pop())
        if name in pins or name in IN_IMAGE:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            sys.exit(f"error: {name} is not installed here; install picochat's dependencies first")
        pins[name] = f"{name}=={dist.version}"
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(TARGET):
                todo.append(requirement.name)
    return [pins[name] for name in sorted(pins)]


if __name__ == "__main__":
    print("\n".join(wheel_pins()))
