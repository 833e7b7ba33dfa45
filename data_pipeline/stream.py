"""Streaming tokenization: sources -> documents -> tokens -> packed windows, per DP rank and loader worker.

* **Sources** are read with ``datasets`` streaming (``load_dataset(..., streaming=True)``), one shard (file)
  at a time: ``jsonl`` (read as text lines and parsed here, so one malformed line is skipped and counted
  instead of failing its file), ``parquet`` and plain ``text`` (one document per file). A weighted
  **mixture** draws the source of each next document from a counter-based seeded RNG: reproducible and
  resumable.
* **Sharding**: the reading slots are (DP rank, worker). With at least as many files as slots, slot s
  reads files s, s + slots, ...; with fewer, every slot reads all files and keeps documents
  s, s + slots, ... No two slots ever see the same document.
* **Packing**: each slot joins its documents with EOS and cuts consecutive ``seq_len + 1`` windows
  (no padding); a micro-batch is ``micro_batch_size`` windows of one slot. Documents over
  ``MAX_PIECE`` characters are tokenized in newline-aligned pieces.
* **Exactly-once resume**: every batch carries its slot's position after it: per source (epoch, file,
  document), the mixture draw counter of the first document still in the packing buffer and the token
  offset into it. A resumed slot re-reads from there and re-derives the buffer, so the token stream
  continues exactly where the consumed batches ended (prefetched batches are simply regenerated).
* **Bad input** (malformed JSON, missing or non-string text field, invalid UTF-8, empty documents, empty
  shards) is skipped and counted in :class:`DataStats`; a missing file is an error before training.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hyperloop_dist.data.errors import DataError
from hyperloop_dist.data.tokenizer import EOS_ID

MAX_PIECE = 1 << 20  # characters tokenized at once
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".md": "text",
           ".rst": "text"}
STAT_KEYS = ("documents", "tokens", "malformed_json", "missing_field", "non_string_field", "invalid_utf8",
             "empty_documents", "empty_shards", "split_documents")


DEFAULT_RETRY_S = 120.0  # data.retry_s: how long a remote read retries transient failures


@dataclass(frozen=True)
class Source:
    name: str
    files: tuple[str, ...]
    fmt: str
    text_field: str = "text"
    weight: float = 1.0
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)  # fsspec, for remote files
    retry_s: float = DEFAULT_RETRY_S
    versions: dict[str, str] = field(default_factory=dict, hash=False)  # remote file -> its size and ETag

    @property
    def remote(self) -> bool:
        from hyperloop_dist.data.remote import is_remote

        return is_remote(self.name)


def resolve_source(pattern: str, fmt: str = "auto", text_field: str = "text", weight: float = 1.0,
                   storage_options: dict[str, Any] | None = None, retry_s: float = DEFAULT_RETRY_S,
                   listed: list[str] | None = None, versions: list[str] | None = None) -> Source:
    """Expand a path, directory or glob, local or any fsspec URL, into a Source; every problem is reported
    before training starts. ``listed``: the sorted files a checkpoint recorded when the run started, and
    ``versions`` their remote sizes and ETags; the source reads exactly those again, and each must still
    exist, unchanged."""
    storage_options = dict(storage_options or {})
    if listed is None:
        found = _list_files(pattern, storage_options, retry_s)
        files, listed_versions = list(found), {f: v for f, v in found.items() if v}
    else:
        files, listed_versions = list(listed), {f: v for f, v in zip(listed, versions or [], strict=False) if v}
        try:
            now = _list_files(pattern, storage_options, retry_s)
        except DataError as exc:
            if exc.__class__ is not DataError:  # a remote failure (denied, no bucket, outage) as it is
                raise
            now = {}
        _check_unchanged(pattern, files, listed_versions, now)
    if fmt == "auto":
        kinds = {FORMATS.get(Path(f).suffix) for f in files}
        if None in kinds or len(kinds) != 1:
            raise DataError(f"data source {pattern!r}: cannot tell the format from the file names "
                            f"({', '.join(sorted({Path(f).suffix for f in files}))}); set its format")
        fmt = kinds.pop()
    if fmt not in ("jsonl", "parquet", "text"):
        raise DataError(f"data source {pattern!r}: format {fmt!r} is not one of jsonl, parquet, text")
    if weight <= 0:
        raise DataError(f"data source {pattern!r}: weight {weight} must be > 0")
    source = Source(pattern, tuple(files), fmt, text_field, weight, storage_options, retry_s, listed_versions)
    if fmt == "parquet" and not source.remote:  # (remote shards are checked when their copy arrives)
        for f in files:
            _check_parquet_magic(pattern, f)
    return source


def _check_unchanged(pattern: str, files: list[str], versions: dict[str, str], now: dict[str, str]) -> None:
    """Each file a run listed at its start is still there, with the size and ETag it had then."""
    from hyperloop_dist.data.remote import changed, changed_message, gone_message

    what = f"data source {pattern!r}"
    gone = [f for f in files if f not in now]
    if gone:
        more = f" ({len(gone)} of its {len(files)} files are gone)" if len(gone) > 1 else ""
        raise DataError(gone_message(what, gone[0]) + more)
    replaced = [f for f in files if changed(versions.get(f, ""), now[f])]
    if replaced:
        more = f" ({len(replaced)} of its {len(files)} files have changed)" if len(replaced) > 1 else ""
        raise DataError(changed_message(what, replaced[0], versions[replaced[0]], now[replaced[0]]) + more)


def _list_files(pattern: str, storage_options: dict[str, Any], retry_s: float) -> dict[str, str]:
    """The sorted files ``pattern`` names, each with its remote version ("" for a local file)."""
    from hyperloop_dist.data.remote import has_glob, is_remote, list_files

    path = Path(pattern)
    glob_like = has_glob(pattern)
    versions: dict[str, str] = {}
    if is_remote(pattern):
        versions = list_files(f"data source {pattern!r}", pattern, storage_options, retry_s, tuple(FORMATS))
        files = list(versions)
        if not files and not glob_like:
            raise DataError(f"data source {pattern!r} does not exist; check the URL (globs like "
                            "'s3://bucket/dir/*.parquet' work)")
    elif path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix in FORMATS)
    elif glob_like:
        files = sorted(glob.glob(pattern, recursive=True))
    elif path.is_file():
        files = [str(path)]
    else:
        raise DataError(f"data source {pattern!r} does not exist; check the path (globs like 'dir/*.jsonl' work)")
    if not files:
        raise DataError(f"data source {pattern!r} matches no files")
    missing = [f for f in files if not is_remote(f) and not Path(f).is_file()]
    if missing:
        raise DataError(f"data source {pattern!r}: {missing[0]} is not a readable file")
    return {f: versions.get(f, "") for f in files}


def _check_parquet_magic(source: str, path: str, name: str | None = None) -> None:
    """A parquet file starts and ends with ``PAR1``; anything else gets a named error, not pyarrow's."""
    size = os.path.getsize(path)
    if size == 0:
        return  # an empty shard: skipped and counted
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise DataError(f"data source {source!r}: {name or path} is not a parquet file (it lacks the PAR1 marks at its "
                        "start and end); fix the file, or name its real format with the source's `format`")


