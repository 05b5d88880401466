"""The inference engine: KV-cache decoding equals a plain full forward, sampling, tool calls, stop
tokens, context limits, fitting long chats, and `picochat chat -p` end to end on a tiny checkpoint."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys

import pytest
import torch
from engine_fakes import ScriptedGPT, naive_greedy, tiny_model, tiny_tokenizer

from picochat import decode_head
from picochat.checkpoint import checkpoint_dir_for, save_checkpoint
from picochat.common import PicochatError
from picochat.decode_head import DecodeHead
from picochat.engine import (
    Engine,
    ReplyText,
    RowState,
    fit_conversation,
    prompt_budget,
)
from picochat.sampling import SamplingParams as P


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


def prompt(tok, text: str = "What is 2+3?") -> list[int]:
    return tok.render_for_completion({"messages": [{"role": "user", "content": text}]})


def sp(tok, name: str) -> int:
    return tok.encode_special(f"<|{name}|>")


def test_greedy_with_cache_equals_full_forward_token_for_token(tok, model):
    tokens = prompt(tok)
    expected = naive_greedy(model, tokens, 40)
    sequences, masks = Engine(model, tok).generate_batch(tokens, 3, params=P(max_tokens=40, temperature=0))
    for sequence, mask in zip(sequences, masks, strict=True):
        assert sequence == tokens + expected
        assert mask == [0] * len(tokens) + [1] * 40
    assert len(set(expected)) > 3  # a real, varied reply, not one token repeated


def test_samples_share_one_prefill_differ_and_reproduce_with_a_seed(tok, model):
    engine = Engine(model, tok)
    tokens = prompt(tok)
    lengths = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(args[0].shape), with_kwargs=True
    )
    try:
        first, _ = engine.generate_batch(tokens, 4, params=P(max_tokens=20, temperature=1.0, seed=7))
    finally:
        hook.remove()
    assert lengths[0] == (1, len(tokens))  # the prompt is run once, for all rows...
    assert all(shape == (4, 1) for shape in lengths[1:])  # ...then the 4 rows decode together
    assert len({tuple(s) for s in first}) == 4  # temperature 1: the rows differ
    again, _ = engine.generate_batch(tokens, 4, params=P(max_tokens=20, temperature=1.0, seed=7))
    other, _ = engine.generate_batch(tokens, 4, params=P(max_tokens=20, temperature=1.0, seed=8))
    assert again == first
    assert other != first


def test_streaming_yields_one_entry_per_row_per_step(tok, model):
    steps = list(Engine(model, tok).generate(prompt(tok), 2, params=P(max_tokens=5, temperature=0)))
    assert len(steps) == 5
    assert all(len(step) == 2 and all(isinstance(t, int) and m == 1 for t, m in step) for step in steps)


def scripted_engine(tok, tokens: list[int], script: list[int], seed: int = 0) -> Engine:
    model = tiny_model(tok, seed, cls=ScriptedGPT, start=len(tokens), script=script)
    return Engine(model, tok)


@pytest.mark.parametrize("stop", ["assistant_end", "bos"])
def test_a_row_stops_at_its_stop_token(tok, stop):
    tokens = prompt(tok)
    words = tok.encode(" fine")
    engine = scripted_engine(tok, tokens, [*words, sp(tok, stop)])
    steps = [step[0] for step in engine.stream(tokens, params=P(max_tokens=30, temperature=0.7, seed=1))]
    assert [s.token for s in steps] == [*words, sp(tok, stop)]
    assert [s.finish_reason for s in steps] == [None] * len(words) + ["stop"]
    sequences, _ = engine.generate_batch(tokens, 2, params=P(max_tokens=30, temperature=0))
    assert sequences == [tokens + words] * 2  # the stop token is not part of the sequence


def test_tool_call_output_is_forced_into_the_row(tok):
    tokens = prompt(tok)
    code, after = tok.encode("2+3"), tok.encode(" The answer is 5.")
    forced = [sp(tok, "output_start"), *tok.encode("5"), sp(tok, "output_end")]
    wrong = tok.encode("7")[0]  # what the model "wants" while the output is being forced
    script = [sp(tok, "python_start"), *code, sp(tok, "python_end"), *[wrong] * len(forced), *after]
    engine = scripted_engine(tok, tokens, [*script, sp(tok, "assistant_end")])

    sequences, masks = engine.generate_batch(tokens, 2, params=P(max_tokens=40, temperature=0))
    reply = [sp(tok, "python_start"), *code, sp(tok, "python_end"), *forced, *after]
    assert sequences == [tokens + reply] * 2
    sampled = [1] * (len(code) + 2) + [0] * len(forced) + [1] * len(after)
    assert masks == [[0] * len(tokens) + sampled] * 2

    text = ReplyText(tok)
    pieces = [
        p
        for (step,) in engine.stream(tokens, params=P(temperature=0))
        for p in text.feed(step.token, step.kind)
    ]
    merged: list[list[str]] = []
    for kind, piece, _ in pieces + text.flush():
        if merged and merged[-1][0] == kind:
            merged[-1][1] += piece
        else:
            merged.append([kind, piece])
    assert merged == [["python", "2+3"], ["python_output", "5"], ["text", " The answer is 5."]]


def test_failed_tool_call_forces_nothing(tok):
    tokens = prompt(tok)
    bad = tok.encode("2+")
    script = [
        sp(tok, "python_start"),
        *bad,
        sp(tok, "python_end"),
        *tok.encode(" ok"),
        sp(tok, "assistant_end"),
    ]
    sequences, masks = scripted_engine(tok, tokens, script).generate_batch(
        tokens, params=P(max_tokens=30, temperature=0)
    )
    assert sequences[0] == tokens + script[:-1]
    assert 0 not in masks[0][len(tokens) :]


def test_row_state_budget_and_forced_tokens(tok):
    from picochat.engine import ChatTokens

    chat = ChatTokens.from_tokenizer(tok, tool=lambda code: f"<{code}>")
    row = RowState(chat, max_tokens=4)
    assert row.next_token(sp(tok, "python_start")).kind is None
    assert row.next_token(tok.encode("x")[0]) == (tok.encode("x")[0], 1, "python", None)
    assert row.next_token(sp(tok, "python_end")).kind is None
    assert list(row.forced) == [sp(tok, "output_start"), *tok.encode("<x>"), sp(tok, "output_end")]
    last = row.next_token(123)  # the sampled 123 is ignored: a forced token comes first
    assert (last.token, last.mask, last.finish_reason) == (sp(tok, "output_start"), 0, "length")


def test_generation_stops_with_length_at_the_end_of_the_context(tok, model):
    engine = Engine(model, tok)
    tokens = prompt(tok)
    steps = [step[0] for step in engine.stream(tokens, params=P(max_tokens=None, temperature=0))]
    assert len(tokens) + len(steps) == engine.max_context == 64
    assert steps[-1].finish_reason == "length" and all(s.finish_reason is None for s in steps[:-1])
    assert len(list(engine.generate(tokens, params=P(max_tokens=1000, temperature=0)))) == 64 - len(tokens)
    with pytest.raises(ValueError, match="no room in the model's context"):
        list(engine.generate(list(range(64))))


def test_reply_text_never_splits_a_character(tok):
    text = "héllo wörld 😀 ünïcödé ✓"
    stream = ReplyText(tok)
    pieces = [p for t in tok.encode(text) for p in stream.feed(t, "text")] + stream.flush()
    assert "".join(piece.text for piece in pieces) == text
    assert not any("\ufffd" in piece.text for piece in pieces)
    assert sum(piece.tokens for piece in pieces) == len(tok.encode(text))  # every token in one piece


def chat(*turns: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": messages}


def test_fit_conversation_drops_oldest_turns_and_keeps_the_system_prompt(tok):
    conversation = chat(*(f"message number {i} " * 3 for i in range(9)), system="Be brief.")
    full = len(tok.render_for_completion(conversation))
    same, dropped = fit_conversation(tok, conversation, full)
    assert (same, dropped) == (conversation, 0)

    fitted, dropped = fit_conversation(tok, conversation, full - 1)
    assert dropped == 2
    assert fitted["messages"] == conversation["messages"][:1] + conversation["messages"][3:]

    budget = full // 2
    fitted, dropped = fit_conversation(tok, conversation, budget)
    messages = fitted["messages"]
    assert len(tok.render_for_completion(fitted)) <= budget
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["role"] == "user" and messages[-1] == conversation["messages"][-1]
    assert messages[1:] == conversation["messages"][-len(messages) + 1 :]
    assert dropped == len(conversation["messages"]) - len(messages) > 2


def test_fit_conversation_shortens_a_single_huge_message(tok):
    long_text = "start " + "blah " * 300 + "the end"
    fitted, dropped = fit_conversation(tok, chat("hi", "hello", long_text, system="Sys."), 40)
    assert len(tok.render_for_completion(fitted)) <= 40
    assert fitted["messages"][0]["content"] == "Sys."
    assert fitted["messages"][1]["content"].endswith("the end")
    assert dropped == 3  # two turns removed, one shortened
    fitted, _ = fit_conversation(tok, chat("hi", system="S" * 500), 20)
    assert fitted == {"messages": [{"role": "user", "content": "hi"}]}  # a system prompt that cannot fit


def test_prompt_budget_leaves_room_for_the_reply():
    assert prompt_budget(1024, 100) == 924
    assert prompt_budget(1024, 5000) == 512  # the prompt always keeps at least half the context


def test_chat_one_shot_on_a_tiny_checkpoint(tok, model, tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))  # read by the subprocess too
    tok.save(tmp_path / "tokenizer")
    cmd = [sys.executable, "-m", "picochat.chat", "-p", "What is 2+3?", "-t", "0", "--max-new-tokens", "12"]

    missing = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1
    assert "runs/cpu.sh" in missing.stderr and "picochat train sft" in missing.stderr

    meta = {"model_config": dataclasses.asdict(model.config)}
    save_checkpoint(checkpoint_dir_for("sft", "d2"), 5, model.state_dict(), None, meta)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == tok.decode(naive_greedy(model, prompt(tok), 12)).strip()
    bf16 = subprocess.run([*cmd, "--bf16-head"], capture_output=True, text=True, timeout=120)
    if decode_head.bf16_head_problem():  # refused in one line, naming the flag
        assert bf16.returncode == 1 and "--bf16-head" in bf16.stderr and "Traceback" not in bf16.stderr
    else:
        assert bf16.returncode == 0 and bf16.stdout.strip(), bf16.stderr

    # Interactive: two exchanges, /clear, and Ctrl-D (end of input) to leave.
    session = subprocess.run(
        [sys.executable, "-m", "picochat.chat", "-t", "0", "--max-new-tokens", "4", "--system", "Be brief."],
        input="hello\n/clear\nWhat is 2+3?\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert session.returncode == 0, session.stderr
    assert session.stdout.count("Assistant: ") == 2 and "(new conversation)" in session.stdout


def test_chat_shows_tool_calls_and_dropped_turns(tok, capsys):
    from argparse import Namespace

    from picochat.chat import Chat

    tokens = prompt(tok)
    code = tok.encode("2+3")
    script = [
        sp(tok, "python_start"),
        *code,
        sp(tok, "python_end"),
        *[0] * 3,
        *tok.encode(" Five."),
        sp(tok, "assistant_end"),
    ]
    engine = scripted_engine(tok, tokens, script)
    args = Namespace(system=None, max_new_tokens=20, temperature=0.0, top_k=50, top_p=1.0, seed=None)
    out = io.StringIO()
    chat = Chat(engine, args, out)
    chat.reply("What is 2+3?")
    assert out.getvalue() == " [python] 2+3 -> 5 Five.\n"
    assert chat.messages[-1]["content"] == [
        {"type": "python", "text": "2+3"},
        {"type": "python_output", "text": "5"},
        {"type": "text", "text": " Five."},
    ]
    for _ in range(6):  # the 64-token context fills up: old turns go, with a notice on stderr
        chat.reply("What is 2+3? " * 3)
    assert "dropped or shortened" in capsys.readouterr().err
    assert len(tok.render_for_completion({"messages": chat.messages[:-1]})) <= prompt_budget(64, 20)


@pytest.mark.parametrize("rows", [1, 3])  # batch 1 takes the transposed copy, larger batches oneDNN's
def test_decode_head_matches_the_lm_head_and_follows_weight_changes(tok, rows):
    model = tiny_model(tok, seed=3)
    head = DecodeHead(model)
    x = torch.randn(rows, 1, model.config.n_embd)
    assert head.layout(rows) in ("transposed", "onednn", "rowmajor")
    with torch.inference_mode():
        torch.testing.assert_close(head(x), model.lm_head(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an optimiser step changes the weight in place: the copies must follow
        model.lm_head.weight.mul_(-2.0)
    with torch.inference_mode():
        torch.testing.assert_close(head(x), model.lm_head(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(bool(decode_head.bf16_head_problem()), reason="this CPU has no bf16 oneDNN path")
@pytest.mark.parametrize("rows", [1, 8])
def test_the_bf16_head_gives_the_fp32_logits_to_bf16_precision_and_follows_weight_changes(tok, rows):
    model = tiny_model(tok, seed=3)
    head = DecodeHead(model, bf16=True)
    x = torch.randn(rows, 1, model.config.n_embd)
    assert head.layout(rows) == "onednn_bf16"
    for _ in range(2):
        with torch.inference_mode():
            out, exact = head(x), model.lm_head(x)
        assert out.dtype == torch.float32 and out.shape == exact.shape
        torch.testing.assert_close(out, exact, rtol=0.02, atol=0.02 * exact.abs().max().item())
        assert not torch.equal(out, exact)  # it really is a bf16 product
        with torch.no_grad():  # an optimiser step changes the weight in place: the copy must follow
            model.lm_head.weight.mul_(-2.0)


def test_the_bf16_head_is_refused_in_one_line_where_the_cpu_lacks_bf16(tok, monkeypatch):
    monkeypatch.setattr(decode_head, "_bf16_supported", lambda: False)
    with pytest.raises(PicochatError, match="needs a CPU with AVX512 or AMX bf16 support.*drop the flag"):
        Engine(tiny_model(tok), tok, bf16_head=True)
    Engine(tiny_model(tok), tok)  # fp32 (the default) needs nothing


def test_decode_head_never_yields_logits_past_the_vocabulary(tok):
    model = tiny_model(tok)
    vocab = model.config.vocab_size
    padded = torch.nn.Linear(model.config.n_embd, vocab + 64, bias=False)  # a vocabulary padded to 64
    with torch.no_grad():
        padded.weight[:vocab] = model.lm_head.weight
    model.lm_head = padded
    with torch.inference_mode():
        for rows in (1, 4):
            assert DecodeHead(model)(torch.randn(rows, model.config.n_embd)).shape == (rows, vocab)


def test_greedy_batch_1_equals_full_forward(tok, model):
    tokens = prompt(tok, "Hello there!")
    sequences, _ = Engine(model, tok).generate_batch(tokens, 1, params=P(max_tokens=30, temperature=0))
    assert sequences[0] == tokens + naive_greedy(model, tokens, 30)


def test_a_reply_longer_than_the_first_cache_grows_it_and_stays_exact(tok, monkeypatch):
    """The decode cache starts small and doubles (engine.CACHE_GROWTH): greedy replies that cross two
    growths, with the windows and extras of train base's defaults, equal a full forward's."""
    monkeypatch.setattr("picochat.engine.CACHE_GROWTH", 4)
    extras = {"window_pattern": "SL", "short_window": 4, "bigram_embeds": 2, "smear": True}
    model = tiny_model(tok, seed=5, sequence_len=128, extras=extras)
    tokens = prompt(tok, "Hello there!")
    sequences, _ = Engine(model, tok).generate_batch(tokens, 2, params=P(max_tokens=20, temperature=0))
    expected = tokens + naive_greedy(model, tokens, 20)
    assert sequences == [expected[: len(s)] for s in sequences] and len(sequences[0]) > len(tokens) + 8
