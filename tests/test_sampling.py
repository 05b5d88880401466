"""SamplingParams validation and the batched sampler: filters, per-row settings in one batch, seeds
independent of the batch, OpenAI penalties, logit_bias and log-probabilities."""

from __future__ import annotations

import math
import random

import pytest
import torch

from picochat.sampling import BatchSampler, SamplingParams, measure_logprobs

V = 50


def sampler_for(*params: SamplingParams, vocab: int = V) -> BatchSampler:
    sampler = BatchSampler(len(params), vocab, "cpu")
    for slot, p in enumerate(params):
        sampler.assign(slot, p)
    return sampler


def draw(sampler: BatchSampler, logits: torch.Tensor, times: int) -> list[list[int]]:
    """`times` independent draws per row: [row][draw]."""
    slots = list(range(logits.size(0)))
    columns = [sampler.sample(logits, slots)[0] for _ in range(times)]
    return [list(row) for row in zip(*columns, strict=True)]


@pytest.mark.parametrize("field", ["temperature", "top_p", "frequency_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((3, value),))


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -5},
        {"top_k": 2.5},
        {"max_tokens": -1},
        {"frequency_penalty": 2.5},
        {"presence_penalty": -3.0},
        {"logit_bias": ((1, 101.0),)},
        {"logit_bias": ((-1, 1.0),)},
        {"top_logprobs": 21},
        {"top_logprobs": -1},
        {"seed": 1.5},
    ],
)
def test_out_of_range_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_tiny_temperature_is_greedy_and_top_k_zero_is_off():
    assert SamplingParams(temperature=1e-38).temperature == 0.0
    assert SamplingParams(temperature=1e-5).temperature == 1e-5
    assert SamplingParams(top_k=0).top_k is None


def test_filters_each_row_with_its_own_settings_in_one_batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, V, generator=gen) * 2
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=1, seed=1),
        SamplingParams(temperature=1.0, top_p=1e-6, seed=2),
        SamplingParams(temperature=2.0, top_k=3, seed=3),
        SamplingParams(temperature=1.0, top_k=7, top_p=0.5, seed=4),
        SamplingParams(temperature=1.0, seed=5),
    ]
    rows = draw(sampler_for(*params), logits, 200)
    top = logits.argmax(-1).tolist()
    assert set(rows[0]) == {top[0]} and set(rows[1]) == {top[1]} and set(rows[2]) == {top[2]}
    assert set(rows[3]) == set(logits[3].topk(3).indices.tolist())  # 200 draws at temperature 2: all 3
    probs = torch.softmax(logits[4].topk(7).values, -1)
    nucleus = int((probs.cumsum(-1) - probs < 0.5).sum())  # tokens needed to reach half the mass
    assert set(rows[4]) <= set(logits[4].topk(7).indices[:nucleus].tolist())
    assert len(set(rows[5])) > 10  # the whole vocabulary


def test_sampling_follows_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sampler = sampler_for(SamplingParams(temperature=0.7, seed=0), vocab=4)
    counts = torch.bincount(torch.tensor(draw(sampler, logits, 4000)[0]), minlength=4).float()
    expected = torch.softmax(logits[0] / 0.7, -1) * 4000
    assert ((counts - expected).abs() < 4 * expected.sqrt() + 5).all(), (counts, expected)


def test_a_seeded_row_does_not_depend_on_its_batch():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    seeded = SamplingParams(temperature=1.0, top_k=20, seed=42)
    alone = draw(sampler_for(seeded), logits[1:2], 30)[0]
    company = [SamplingParams(temperature=0.9, top_p=0.8), seeded, SamplingParams(temperature=0.0)]
    assert draw(sampler_for(*company), logits, 30)[1] == alone
    assert draw(sampler_for(SamplingParams(temperature=1.0, top_k=20, seed=43)), logits[1:2], 30)[0] != alone