def check_sources(sources: list[Source]) -> None:
    """Stop before training when a source has no usable document in a whole pass.

    Each source is read as one reader slot reads it, until its first good document (cheap for a good
    source); a whole pass without one raises the reader's DataError. One bad source in a mixture fails the
    run too: training on fewer sources than configured would be a silent change of the data.
    """
    for source in sources:
        _SourceReader(source, 0, 1, DataStats()).next_document()


def _no_documents(source: Source, records: int, stats: DataStats, where: str = "",
                  files: tuple[str, ...] | None = None) -> str:
    reasons = ", ".join(f"{v:,} {k}" for k, v in stats.counts.items() if v and k not in ("documents", "tokens"))
    files = files if files is not None else source.files
    files = files[0] if len(files) == 1 else f"{len(files)} files"
    hint = {"jsonl": f"one JSON object per line with a string field {source.text_field!r}",
            "parquet": f"a string column {source.text_field!r}",
            "text": "UTF-8 text files"}[source.fmt]
    return (f"data source {source.name!r}{where}: 0 documents in {records:,} records of {files}"
            f"{f' ({reasons})' if reasons else ''}; a {source.fmt} source needs {hint} "
            "(set the source's `text_field` or `format` if they differ)")


@dataclass
class DataStats:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0))

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n


