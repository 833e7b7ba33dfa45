"""The streaming tokenization pipeline: exact packing, disjoint shards, exactly-once resume, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from hyperloop_dist.config import load_config
from hyperloop_dist.data.stream import (
    DataError,
    DataStats,
    SlotStream,
    StreamLoader,
    _SourceReader,
    resolve_source,
)
from hyperloop_dist.data.tokenizer import EOS_ID, load_tokenizer

from .conftest import FIXTURE_CORPUS


@pytest.fixture(scope="module")
def tokenizer(tiny_data: list[str]) -> str:
    return load_config(None, tiny_data).data.tokenizer


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def doc_texts(n: int, prefix: str = "doc") -> list[str]:
    return [f"{prefix}-{i:04d} " + " ".join(["the king's men"] * (3 + i % 7)) for i in range(n)]


def test_packing_reproduces_the_eos_joined_stream(tokenizer: str) -> None:
    source = resolve_source(str(FIXTURE_CORPUS / "*.txt"))
    sp = load_tokenizer(tokenizer)
    stream = SlotStream([source], tokenizer, slot=0, slots=1, seq_len=31, seed=0)
    windows = [stream.next_window() for _ in range(300)]
    assert all(len(w) == 32 for w in windows)
    expected: list[int] = []
    for f in source.files:
        expected += sp.encode(Path(f).read_text()) + [EOS_ID]
    got = np.concatenate(windows).tolist()
    assert got == (expected * 2)[: len(got)]  # the second epoch starts where the first ended


@pytest.mark.parametrize("files", [1, 3, 8])
def test_reader_slots_see_disjoint_documents_covering_the_source(tmp_path: Path, files: int) -> None:
    texts = doc_texts(40)
    for i in range(files):
        write_jsonl(tmp_path / f"part{i}.jsonl", texts[i::files])
    source = resolve_source(str(tmp_path / "*.jsonl"))
    seen = []
    for slot in range(4):  # 2 DP ranks x 2 workers
        reader = _SourceReader(source, slot, 4, stats=DataStats())
        docs = []
        for position, text in reader._records():
            if position[0] > 0:
                break
            docs.append(text)
        seen.append(docs)
    flat = [d for docs in seen for d in docs]
    assert len(flat) == len(set(flat)), "a document was read by two slots"
    assert set(flat) == set(texts)


def _markers(rows, sp) -> list[str]:
    return [m for row in rows for m in sp.decode(row.tolist()).split() if m.startswith("doc-")]


def test_two_ranks_two_workers_never_share_a_document(tmp_path: Path, tokenizer: str) -> None:
    texts = doc_texts(64)
    for i in range(4):
        write_jsonl(tmp_path / f"part{i}.jsonl", texts[i::4])
    source = resolve_source(str(tmp_path))
    sp = load_tokenizer(tokenizer)
    per_rank = []
    for rank in range(2):
        loader = StreamLoader([source], tokenizer, seq_len=31, micro_batch_size=2, dp_rank=rank, dp_size=2,
                              workers=2, seed=0)
        per_rank.append(_markers([row for _ in range(6) for row in next(loader)[0]], sp))
    assert per_rank[0] and per_rank[1]
    assert not set(per_rank[0]) & set(per_rank[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_token_stream_exactly(tmp_path: Path, tokenizer: str, workers: int) -> None:
    a, b = doc_texts(30, "alpha"), doc_texts(50, "beta")
    write_jsonl(tmp_path / "a.jsonl", a)
    (tmp_path / "b").mkdir()
    for i in range(3):
        write_jsonl(tmp_path / "b" / f"{i}.jsonl", b[i::3])
    sources = [resolve_source(str(tmp_path / "a.jsonl"), weight=0.3), resolve_source(str(tmp_path / "b"), weight=0.7)]

    def loader(state=None) -> StreamLoader:
        return StreamLoader(sources, tokenizer, seq_len=15, micro_batch_size=3, dp_rank=0, dp_size=1,
                            workers=workers, seed=7, state=state)

    total = 40
    uninterrupted = loader()
    straight = [next(uninterrupted)[0] for _ in range(total)]
    for stop in sorted(random.Random(workers).sample(range(1, total), 3)):
        first = loader()
        head = [next(first)[0] for _ in range(stop)]
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        resumed = loader(state)
        tail = [next(resumed)[0] for _ in range(total - stop)]
        assert all(np.array_equal(x, y) for x, y in zip(head + tail, straight, strict=True)), stop


def test_resume_with_another_layout_is_refused(tmp_path: Path, tokenizer: str) -> None:
    write_jsonl(tmp_path / "a.jsonl", doc_texts(10))
    source = resolve_source(str(tmp_path / "a.jsonl"))
    first = StreamLoader([source], tokenizer, 15, 2, 0, 1, 0, seed=0)
    next(first)
    with pytest.raises(DataError, match="dp_size"):
        StreamLoader([source], tokenizer, 15, 2, 0, 2, 0, seed=0, state=first.state_dict())


def test_bad_input_is_skipped_and_counted(tmp_path: Path, tokenizer: str) -> None:
    good = doc_texts(6)
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = [json.dumps({"text": good[0]}), "{not json", json.dumps({"body": "no text field"}),
             json.dumps({"text": 42}), json.dumps({"text": ""}), json.dumps(["a", "list"]),
             json.dumps({"text": good[1]})]
    (bad / "a.jsonl").write_bytes("\n".join(lines).encode() + b"\n" + b'{"text": "caf\xe9 latin-1"}\n'
                                  + json.dumps({"text": good[2]}).encode() + b"\n")
    (bad / "empty.jsonl").write_bytes(b"")
    write_jsonl(bad / "c.jsonl", good[3:])
    big = tmp_path / "big"
    big.mkdir()
    (big / "huge.txt").write_text("All the world's a stage, and all the men and women merely players.\n" * 780_000)
    stats = DataStats()
    reader = _SourceReader(resolve_source(str(bad)), 0, 1, stats)
    docs = []
    for position, text in reader._records():  # one full pass over the bad shards
        if position[0] > 0:
            break
        docs.append(text)
    assert docs == good
    counts = stats.counts
    assert counts["malformed_json"] == 1
    assert counts["missing_field"] == 2  # a record without the field, and a JSON list
    assert counts["non_string_field"] == 1
    assert counts["invalid_utf8"] == 1
    assert counts["empty_documents"] == 1
    assert counts["empty_shards"] == 1
    # a 50 MB single document goes through in newline-aligned pieces, windows keep coming
    assert (big / "huge.txt").stat().st_size > 50e6
    stream = SlotStream([resolve_source(str(big))], tokenizer, slot=0, slots=1, seq_len=63, seed=0)
    windows = [stream.next_window() for _ in range(3)]
    assert stream.stats.counts["split_documents"] == 1 and all(len(w) == 64 for w in windows)


def test_missing_and_unreadable_sources_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        resolve_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="matches no files"):
        resolve_source(str(tmp_path / "*.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="cannot tell the format"):
        resolve_source(str(tmp_path / "*.csv"))


def test_mixture_sources_train_a_tokenizer_from_the_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a").mkdir()
    for i in range(2):
        write_jsonl(tmp_path / "a" / f"{i}.jsonl", doc_texts(80, f"j{i}"))
    pq.write_table(pa.table({"content": doc_texts(80, "pq")}), tmp_path / "b.parquet")
    sources = (f"data.sources=[{{path: {tmp_path / 'a'}}}, "
               f"{{path: {tmp_path / 'b.parquet'}, text_field: content, weight: 0.5}}]")
    args = ["data.corpus=sources", sources, f"data.tokenizer={tmp_path / 'tok.model'}", "model.vocab_size=300"]
    cli = [sys.executable, "-m", "hyperloop_dist.cli", "data"]
    done = subprocess.run([*cli, "train-tokenizer", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert load_tokenizer(tmp_path / "tok.model").vocab_size() == 300
    missing = subprocess.run([*cli, "prepare", "data.corpus=sources", f"data.sources=[{{path: {tmp_path / 'x'}}}]"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_pretokenized_megatron_dataset_round_trips(tiny_data: list[str], tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from hyperloop_dist.data.batches import WindowBatches
    from hyperloop_dist.data.pretokenize import load_pretokenized, pretokenize
    from hyperloop_dist.data.sources import train_sources

    cfg = load_config(None, [*tiny_data, f"data.pretokenized={tmp_path / 'train'}", "data.loader=windows",
                             "train.micro_batch_size=2"])
    counts = pretokenize(cfg, tmp_path / "train", log=lambda *_: None)
    sp = load_tokenizer(cfg.data.tokenizer)
    files = train_sources(cfg)[0].files
    expected = [sp.encode(Path(f).read_text()) + [EOS_ID] for f in files]
    dataset = IndexedDataset(str(tmp_path / "train"))  # Megatron's own reader
    assert len(dataset) == counts["documents"] == len(files)
    assert all(dataset[i].tolist() == doc for i, doc in enumerate(expected))
    stream = load_pretokenized(tmp_path / "train")
    assert stream.tolist() == [t for doc in expected for t in doc]
    tokens, labels = WindowBatches(cfg, 0, 1).next(0, 0)  # the training loader reads it
    assert tokens.shape == (2, cfg.model.seq_length) and np.array_equal(tokens[:, 1:], labels[:, :-1])
