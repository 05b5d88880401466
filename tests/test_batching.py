"""The continuous-batching backend: batched replies equal replies run alone (so per-row positions and
masks are right), requests join mid-flight, cancelled requests free their slot, a full queue refuses,
tool calls run per row, long chats are fitted, and the real server streams through it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
import urllib.request

import openai
import pytest
import torch
from engine_fakes import ScriptedGPT, tiny_model, tiny_tokenizer
from serve_fakes import ServerThread

from picochat.checkpoint import checkpoint_dir_for, save_checkpoint
from picochat.engine import Engine
from picochat.serve.app import create_app
from picochat.serve.backend import Delta, QueueFullError, SamplingParams
from picochat.serve.batching import ContinuousBatchingBackend

CONTEXT = 128
GREEDY = SamplingParams(temperature=0.0, max_tokens=30)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def model_for(tok, slow: float = 0.0, **kw):
    """A tiny random model; `slow` seconds of sleep per forward pass let tests act mid-generation."""
    model = tiny_model(tok, sequence_len=CONTEXT, **kw)
    if slow:
        model.register_forward_hook(lambda module, args, output: time.sleep(slow))
    return model


def backend_for(model, tok, **kw) -> ContinuousBatchingBackend:
    return ContinuousBatchingBackend(Engine(model, tok), "tiny", **kw)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def reply(backend, messages, params=GREEDY, deltas: list | None = None) -> tuple[str, Delta]:
    """Run one generation to its end: (its text, its final delta)."""
    text = ""
    async for delta in backend.generate(messages, params):
        if deltas is not None:
            deltas.append(delta)
        text += delta.text
        if delta.finish_reason:
            return text, delta
    raise AssertionError("the generation ended without a finish_reason")


def record_batch_sizes(model) -> list[int]:
    sizes: list[int] = []
    model.register_forward_pre_hook(
        lambda module, args: sizes.append(args[0].shape[0]) if args[0].shape[1] == 1 else None
    )
    return sizes


QUESTIONS = [
    "hi",
    "What is 2+3? Tell me.",
    "The quick brown fox",
    "How are you today? I am fine, thank you.",
    "ok",
]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=30),
    SamplingParams(temperature=0.0, max_tokens=12),
    SamplingParams(temperature=0.9, top_k=20, max_tokens=25, seed=3),
    SamplingParams(temperature=0.0, max_tokens=40),
    SamplingParams(temperature=1.0, top_p=0.9, top_k=None, max_tokens=18, seed=11),
]


@pytest.mark.parametrize(
    "extras",
    [{}, {"value_embeds": True, "smear": True, "bigram_embeds": 2}],
    ids=["plain", "ve_smear_bigram"],
)
def test_concurrent_replies_equal_replies_run_alone(tok, extras):
    model = model_for(tok, extras=extras)
    sizes = record_batch_sizes(model)

    async def main():
        backend = backend_for(model, tok, max_batch_size=4, max_queue=8)
        alone = [await reply(backend, user(q), p) for q, p in zip(QUESTIONS, PARAMS, strict=True)]
        sizes.clear()
        together = await asyncio.gather(
            *(reply(backend, user(q), p) for q, p in zip(QUESTIONS, PARAMS, strict=True))
        )
        await backend.stop()
        return alone, together

    alone, together = asyncio.run(main())
    for (text_a, last_a), (text_b, last_b) in zip(alone, together, strict=True):
        assert text_a == text_b and len(text_a) > 5
        assert last_a == last_b and last_a.finish_reason == "length"
    assert max(sizes) == 4  # four rows decoded together; the fifth joined when a slot freed up
    engine = Engine(model, tok)
    expected, _ = engine.generate_batch(tok.render_for_completion({"messages": user("hi")}), params=GREEDY)
    assert together[0][0] == tok.decode(expected[0][-30:])  # and the same as the engine's own decoding


def test_a_request_joins_another_mid_flight(tok):
    model = model_for(tok, slow=0.003)
    sizes = record_batch_sizes(model)
    long_params = SamplingParams(temperature=0.0, max_tokens=80)

    async def main():
        backend = backend_for(model, tok, max_batch_size=4)
        alone_a = await reply(backend, user("hi"), long_params)
        alone_b = await reply(backend, user("The quick brown fox"))
        sizes.clear()
        deltas_a: list[Delta] = []
        task_a = asyncio.create_task(reply(backend, user("hi"), long_params, deltas_a))
        while sum(bool(d.text) for d in deltas_a) < 10:
            await asyncio.sleep(0.005)
        joined_b = await reply(backend, user("The quick brown fox"))
        assert not task_a.done()  # b came and went while a was generating
        joined_a = await task_a
        await backend.stop()
        return (alone_a, alone_b), (joined_a, joined_b)

    alone, joined = asyncio.run(main())
    assert joined == alone
    assert sizes[0] == 1 and 2 in sizes and sizes[-1] == 1


def test_cancelled_request_frees_its_slot_and_a_full_queue_refuses(tok):
    model = model_for(tok, slow=0.003)
    long_params = SamplingParams(temperature=0.0, max_tokens=100)

    async def main():
        backend = backend_for(model, tok, max_batch_size=1, max_queue=1)
        stream = backend.generate(user("hi"), long_params)
        texts = 0
        async for delta in stream:
            texts += bool(delta.text)
            if texts == 3:
                break
        waiting = asyncio.create_task(reply(backend, user("ok")))  # queued behind the first
        while backend.stats()["queued"] == 0:
            await asyncio.sleep(0.002)
        assert backend.stats() == {"active": 1, "queued": 1, "max_batch_size": 1}
        with pytest.raises(QueueFullError):
            await reply(backend, user("one too many"))
        await stream.aclose()  # the client went away: its slot goes to the waiting request
        text, last = await asyncio.wait_for(waiting, timeout=10)
        assert last.finish_reason == "length" and text
        assert backend.stats()["active"] == 0

        # Cancelling the task that iterates a generation (the server's way) frees the slot as well.
        task = asyncio.create_task(reply(backend, user("hi"), long_params))
        while backend.stats()["active"] == 0:
            await asyncio.sleep(0.002)
        task.cancel()
        deadline = time.monotonic() + 5
        while backend.stats()["active"] and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert backend.stats() == {"active": 0, "queued": 0, "max_batch_size": 1}
        await backend.stop()

    asyncio.run(main())


def test_tool_calls_run_per_row_inside_a_batch(tok):
    messages = user("What is 2+3?")
    start = len(tok.render_for_completion({"messages": messages}))
    sp = tok.encode_special
    script = [
        sp("<|python_start|>"),
        *tok.encode("2+3"),
        sp("<|python_end|>"),
        *[0] * (2 + len(tok.encode("5"))),  # replaced by the forced output
        *tok.encode(" It is 5."),
        sp("<|assistant_end|>"),
    ]
    model = model_for(tok, cls=ScriptedGPT, start=start, script=script)
    other = user("How are you today? I am fine, thank you. " * 2)  # positions past the script's

    async def main():
        backend = backend_for(model, tok, max_batch_size=4)
        alone = await reply(backend, other)
        deltas: list[Delta] = []
        together = await asyncio.gather(reply(backend, messages, GREEDY, deltas), reply(backend, other))
        await backend.stop()
        return alone, together, deltas

    alone, (tool_reply, other_reply), deltas = asyncio.run(main())
    assert other_reply == alone
    merged: list[list[str]] = []
    for d in deltas:
        if d.text and merged and merged[-1][0] == d.kind:
            merged[-1][1] += d.text
        elif d.text:
            merged.append([d.kind, d.text])
    assert merged == [["python", "2+3"], ["python_output", "5"], ["text", " It is 5."]]
    assert tool_reply[1].finish_reason == "stop"
    assert tool_reply[1].completion_tokens == len(script)  # forced tokens count, the stop token too


def test_a_chat_longer_than_the_context_is_fitted_with_a_notice(tok):
    model = model_for(tok)
    messages = []
    for i in range(12):
        messages += [
            {"role": "user", "content": f"question {i}: how are you today?"},
            {"role": "assistant", "content": "I am fine, thank you for asking."},
        ]
    messages.append({"role": "user", "content": "and now?"})

    async def main():
        backend = backend_for(model, tok)
        deltas: list[Delta] = []
        text, last = await reply(backend, messages, SamplingParams(temperature=0.0, max_tokens=500), deltas)
        await backend.stop()
        return deltas, last

    deltas, last = asyncio.run(main())
    assert "dropped" in deltas[0].notice
    assert last.finish_reason == "length"
    assert last.prompt_tokens <= CONTEXT // 2  # the reply asked for more than the context: half each
    assert last.prompt_tokens + last.completion_tokens == CONTEXT


def test_the_real_server_streams_through_the_backend(tok):
    model = model_for(tok)
    backend = backend_for(model, tok, max_batch_size=2)
    with ServerThread(create_app(backend)) as server:
        client = openai.OpenAI(api_key="none", base_url=server.url + "/v1", max_retries=0, timeout=30)
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=user("hi"), stream=True, temperature=0, max_tokens=30
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        whole = client.chat.completions.create(
            model="tiny", messages=user("hi"), temperature=0, max_tokens=30
        )
        assert streamed == whole.choices[0].message.content and len(streamed) > 5
        assert whole.usage.completion_tokens == 30 and whole.choices[0].finish_reason == "length"
        with urllib.request.urlopen(server.url + "/health") as response:
            health = json.load(response)
        assert health["active"] == 0 and health["queued"] == 0 and health["max_context"] == CONTEXT


def test_from_checkpoint_serves_a_saved_model(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    tok.save(tmp_path / "tokenizer")
    model = model_for(tok)
    meta = {"model_config": dataclasses.asdict(model.config)}
    save_checkpoint(checkpoint_dir_for("mid", "d2"), 3, model.state_dict(), None, meta)
    threads = torch.get_num_threads()
    try:
        backend = ContinuousBatchingBackend.from_checkpoint(
            source="mid", model_tag=None, step=None, device_type="cpu", max_batch_size=2, max_queue=1
        )
        assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) - 1)  # a core for HTTP
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: do not slow down other tests
    assert (backend.model_name, backend.max_context) == ("picochat-mid-d2", CONTEXT)

    async def main():
        fresh = backend_for(model, tok)
        results = [await reply(b, user("hi")) for b in (backend, fresh)]
        for b in (backend, fresh):
            await b.stop()
        return results

    loaded, fresh = asyncio.run(main())
    assert loaded == fresh


def boom_tool(code: str) -> str:
    raise RuntimeError(f"the tool exploded on {code!r}")


@pytest.mark.parametrize("attack", ["tiny_temperature", "raising_tool", "bad_logit_bias"])
def test_an_attacker_request_cannot_break_a_victim_stream(tok, attack):
    """A victim stream runs next to an attacker whose row overflows (temperature 1e-38), raises (its
    tool call) or carries a bad setting; the victim's reply is exactly what it is alone."""
    attacker_messages = user("What is 2+3?")
    start = len(tok.render_for_completion({"messages": attacker_messages}))
    script = [
        tok.encode_special("<|python_start|>"),
        *tok.encode("2+3"),
        tok.encode_special("<|python_end|>"),
    ]
    model = model_for(tok, slow=0.002, cls=ScriptedGPT, start=start, script=script)
    victim = user("How are you today? I am fine, thank you. " * 2)  # positions past the script's
    attacker = SamplingParams(temperature=0.9, max_tokens=40)
    if attack == "tiny_temperature":
        attacker = SamplingParams(temperature=1e-38, max_tokens=40)
    elif attack == "bad_logit_bias":
        attacker = SamplingParams(logit_bias=((10**6, 5.0),), max_tokens=40)
    victim_params = SamplingParams(temperature=0.8, top_k=20, seed=5, max_tokens=60)

    async def main():
        tool = boom_tool if attack == "raising_tool" else (lambda code: "5")
        backend = ContinuousBatchingBackend(Engine(model, tok, tool=tool), "tiny", max_batch_size=4)
        alone = await reply(backend, victim, victim_params)
        victim_task = asyncio.create_task(reply(backend, victim, victim_params))
        attacker_outcome = await asyncio.gather(
            reply(backend, attacker_messages, attacker), return_exceptions=True
        )
        together = await victim_task
        after = await reply(backend, victim, victim_params)  # the server still serves
        await backend.stop()
        return alone, together, after, attacker_outcome[0]

    alone, together, after, outcome = asyncio.run(main())
    assert together == alone == after and together[1].finish_reason == "length"
    if attack == "tiny_temperature":  # treated as greedy: it completes too
        text, last = outcome
        assert last.finish_reason == "length" and "5" in text
    elif attack == "raising_tool":
        assert isinstance(outcome, RuntimeError) and "exploded" in str(outcome)
    else:
        assert isinstance(outcome, RuntimeError) and "outside the vocabulary" in str(outcome)