def _undecodable(text: str) -> bool:
    # Bytes that are not UTF-8 arrive as U+FFFD (errors="replace"); a U+FFFD already in the source text is
    # the mark of an earlier failed decode, so it is skipped the same way.
    return "\ufffd" in text


def _leave_stop_signals_to_trainer(worker_id: int) -> None:
    """SLURM signals every process of a job step, loader workers included. A worker killed by USR1 or TERM
    would fail the batch the trainer is about to checkpoint after; the trainer handles both and workers
    end with it (DataLoader's watchdog ends a worker whose parent is gone)."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def _outside_torch_worker() -> Iterator[None]:
    """Hide the DataLoader worker context from ``datasets`` while an iteration starts.

    Inside a worker, ``datasets.IterableDataset.__iter__`` splits its shards over the workers by itself.
    Our slots already own disjoint files (or records), so that second split would starve all but one
    worker. The check runs once, when iteration starts (torch's private ``_worker_info``; covered by the
    multi-worker tests).
    """
    from torch.utils.data._utils import worker

    saved, worker._worker_info = worker._worker_info, None
    try:
        yield
    finally:
        worker._worker_info = saved


def _iterate(dataset: Iterator[dict]) -> Iterator[dict]:
    it = iter(dataset)
    with _outside_torch_worker():
        first = next(it, None)
    if first is None:
        return
    yield first
    yield from it


def _read_shard(source: Source, path: str, name: str | None = None) -> Iterator[tuple[str | None, str | None]]:
    """Yield ``(text, None)`` per good record of the local file ``path`` and ``(None, reason)`` per skipped
    one; ``name`` is the shard's own name where ``path`` is the local copy of a remote one."""
    from datasets import load_dataset

    name = name or path
    if os.path.getsize(path) == 0:
        return
    if source.fmt == "parquet" and name != path:
        _check_parquet_magic(source.name, path, name)
    if source.fmt == "parquet":
        rows = _iterate(load_dataset("parquet", data_files=[path], split="train", streaming=True))
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as exc:  # pyarrow's own errors name neither the source nor what to do
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise DataError(f"data source {source.name!r}: {name} cannot be read as parquet "
                                f"({type(exc).__name__}: {first})") from exc
            value = row.get(source.text_field, None)
            if value is None:
                yield None, "missing_field"
            elif not isinstance(value, str):
                yield None, "non_string_field"
            else:
                yield value, None
    # errors="replace" keeps a file with undecodable bytes readable: the bad line or document is skipped.
    lines = load_dataset("text", data_files=[path], split="train", streaming=True, encoding="utf-8",
                         encoding_errors="replace", sample_by="document" if source.fmt == "text" else "line")
    for row in _iterate(lines):
        text = row["text"]
        if _undecodable(text):
            yield None, "invalid_utf8"
        elif source.fmt == "text":
            yield text, None
        elif text.strip():  # (blank lines between JSON records are not records)
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                yield None, "malformed_json"
                continue
            if not isinstance(record, dict) or source.text_field not in record:
                yield None, "missing_field"
            elif not isinstance(record[source.text_field], str):
                yield None, "non_string_field"
            else:
                yield record[source.text_field], None


