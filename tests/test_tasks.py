"""The task library: conversation shapes, rendering, answer extraction, scoring, mixtures, loading."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from picochat.common import PicochatError
from picochat.tasks import (
    ARC,
    GSM8K,
    MMLU,
    HumanEval,
    Identity,
    SimpleSpelling,
    SmolTalk,
    SpellingBee,
    TaskMixture,
    TaskSequence,
    categorical_choice,
    letter_token_ids,
)
from picochat.tasks import arc as arc_module
from picochat.tasks.base import assistant_text
from picochat.tasks.gsm8k import answer_to_parts, extract_answer
from picochat.tasks.loading import bundled_rows, hub_rows
from picochat.tasks.spelling import split_words
from picochat.tokenizer import MIN_VOCAB_SIZE, Tokenizer


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE tokenizer: enough to render conversations the way training does."""
    return Tokenizer.train_from_iterator(
        ["Natalia sold 48 clips. The answer is B."] * 10, MIN_VOCAB_SIZE + 20
    )


def dump(conversation):
    return json.dumps(conversation, sort_keys=True)


def assert_well_formed(conversation):
    """Roles alternate user/assistant (after an optional system message); contents and parts are valid."""
    messages = conversation["messages"]
    if messages[0]["role"] == "system":
        messages = messages[1:]
    assert messages and [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            assert message["role"] == "assistant"
            assert all(
                p["type"] in ("text", "python", "python_output") and isinstance(p["text"], str)
                for p in content
            )
        else:
            assert isinstance(content, str) and content


# ---------------------------------------------------------------------------------------------
# Every task: sizes offline and the shape of its conversations.

OFFLINE_SIZES = [
    (lambda: SmolTalk("train"), 1823),
    (lambda: SmolTalk("test"), 203),
    (lambda: MMLU(split="train"), 1531),
    (lambda: MMLU(split="test"), 5329),
    (lambda: ARC("ARC-Easy", "train"), 2251),
    (lambda: ARC("ARC-Easy", "validation"), 570),
    (lambda: ARC("ARC-Easy", "test"), 2376),
    (lambda: ARC("ARC-Challenge", "train"), 1119),
    (lambda: ARC("ARC-Challenge", "validation"), 299),
    (lambda: ARC("ARC-Challenge", "test"), 1172),
    (lambda: GSM8K("train"), 7473),
    (lambda: GSM8K("test"), 1319),
    (lambda: HumanEval(), 164),
    (lambda: SpellingBee("train", size=300), 300),
    (lambda: SimpleSpelling("test", size=300), 300),
    (lambda: Identity(), 500),
]


@pytest.mark.parametrize("make, size", OFFLINE_SIZES)
def test_every_task_yields_well_formed_conversations(make, size, tokenizer):
    task = make()
    assert len(task) == size
    assert task.eval_type in ("categorical", "generative")
    for i in range(50):
        conversation = task[i]
        assert_well_formed(conversation)
        ids, mask = tokenizer.render_conversation(conversation, max_tokens=10**6)  # the trainer's view
        assert len(ids) == len(mask) and sum(mask) > 0
        if task.eval_type == "categorical":
            assert conversation["messages"][-1]["content"] in conversation["letters"]
        if not isinstance(task, (HumanEval, SmolTalk, Identity)):  # no scoring / scoring is slow
            assert task.evaluate(conversation, assistant_text(conversation["messages"][-1])) is True


def test_tasks_load_data_only_when_first_used(monkeypatch):
    calls = []
    real = arc_module.bundled_rows
    monkeypatch.setattr(arc_module, "bundled_rows", lambda path: calls.append(path) or real(path))
    task = ARC("ARC-Challenge", "validation")
    assert calls == []
    assert len(task) == 299 and task[0] == task[0]
    assert calls == ["eval/arc/ARC-Challenge-Dev.jsonl.gz"]


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(PicochatError, match="split"):
        GSM8K("dev")
    with pytest.raises(PicochatError, match="source"):
        MMLU(source="web")
    with pytest.raises(PicochatError, match="subset"):
        len(MMLU(subset="astrology"))
    with pytest.raises(PicochatError, match="slice"):
        GSM8K(step=0)


# ---------------------------------------------------------------------------------------------
# GSM8K: calculator annotations become tool calls; the final answer is extracted for scoring.


def test_gsm8k_turns_calculator_annotations_into_tool_calls():
    conversation = GSM8K("train")[0]
    assert conversation["messages"][0]["content"].startswith("Natalia sold clips to 48 of her friends")
    assert conversation["messages"][1]["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": " clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": " clips altogether in April and May.\n#### 72"},
    ]
    # Weng: "= $<<12/60=0.2>>0.2 per minute" keeps the "$" and drops the copied "0.2".
    weng = GSM8K("train")[1]["messages"][1]["content"]
    assert weng[:4] == [
        {"type": "text", "text": "Weng earns 12/60 = $"},
        {"type": "python", "text": "12/60"},
        {"type": "python_output", "text": "0.2"},
        {"type": "text", "text": " per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $"},
    ]
    assert assistant_text(GSM8K("train")[1]["messages"][1]).endswith("she earned 0.2 x 50 = $10.\n#### 10")