def test_logprobs_ride_on_the_deltas_that_carry_their_text(tok):
    model = model_for(tok)
    params = SamplingParams(temperature=0.0, max_tokens=20, logprobs=True, top_logprobs=3)

    async def main():
        backend = backend_for(model, tok)
        deltas: list[Delta] = []
        text, _ = await reply(backend, user("hi"), params, deltas)
        plain, _ = await reply(backend, user("hi"), dataclasses.replace(params, logprobs=False))
        await backend.stop()
        return text, plain, deltas

    text, plain, deltas = asyncio.run(main())
    assert text == plain
    carried = [lp for d in deltas for lp in d.logprobs]
    assert len(carried) == 20
    for d in deltas:  # each delta's tokens spell its text (a token alone may hold half a character)
        assert bytes(b for lp in d.logprobs for b in lp.bytes).decode(errors="replace") == d.text
    for lp in carried:  # greedy: the chosen token is the most likely one
        assert len(lp.top) == 3 and lp.top[0].token == lp.token
        assert lp.logprob == pytest.approx(lp.top[0].logprob) and lp.logprob <= 0


def test_complete_continues_raw_tokens_and_score_reads_the_prompt(tok):
    model = model_for(tok)
    prompt = tok.encode("The quick brown fox", prepend=tok.get_bos_token_id())

    async def main():
        backend = backend_for(model, tok)
        pieces = [d async for d in backend.complete(prompt, SamplingParams(temperature=0.0, max_tokens=15))]
        scores = await backend.score(prompt, top_logprobs=2)
        await backend.stop()
        return pieces, scores

    pieces, scores = asyncio.run(main())
    from engine_fakes import naive_greedy

    assert "".join(d.text for d in pieces) == tok.decode(naive_greedy(model, prompt, 15))
    assert pieces[-1].finish_reason == "length" and pieces[-1].completion_tokens == 15
    logp = torch.log_softmax(model(torch.tensor([prompt]))[0], -1)
    assert scores[0] is None and len(scores) == len(prompt)
    for i, score in enumerate(scores[1:], start=1):
        assert score.logprob == pytest.approx(logp[i - 1, prompt[i]].item(), abs=1e-4)
        assert len(score.top) == 2 and score.top[0].logprob >= score.top[1].logprob


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(tok, monkeypatch):
    import picochat.serve.batching as batching

    monkeypatch.setattr(batching, "PREFILL_CHUNK", 8)
    model = model_for(tok, slow=0.002)
    shapes: list[tuple[int, int]] = []
    model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    long_question = user("How are you today? I am fine, thank you. " * 3)

    async def main():
        backend = backend_for(model, tok, max_batch_size=2)
        alone = await reply(backend, long_question)
        deltas: list[Delta] = []
        first = asyncio.create_task(
            reply(backend, user("hi"), SamplingParams(temperature=0.0, max_tokens=60), deltas)
        )
        while sum(bool(d.text) for d in deltas) < 3:
            await asyncio.sleep(0.002)
        shapes.clear()
        joined = await reply(backend, long_question)
        await first
        await backend.stop()
        return alone, joined

    alone, joined = asyncio.run(main())
    assert joined == alone
    prefills = [i for i, (_, t) in enumerate(shapes) if t > 1]
    assert all(shapes[i][1] <= 8 for i in prefills) and len(prefills) > 3
    decodes_between = [shape for shape in shapes[prefills[0] : prefills[-1]] if shape[1] == 1]
    assert len(decodes_between) >= len(prefills) - 1  # the running stream kept decoding meanwhile
