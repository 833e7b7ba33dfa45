"""Sources in object storage, against a real S3 API (moto's server on a free loopback port): the same token
stream as local files, the listing kept for resume, retries through an outage, permanent failures named."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hyperloop_dist import cli
from hyperloop_dist.data.stream import (
    DataError,
    DataStats,
    SlotStream,
    StreamLoader,
    _SourceReader,
    resolve_source,
)
from hyperloop_dist.data.tokenizer import load_tokenizer

from .helpers import losses, train, train_and_kill_after_first_save
from .s3_server import FlakyProxy, S3Server, environment, forbidding_server
from .test_data_stream import doc_texts, write_jsonl

BUCKET = "corpus-bucket"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """moto S3 with ``web/`` (4 parquet shards) and ``notes/`` (2 jsonl shards with bad records), the same
    files under ``local``; the four AWS variables point every client of this process and its children at it."""
    server = S3Server()
    local = tmp_path_factory.mktemp("s3-corpus")
    (local / "web").mkdir()
    (local / "notes").mkdir()
    web = doc_texts(400, "web")
    for i in range(4):
        pq.write_table(pa.table({"text": web[i::4]}), local / "web" / f"{i}.parquet")
    write_jsonl(local / "notes" / "0.jsonl", doc_texts(60, "note"))
    (local / "notes" / "1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n{not json\n{"body": 1}\n'
                                              + json.dumps({"text": "the last note"}).encode() + b"\n")
    with environment(server.env()):
        fs = server.filesystem()
        fs.mkdir(BUCKET)
        for f in sorted(local.rglob("*.*")):
            fs.put_file(str(f), f"{BUCKET}/{f.relative_to(local)}")
        yield SimpleNamespace(server=server, fs=fs, local=local)
    server.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_data: list[str]) -> str:
    return next(o.split("=", 1)[1] for o in tiny_data if o.startswith("data.tokenizer="))


def _mixture(root: str) -> list:
    return [resolve_source(f"{root}/web/*.parquet", weight=0.6), resolve_source(f"{root}/notes/", weight=0.4)]


def test_s3_sources_stream_the_same_tokens_as_local_files(s3, tokenizer: str) -> None:
    remote, local = _mixture(f"s3://{BUCKET}"), _mixture(str(s3.local))
    assert remote[0].files == tuple(f"s3://{BUCKET}/web/{i}.parquet" for i in range(4))  # sorted URLs
    assert remote[1].files == (f"s3://{BUCKET}/notes/0.jsonl", f"s3://{BUCKET}/notes/1.jsonl")
    streams = []
    for sources in (remote, local):  # 2 loader worker processes (s3fs after fork), 4 reading slots in all
        loader = StreamLoader(sources, tokenizer, seq_len=31, micro_batch_size=2, dp_rank=0, dp_size=1,
                              workers=2, seed=3)
        streams.append([next(loader)[0] for _ in range(12)])
        loader.close()
    assert all(np.array_equal(a, b) for a, b in zip(*streams, strict=True))
    # one pass of the jsonl source: the bad-input counters of the local files, and the shard copied ahead
    counts = []
    for source in (remote[1], local[1]):
        reader, docs = _SourceReader(source, 0, 1, DataStats()), []
        for position, text in reader._records():
            if position[0] > 0:
                break
            docs.append(text)
        counts.append((docs, reader.stats.counts))
    assert counts[0] == counts[1] and counts[0][1]["invalid_utf8"] == counts[0][1]["malformed_json"] == 1
    assert reader.spool is None and remote[1].remote


def test_resume_reads_the_files_listed_at_the_start(s3, tokenizer: str) -> None:
    for i in range(4):
        s3.fs.copy(f"{BUCKET}/web/{i}.parquet", f"{BUCKET}/resume/{i}.parquet")
    pattern = f"s3://{BUCKET}/resume/*.parquet"

    def loader(source, state=None) -> StreamLoader:
        return StreamLoader([source], tokenizer, seq_len=15, micro_batch_size=2, dp_rank=0, dp_size=1, workers=0,
                            seed=0, state=state)

    source = resolve_source(pattern)
    straight = loader(source)
    expected = [next(straight)[0] for _ in range(60)]
    first = loader(source)
    head = [next(first)[0] for _ in range(25)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert state["files"] == [list(source.files)]
    s3.fs.copy(f"{BUCKET}/web/0.parquet", f"{BUCKET}/resume/00-added-later.parquet")  # sorts first
    with pytest.raises(DataError, match="other files"):
        loader(resolve_source(pattern), state)  # a fresh listing would shift every slot's files
    resumed = loader(resolve_source(pattern, listed=state["files"][0]), state)
    tail = [next(resumed)[0] for _ in range(35)]
    assert all(np.array_equal(a, b) for a, b in zip(head + tail, expected, strict=True))
    # a listed file that is gone: an error naming it, at resume and in the middle of a run
    s3.fs.rm(f"{BUCKET}/resume/2.parquet")
    with pytest.raises(DataError, match="resume/2.parquet was listed when the run started and is gone"):
        resolve_source(pattern, listed=state["files"][0])
    reader = _SourceReader(source, 0, 1, DataStats())
    with pytest.raises(DataError, match="resume/2.parquet was listed when the run started and is gone"):
        while True:
            reader.next_document()


@pytest.mark.xfail(reason="unfinished: the outage fires after the windows read here (prefetch of a later shard)", strict=False)
def test_an_outage_mid_read_retries_and_keeps_the_token_stream(s3, tokenizer: str) -> None:
    """A proxy in front of moto resets every connection in the middle of a shard's copy and refuses new
    ones for 3 s; botocore's own retries are off, so the pipeline's backoff is what carries the read through."""
    rng = np.random.default_rng(0)
    words = np.array("the king's men of rome and all the world a stage players exit".split())
    for i in range(3):  # ~150 kB shards: the outage falls inside one response body
        docs = [" ".join(rng.choice(words, 40)) for _ in range(600)]
        pq.write_table(pa.table({"text": docs}), s3.local / f"outage-{i}.parquet", compression="none")
        s3.fs.put_file(str(s3.local / f"outage-{i}.parquet"), f"{BUCKET}/outage/{i}.parquet")
    proxy = FlakyProxy(s3.server.port)
    through_proxy = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}"},
                     "config_kwargs": {"retries": {"max_attempts": 1}}}
    pattern = f"s3://{BUCKET}/outage/*.parquet"
    stream = SlotStream([resolve_source(pattern, storage_options=through_proxy, retry_s=30)], tokenizer, slot=0,
                        slots=1, seq_len=31, seed=0)
    proxy.outage_after(s3.fs.size(f"{BUCKET}/outage/0.parquet") + 60_000, seconds=3.0)  # inside shard 1's copy
    start, got = time.monotonic(), []
    while stream.readers[0].position[:2] < (0, 2):  # through shard 1, into shard 2
        got.append(stream.next_window())
    proxy.stop()
    assert proxy.outages == 1, "the outage never happened"
    assert time.monotonic() - start > 3.0
    direct = SlotStream([resolve_source(pattern)], tokenizer, slot=0, slots=1, seq_len=31, seed=0)
    assert all(np.array_equal(a, direct.next_window()) for a in got)
    assert stream.stats.counts == direct.stats.counts


def test_permanent_failures_stop_before_training_naming_the_source(s3, tokenizer: str, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    missing = "s3://no-such-bucket/web/*.parquet"
    code = cli.main(["train", "data.corpus=sources", f"data.sources=[{{path: '{missing}'}}]",
                     f"data.tokenizer={tokenizer}", f"train.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 1 and "training failed before start" in err and missing in err and "does not exist" in err
    endpoint, server = forbidding_server()
    start = time.monotonic()
    with pytest.raises(DataError, match="access to .* is denied .*AWS_ACCESS_KEY_ID"):
        resolve_source(f"s3://{BUCKET}/web/*.parquet", storage_options={"client_kwargs": {"endpoint_url": endpoint}})
    assert time.monotonic() - start < 10, "a 403 is not retried"
    server.shutdown()


def test_tokenizer_training_and_prepare_read_s3_urls(s3, tmp_path: Path) -> None:
    sources = f"data.sources=[{{path: 's3://{BUCKET}/web/*.parquet'}}, {{path: 's3://{BUCKET}/notes/'}}]"
    args = ["data.corpus=sources", sources, "model.vocab_size=300"]
    assert cli.main(["data", "train-tokenizer", *args, f"data.tokenizer={tmp_path / 'a.model'}"]) == 0
    assert cli.main(["data", "prepare", *args, f"data.tokenizer={tmp_path / 'b.model'}"]) == 0
    assert load_tokenizer(tmp_path / "a.model").vocab_size() == load_tokenizer(tmp_path / "b.model").vocab_size() == 300


@pytest.mark.slow
def test_training_from_s3_resumes_after_a_kill_with_the_same_losses(s3, tiny_data: list[str],
                                                                    tmp_path: Path) -> None:
    """2 ranks x 2 loader workers over 4 parquet shards in S3; SIGKILL after the first checkpoint."""
    args = [*tiny_data, "data.corpus=sources", f"data.sources=[{{path: 's3://{BUCKET}/web/*.parquet'}}]",
            "data.workers=2", "train.steps=8", "train.save_interval=4", "parallel.nproc_per_node=2"]
    straight = train(args, tmp_path / "straight")
    assert "documents" in straight.stdout and "tokens read" in straight.stdout
    train_and_kill_after_first_save(args, tmp_path / "killed")
    train(args, tmp_path / "killed")
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 8
