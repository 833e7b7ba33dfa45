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
from hyperloop_dist.data.remote import RETRY_MARGIN_S
from hyperloop_dist.data.stream import (
    DataError,
    DataStats,
    StreamLoader,
    _SourceReader,
    resolve_source,
)
from hyperloop_dist.data.tokenizer import load_tokenizer

from .helpers import checkpoint, losses, train, train_and_kill_after_first_save
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
    # a listed file replaced since (another size or ETag): an error naming it, at resume and when its copy starts
    s3.fs.copy(f"{BUCKET}/web/3.parquet", f"{BUCKET}/resume/1.parquet")
    with pytest.raises(DataError, match="resume/1.parquet has changed since the run listed it .*ETag"):
        resolve_source(pattern, listed=state["files"][0], versions=state["versions"][0])
    reader = _SourceReader(source, 0, 1, DataStats())
    with pytest.raises(DataError, match="resume/1.parquet has changed since the run listed it"):
        while True:
            reader.next_document()
    reader.close()
    s3.fs.copy(f"{BUCKET}/web/1.parquet", f"{BUCKET}/resume/1.parquet")  # restored: the same bytes, the same ETag
    # a listed file that is gone: an error naming it, at resume and in the middle of a run
    s3.fs.rm(f"{BUCKET}/resume/2.parquet")
    with pytest.raises(DataError, match="resume/2.parquet was listed when the run started and is gone"):
        resolve_source(pattern, listed=state["files"][0])
    reader = _SourceReader(source, 0, 1, DataStats())
    with pytest.raises(DataError, match="resume/2.parquet was listed when the run started and is gone"):
        while True:
            reader.next_document()
    reader.close()


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


S3_RUN = ["data.corpus=sources", f"data.sources=[{{path: 's3://{BUCKET}/web/*.parquet'}}]", "data.workers=2",
          "train.steps=8", "train.save_interval=4", "parallel.nproc_per_node=2"]


@pytest.fixture(scope="module")
def s3_run(s3, tiny_data: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks x 2 loader workers over the 4 parquet shards in S3, 8 steps: the reference of the tests below."""
    run = tmp_path_factory.mktemp("s3-run") / "straight"
    out = train([*tiny_data, *S3_RUN], run)
    assert "documents" in out.stdout and "tokens read" in out.stdout
    assert len(losses(run)) == 8
    return run


@pytest.mark.slow
def test_training_from_s3_resumes_after_a_kill_with_the_same_losses(s3_run: Path, tiny_data: list[str],
                                                                    tmp_path: Path) -> None:
    """SIGKILL after the first checkpoint; the resume reads the listing the checkpoint keeps (once)."""
    args = [*tiny_data, *S3_RUN]
    train_and_kill_after_first_save(args, tmp_path / "killed")
    data = checkpoint(tmp_path / "killed", 4) / "data"
    listing = json.loads((data / "listing.json").read_text())
    assert listing["files"] == [[f"s3://{BUCKET}/web/{i}.parquet" for i in range(4)]]
    assert all(v.startswith("size ") and "ETag" in v for v in listing["versions"][0])
    assert all("files" not in json.loads(f.read_text()) for f in data.glob("dp_*.json"))
    train(args, tmp_path / "killed")
    assert losses(tmp_path / "killed") == losses(s3_run)


@pytest.mark.slow
def test_an_outage_mid_read_retries_and_keeps_the_token_stream(s3, s3_run: Path, tiny_data: list[str],
                                                               tmp_path: Path) -> None:
    """The run above again, through a proxy that cuts the first GET of shard 1 halfway through its body,
    resets every connection and refuses new ones for 3 s. botocore's own retries are off (AWS_MAX_ATTEMPTS=1)
    and s3fs's few quick ones are spent within the outage, so the pipeline's backoff carries the read through.
    Every slot reads its shard from its first batch, so the read cut is one the token stream needs."""
    proxy = FlakyProxy(s3.server.port)
    shard = f"{BUCKET}/web/1.parquet"
    proxy.outage_on("GET", shard, after_bytes=s3.fs.size(shard) // 2, seconds=3.0)
    try:
        out = train([*tiny_data, *S3_RUN], tmp_path / "outage",
                    env={"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": "1"})
    finally:
        proxy.stop()  # (the run's processes, and so every copy thread, have ended)
    assert proxy.outages == 1 and proxy.hit is not None and proxy.hit.startswith(f"GET /{shard}"), proxy.hit
    log = out.stdout + out.stderr  # (the launcher passes the ranks' stderr on in its stdout)
    assert f"s3://{shard}" in log and "retry 1 in" in log, log[-3000:]
    assert losses(tmp_path / "outage") == losses(s3_run)


def test_the_hang_watchdog_waits_out_the_data_retries(tmp_path: Path) -> None:
    """A remote source's outage ends as the pipeline's error naming it, not as a hang: the automatic step
    allowance is over data.retry_s, and an explicit one that is not is refused at load."""
    from hyperloop_dist.config import ConfigError, load_config
    from hyperloop_dist.train import hang
    from hyperloop_dist.train.trainer import _min_step_allowance

    remote = ["data.corpus=sources", f"data.sources=[{{path: 's3://{BUCKET}/web/*.parquet'}}]", "data.retry_s=300"]
    floor = _min_step_allowance(load_config(None, remote))
    assert floor == 300 + RETRY_MARGIN_S and _min_step_allowance(load_config(None, [])) == hang.MIN_STEP_TIMEOUT_S
    watchdog = hang.HangWatchdog(tmp_path, 0, 1, "0", hang.Allowances(1800.0, None, 900.0, min_step_s=floor))
    watchdog.section("step", 1)
    watchdog.step_times.extend([0.05] * 10)  # fast steps: 10 x the median is far below the floor
    assert watchdog.allowance() == floor
    with pytest.raises(ConfigError, match=r"train.hang_timeout_s=60.0: must be more than data.retry_s=300.0"):
        load_config(None, [*remote, "train.hang_timeout_s=60"])
