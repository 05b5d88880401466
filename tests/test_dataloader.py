"""picochat.dataset (shards, splits, per-rank shares) and picochat.dataloader (packing, exact resume)."""

import itertools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from engine_fakes import tiny_tokenizer

from picochat import dataset
from picochat.common import PicochatError
from picochat.dataloader import TokenBatchLoader


def write_shards(folder, files: int = 3, docs_per_file: int = 12, row_group_size: int = 4) -> list[str]:
    """Parquet files like FineWeb-Edu's (a `text` column), several row groups each; returns every text."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for f in range(files):
        rows = [f"document {f}-{i}: " + "word " * (3 + (7 * i + f) % 11) for i in range(docs_per_file)]
        table = pa.table({"text": rows, "id": list(range(len(rows)))})
        pq.write_table(table, folder / f"shard_{f:05d}.parquet", row_group_size=row_group_size)
        texts.extend(rows)
    return texts


@pytest.fixture
def corpus(tmp_path):
    texts = write_shards(tmp_path / "shards")
    return str(tmp_path / "shards"), texts


def test_splits_last_file_is_validation(corpus):
    source, texts = corpus
    assert list(dataset.iter_documents("train", source)) == texts[:24]
    assert list(dataset.iter_documents("val", source)) == texts[24:]
    assert dataset.count_documents("train", source) == 24


@pytest.mark.parametrize("split,world_size", [("train", 2), ("train", 3), ("val", 2), ("val", 5)])
def test_ranks_read_disjoint_shares_that_cover_the_split(corpus, split, world_size):
    source, _ = corpus
    everything = list(dataset.iter_documents(split, source))
    shares = [list(dataset.iter_documents(split, source, r, world_size)) for r in range(world_size)]
    assert all(shares), "every rank gets data"
    assert sorted(itertools.chain(*shares)) == sorted(everything)


def test_bundled_source_has_train_and_val_for_two_ranks():
    for split in ("train", "val"):
        for rank in (0, 1):
            first = next(dataset.iter_documents(split, "bundled", rank, 2))
            assert isinstance(first, str) and first


def test_missing_or_bad_folders_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    with pytest.raises(PicochatError, match="picochat download"):
        dataset.split_files("train", "hub")
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"content": ["x"]}), bad / f"{i}.parquet")
    with pytest.raises(PicochatError, match="no `text` column"):
        list(dataset.iter_documents("train", str(bad)))


def stream_of(tokenizer, texts: list[str]) -> list[int]:
    return [t for text in texts for t in tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())]


def test_batches_are_the_shuffled_rows_of_each_units_token_stream(tmp_path):
    source = tmp_path / "shards"
    write_shards(source, files=3, docs_per_file=40, row_group_size=20)
    tok = tiny_tokenizer()
    B, T = 1, 16  # one row per batch, so a pass serves every row exactly
    expected_rows = []
    for texts, _ in dataset.iter_document_batches("train", str(source), loop=False):
        stream = stream_of(tok, texts)
        rows = [stream[i : i + T + 1] for i in range(0, len(stream) - T, T)]  # overlap by one token
        expected_rows.extend(rows)
    loader = TokenBatchLoader(tok, B, T, "train", "cpu", str(source))
    served = []
    for _ in range(len(expected_rows) // B):
        x, y = next(loader)
        assert x.shape == y.shape == (B, T) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the inputs shifted by one"
        served.extend(torch.cat([x, y[:, -1:]], dim=1).tolist())
    loader.close()
    assert sorted(served) == sorted(expected_rows), "one pass serves every row of every unit once"
    assert served != expected_rows, "rows come shuffled, not as consecutive slices of one text"


def test_loader_wraps_around_epochs(corpus):
    source, texts = corpus
    tok = tiny_tokenizer()
    total = len(stream_of(tok, texts[24:]))
    loader = TokenBatchLoader(tok, 1, 32, "val", "cpu", source)
    for _ in range(total // 32 + 3):  # more than one pass over the validation split
        next(loader)
    assert loader.state_dict()["epoch"] >= 1
    loader.close()


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_continues_with_exactly_the_same_batches(corpus, world_size):
    source, _ = corpus
    tok = tiny_tokenizer()
    for rank in range(world_size):
        original = TokenBatchLoader(tok, 2, 24, "train", "cpu", source, rank, world_size)
        for _ in range(7):
            next(original)
        state = original.state_dict()
        resumed = TokenBatchLoader(tok, 2, 24, "train", "cpu", source, rank, world_size, dict(state))
        for _ in range(12):  # crosses units, files and an epoch boundary
            a, b = next(original), next(resumed)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        original.close()
        resumed.close()


def test_resume_with_another_world_size_is_refused(corpus):
    source, _ = corpus
    tok = tiny_tokenizer()
    loader = TokenBatchLoader(tok, 1, 8, "train", "cpu", source)
    next(loader)
    with pytest.raises(PicochatError, match="same number of processes"):
        TokenBatchLoader(tok, 1, 8, "train", "cpu", source, 0, 2, loader.state_dict())
    loader.close()


def test_reader_errors_reach_the_training_loop(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"content": ["x"]}), folder / f"{i}.parquet")
    # A validation loader skips the up-front check (it runs once per run, for the train loader), so the
    # error is raised by the background reader and must come out of next().
    loader = TokenBatchLoader(tiny_tokenizer(), 1, 8, "val", "cpu", str(folder))
    with pytest.raises(PicochatError, match="no `text` column"):
        next(loader)


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "not parquet":
        path.write_text("<html>404 Not Found</html>")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # "data page": the footer (at the end) stays intact, a page in the middle is garbage
        middle = len(data) // 3
        path.write_bytes(data[:middle] + bytes(range(256)) * 4 + data[middle + 1024 :])


@pytest.mark.parametrize("how", ["not parquet", "truncated", "empty", "data page"])
@pytest.mark.parametrize("which", [0, 2])  # a training shard, the validation shard
def test_a_damaged_shard_is_named_before_training_starts(tmp_path, how, which):
    source = tmp_path / "shards"
    write_shards(source, files=3, docs_per_file=200, row_group_size=200)
    bad = source / f"shard_{which:05d}.parquet"
    damage(bad, how)
    if how == "data page" and which == 0:
        dataset.check_shards(str(source))  # footers only, for training shards: found when read
        with pytest.raises(PicochatError, match=f"{bad}.*not a readable parquet file"):
            list(dataset.iter_documents("train", str(source)))
        return
    with pytest.raises(PicochatError, match=f"{bad}.*not a readable parquet file.*fetch it again"):
        dataset.check_shards(str(source))
    with pytest.raises(PicochatError, match=str(bad)):  # the train loader runs the check up front
        TokenBatchLoader(tiny_tokenizer(), 1, 8, "train", "cpu", str(source))


def test_bestfit_rows_start_at_pieces_and_target_every_token_once():
    from picochat.dataloader import bestfit_rows

    gen = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(2, 15, (60,), generator=gen)] + [40]  # one longer than 2 rows
    docs, next_id = [], 1
    for n in lengths:  # token ids unique across the corpus, 0 = BOS at each document start
        docs.append([0] + list(range(next_id, next_id + n - 1)))
        next_id += n - 1
    rows = bestfit_rows(docs, 17)
    assert rows and all(len(r) == 17 for r in rows)
    targets = [t for r in rows for t in r[1:] if t != 0]
    assert len(targets) == len(set(targets)), "a token is a target twice"
    missing = set(range(1, next_id)) - set(targets)
    assert len(missing) < 17, "more than the last partial row was dropped"
    starts_at_bos = sum(r[0] == 0 for r in rows) / len(rows)
    assert starts_at_bos > 0.6, starts_at_bos
    assert rows[:2] == [docs[-1][:17], docs[-1][16:33]]  # the long document fills whole rows first


def test_bestfit_loader_resumes_exactly_and_validation_keeps_the_stream_cut(corpus):
    from picochat.dataloader import unit_rows

    source, _ = corpus
    tok = tiny_tokenizer()
    original = TokenBatchLoader(tok, 2, 24, "train", "cpu", source, packing="bestfit")
    for _ in range(5):
        next(original)
    resumed = TokenBatchLoader(
        tok, 2, 24, "train", "cpu", source, resume_state=original.state_dict(), packing="bestfit"
    )
    for _ in range(10):
        a, b = next(original), next(resumed)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    original.close()
    resumed.close()
    ids = [[0, 5, 6, 7], [0, 8, 9], [0, 1, 2, 3, 4, 5, 6]]
    assert torch.equal(unit_rows(ids, 4, 0, 0, "stream"), unit_rows(ids, 4, 0, 0))
    assert not torch.equal(unit_rows(ids, 4, 0, 0, "bestfit"), unit_rows(ids, 4, 0, 0))
    with pytest.raises(PicochatError, match="packing"):
        TokenBatchLoader(tok, 2, 24, "train", "cpu", source, packing="greedy")


def test_prefetch_gives_the_same_batches_and_resumes_after_the_last_one_handed_out(corpus):
    source, _ = corpus
    tok = tiny_tokenizer()
    plain = TokenBatchLoader(tok, 2, 24, "train", "cpu", source)
    ahead = TokenBatchLoader(tok, 2, 24, "train", "cpu", source, prefetch=True)
    for _ in range(6):
        a, b = next(plain), next(ahead)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert ahead.state_dict() == plain.state_dict()  # not the position of the batch assembled ahead
    resumed = TokenBatchLoader(
        tok, 2, 24, "train", "cpu", source, resume_state=ahead.state_dict(), prefetch=True
    )
    for _ in range(8):  # crosses units and an epoch
        a, b = next(plain), next(resumed)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for loader in (plain, ahead, resumed):
        loader.close()
