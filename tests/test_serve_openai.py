"""Every parameter of OpenAI's chat-completions and (legacy) completions reference, through the official
`openai` client: each one picochat accepts reaches the backend (or shapes the reply), each one it refuses
gets a 400 naming it. Against a real uvicorn server with two fake models (tests/serve_fakes.py)."""

from __future__ import annotations

import http.client
import json
import sys
import types

import openai
import pytest
from serve_fakes import FakeBackend, ServerThread, completion_words, echo_text

from picochat.common import PicochatError
from picochat.serve import app as serve_app
from picochat.serve.app import create_app
from picochat.serve.protocol import Limits

MODEL, OTHER = "fake-d4", "fake-base-d4"
LIMITS = Limits(max_tokens=64, default_max_tokens=32, max_n=3)


@pytest.fixture(scope="module")
def backends():
    return FakeBackend(model_name=MODEL), FakeBackend(model_name=OTHER)


@pytest.fixture(scope="module")
def client(backends):
    with ServerThread(create_app(list(backends), limits=LIMITS)) as running:
        yield openai.OpenAI(api_key="unused", base_url=running.url + "/v1", max_retries=0, timeout=30)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def params_for(backend: FakeBackend, question: str):
    found = [p for m, p in backend.requests if (m if isinstance(m, str) else m[-1]["content"]) == question]
    assert found, f"the backend never saw {question!r}"
    return found[-1]


# ---------------------------------------------------------------------------------------------
# Chat completions: accepted parameters


def test_sampling_parameters_reach_the_backend(client, backends):
    client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "developer", "content": "Be brief."}, *user("all params")],
        temperature=0.3,
        top_p=0.9,
        max_completion_tokens=40,
        seed=11,
        frequency_penalty=0.5,
        presence_penalty=-1.25,
        logit_bias={"65": 5, "3": -100},
        user="someone",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        response_format={"type": "text"},
        extra_body={"top_k": 5},
    )
    p = params_for(backends[0], "all params")
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed) == (0.3, 0.9, 5, 40, 11)
    assert (p.frequency_penalty, p.presence_penalty) == (0.5, -1.25)
    assert p.logit_bias == ((3, -100.0), (65, 5.0))
    assert backends[0].requests[-1][0][0] == {"role": "system", "content": "Be brief."}


def test_server_defaults_are_explicit(client, backends):
    client.chat.completions.create(model=MODEL, messages=user("defaults"), max_tokens=7)
    p = params_for(backends[0], "defaults")
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (0.8, 50, 1.0, 7)
    assert (p.frequency_penalty, p.presence_penalty, p.logit_bias, p.logprobs) == (0.0, 0.0, (), False)


def test_tiny_temperature_is_greedy(client, backends):
    client.chat.completions.create(model=MODEL, messages=user("tiny t"), temperature=1e-38)
    assert params_for(backends[0], "tiny t").temperature == 0.0


def test_logprobs_plain(client):
    reply = client.chat.completions.create(model=MODEL, messages=user("hello"), logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content == echo_text("hello")
    first = content[0]
    assert first.logprob == -0.5 and first.bytes == list(first.token.encode())
    assert [t.token for t in first.top_logprobs] == [first.token, "alt0"]
    assert [t.logprob for t in first.top_logprobs] == [-0.5, -1.5]
    plain = client.chat.completions.create(model=MODEL, messages=user("hello"))
    assert plain.choices[0].logprobs is None


def test_logprobs_streaming_and_stop(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=user("hello"), logprobs=True, stream=True, stop=["fake"]
    )
    text, tokens = "", []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += [t.token for t in chunk.choices[0].logprobs.content]
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    assert text == "Echo: hello. This is a "
    assert "".join(tokens) == text  # the tokens cut off by the stop sequence carry no logprobs


def test_tool_outputs_carry_no_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=user("calc 2+3"), logprobs=True)
    tokens = [t.token for t in reply.choices[0].logprobs.content]
    assert "2+" in tokens and "3" in tokens and "5" not in tokens  # the tool's "5" was forced, not sampled


