"""Tokens/s of the data pipeline on the real corpus: per worker, with 2 workers, and pre-tokenized.

Converts the default corpus (``english``; ``hyperloop data prepare`` obtains it) into paragraph-sized documents as
jsonl and parquet shards, then times the streaming pipeline reading, tokenizing and packing them: one slot
in-process ("per worker"), and a rank with 2 DataLoader worker processes. The same parquet shards are read
from S3 too: moto's server (``moto[server]``, a dev extra) in a child process on loopback, started here.
Each remote shard is copied to a local spool while the one before it is tokenized; the S3 row's ratio to
the local parquet row shows whether reading waits on the network. The pre-tokenized path draws windows from
the tokenized corpus (``data.loader=windows``). Target: >= 250k tokens/s per worker.

    python benchmarks/data_throughput.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from s3_loopback import S3Server, environment  # benchmarks/ is on sys.path when this script runs

from hyperloop_dist.config import Config, load_config
from hyperloop_dist.data.batches import WindowBatches
from hyperloop_dist.data.sources import train_sources
from hyperloop_dist.data.stream import SlotStream, StreamLoader, resolve_source
from hyperloop_dist.data.token_windows import prepare_corpus

SEQ, MBS = 1024, 8
S3_ROW = "parquet, S3 (moto, loopback)"


def write_shards(cfg: Config, out: Path) -> tuple[int, int]:
    docs = []
    for f in train_sources(cfg)[0].files:
        docs += [p for p in Path(f).read_text(errors="replace").split("\n\n") if p.strip()]
    (out / "jsonl").mkdir()
    (out / "parquet").mkdir()
    shards = 4
    for i in range(shards):
        part = docs[i::shards]
        (out / "jsonl" / f"{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        pq.write_table(pa.table({"text": part}), out / "parquet" / f"{i}.parquet")
    return len(docs), sum(len(d) for d in docs)


def s3_copy(local: Path, server: S3Server) -> str:
    """The parquet shards put into a bucket of ``server``; their glob URL."""
    fs = server.filesystem()
    fs.mkdir("bench")
    for f in sorted(local.glob("*.parquet")):
        fs.put_file(str(f), f"bench/parquet/{f.name}")
    return "s3://bench/parquet/*.parquet"


def timed(next_batch: Callable[[], int], seconds: float) -> float:
    next_batch()  # warm-up: workers start, first shard opens
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += next_batch()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    cfg = load_config(None, [f"model.seq_length={SEQ}"])
    prepare_corpus(cfg, log=lambda *_: None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n_docs, n_chars = write_shards(cfg, Path(tmp))
        print(f"corpus: {n_docs:,} paragraph documents, {n_chars / 1e6:.1f} MB, 4 shards per format")
        server = S3Server(process=True)
        try:
            with environment(server.env()):
                paths = {"jsonl": str(Path(tmp) / "jsonl"), "parquet": str(Path(tmp) / "parquet"),
                         S3_ROW: s3_copy(Path(tmp) / "parquet", server)}
                speeds, spools = {}, {}
                for name, path in paths.items():
                    source = resolve_source(path)
                    stream = SlotStream([source], cfg.data.tokenizer, slot=0, slots=1, seq_len=SEQ, seed=0)
                    per_worker = timed(lambda s=stream: sum(len(s.next_window()) for _ in range(MBS)), args.seconds)
                    spools[name] = stream.readers[0].spool
                    stream.close()
                    loader = StreamLoader([source], cfg.data.tokenizer, SEQ, MBS, 0, 1, workers=2, seed=0)
                    two = timed(lambda ld=loader: next(ld)[0].numel() + MBS, args.seconds)
                    loader.close()
                    speeds[name] = per_worker
                    rows.append((f"stream {name}", f"{per_worker / 1e3:,.0f}k", f"{two / 1e3:,.0f}k"))
        finally:
            server.stop()
    windows = WindowBatches(load_config(None, [f"model.seq_length={SEQ}", "data.loader=windows",
                                               f"train.micro_batch_size={MBS}"]), 0, 1)
    step = iter(range(10**9))
    pre = timed(lambda: windows.next(next(step), 0)[0].numel() + MBS, args.seconds)
    rows.append(("pre-tokenized windows", f"{pre / 1e3:,.0f}k", "(no workers)"))
    header = ("path", "tokens/s, 1 worker", "tokens/s, 2 workers")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    ratio, spool = speeds[S3_ROW] / speeds["parquet"], spools[S3_ROW]
    print(f"\nS3 / local parquet, 1 worker: {ratio:.2f}. Prefetch depth: 1 shard ahead per reader slot. In the "
          f"1-worker S3 run, {spool.copied} shard copies; the reader found {spool.ready} of its shards already "
          f"copied and waited for {spool.waited} (the first has nothing before it), {spool.wait_s:.2f} s of "
          f"{args.seconds:g} s in all")


if __name__ == "__main__":
    main()