class _SourceReader:
    """One source as seen by one slot: an endless, resumable sequence of documents."""

    def __init__(self, source: Source, slot: int, slots: int, stats: DataStats,
                 position: tuple[int, int, int] = (0, 0, 0)) -> None:
        self.source, self.slot, self.slots, self.stats = source, slot, slots, stats
        self.by_file = len(source.files) >= slots
        self.files = source.files[slot::slots] if self.by_file else source.files
        self.position = tuple(position)  # (epoch, file index, record index in file): the next to read
        self._iter: Iterator[tuple[tuple[int, int, int], str]] | None = None
        self._counts: dict[int, int] = {}  # records per file (document-level dealing)
        self.spool = None
        if source.remote:
            from hyperloop_dist.data.remote import ShardSpool

            self.spool = ShardSpool(f"data source {source.name!r}", source.storage_options, source.retry_s,
                                    source.versions)

    def close(self) -> None:
        """Stop a remote source's background copy: nothing reads on once the reader is done with."""
        if self.spool is not None:
            self.spool.close()

    @contextlib.contextmanager
    def _shard(self, f: int, ahead: bool = True) -> Iterator[str]:
        """File ``f`` of this slot as a local path: remote shards are copied (the next one meanwhile)."""
        name = self.files[f]
        if self.spool is None:
            if not os.path.isfile(name):
                from hyperloop_dist.data.remote import gone_message

                raise DataError(gone_message(f"data source {self.source.name!r}", name))
            yield name
            return
        following = self.files[(f + 1) % len(self.files)] if ahead else None
        with self.spool.shard(name, following, in_order=ahead) as local:
            yield local

    def _records(self) -> Iterator[tuple[tuple[int, int, int], str]]:
        epoch, file_pos, record_pos = self.position
        while True:
            found, records = False, 0
            for f in range(file_pos, len(self.files)):
                empty, count = True, 0
                with self._shard(f) as local:
                    for r, (text, skipped) in enumerate(_read_shard(self.source, local, self.files[f])):
                        empty, count = False, r + 1
                        if r < record_pos:
                            continue  # read before the checkpoint (and counted then)
                        after = (epoch, f, r + 1)
                        self.position = after
                        if not self.by_file and (self._record_offset(f) + r) % self.slots != self.slot:
                            continue  # records are dealt to slots across the whole source, in file order
                        records += 1
                        if skipped is not None:
                            self.stats.add(skipped)
                        elif not text.strip():
                            self.stats.add("empty_documents")
                        else:
                            found = True
                            yield after, text
                self._counts.setdefault(f, count)
                if empty and epoch == 0 and record_pos == 0:
                    self.stats.add("empty_shards")
                record_pos = 0
                self.position = (epoch, f + 1, 0)
            if not found and file_pos == 0:
                where = f" (the files or records of reader slot {self.slot} of {self.slots})" if self.slots > 1 else ""
                raise DataError(_no_documents(self.source, records, self.stats, where, tuple(self.files)))
            epoch, file_pos, record_pos = epoch + 1, 0, 0
            self.position = (epoch, 0, 0)

    def _record_offset(self, file_index: int) -> int:
        for f in range(file_index):
            if f not in self._counts:
                with self._shard(f, ahead=False) as local:
                    self._counts[f] = sum(1 for _ in _read_shard(self.source, local, self.files[f]))
        return sum(self._counts[f] for f in range(file_index))

    def next_document(self) -> str:
        if self._iter is None:
            self._iter = self._records()
        return next(self._iter)[1]


@dataclass
class SlotState:
    """Where a slot's token stream stands: enough to regenerate it exactly."""

    positions: list[tuple[int, int, int]]  # per source, before the first document still in the buffer
    draw: int  # mixture draw counter of that document
    offset: int  # tokens of it already consumed
    stats: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"positions": [list(p) for p in self.positions], "draw": self.draw, "offset": self.offset,
                "stats": self.stats}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SlotState:
        return cls([tuple(p) for p in data["positions"]], data["draw"], data["offset"], dict(data["stats"]))