def test_n_stream_usage_and_stop_still_work_together(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=user("twice"),
            n=2,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
            presence_penalty=0.1,
        )
    )
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: echo_text("twice", 1), 1: echo_text("twice", 2)}
    assert chunks[-1].usage.prompt_tokens == 1 and chunks[-1].usage.completion_tokens == 16


# ---------------------------------------------------------------------------------------------
# Models


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list().data] == [MODEL, OTHER]
    assert client.models.retrieve(OTHER).id == OTHER
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.code == "model_not_found"


def test_model_chooses_the_backend(client, backends):
    reply = client.chat.completions.create(model=OTHER, messages=user("which model"))
    assert reply.model == OTHER
    params_for(backends[1], "which model")
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert info.value.code == "model_not_found" and info.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi")


def test_main_serves_several_models_and_defaults_to_the_newest_stage(monkeypatch, tmp_path, capsys):
    built = []

    class Loader:
        @staticmethod
        def from_checkpoint(**kwargs):
            built.append((kwargs["source"], kwargs["model_tag"], kwargs["step"]))
            return FakeBackend(model_name=f"picochat-{kwargs['source']}-{kwargs['model_tag']}")

    monkeypatch.setitem(
        sys.modules, "picochat.serve.batching", types.SimpleNamespace(ContinuousBatchingBackend=Loader)
    )
    apps = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: apps.append(app))
    assert serve_app.main(["--model", "base:d4", "--model", "sft:d6", "--cors-origin", "http://x:3000"]) == 0
    assert built == [("base", "d4", None), ("sft", "d6", None)]
    with ServerThread(apps[-1]) as running:
        client = openai.OpenAI(api_key="-", base_url=running.url + "/v1", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["picochat-base-d4", "picochat-sft-d6"]
    with pytest.raises(SystemExit):
        serve_app.main(["--model", "final:d4"])
    with pytest.raises(PicochatError, match="--model replaces"):
        serve_app.main(["--model", "sft", "-i", "mid"])

    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    (tmp_path / "checkpoints" / "rl" / "d4" / "step_000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "rl" / "d4" / "step_000001" / "meta.json").write_text("{}")
    built.clear()
    capsys.readouterr()
    assert serve_app.main([]) == 0
    assert built == [("rl", None, None)]
    assert "serving the rl model (the newest trained stage" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Chat completions: refused parameters


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(
    ("param", "kwargs"),
    [
        ("tools", {"tools": [TOOL]}),
        ("tool_choice", {"tool_choice": "auto"}),
        ("parallel_tool_calls", {"parallel_tool_calls": False}),
        ("functions", {"functions": [TOOL["function"]]}),
        ("function_call", {"function_call": "auto"}),
        ("response_format", {"response_format": {"type": "json_object"}}),
        (
            "response_format",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
        ),
        ("audio", {"audio": {"voice": "alloy", "format": "wav"}}),
        ("modalities", {"modalities": ["text", "audio"]}),
        ("prediction", {"prediction": {"type": "content", "content": "x"}}),
        ("web_search_options", {"web_search_options": {}}),
        ("reasoning_effort", {"reasoning_effort": "low"}),
        ("verbosity", {"verbosity": "low"}),
        ("store", {"store": True}),
        ("top_logprobs", {"top_logprobs": 2}),
        ("top_logprobs", {"logprobs": True, "top_logprobs": 21}),
        ("logit_bias", {"logit_bias": {"65": 101}}),
        ("logit_bias", {"logit_bias": {"not-a-token": 1}}),
        ("logit_bias", {"logit_bias": {"999999": 1}}),
        ("frequency_penalty", {"frequency_penalty": 2.5}),
        ("presence_penalty", {"presence_penalty": -3}),
        ("temperature", {"temperature": 2.5}),
        ("top_p", {"top_p": 0}),
        ("max_completion_tokens", {"max_completion_tokens": 65}),
        ("n", {"n": 4}),
        ("seed", {"seed": 1.5}),
    ],
)
def test_refused_chat_parameters_name_themselves(client, backends, param, kwargs):
    seen = len(backends[0].requests)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=user("refuse me"), **kwargs)
    assert info.value.param == param, info.value
    assert param in info.value.message
    assert len(backends[0].requests) == seen


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("param", ["temperature", "top_p", "frequency_penalty"])
def test_non_finite_numbers_are_refused(client, literal, param):
    # The openai client will not send NaN; Python's json module would parse it from anyone else.
    body = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "nan"}}], "{param}": {literal}}}'
    conn = http.client.HTTPConnection(client.base_url.host, client.base_url.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 400
    assert json.loads(response.read())["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------------------------
# Legacy completions


def test_completion_plain(client, backends):
    reply = client.completions.create(
        model=OTHER,
        prompt="Once upon",
        max_tokens=20,
        temperature=0,
        top_p=0.5,
        seed=3,
        frequency_penalty=1,
        presence_penalty=1,
        logit_bias={"66": -5},
        user="u",
        best_of=1,
        extra_body={"top_k": 0},
    )
    assert reply.object == "text_completion" and reply.model == OTHER
    assert reply.choices[0].text == "".join(completion_words("Once upon"))
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].logprobs is None
    assert reply.usage.prompt_tokens == len("Once upon") + 1  # bytes + <|bos|>
    p = params_for(backends[1], "Once upon")
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens) == (0.0, 0.5, None, 3, 20)
    assert (p.frequency_penalty, p.presence_penalty, p.logit_bias) == (1.0, 1.0, ((66, -5.0),))


