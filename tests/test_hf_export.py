"""picochat export -> transformers: logits, greedy generation, tokenizer ids and chat-template ids match."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from picochat.common import PicochatError
from picochat.gpt import GPT, GPTConfig
from picochat.hf_export import check_exportable, write_export
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXTS = [
    "hello world, the quick brown fox 12345 jumps!",
    "def f(x):\n    return x * 2\n",
    "héllo wörld 你好 🙂",
] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator(TEXTS, vocab_size=400)


@pytest.fixture(scope="module")
def export(tmp_path_factory, tokenizer):
    config = GPTConfig(
        sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2, n_embd=64
    )
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("export")
    write_export(folder, model.state_dict(), config, tokenizer, "card\n")
    return model.eval(), folder


@pytest.fixture(scope="module")
def hf_tok(export):
    return transformers.AutoTokenizer.from_pretrained(export[1])


def test_logits_and_greedy_generation_match(export):
    model, folder = export
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(hf).__name__ == "NanoChatForCausalLM"
    idx = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=1e-4)
        ours = idx[:1]
        for _ in range(12):
            ours = torch.cat([ours, model(ours)[:, -1:].argmax(-1)], dim=1)
        theirs = hf.generate(
            idx[:1], max_new_tokens=12, do_sample=False, eos_token_id=None, min_new_tokens=12
        )
    assert theirs.tolist() == ours.tolist()


def test_generation_config_stops_on_assistant_end(export, tokenizer):
    gen = json.loads((export[1] / "generation_config.json").read_text())
    assert tokenizer.encode_special("<|assistant_end|>") in gen["eos_token_id"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_tokenizer_ids_identical_on_random_unicode(tokenizer, hf_tok, text):
    # transformers matches special-token strings inside text; picochat encodes them as plain text
    # (documented in docs/huggingface.md), so those texts are the one known difference.
    assume(not any(name in text for name in SPECIAL_TOKENS))
    assert hf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert hf_tok.decode(tokenizer.encode(text)) == tokenizer.decode(tokenizer.encode(text))


def test_tokenizer_ids_identical_on_texts_and_special_tokens(tokenizer, hf_tok):
    for text in [*TEXTS[:3], "  spaces\r\n\n\ttabs 1234567 it's WE'LL", ""]:
        assert hf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    for name in SPECIAL_TOKENS:
        assert hf_tok.convert_tokens_to_ids(name) == tokenizer.encode_special(name)
        assert hf_tok.encode(name, add_special_tokens=False) == [tokenizer.encode_special(name)]


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}],
    [
        {"role": "system", "content": "You can use python."},
        {"role": "user", "content": "what is 12*34?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me compute. "},
                {"type": "python", "text": "12*34"},
                {"type": "python_output", "text": "408"},
                {"type": "text", "text": "It is 408."},
            ],
        },
        {"role": "user", "content": "and 😀 plus héllo?"},
        {"role": "assistant", "content": "No idea!"},
        {"role": "user", "content": "ok\n\nbye"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_ids_match_render_for_completion(tokenizer, hf_tok, messages):
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == tokenizer.render_for_completion({"messages": messages})


@pytest.mark.parametrize(
    "extras",
    [
        {"value_embeds": True},
        {"resid_scalars": True, "qk_scale": 1.3},
        {"value_embeds": True, "resid_scalars": True, "vocab_multiple": 64, "smear": True},
        {"smear": True},
        {"window_pattern": "SL", "short_window": 8},
        {"value_embeds": True, "smear": True, "qk_scale": 1.3, "window_pattern": "SSSL", "short_window": 5},
        {"bigram_embeds": 2},
        {"bigram_embeds": 3, "smear": True, "resid_scalars": True, "vocab_multiple": 64},
        {"attn_gate": True},
        {"attn_gate": True, "value_embeds": True, "smear": True, "window_pattern": "SSSL", "short_window": 5},
    ],
    ids=[
        "value_embeds",
        "scalars_qk_scale",
        "all_padded",
        "smear",
        "windows",
        "defaults_windows",
        "bigram",
        "bigram_smear_x0",
        "attn_gate",
        "attn_gate_defaults",
    ],
)
def test_architecture_extras_export_with_their_code_and_match(tmp_path, tokenizer, extras):
    """Value embeddings, residual/x0 scalars, a QK scale, the smear and sliding windows (shorter than the
    20-token prompt, so the cached decode crosses them) load through the shipped modeling_picochat.py
    (trust_remote_code) with the same logits and greedy tokens; a padded vocabulary exports unpadded."""
    config = GPTConfig(
        sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
        **extras,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # the extras' weights too: a dropped one changes the logits
            p.normal_(0.0, 0.3)
    write_export(tmp_path, model.state_dict(), config, tokenizer, "card\n")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "picochat"
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, trust_remote_code=True
    ).eval()
    assert type(hf).__name__ == "PicochatForCausalLM"
    assert hf.lm_head.weight.size(0) == tokenizer.get_vocab_size()
    idx = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=1e-4)
        ours = idx[:1]
        for _ in range(12):
            ours = torch.cat([ours, model(ours)[:, -1:].argmax(-1)], dim=1)
        theirs = hf.generate(  # with transformers' KV cache: the value embeddings follow the new ids
            idx[:1], max_new_tokens=12, do_sample=False, eos_token_id=None, min_new_tokens=12
        )
    assert theirs.tolist() == ours.tolist()


def test_unsupported_setting_is_refused_by_name(monkeypatch):
    import picochat.hf_export as hf_export

    monkeypatch.setattr(hf_export, "SUPPORTED_FIELDS", hf_export.SUPPORTED_FIELDS - {"softcap"})
    check_exportable(GPTConfig())  # defaults are fine
    with pytest.raises(PicochatError, match="softcap"):
        check_exportable(GPTConfig(softcap=20.0))