class SlotStream:
    """The packed token stream of one (DP rank, worker) slot."""

    def __init__(self, sources: list[Source], tokenizer_path: str, slot: int, slots: int, seq_len: int,
                 seed: int, state: SlotState | None = None) -> None:
        import sentencepiece as spm

        self.sources, self.slot, self.slots = sources, slot, slots
        self.window = seq_len + 1
        self.seed = seed
        self.sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
        state = state or SlotState([(0, 0, 0)] * len(sources), 0, 0, dict.fromkeys(STAT_KEYS, 0))
        self.stats = DataStats(dict(state.stats))
        self.readers = [_SourceReader(s, slot, slots, self.stats, p) for s, p in zip(sources, state.positions,
                                                                                       strict=True)]
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.cumulative = np.cumsum(weights / weights.sum())
        self.draw = state.draw
        # buffer of documents: (draw, positions before it, tokens); `self.offset` tokens of the first consumed
        self.buffer: deque[tuple[int, list[tuple[int, int, int]], np.ndarray]] = deque()
        self.offset = 0
        self.buffered = 0
        self._pull()
        self.offset = state.offset
        self.buffered -= state.offset

    def _choose(self, draw: int) -> int:
        if len(self.sources) == 1:
            return 0
        u = np.random.default_rng([self.seed, self.slot, draw]).random()
        return int(np.searchsorted(self.cumulative, u, side="right").clip(max=len(self.sources) - 1))

    def _tokenize(self, text: str) -> list[int]:
        if len(text) <= MAX_PIECE:
            return self.sp.encode(text)
        self.stats.add("split_documents")
        ids: list[int] = []
        start = 0
        while start < len(text):
            end = min(len(text), start + MAX_PIECE)
            cut = text.rfind("\n", start, end) + 1 if end < len(text) else end
            cut = cut if cut > start else end
            ids.extend(self.sp.encode(text[start:cut]))
            start = cut
        return ids

    def _pull(self) -> None:
        """Read the next document into the buffer."""
        positions = [r.position for r in self.readers]
        which = self._choose(self.draw)
        text = self.readers[which].next_document()
        tokens = np.asarray(self._tokenize(text) + [EOS_ID], dtype=np.int64)
        self.stats.add("documents")
        self.stats.add("tokens", len(tokens))
        self.buffer.append((self.draw, positions, tokens))
        self.draw += 1
        self.buffered += len(tokens)

    def next_window(self) -> np.ndarray:
        while self.buffered < self.window:
            self._pull()
        out, need = [], self.window
        while need:
            _, _, tokens = self.buffer[0]
            take = min(need, len(tokens) - self.offset)
            out.append(tokens[self.offset:self.offset + take])
            self.offset += take
            need -= take
            if self.offset == len(tokens):
                self.buffer.popleft()
                self.offset = 0
        self.buffered -= self.window
        return np.concatenate(out)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    def state(self) -> SlotState:
        if not self.buffer:
            return SlotState([r.position for r in self.readers], self.draw, 0, dict(self.stats.counts))
        draw, positions, _ = self.buffer[0]
        return SlotState(list(positions), draw, self.offset, dict(self.stats.counts))


