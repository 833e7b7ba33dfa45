"""Where the trainer's micro-batches come from: the streaming pipeline or random pre-tokenized windows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from hyperloop_dist.config import Config, SourceConfig
from hyperloop_dist.data.corpus import corpus_files
from hyperloop_dist.data.stream import (
    DataError,
    DataStats,
    Source,
    StreamLoader,
    _SourceReader,
    resolve_source,
)
from hyperloop_dist.data.token_windows import WindowSampler, load_tokens, split_files


class Batches(Protocol):
    windows_per_step: int

    def next(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any] | None: ...

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


def configured_source(spec: SourceConfig, cfg: Config, listed: list[str] | None = None) -> Source:
    return resolve_source(spec.path, spec.format, spec.text_field, spec.weight, spec.storage_options,
                          cfg.data.retry_s, listed)


def train_sources(cfg: Config, listing: list[list[str]] | None = None) -> list[Source]:
    """The training mixture: the corpus's training works, or the configured sources (listed now, or read
    from ``listing``, the files a checkpoint recorded per source)."""
    d = cfg.data
    if d.corpus == "sources":
        listing = listing or [None] * len(d.sources)
        return [configured_source(s, cfg, files) for s, files in zip(d.sources, listing, strict=True)]
    if listing:
        return [Source(name=d.dir, files=tuple(listing[0]), fmt="text")]
    train, _ = split_files(corpus_files(d.dir), d.heldout_fraction)
    return [Source(name=d.dir, files=tuple(str(f) for f in train), fmt="text")]


def listed_sources(cfg: Config, state: dict[str, Any] | None) -> list[Source]:
    """The training sources with the listing every rank reads: the checkpoint's on resume, else one made
    now by rank 0 and sent to all (a bucket that changes while ranks start cannot split them)."""
    import torch.distributed as dist

    if state is not None and "files" in state:
        return train_sources(cfg, state["files"])
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return train_sources(cfg)
    box: list[object] = [None]
    if dist.get_rank() == 0:
        try:
            box = [train_sources(cfg)]
        except DataError as exc:
            box = [exc]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], DataError):
        raise box[0]
    return box[0]  # type: ignore[return-value]


def tokenizer_sample(cfg: Config, max_bytes: int, progress: bool = True) -> Iterator[str]:
    """Documents for tokenizer training, round-robin over the training sources, up to ``max_bytes``."""
    from tqdm import tqdm

    readers = [_SourceReader(s, 0, 1, DataStats()) for s in train_sources(cfg)]
    done = 0
    with tqdm(total=max_bytes, unit="B", unit_scale=True, desc="tokenizer sample", disable=not progress) as bar:
        while done < max_bytes and readers:
            for reader in list(readers):
                if reader.position[0] > 0:  # one pass over a source is enough
                    readers.remove(reader)
                    continue
                text = reader.next_document()
                done += len(text)
                bar.update(len(text))
                yield text


class StreamBatches:
    """Micro-batches from the streaming pipeline, in order; resumable through ``state_dict``."""

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, state: dict[str, Any] | None) -> None:
        t = cfg.train
        self.windows_per_step = t.micro_batch_size * t.grad_accum * dp_size
        self.loader = StreamLoader(listed_sources(cfg, state), cfg.data.tokenizer, cfg.model.seq_length,
                                   t.micro_batch_size, dp_rank, dp_size, cfg.data.workers, t.seed, state)

    def next(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def stats(self) -> dict[str, int]:
        return self.loader.stats()

    def close(self) -> None:
        self.loader.close()


class WindowBatches:
    """Seeded random windows of a pre-tokenized token stream, indexed by step (stateless): the tokenized
    training split of data.dir, or a Megatron indexed dataset (``data.pretokenized``)."""

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int) -> None:
        t = cfg.train
        self.dp_rank = dp_rank
        if cfg.data.pretokenized:
            from hyperloop_dist.data.pretokenize import load_pretokenized

            tokens = load_pretokenized(cfg.data.pretokenized)
        else:
            tokens = load_tokens(Path(cfg.data.dir) / "tokens", "train")
        self.sampler = WindowSampler(tokens, cfg.model.seq_length, t.micro_batch_size, t.grad_accum, dp_size, t.seed)
        self.windows_per_step = self.sampler.windows_per_step

    def next(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.batch(step, micro, self.dp_rank)

    def state_dict(self) -> None:
        return None

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


def make_batches(cfg: Config, dp_rank: int, dp_size: int, state: dict[str, Any] | None = None) -> Batches:
    if cfg.data.loader == "stream":
        return StreamBatches(cfg, dp_rank, dp_size, state)
    return WindowBatches(cfg, dp_rank, dp_size)
