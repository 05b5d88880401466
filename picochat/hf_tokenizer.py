"""Reading a Hugging Face tokenizer.json back into a picochat `Tokenizer` (for `picochat import`).

picochat's tokenizer is tiktoken-style byte-level BPE: ids 0..n-1 are byte strings whose id is also
their merge rank, one split regex, then the 9 special tokens at ids n..n+8. A tokenizer.json imports
when it says exactly that (as `picochat export` writes it, or any reordering of its JSON that
transformers reads the same); anything else is refused with one line naming the setting, because a
tokenizer that merely loads but splits or merges differently would silently feed the model other ids.
The rebuilt tokenizer is finally checked against the `tokenizers` library on a probe text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from picochat.common import PicochatError
from picochat.hf_export import byte_to_unicode
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

# English, code, digits, whitespace runs and several scripts: where split regexes and merges differ.
PROBE = (
    "Hello, world! It's 2026; we'll see. def f(x):\n    return x ** 2  # 12345678\n\n\t"
    "héllo wörld, naïve café — 你好，世界 🙂🚀 Привет мир  ​ العربية  e=mc² 3.14159 ...!!!???"
)


def _refuse(path: Path, what: str) -> PicochatError:
    return PicochatError(
        f"{path}: {what}; picochat imports byte-level BPE tokenizers whose ids are their merge ranks, "
        "with one split regex and picochat's special tokens (as `picochat export` writes them)"
    )


def _split_pattern(path: Path, pre: Any) -> str:
    """The regex of a Sequence[Split(regex, isolated), ByteLevel(no regex)] pre-tokenizer."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    kinds = [s.get("type") for s in steps or [] if isinstance(s, dict)]
    if kinds != ["Split", "ByteLevel"]:
        shown = kinds or (pre.get("type") if isinstance(pre, dict) else pre)
        raise _refuse(path, f"its pre_tokenizer is {shown!r}, not a Split regex then ByteLevel")
    split, byte_level = steps
    pattern = split.get("pattern")
    if not isinstance(pattern, dict) or not isinstance(pattern.get("Regex"), str):
        raise _refuse(path, f"its Split pattern {pattern!r} is not a regex")
    if split.get("behavior") != "Isolated" or split.get("invert"):
        raise _refuse(path, f"its Split behaviour is {split.get('behavior')!r}, not 'Isolated'")
    if byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
        raise _refuse(path, "its ByteLevel step adds a prefix space or its own regex")
    return pattern["Regex"]


def _ranks(path: Path, model: Any) -> dict[bytes, int]:
    """Byte string -> id of a BPE model whose merges apply in id order (what tiktoken does)."""
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise _refuse(path, f"its model is {model.get('type') if isinstance(model, dict) else model!r}")
    if (
        model.get("byte_fallback")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
    ):
        raise _refuse(path, "its BPE model uses byte_fallback or subword prefixes/suffixes")
    to_byte = {char: b for b, char in byte_to_unicode().items()}
    try:
        ranks = {bytes(to_byte[c] for c in token): int(i) for token, i in model["vocab"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _refuse(path, f"its vocabulary has a token outside the byte-level alphabet ({e})") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise _refuse(path, "its vocabulary ids are not 0..n-1 each used once")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise _refuse(path, "its vocabulary lacks some of the 256 single bytes")
    merged = []
    for merge in model.get("merges") or []:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged.append(ranks.get(bytes(to_byte[c] for c in left + right), -1))
    # A token may be listed as several merges (every split into two lower-ranked tokens), but the
    # merges must come in the order of the ids they make and make every multi-byte token.
    multi = {rank for token, rank in ranks.items() if len(token) > 1}
    if merged != sorted(merged) or -1 in merged or set(merged) != multi:
        raise _refuse(path, "its merges do not make its multi-byte tokens in vocabulary-id order")
    return ranks


def tokenizer_from_hf(path: Path) -> Tokenizer:
    """The picochat Tokenizer a tokenizer.json describes; PicochatError naming what is unsupported."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, ValueError) as e:
        raise PicochatError(
            f"cannot read {path} ({e}); a transformers model folder has a tokenizer.json"
        ) from e
    if not isinstance(data, dict):
        raise _refuse(path, "it is not a JSON object")
    if data.get("normalizer") is not None:
        raise _refuse(path, f"it has a normalizer ({data['normalizer'].get('type')!r})")
    pattern = _split_pattern(path, data.get("pre_tokenizer"))
    ranks = _ranks(path, data.get("model"))
    added = {t.get("content"): t.get("id") for t in data.get("added_tokens") or [] if isinstance(t, dict)}
    for i, name in enumerate(SPECIAL_TOKENS):
        if added.get(name) != len(ranks) + i:
            where = "missing" if name not in added else f"at id {added[name]}"
            raise _refuse(path, f"special token {name} is {where}, not id {len(ranks) + i}")
    extra = sorted(set(added) - set(SPECIAL_TOKENS), key=str)
    if extra:
        raise _refuse(path, f"it adds tokens picochat does not have (e.g. {extra[0]!r})")
    try:
        tokenizer = Tokenizer(ranks, pattern)
    except ValueError as e:  # e.g. a regex tiktoken cannot compile
        raise _refuse(path, f"picochat cannot build it ({e})") from e
    theirs = HFTokenizer.from_str(text).encode(PROBE, add_special_tokens=False).ids
    if theirs != tokenizer.encode(PROBE):
        raise _refuse(path, "the `tokenizers` library splits text differently from its picochat rebuild")
    return tokenizer