def test_gsm8k_text_and_outputs_read_like_the_original_answer():
    task, rows = GSM8K("train"), bundled_rows("eval/gsm8k/train.jsonl.gz")
    for i in range(300):
        parts = task[i]["messages"][1]["content"]
        assert not any("<<" in p["text"] or ">>" in p["text"] for p in parts)
        assert [p["type"] for p in parts].count("python") == rows[i]["answer"].count("<<")
        # Reading text + tool outputs gives the answer without annotations, each result said once.
        # (Only number formatting may change: "22,500" written after a result becomes the tool's "22500".)
        original = re.sub(r"<<[^<>]*>>", "", rows[i]["answer"])
        assert assistant_text(task[i]["messages"][1]).replace(",", "") == original.replace(",", "")


def test_gsm8k_keeps_results_that_are_not_echoed_and_drops_formatted_echoes():
    assert answer_to_parts("so <<3/4=3/4>>3/4 is left\n#### 1")[2:] == [
        {"type": "python_output", "text": "3/4"},
        {"type": "text", "text": " is left\n#### 1"},
    ]
    assert answer_to_parts("He makes <<4500*5=22500>>22,500 a year")[-1] == {
        "type": "text",
        "text": " a year",
    }
    # "<<2*1=2>>2.5" is not an echo of 2: the text must stay intact.
    assert answer_to_parts("<<2*1=2>>2.5 left")[-1] == {"type": "text", "text": "2.5 left"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 72 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("so she pays\n#### $5.", "5"),
        ("#### -3.5 degrees", "-3.5"),
        ("#### $1,000.00", "1000.00"),
        ("the answer is 12", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_gsm8k_evaluate_and_reward_compare_final_numbers():
    task = GSM8K("test")
    conversation = task[0]
    reference = extract_answer(assistant_text(conversation["messages"][-1]))
    assert task.evaluate(conversation, f"Some working.\n#### {reference}")
    assert task.evaluate(conversation, f"#### ${int(reference):,}.00")
    assert not task.evaluate(conversation, f"#### {int(reference) + 1}")
    assert not task.evaluate(conversation, f"The answer is {reference}.")  # no "####"
    assert task.reward(conversation, f"#### {reference}") == 1.0
    assert task.reward(conversation, "#### -1") == 0.0


# ---------------------------------------------------------------------------------------------
# Multiple choice: rendering, letters, scoring, categorical choice.


def test_mmlu_renders_question_choices_and_letter_answer():
    conversation = MMLU(split="test")[0]  # bundled MMLU-Redux, "ok" rows only
    prompt = conversation["messages"][0]["content"]
    assert prompt.startswith("Multiple choice question (abstract algebra):\n\n")
    assert "\n\nA. Yes, with p=2.\nB. Yes, with p=3.\nC. Yes, with p=5.\nD. No.\n\n" in prompt
    assert prompt.endswith("Answer with the letter (A, B, C or D) only.")
    assert conversation["letters"] == ["A", "B", "C", "D"]
    assert conversation["messages"][1] == {"role": "assistant", "content": "B"}
    task = MMLU(split="test")
    assert task.evaluate(conversation, "B") and task.evaluate(conversation, " B\n")
    assert not task.evaluate(conversation, "A")
    assert task.eval_type == "categorical"


def test_mmlu_test_split_drops_questions_marked_wrong_and_filters_subjects():
    raw = bundled_rows("eval/mmlu/mmlu_redux_test_subset.jsonl.gz")
    flagged = next(r for r in raw if r["error_type"].lower() != "ok")
    prompts = {c["messages"][0]["content"] for c in MMLU(split="test")}
    assert not any(flagged["question"].strip() in p for p in prompts)
    physics = MMLU(subset="high_school_physics", split="train")
    assert 0 < len(physics) < 100
    assert all("(high school physics)" in c["messages"][0]["content"] for c in physics)


def test_arc_normalises_numeric_labels_and_choice_counts():
    raw = bundled_rows("eval/arc/ARC-Easy-Train.jsonl.gz")
    task = ARC("ARC-Easy", "train")
    numeric = next(i for i, r in enumerate(raw) if r["question"]["choices"][0]["label"] == "1")
    five = next(i for i, r in enumerate(raw) if len(r["question"]["choices"]) == 5)
    three = next(i for i, r in enumerate(raw) if len(r["question"]["choices"]) == 3)
    for i, letters in ((numeric, "ABCD"), (five, "ABCDE"), (three, "ABC")):
        conversation, row = task[i], raw[i]
        assert conversation["letters"] == list(letters)
        labels = [c["label"] for c in row["question"]["choices"]]
        answer = letters[labels.index(row["answerKey"])]
        assert conversation["messages"][1]["content"] == answer
        correct_text = row["question"]["choices"][labels.index(row["answerKey"])]["text"]
        assert f"\n{answer}. {correct_text}" in conversation["messages"][0]["content"]


def test_categorical_choice_restricts_argmax_to_the_letters():
    logits = torch.zeros(100)
    letter_ids = [10, 11, 12, 13]
    logits[12] = 5.0
    logits[50] = 100.0  # a stronger token that is not an answer letter is ignored
    assert categorical_choice(logits, letter_ids) == 2
    logits[10] = 7.0
    assert categorical_choice(logits, letter_ids) == 0
    assert categorical_choice(torch.zeros(100), letter_ids) == 0  # ties go to the first letter


def test_categorical_evaluation_end_to_end_with_a_real_tokenizer(tokenizer):
    task = ARC("ARC-Challenge", "test")
    conversation = task[3]
    letter_ids = letter_token_ids(tokenizer, conversation["letters"])
    prompt = tokenizer.render_for_completion(conversation)
    full, _ = tokenizer.render_conversation(conversation)
    # The reference answer is exactly one token, right after the prompt: the position the logits are read at.
    assert full[: len(prompt)] == prompt
    answer = conversation["messages"][1]["content"]
    assert full[len(prompt)] == letter_ids[conversation["letters"].index(answer)]
    logits = torch.randn(tokenizer.get_vocab_size())
    logits[full[len(prompt)]] = 50.0  # a model that is sure of the right letter
    choice = categorical_choice(logits, letter_ids)
    assert task.evaluate(conversation, conversation["letters"][choice])


def test_letter_token_ids_requires_single_token_letters():
    class ByteTokenizer:
        def encode(self, text):
            return list(text.encode())

    assert letter_token_ids(ByteTokenizer(), ["A", "B", "C"]) == [65, 66, 67]
    with pytest.raises(PicochatError, match="single-token"):
        letter_token_ids(ByteTokenizer(), ["A", "BB"])


# ---------------------------------------------------------------------------------------------
# Slicing and mixtures.


def test_slicing_is_like_range():
    full, part = GSM8K("test"), GSM8K("test", start=10, stop=20, step=3)
    assert len(part) == 4
    assert [dump(c) for c in part] == [dump(full[i]) for i in (10, 13, 16, 19)]
    assert dump(part[-1]) == dump(full[19])
    with pytest.raises(IndexError):
        part[4]
    assert len(GSM8K("test", start=1300, stop=10**9)) == 19
    assert len(GSM8K("test", start=5000)) == 0
    shards = [GSM8K("test", start=rank, step=4) for rank in range(4)]
    assert sum(len(s) for s in shards) == len(full)


def test_mixture_is_deterministic_complete_and_oversamples():
    spelling, identity = SimpleSpelling(size=30), Identity(size=20)
    mix = TaskMixture([spelling, identity], seed=1)
    order = [dump(c) for c in mix]
    assert order == [dump(c) for c in TaskMixture([spelling, identity], seed=1)]
    assert order != [dump(c) for c in TaskMixture([spelling, identity], seed=2)]
    expected = [dump(c) for c in spelling] + [dump(c) for c in identity]
    assert sorted(order) == sorted(expected)
    assert order != expected  # shuffled, not concatenated
    doubled = [dump(c) for c in TaskMixture([spelling, spelling, identity], seed=1)]
    assert sorted(doubled) == sorted(expected + [dump(c) for c in spelling])
    assert mix.eval_type == "generative"
    with pytest.raises(PicochatError, match="mix"):
        _ = TaskMixture([spelling, MMLU()]).eval_type


def test_sequence_chains_tasks_in_order_and_can_be_sliced():
    a, b = SimpleSpelling(size=5), Identity(size=4)
    sequence = TaskSequence([a, b])
    assert [dump(c) for c in sequence] == [dump(c) for c in a] + [dump(c) for c in b]
    sliced = TaskSequence([a, b], start=3, step=2)
    assert [dump(c) for c in sliced] == [dump(a[3]), dump(b[0]), dump(b[2])]


# ---------------------------------------------------------------------------------------------
# Spelling and identity.


def test_spelling_words_are_split_disjointly():
    train, test = set(split_words("train")), set(split_words("test"))
    assert not train & test
    assert 5000 < len(test) < len(train)
    assert all(re.fullmatch("[a-z]+", w) for w in test)
    for conversation in SimpleSpelling("test", size=100):
        word = conversation["messages"][1]["content"].replace(",", "")
        assert word in test and word in conversation["messages"][0]["content"]


def test_spelling_bee_is_deterministic_and_correct():
    from picochat.execution import run_calculator

    task = SpellingBee("train", size=200)
    assert [dump(c) for c in task] == [dump(c) for c in SpellingBee("train", size=200)]
    assert len({dump(c) for c in task}) > 190
    zero_counts = 0
    for conversation in task:
        parts = conversation["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", parts[1]["text"]).groups()
        question = conversation["messages"][0]["content"]
        assert word in question and letter in question
        count = word.count(letter)
        zero_counts += count == 0
        assert parts[2]["text"] == run_calculator(parts[1]["text"]) == str(count)
        assert f"letter by letter: {','.join(word)}\n" in parts[0]["text"]
        assert parts[3]["text"].endswith(f"#### {count}")
        assert task.evaluate(conversation, f"...\n#### {count}")
        assert not task.evaluate(conversation, f"#### {count + 1}")
    assert 0 < zero_counts < 50  # some questions ask about an absent letter


def test_simple_spelling_is_deterministic_and_correct():
    task = SimpleSpelling("train", size=100)
    assert dump(task[7]) == dump(SimpleSpelling("train", size=100)[7])
    for conversation in task:
        spelled = conversation["messages"][1]["content"]
        word = spelled.replace(",", "")
        assert word in conversation["messages"][0]["content"]
        assert task.evaluate(conversation, " " + ", ".join(word))
        assert not task.evaluate(conversation, word)


def test_identity_conversations_are_valid_varied_and_on_message():
    task = Identity()
    conversations = list(task)
    assert [dump(c) for c in conversations] == [dump(c) for c in Identity()]
    assert len({dump(c) for c in conversations}) > 400
    assert any(len(c["messages"]) >= 6 for c in conversations)  # multi-turn ones exist
    answers = " ".join(m["content"] for c in conversations for m in c["messages"] if m["role"] == "assistant")
    for fact in ("picochat project", "from scratch", "mistakes", "calculator", "internet", "English"):
        assert fact in answers
    for conversation in conversations:
        assert_well_formed(conversation)
        assert all(isinstance(m["content"], str) for m in conversation["messages"])


# ---------------------------------------------------------------------------------------------
# HumanEval scoring runs the tests in the sandbox.


def test_humaneval_scores_by_running_the_tests():
    task = HumanEval(timeout=10.0)
    first = task[0]
    assert first["messages"][0]["content"].startswith(
        "Complete the following Python function.\n\n```python\n"
    )
    reference = first["messages"][1]["content"]
    assert reference.startswith("```python\nfrom typing import List") and reference.endswith("```")
    assert task.evaluate(first, reference)
    assert task.evaluate(task[2], task[2]["messages"][1]["content"])
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert not task.evaluate(first, wrong)
    # Raw code, no fence, annotated with List but without the import: the prompt's import is added.
    solution = bundled_rows("eval/humaneval/HumanEval.jsonl.gz")[0]["canonical_solution"]
    raw = "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n" + solution
    assert task.evaluate(first, raw)
    assert task.evaluate(first, solution)  # just the body: continues the prompt
    assert not HumanEval(timeout=2.0).evaluate(
        first, "```python\ndef has_close_elements(a, b):\n    while True: pass\n```"
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face hub loading (no network here: the download is faked).


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub

    files = {}

    def download(repo_id, filename, repo_type=None, endpoint=None):
        if (repo_id, filename) not in files:
            raise ConnectionError("no network")
        return files[(repo_id, filename)]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr("picochat.tasks.loading.HUB_BACKOFF", 0.0)  # "no network" is retried: at once here
    hub_rows.cache_clear()
    yield lambda repo, name, rows: files.update({(repo, name): _write_parquet(tmp_path, name, rows)})
    hub_rows.cache_clear()


def _write_parquet(folder, name, rows):
    path = folder / name.replace("/", "_")
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_hub_source_offline_raises_picochat_error(fake_hub):
    with pytest.raises(PicochatError, match="source='bundled'"):
        len(GSM8K("test", source="hub"))


def test_hub_rows_are_normalised_to_the_bundled_format(fake_hub):
    fake_hub("allenai/ai2_arc", "ARC-Easy/test-00000-of-00001.parquet", [{
        "id": "x1", "question": "Which is a mammal?", "answerKey": "2",
        "choices": {"text": ["trout", "whale", "frog"], "label": ["1", "2", "3"]},
    }])  # fmt: skip
    conversation = ARC("ARC-Easy", "test", source="hub")[0]
    assert conversation["letters"] == ["A", "B", "C"]
    assert "Which is a mammal?\n\nA. trout\nB. whale\nC. frog" in conversation["messages"][0]["content"]
    assert conversation["messages"][1]["content"] == "B"
    question = {"question": "2+2?", "subject": "", "choices": ["3", "4", "5", "6"], "answer": 1}
    fake_hub("cais/mmlu", "all/auxiliary_train-00000-of-00001.parquet", [{"train": question}])
    assert MMLU(split="train", source="hub")[0]["messages"][1]["content"] == "B"
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi!"}]
    fake_hub("HuggingFaceTB/smol-smoltalk", "data/test-00000-of-00001.parquet", [{"messages": messages}])
    assert SmolTalk("test", source="hub")[0] == {"messages": messages}