def test_penalties_follow_openai_and_logit_bias_is_added():
    logits = torch.zeros(1, V)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, logit_bias=((7, 3.0),))
    sampler = sampler_for(params)
    for token in [4, 4, 4, 9]:
        sampler.observe([0], [token])
    expected = torch.zeros(V)
    expected[4] = -(3 * 0.5 + 0.25)
    expected[9] = -(0.5 + 0.25)
    expected[7] = 3.0
    assert torch.allclose(sampler.adjust[0], expected)
    # Greedy with the adjustments: the bias wins; a row without them is left alone.
    greedy = SamplingParams(temperature=0.0, logit_bias=((11, 1.0),), frequency_penalty=1.0)
    plain = SamplingParams(temperature=0.0)
    sampler = sampler_for(greedy, plain)
    logits = torch.zeros(2, V)
    logits[:, 11] = 0.5
    logits[:, 3] = 1.2
    assert sampler.sample(logits, [0, 1])[0] == [11, 3]
    sampler.observe([0, 1], [11, 3])  # 11 now costs 1.0: 0.5 + 1.0 - 1.0 < 1.2
    assert sampler.sample(logits, [0, 1])[0] == [3, 3]
    sampler.assign(0, plain)  # a new request in the slot starts clean
    assert torch.equal(sampler.adjust[0], torch.zeros(V))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sampler.assign(1, SamplingParams(logit_bias=((V, 1.0),)))


def test_logprobs_are_the_models_raw_distribution():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=0.5, top_k=5, logprobs=True, top_logprobs=4, logit_bias=((0, 50.0),))
    sampler = sampler_for(params, SamplingParams(temperature=0.0))
    tokens, logprobs = sampler.sample(logits, [0, 1])
    assert tokens[0] == 0 and logprobs[1] is None  # the bias decides; row 1 did not ask
    logp = torch.log_softmax(logits[0], -1)  # without temperature, bias or top-k
    assert logprobs[0].logprob == pytest.approx(logp[0].item(), abs=1e-5)
    assert [t for t, _ in logprobs[0].top] == logp.topk(4).indices.tolist()
    assert [lp for _, lp in logprobs[0].top] == pytest.approx(logp.topk(4).values.tolist(), abs=1e-5)
    assert measure_logprobs(logits, [1, 2], [0, 2])[0].top == ()


def test_rounding_never_picks_a_token_outside_the_filters():
    sampler = sampler_for(SamplingParams(temperature=1.0, top_k=2, seed=0))

    class AlmostOne(random.Random):
        def random(self) -> float:
            return 1.0 - 2**-53

    sampler.rngs[0] = AlmostOne()
    logits = torch.tensor([[5.0, 4.0] + [-30.0] * (V - 2)])
    assert sampler.sample(logits, [0])[0][0] in (0, 1)


@pytest.mark.parametrize(
    "rows",
    [
        [SamplingParams(top_k=5, seed=1), SamplingParams(top_k=20, temperature=0.7, seed=2)],  # cap late
        [SamplingParams(top_k=5, seed=1), SamplingParams(temperature=0.0)],  # greedy: cap everything
        [SamplingParams(top_k=5, seed=1, logprobs=True, top_logprobs=3)],
        [SamplingParams(top_k=5, seed=1, presence_penalty=1.0), SamplingParams(top_p=0.9, seed=3)],
    ],
)
def test_a_sampler_given_raw_logits_applies_the_soft_cap_itself(rows):
    """With `softcap`, the sampler takes the logits before the model's soft-cap: its tokens and
    logprobs equal those of a plain sampler given the capped logits, step after step (penalties
    included), whether it caps only the top-k candidates or the whole vocabulary."""
    from picochat.gpt import soft_cap

    raw = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(0)) * 40  # many saturate
    late = BatchSampler(len(rows), V, "cpu", softcap=15.0)
    plain = sampler_for(*rows)
    for slot, p in enumerate(rows):
        late.assign(slot, p)
    slots = list(range(len(rows)))
    for _ in range(20):
        tokens, logprobs = late.sample(raw, slots)
        assert (tokens, logprobs) == plain.sample(soft_cap(raw, 15.0), slots)
        late.observe(slots, tokens)
        plain.observe(slots, tokens)