def test_completion_token_prompt_batch_n_and_stop(client):
    ids = [b + 1 for b in b"Hi"]
    reply = client.completions.create(model=MODEL, prompt=["ab", "cde"], n=2, max_tokens=3, stop=[" w2"])
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == [" w0 w1"] * 4
    assert all(c.finish_reason == "stop" for c in reply.choices)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=2)
    assert by_ids.choices[0].text == " w0 w1" and by_ids.choices[0].finish_reason == "length"


def test_completion_streaming(client):
    stream = client.completions.create(
        model=MODEL, prompt="abc", stream=True, stream_options={"include_usage": True}, logprobs=1
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "".join(completion_words("abc"))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert "".join(tokens) == text
    assert chunks[-1].usage.completion_tokens == len(completion_words("abc"))


def test_completion_echo_logprobs_scores_the_prompt(client):
    """What lm-evaluation-harness sends to score a continuation: echo, logprobs, max_tokens 0 or 1."""
    for max_tokens in (0, 1):
        reply = client.completions.create(
            model=MODEL, prompt="The cat", echo=True, logprobs=2, max_tokens=max_tokens, temperature=0
        )
        choice = reply.choices[0]
        assert choice.text.startswith("The cat")
        lp = choice.logprobs
        assert lp.tokens[:7] == list("The cat")  # <|bos|> is not shown; every prompt token has a score
        assert lp.token_logprobs[:7] == [-(b + 1) / 100 for b in b"The cat"]
        assert list(lp.top_logprobs[0]) == ["T", "alt0"]
        assert lp.text_offset[:7] == list(range(7))
        assert len(lp.tokens) == 7 + max_tokens
    echo_only = client.completions.create(model=MODEL, prompt="xy", echo=True, max_tokens=1)
    assert echo_only.choices[0].text == "xy w0" and echo_only.choices[0].logprobs is None


@pytest.mark.parametrize(
    ("param", "kwargs"),
    [
        ("suffix", {"suffix": "end"}),
        ("best_of", {"best_of": 3}),
        ("max_tokens", {"max_tokens": 0}),  # only with echo
        ("logprobs", {"logprobs": 6}),
        ("prompt", {"prompt": 5}),
        ("prompt", {"prompt": [[1, 2], "ok", 3]}),
        ("prompt", {"prompt": [300]}),  # outside the vocabulary
        ("prompt", {"prompt": "x" * 1000, "max_tokens": 64}),  # prompt + max_tokens > context
        ("temperature", {"temperature": -1}),
    ],
)
def test_refused_completion_parameters_name_themselves(client, param, kwargs):
    kwargs = {"prompt": "hi", **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, **kwargs)
    assert info.value.param == param, info.value
