"""Tests for picochat.tokenizer and the `picochat tokenizer train/eval` commands (small corpora, fast)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from picochat.common import PicochatError
from picochat.evals import tokenizer as tok_eval
from picochat.tokenizer import (
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    Tokenizer,
    get_token_bytes,
    get_tokenizer,
)
from picochat.train import tokenizer as tok_train

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and we've got 12345 apples!\n",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5\n",
    "Once upon a time, in a land far away, there lived a king who loved numbers like 3.14159.\n",
    "Ünïcödé text: naïve café, 日本語のテキスト, emoji 🙂🚀 and tabs\tand   spaces.\n",
    "SELECT name, count(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;\n",
] * 20
VOCAB = 400
VAL_TEXT = "validation text: the quick brown fox, 42."
specials = st.sampled_from(SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(iter(CORPUS), VOCAB)


def sp(tok: Tokenizer, name: str) -> int:
    return tok.encode_special(f"<|{name}|>")


# ---------------------------------------------------------------------------------------------
# Vocabulary, encoding, decoding


def test_vocab_layout(tok):
    assert tok.get_vocab_size() == VOCAB
    ids = [tok.encode_special(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(VOCAB - len(SPECIAL_TOKENS), VOCAB))  # special tokens come last
    assert tok.get_bos_token_id() == ids[0]
    assert tok.get_special_tokens() == dict(zip(SPECIAL_TOKENS, ids, strict=True))
    assert tok.id_to_token(ids[3]) == "<|assistant_start|>"
    assert tok.id_to_token(ord("a")) == "a"  # ids 0..255 are the single bytes
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|eos|>")
    with pytest.raises(ValueError, match="at least"):
        Tokenizer.train_from_iterator(CORPUS, MIN_VOCAB_SIZE - 1)


def test_merges_compress_the_training_text(tok):
    text = CORPUS[0]
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_of_any_string(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.get_vocab_size() - len(SPECIAL_TOKENS) for i in ids)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), specials), max_size=12).map("".join))
def test_plain_text_never_produces_special_tokens(tok, text):
    special_ids = set(tok.get_special_tokens().values())
    for ids in [tok.encode(text), *tok.encode([text, text], num_threads=2)]:
        assert not special_ids & set(ids)
        assert tok.decode(ids) == text


def test_lone_surrogates_become_replacement_characters(tok):
    # Not valid Unicode text, so it cannot round-trip; it must not crash either.
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


def test_batch_encoding_prepend_and_append(tok):
    texts = ["hello world", "", "<|bos|> is just text here"]
    bos, end = tok.get_bos_token_id(), sp(tok, "assistant_end")
    singles = [tok.encode(t) for t in texts]
    assert tok.encode(texts, num_threads=3) == singles
    assert tok.encode(texts, prepend="<|bos|>", append=end) == [[bos, *ids, end] for ids in singles]
    assert tok.encode(texts[0], prepend=bos) == [bos, *singles[0]]
    assert tok.encode(texts[0], append="<|assistant_end|>") == [*singles[0], end]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("x", prepend=VOCAB)
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_decode_of_a_partial_character_uses_replacement(tok):
    ids = tok.encode("𝄞")  # not in the corpus: one token per UTF-8 byte
    assert len(ids) == 4
    assert tok.decode(ids[:2]) == "\ufffd"


# ---------------------------------------------------------------------------------------------
# Training determinism, saving and loading, token byte lengths


def test_training_is_deterministic(tmp_path):
    first = Tokenizer.train_from_iterator(iter(CORPUS), VOCAB)
    second = Tokenizer.train_from_iterator(list(CORPUS), VOCAB)
    assert first.mergeable_ranks == second.mergeable_ranks
    first.save(tmp_path / "a")
    second.save(tmp_path / "b")
    for name in ("tokenizer.tiktoken", "tokenizer.json", "token_bytes.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_small_text_gives_a_smaller_vocabulary():
    tok = Tokenizer.train_from_iterator(["abab"], 1000)
    assert tok.get_vocab_size() == 256 + 2 + len(SPECIAL_TOKENS)  # only "ab" and "abab" can be merged
    assert tok.encode("abab") == [257]


def test_save_and_load_round_trip(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    with pytest.raises(PicochatError, match="picochat tokenizer train"):
        get_tokenizer()
    with pytest.raises(PicochatError, match="picochat tokenizer train"):
        get_token_bytes()
    tok.save(tmp_path / "tokenizer")
    meta = json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text())
    assert meta["vocab_size"] == VOCAB and meta["special_tokens"]["<|bos|>"] == tok.get_bos_token_id()
    assert meta["pattern"] == tok.pattern
    loaded = get_tokenizer()
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    texts = [*CORPUS[:5], "unseen: Zebra 987654321 <|user_start|>"]
    assert loaded.encode(texts) == tok.encode(texts)
    assert loaded.get_special_tokens() == tok.get_special_tokens()


def test_corrupt_tokenizer_files_are_reported(tok, tmp_path):
    tok.save(tmp_path)
    ranks = tmp_path / "tokenizer.tiktoken"
    ranks.write_text(ranks.read_text().replace(" 300\n", " x\n"))
    with pytest.raises(PicochatError, match="corrupt tokenizer"):
        Tokenizer.from_directory(tmp_path)
    tok.save(tmp_path)
    meta = json.loads((tmp_path / "tokenizer.json").read_text())
    meta["vocab_size"] += 1
    (tmp_path / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(PicochatError, match="does not match"):
        Tokenizer.from_directory(tmp_path)


def test_token_bytes(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    tok.save(tmp_path / "tokenizer")
    token_bytes = get_token_bytes("cpu")
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (VOCAB,)
    for i in range(VOCAB - len(SPECIAL_TOKENS)):
        assert token_bytes[i] == len(tok.enc.decode_single_token_bytes(i))
    assert token_bytes[-len(SPECIAL_TOKENS) :].eq(0).all()
    # What bits-per-byte relies on: summing over a document's tokens gives its UTF-8 length.
    text = "".join(CORPUS[:5])
    ids = tok.encode(text, prepend="<|bos|>")
    assert token_bytes[ids].sum().item() == len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Conversations


def expected_render(tok: Tokenizer, pieces: list[tuple[str | int, int]]) -> tuple[list[int], list[int]]:
    """Build (ids, mask) from (text or special id, mask) pieces, one token at a time."""
    ids, mask = [], []
    for piece, m in pieces:
        tokens = [piece] if isinstance(piece, int) else tok.encode(piece)
        ids += tokens
        mask += [m] * len(tokens)
    return ids, mask


def test_multi_turn_mask(tok):
    conv = {
        "messages": [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Add 2 and 3"},
            {"role": "assistant", "content": "It is 5."},
        ]
    }
    ids, mask = tok.render_conversation(conv)
    assert (ids, mask) == expected_render(
        tok,
        [
            (sp(tok, "bos"), 0),
            (sp(tok, "user_start"), 0),
            ("Hi there", 0),
            (sp(tok, "user_end"), 0),
            (sp(tok, "assistant_start"), 0),
            ("Hello! How can I help?", 1),
            (sp(tok, "assistant_end"), 1),
            (sp(tok, "user_start"), 0),
            ("Add 2 and 3", 0),
            (sp(tok, "user_end"), 0),
            (sp(tok, "assistant_start"), 0),
            ("It is 5.", 1),
            (sp(tok, "assistant_end"), 1),
        ],
    )
    assert tok.render_conversation(conv, max_tokens=7) == (ids[:7], mask[:7])


TOOL_CONV = {
    "messages": [
        {"role": "user", "content": "What is 2+3?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me compute: "},
                {"type": "python", "text": "2+3"},
                {"type": "python_output", "text": "5"},
                {"type": "text", "text": "The answer is 5."},
            ],
        },
    ]
}


def test_tool_use_mask(tok):
    ids, mask = tok.render_conversation(TOOL_CONV)
    assert (ids, mask) == expected_render(
        tok,
        [
            (sp(tok, "bos"), 0),
            (sp(tok, "user_start"), 0),
            ("What is 2+3?", 0),
            (sp(tok, "user_end"), 0),
            (sp(tok, "assistant_start"), 0),
            ("Let me compute: ", 1),
            (sp(tok, "python_start"), 1),
            ("2+3", 1),
            (sp(tok, "python_end"), 1),
            (sp(tok, "output_start"), 0),
            ("5", 0),
            (sp(tok, "output_end"), 0),
            ("The answer is 5.", 1),
            (sp(tok, "assistant_end"), 1),
        ],
    )
    assert "<|python_start|>" in tok.visualize_tokens(ids, mask)


def test_system_message_is_merged_into_the_first_user_turn(tok):
    with_system = {"messages": [{"role": "system", "content": "Be brief."}, *TOOL_CONV["messages"]]}
    merged = {
        "messages": [{"role": "user", "content": "Be brief.\n\nWhat is 2+3?"}, TOOL_CONV["messages"][1]]
    }
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)
    assert with_system["messages"][1]["content"] == "What is 2+3?"  # the caller's dict is untouched


def test_render_for_completion(tok):
    ids, _ = tok.render_conversation(TOOL_CONV)
    prompt = tok.render_for_completion(TOOL_CONV)
    prefix = ids[: ids.index(sp(tok, "assistant_start")) + 1]
    assert prompt == prefix and prompt[-1] == sp(tok, "assistant_start")
    user_only = {"messages": TOOL_CONV["messages"][:1]}
    assert tok.render_for_completion(user_only) == prefix


def user(text: str = "hi") -> dict:
    return {"role": "user", "content": text}


def assistant(content: object = "hello") -> dict:
    return {"role": "assistant", "content": content}


@pytest.mark.parametrize(
    ("conversation", "problem"),
    [
        ({"messages": []}, "no messages"),
        ([user()], "must be a dict"),
        ({"messages": [assistant()]}, "should be 'user'"),
        ({"messages": [user(), user()]}, "should be 'assistant'"),
        ({"messages": [user(), assistant(), assistant()]}, "should be 'user'"),
        ({"messages": [user(), {"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
        ({"messages": [user(), {"role": "system", "content": "x"}]}, "only be the first"),
        ({"messages": [{"role": "system", "content": "x"}]}, "followed by a user"),
        ({"messages": [user(), assistant([{"type": "image", "text": "x"}])]}, "unknown part type 'image'"),
        ({"messages": [user(), assistant([{"type": "text"}])]}, "needs a string 'text'"),
        ({"messages": [user(), assistant(42)]}, "string or a list of parts"),
        ({"messages": [user(["not", "a", "string"])]}, "content must be a string"),
        ({"messages": [{"role": "user"}]}, "'role' and 'content'"),
    ],
)
def test_malformed_conversations_raise(tok, conversation, problem):
    with pytest.raises(ValueError, match=problem):
        tok.render_conversation(conversation)
    with pytest.raises(ValueError, match=problem):
        tok.render_for_completion(conversation)


# ---------------------------------------------------------------------------------------------
# The commands, on a tiny corpus of "downloaded" shards


@pytest.fixture
def hub_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    shards = [CORPUS[0::2], CORPUS[1::2], [VAL_TEXT]]  # the last shard is validation
    (tmp_path / "base_data").mkdir()
    for i, docs in enumerate(shards):
        pq.write_table(pa.table({"text": docs}), tmp_path / "base_data" / f"shard_{i:05d}.parquet")
    return tmp_path


def test_train_command(hub_home, capsys):
    argv = ["--vocab-size", "400", "--source", "hub", "--max-chars", "2e3", "--doc-cap", "50"]
    assert tok_train.main(argv) == 0
    assert "chars/s" in capsys.readouterr().out
    section = json.loads((hub_home / "report" / "tokenizer.json").read_text())
    assert section["train_chars"] == 2000 and section["doc_cap"] == 50 and section["vocab_size"] <= 400
    assert section["train_seconds"] > 0 and section["chars_per_second"] > 0
    assert get_tokenizer().get_vocab_size() == section["vocab_size"]
    for shard in sorted((hub_home / "base_data").iterdir())[1:]:
        shard.unlink()
    with pytest.raises(PicochatError, match="picochat download"):
        tok_train.main(["--source", "hub"])


def test_capped_texts_respect_both_limits():
    stats = {"documents": 0, "chars": 0}
    texts = list(
        tok_train.capped_texts(iter(["a" * 10, "b" * 3, "c" * 10]), doc_cap=4, max_chars=9, stats=stats)
    )
    assert texts == ["aaaa", "bbb", "cc"] and stats == {"documents": 3, "chars": 9}


def test_eval_command(hub_home, capsys):
    tok_train.main(["--vocab-size", "400", "--source", "hub"])
    capsys.readouterr()
    argv = ["--source", "hub", "--max-examples", "5", "--compare-vocab-sizes", "300"]
    assert tok_eval.main(argv) == 0
    out = capsys.readouterr().out
    assert "val-shard" in out and "tokens@300" in out
    section = json.loads((hub_home / "report" / "tokenizer-eval.json").read_text())
    tok = get_tokenizer()
    val = VAL_TEXT
    size = tok.get_vocab_size()
    assert section["val_bytes_per_token"] == pytest.approx(len(val) / len(tok.encode(val)), abs=1e-4)
    assert set(section["compression"]) == {"val-shard", *tok_eval.EVAL_SETS}
    row = section["compression"]["gsm8k"]
    assert row["bytes"] == sum(len(t.encode()) for t in tok_eval.eval_texts("gsm8k", 5))
    assert row[f"bytes/token@{size}"] > 1 and row["tokens@300"] >= row[f"tokens@{size}"]
    with pytest.raises(SystemExit):
        tok_eval.main(["--compare-vocab-sizes", "12"])


@pytest.mark.parametrize("module", [tok_train, tok_eval])
def test_every_flag_has_help(module):
    for action in module.build_parser()._actions:
        assert action.help, action.option_strings
