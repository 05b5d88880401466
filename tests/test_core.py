"""CORE: task list and bundled data, prompt rendering, and scoring with fake models rigged to know
(or not know) the answers, on hand-made items of each task type and on the bundled files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from picochat.evals import core
from picochat.evals.core import TaskSpec

DEVICE = torch.device("cpu")


class ByteTokenizer:
    """Stand-in for picochat.tokenizer.Tokenizer: one token per UTF-8 byte, plus <|bos|> = 256."""

    BOS = 256

    def get_vocab_size(self) -> int:
        return 257

    def get_bos_token_id(self) -> int:
        return self.BOS

    def encode(self, text: str, prepend: int | None = None) -> list[int]:
        return ([prepend] if prepend is not None else []) + list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


TOK = ByteTokenizer()


class LookupModel:
    """A fake LM that knows some full token sequences: at each position it puts all its mass on the next
    token of the known sequence whose prefix the row follows longest; elsewhere its logits are flat."""

    def __init__(self, texts: list[str], vocab: int = 257) -> None:
        self.seqs = [torch.tensor(TOK.encode(t, prepend=TOK.BOS)) for t in texts]
        self.vocab = vocab

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            best, best_len = None, 0
            for seq in self.seqs:
                n = min(T, len(seq))
                differ = (idx[b, :n] != seq[:n]).nonzero()
                match = int(differ[0]) if len(differ) else n
                if match > best_len:
                    best, best_len = seq, match
            for t in range(min(best_len, len(best) - 1) if best is not None else 0):
                logits[b, t, best[t + 1]] = 20.0
        return logits


def uniform_model(idx: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*idx.shape, 257)


def spec(task_type: str, shots: int = 0, delimiter: str = " ", baseline: float = 0.0) -> TaskSpec:
    return TaskSpec("hand", task_type, shots, delimiter, Path("/nonexistent"), baseline)


MC_ITEMS = [
    {"query": "Question: capital of France?", "choices": ["Paris", "Rome", "Oslo", "Bern"], "gold": 0},
    {"query": "Question: 2+2=?", "choices": ["3", "4", "5", "6"], "gold": 1},
    {"query": "Question: colour of the sky?", "choices": ["red", "green", "blue", "black"], "gold": 2},
    {"query": "Question: opposite of up?", "choices": ["left", "in", "out", "down"], "gold": 3},
]
SCHEMA_ITEMS = [
    {"context_options": ["The cup fell off the table because the " + w for w in ("cup", "table")],
     "continuation": "was pushed.", "gold": 0},
    {"context_options": ["The ball broke the window because the " + w for w in ("ball", "window")],
     "continuation": "was fragile.", "gold": 1},
]  # fmt: skip
LM_ITEMS = [
    {"context": "The capital of France is", "continuation": "Paris"},
    {"context": "The chemical symbol of gold is ", "continuation": "Au"},
    {"context": "One, two, three,", "continuation": "four, five"},
]


def correct_texts(s: TaskSpec, items: list[dict], answer_offset: int = 0) -> list[str]:
    """The full prompt of each item with its right answer (or the answer `answer_offset` further on)."""
    texts = []
    for i, item in enumerate(items):
        prompts = core.example_prompts(s, items, i)
        if s.task_type == "language_modeling":
            texts.append(prompts[1])
        else:
            texts.append(prompts[(item["gold"] + answer_offset) % len(prompts)])
    return texts


def accuracy(model, s: TaskSpec, items: list[dict], **kwargs) -> float:
    counts = core.evaluate_task(model, TOK, s, items, DEVICE, **kwargs)
    return counts.correct / counts.total


# ---------------------------------------------------------------------------------------------
# The task list

MISSING = "2 missing (not bundled, no hub copy found): squad, coqa"


def test_task_list_covers_20_of_22_and_names_the_missing():
    specs = core.core_tasks()
    assert len(specs) == 22
    assert [s.label for s in specs if not s.available] == ["squad", "coqa"]
    assert core.coverage_summary(specs) == f"CORE over 20/22 tasks; {MISSING}"
    by_label = {s.label: s for s in specs}
    # Spot checks against dclm_heavy.yaml and eval_meta_data_v1.csv (the nanochat baselines).
    assert by_label["jeopardy"].task_type == "language_modeling" and by_label["jeopardy"].num_fewshot == 10
    assert by_label["arc_easy"].delimiter == "\nAnswer: " and by_label["arc_easy"].baseline == 25
    assert by_label["copa"].num_fewshot == 0 and by_label["copa"].delimiter == " "
    assert by_label["winograd"].task_type == "schema"
    assert by_label["commonsense_qa"].baseline == 20
    assert by_label["bigbench_language_identification"].baseline == 9.1
    assert by_label["agi_eval_lsat_ar"].num_fewshot == 3 and by_label["agi_eval_lsat_ar"].baseline == 20
    assert by_label["boolq"].baseline == 62
    assert by_label["hellaswag"].path == by_label["hellaswag_zeroshot"].path


@pytest.mark.parametrize("s", [s for s in core.core_tasks() if s.available], ids=lambda s: s.label)
def test_every_bundled_task_loads_renders_and_tokenizes(s: TaskSpec):
    data = core.load_examples(s)
    assert len(data) >= 32
    assert core.load_examples(s)[:5] == data[:5]  # the shuffled order is fixed
    for idx in range(3):
        prompts = core.example_prompts(s, data, idx)
        rows, starts, ends = core.tokenize_prompts(TOK, s.task_type, prompts)
        assert all(1 <= st < e == len(r) for r, st, e in zip(rows, starts, ends, strict=True))
        item = data[idx]
        if s.task_type == "multiple_choice":
            assert len(prompts) == len(item["choices"]) and 0 <= item["gold"] < len(prompts)
            assert prompts[0].endswith(s.delimiter + item["choices"][0])
        elif s.task_type == "schema":
            assert all(p.endswith(s.delimiter + item["continuation"]) for p in prompts)
        else:
            assert prompts[1].endswith(item["continuation"]) and prompts[1].startswith(prompts[0])
            assert TOK.decode(rows[0][starts[0] :]).strip() == item["continuation"].strip()
        # k few-shot examples, separated by blank lines, before the item.
        assert prompts[0].count("\n\n") >= s.num_fewshot


def test_few_shot_draw_is_seeded_and_excludes_the_item():
    data = [{"n": i} for i in range(30)]
    for idx in range(30):
        shots = core.fewshot_examples(data, idx, 10)
        assert len(shots) == 10 and {"n": idx} not in shots
        assert shots == core.fewshot_examples(data, idx, 10)
    assert core.fewshot_examples(data, 0, 10) != core.fewshot_examples(data, 1, 10)
    assert core.fewshot_examples(data, 3, 0) == []


# ---------------------------------------------------------------------------------------------
# Rendering


def test_render_multiple_choice_with_one_shot():
    items = MC_ITEMS[:2]
    prompts = core.render_prompts(spec("multiple_choice", 1, "\nAnswer: "), items[1], [items[0]])
    assert prompts[1] == "Question: capital of France?\nAnswer: Paris\n\nQuestion: 2+2=?\nAnswer: 4"
    assert len(prompts) == 4 and prompts[0].endswith("Answer: 3")


def test_render_schema_and_language_modeling():
    item = SCHEMA_ITEMS[0]
    prompts = core.render_prompts(spec("schema"), item, [SCHEMA_ITEMS[1]])
    assert prompts == [
        "The ball broke the window because the window was fragile.\n\n" + o + " was pushed."
        for o in item["context_options"]
    ]
    # LM: contexts are trimmed; the prompt without the answer drops the delimiter's trailing space.
    without, with_ = core.render_prompts(spec("language_modeling"), LM_ITEMS[1], [LM_ITEMS[0]])
    assert without == "The capital of France is Paris\n\nThe chemical symbol of gold is"
    assert with_ == without + " Au"


def test_tokenize_spans_pick_the_scored_tokens():
    rows, starts, ends = core.tokenize_prompts(TOK, "multiple_choice", ["Q: x? A: yes", "Q: x? A: no"])
    assert [TOK.decode(r[s:e]) for r, s, e in zip(rows, starts, ends, strict=True)] == ["yes", "no"]
    rows, starts, ends = core.tokenize_prompts(TOK, "schema", ["Tom ran so he won.", "Ann ran so he won."])
    assert [TOK.decode(r[s:e]) for r, s, e in zip(rows, starts, ends, strict=True)] == [" ran so he won."] * 2
    rows, starts, ends = core.tokenize_prompts(TOK, "language_modeling", ["2+2 =", "2+2 = 4"])
    assert TOK.decode(rows[0][starts[0] : ends[0]]) == " 4"
    # A choice that is a prefix of another still keeps one scored token.
    rows, starts, _ = core.tokenize_prompts(TOK, "multiple_choice", ["A: no", "A: not"])
    assert starts == [len(rows[0]) - 1] * 2


def test_fit_prompts_drops_shots_from_the_end_until_every_choice_fits():
    s = spec("multiple_choice", 3)
    item, shots = MC_ITEMS[0], MC_ITEMS[1:]
    lengths = [max(len(r) for r in core.fit_prompts(TOK, s, item, shots[:k], None).rows) for k in range(4)]
    assert lengths == sorted(lengths) and len(set(lengths)) == 4
    assert core.fit_prompts(TOK, s, item, shots, lengths[3]).shots == 3  # exactly fits: nothing dropped
    fitted = core.fit_prompts(TOK, s, item, shots, lengths[2])
    assert fitted.shots == 2 and max(len(r) for r in fitted.rows) == lengths[2]
    assert fitted.rows == core.fit_prompts(TOK, s, item, shots[:2], None).rows  # the first two kept, uncut
    assert core.fit_prompts(TOK, s, item, shots, lengths[0]).shots == 0
    assert core.fit_prompts(TOK, s, item, shots, lengths[0] - 1).shots is None  # even 0-shot is too long


# ---------------------------------------------------------------------------------------------
# Scoring with rigged models


@pytest.mark.parametrize(
    "task_type,items,shots",
    [
        ("multiple_choice", MC_ITEMS, 0),
        ("multiple_choice", MC_ITEMS, 2),
        ("schema", SCHEMA_ITEMS, 0),
        ("schema", SCHEMA_ITEMS, 1),
        ("language_modeling", LM_ITEMS, 0),
        ("language_modeling", LM_ITEMS, 2),
    ],
)
def test_a_model_that_knows_the_answers_scores_1_and_one_that_does_not_scores_0(task_type, items, shots):
    s = spec(task_type, shots)
    assert accuracy(LookupModel(correct_texts(s, items)), s, items) == 1.0
    if task_type == "language_modeling":
        # Knowing every token but the last is not enough: greedy output must match exactly.
        wrong = [t[:-1] + ("X" if t[-1] != "X" else "Y") for t in correct_texts(s, items)]
    else:
        wrong = correct_texts(s, items, answer_offset=1)
    assert accuracy(LookupModel(wrong), s, items) == 0.0
    assert accuracy(uniform_model, spec(task_type, shots), items) <= 0.5


def test_prompts_too_long_for_the_context_are_counted_never_cropped():
    s = spec("multiple_choice", 3)
    zero_shot = spec("multiple_choice", 0)
    # The model knows only the 0-shot prompts: it can be right only where every shot was dropped.
    model = LookupModel(correct_texts(zero_shot, MC_ITEMS))
    full = core.evaluate_task(model, TOK, s, MC_ITEMS, DEVICE)
    assert full.fewer_shots == 0 and full.skipped == 0 and full.correct < 4
    longest_0shot = max(len(TOK.encode(t, prepend=TOK.BOS)) for t in correct_texts(zero_shot, MC_ITEMS))
    tight = core.evaluate_task(model, TOK, s, MC_ITEMS, DEVICE, max_seq_len=longest_0shot)
    assert tight == (4, 4, 4, 0)  # every item fell back to 0 shots, and is then answered right
    too_short = core.evaluate_task(model, TOK, s, MC_ITEMS, DEVICE, max_seq_len=longest_0shot - 1)
    assert too_short.skipped >= 1 and too_short.total == 4 - too_short.skipped


def test_evaluate_core_reports_dropped_shots_per_task_and_in_the_summary():
    result = core.evaluate_core(
        uniform_model,
        TOK,
        "cpu",
        max_per_task=2,
        tasks=["hellaswag_zeroshot", "copa", "bigbench_qa_wikidata"],
        max_seq_len=160,
    )
    per_task = {label: (r["fewer_shots"], r["skipped"]) for label, r in result["tasks"].items()}
    assert per_task["hellaswag_zeroshot"] == (0, per_task["hellaswag_zeroshot"][1])  # 0-shot: nothing to drop
    assert per_task["bigbench_qa_wikidata"][0] > 0  # 10 shots of bytes do not fit in 160 tokens
    assert result["fewer_shots"] == sum(f for f, _ in per_task.values()) > 0
    assert f"{result['fewer_shots']} prompt(s) lost few-shot examples" in result["summary"]
    assert "160-token context" in result["summary"]
    table = core.format_core_table(result)
    assert "fewer shots" in table and "skipped" in table and result["summary"] in table


def test_uniform_model_is_at_chance_on_multiple_choice():
    # All losses tie, ties go to choice 0, and the gold answers are spread evenly over the 4 choices,
    # so accuracy is exactly the random baseline and the centred accuracy is 0.
    s = spec("multiple_choice", baseline=25.0)
    acc = accuracy(uniform_model, s, MC_ITEMS)
    assert acc == 0.25
    assert core.centered_accuracy(acc, s.baseline) == 0.0
    assert core.centered_accuracy(1.0, 25.0) == 1.0 and core.centered_accuracy(0.625, 25.0) == 0.5


def test_items_are_split_between_ranks_without_overlap():
    s = spec("multiple_choice")
    model = LookupModel(correct_texts(s, MC_ITEMS[:2]))  # knows items 0 and 1 only
    shards = [core.evaluate_task(model, TOK, s, MC_ITEMS, DEVICE, rank=r, world_size=3) for r in range(3)]
    assert [c.total for c in shards] == [2, 1, 1]
    assert sum(c.correct for c in shards) == 2
    assert core.evaluate_task(model, TOK, s, MC_ITEMS, DEVICE, max_per_task=3) == (2, 3, 0, 0)


def test_evaluate_core_on_bundled_tasks():
    # A model that knows the first 2 (shuffled) items of copa and winograd, and nothing of lambada.
    labels = ["copa", "winograd", "lambada_openai"]
    specs = {s.label: s for s in core.core_tasks()}
    known = []
    for label in labels[:2]:
        s, data = specs[label], core.load_examples(specs[label])
        known += correct_texts(s, data[:2])  # 0-shot tasks: the prompts use no other items
    result = core.evaluate_core(LookupModel(known), TOK, "cpu", max_per_task=2, tasks=labels)
    assert result["covered"] == ["copa", "lambada_openai", "winograd"]  # DCLM's order
    assert result["tasks"]["copa"]["accuracy"] == 1.0 and result["tasks"]["copa"]["centered"] == 1.0
    assert result["tasks"]["winograd"]["centered"] == 1.0
    assert result["tasks"]["lambada_openai"] == pytest.approx(
        {
            "accuracy": 0.0,
            "centered": 0.0,
            "baseline": 0.0,
            "n": 2,
            "type": "language_modeling",
            "shots": 0,
            "fewer_shots": 0,
            "skipped": 0,
        }
    )
    assert result["core"] == pytest.approx(2 / 3)
    assert result["summary"] == f"CORE over 3/22 tasks (a selection); {MISSING}"
    table = core.format_core_table(result)
    assert "copa" in table and "0.6667" in table and "3/22 tasks (a selection)" in table


def test_evaluate_core_full_quick_run_with_a_flat_model():
    result = core.evaluate_core(uniform_model, TOK, "cpu", max_per_task=1, max_seq_len=256)
    assert len(result["tasks"]) == 20 and result["missing"] == ["squad", "coqa"]
    # One byte per token: a 256-token context is too short for many few-shot prompts, and says so.
    assert result["summary"].startswith(f"CORE over 20/22 tasks; {MISSING}; ")
    assert all(r["n"] + r["skipped"] == 1 for r in result["tasks"].values())
    # Each centred accuracy is either 1 (a lucky tie-break) or -baseline/(1-baseline) (a miss).
    for r in (r for r in result["tasks"].values() if r["n"]):
        b = r["baseline"] / 100
        assert r["centered"] in (pytest.approx(1.0), pytest.approx(-b / (1 - b)))
    assert not math.isnan(result["core"])


def test_unknown_task_label_is_a_clear_error():
    with pytest.raises(core.PicochatError, match="unknown CORE task.*nope"):
        core.evaluate_core(uniform_model, TOK, "cpu", tasks=["nope"])


def test_real_tokenizer_spans(tmp_path, monkeypatch):
    import picochat.tokenizer as tokenizer_mod

    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    specs = [s for s in core.core_tasks() if s.available]
    texts = []
    for s in specs:
        texts += ["\n\n".join(core.example_prompts(s, core.load_examples(s), i)) for i in range(2)]
    tok = tokenizer_mod.Tokenizer.train_from_iterator(iter(texts * 3), 400)
    for s in specs:
        data = core.load_examples(s)
        rows, starts, ends = core.tokenize_prompts(tok, s.task_type, core.example_prompts(s, data, 0))
        assert all(1 <= st < e == len(r) for r, st, e in zip(rows, starts, ends, strict=True)), s.label


def test_eval_base_command_records_the_report_section(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    step_dir = tmp_path / "checkpoints" / "base" / "d1" / "step_000007"
    fake = (uniform_model, TOK, {"step": 7, "path": str(step_dir)})
    monkeypatch.setattr("picochat.checkpoint.load_model", lambda stage, tag, step, device: fake)
    argv = ["--core-only", "--max-per-task", "1", "--tasks", "copa,winograd", "--source", "hub"]
    assert core.main(argv) == 0
    saved = json.loads((tmp_path / "report" / "base-eval.json").read_text())
    assert saved["model_tag"] == "d1" and saved["step"] == 7 and saved["max_per_task"] == 1
    assert set(saved["tasks"]) == {"copa", "winograd"} and saved["core_missing"] == ["squad", "coqa"]
    # With --source hub too, squad and coqa are counted, named and explained, in the output and the report.
    assert saved["core_summary"] == f"CORE over 2/22 tasks (a selection); {MISSING}"
    out = capsys.readouterr().out
    assert MISSING in out
    for label in ("squad", "coqa"):
        assert f"{label}: not scored (not bundled, no hub copy found); to score it, put" in out
        assert f"reading_comprehension/{label}.jsonl.gz" in out
    assert saved["core"] == pytest.approx(sum(t["centered"] for t in saved["tasks"].values()) / 2)
    with pytest.raises(core.PicochatError, match="--max-per-task"):
        core.main(["--max-per-task", "0"])
    for action in core.build_parser()._actions:
        assert action.help, action.option_strings