class _StreamDataset(IterableDataset):
    def __init__(self, sources: list[Source], tokenizer: str, seq_len: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, workers: int, seed: int, states: dict[int, SlotState], first_role: int) -> None:
        super().__init__()
        self.args = (sources, tokenizer, seq_len)
        self.mbs, self.dp_rank, self.dp_size, self.workers = micro_batch_size, dp_rank, dp_size, workers
        self.seed, self.states, self.first_role = seed, states, first_role

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, dict[str, Any]]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        role = (worker + self.first_role) % self.workers  # the resumed loader's first batch is role first_role
        slots = self.dp_size * self.workers
        slot = self.dp_rank * self.workers + role
        sources, tokenizer, seq_len = self.args
        try:
            stream = SlotStream(sources, tokenizer, slot, slots, seq_len, self.seed, self.states.get(role))
            while True:
                rows = np.stack([stream.next_window() for _ in range(self.mbs)])
                yield torch.from_numpy(rows), role, stream.state().to_json()
        except Exception as exc:
            # Sent as a value: DataLoader would re-raise it wrapped, its message replaced by a worker traceback.
            import traceback

            yield None, role, {"error": type(exc).__name__, "message": str(exc),
                               "data_error": isinstance(exc, DataError), "traceback": traceback.format_exc()}


class StreamLoader:
    """Micro-batches ``[micro_batch_size, seq_len + 1]`` of one DP rank, with a checkpointable state."""

    def __init__(self, sources: list[Source], tokenizer: str, seq_len: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, workers: int, seed: int, state: dict[str, Any] | None = None) -> None:
        self.layout = {"dp_size": dp_size, "workers": max(workers, 1), "seq_len": seq_len,
                       "micro_batch_size": micro_batch_size, "sources": [s.name for s in sources]}
        self.dp_rank = dp_rank
        self.files = [list(s.files) for s in sources]  # the listing made at the run's start
        self.versions = [[s.versions.get(f, "") for f in s.files] for s in sources]
        self.states: dict[int, SlotState] = {}
        self.consumed = 0
        if state is not None:
            if state["layout"] != self.layout:
                diffs = {k: (state["layout"].get(k), v) for k, v in self.layout.items() if state["layout"].get(k) != v}
                raise DataError(
                    f"the saved data pipeline state was made for another layout ({diffs}, saved vs now): "
                    "data-parallel size, loader workers, sequence length, micro-batch size and sources must "
                    "match to resume the token stream exactly; resume with the saved layout"
                )
            if state.get("files", self.files) != self.files:
                raise DataError("the saved data pipeline state was made over other files than these sources list "
                                "now; resolve the sources with the saved listing (listed_sources) to resume")
            self.states = {int(k): SlotState.from_json(v) for k, v in state["slots"].items()}
            self.consumed = state["consumed"]
        n = self.layout["workers"]
        dataset = _StreamDataset(sources, tokenizer, seq_len, micro_batch_size, dp_rank, dp_size, n, seed,
                                 self.states, self.consumed % n)
        self._loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                                  prefetch_factor=4 if workers else None, persistent_workers=workers > 0,
                                  worker_init_fn=_leave_stop_signals_to_trainer if workers else None)
        self._iter = iter(self._loader)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, role, state = next(self._iter)
        if rows is None:
            if state["data_error"]:
                raise DataError(state["message"])
            raise RuntimeError(f"data loader (reader slot {role}) failed: {state['error']}: {state['message']}\n"
                               f"{state['traceback']}")
        self.states[role] = SlotState.from_json(state)
        self.consumed += 1
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def __iter__(self) -> StreamLoader:
        return self

    def close(self) -> None:
        """Stop the worker processes now (every exit path of the trainer calls this).

        Workers ignore SIGTERM (:func:`_leave_stop_signals_to_trainer`), so DataLoader's own shutdown, which
        ends a worker that does not answer with ``terminate()``, can leave one behind, and Python's exit
        would then wait for it forever: the stragglers get SIGKILL.
        """
        it, self._iter = self._iter, None
        if it is None:
            return
        workers = list(getattr(it, "_workers", []))  # (torch's private names; tests/test_faults.py covers them)
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join(timeout=5)

    def stats(self) -> dict[str, int]:
        total = dict.fromkeys(STAT_KEYS, 0)
        for s in self.states.values():
            for k, v in s.stats.items():
                total[k] += v
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "consumed": self.consumed, "files": self.files, "versions": self.versions,
                "slots": {str(k): v.to_json() for k, v in self.states.items()}}
