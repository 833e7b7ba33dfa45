"""The recipe's training sources: the corpus's training works or the configured sources, and the listing every
rank reads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hyperloop_dist.config import Config, SourceConfig
from hyperloop_dist.data.corpus import corpus_files, split_files
from hyperloop_dist.data.stream import DataError, DataStats, Source, _SourceReader, resolve_source


def configured_source(spec: SourceConfig, cfg: Config, listed: list[str] | None = None,
                      versions: list[str] | None = None) -> Source:
    return resolve_source(spec.path, spec.format, spec.text_field, spec.weight, spec.storage_options,
                          cfg.data.retry_s, listed, versions)


def train_sources(cfg: Config, listing: list[list[str]] | None = None,
                  versions: list[list[str]] | None = None) -> list[Source]:
    """The training mixture: the corpus's training works, or the configured sources (listed now, or read
    from ``listing``, the files a checkpoint recorded per source, with their remote ``versions``)."""
    d = cfg.data
    if d.corpus == "sources":
        listing = listing or [None] * len(d.sources)
        versions = versions or [None] * len(d.sources)
        return [configured_source(s, cfg, files, v) for s, files, v in zip(d.sources, listing, versions,
                                                                           strict=True)]
    if listing:
        return [Source(name=d.dir, files=tuple(listing[0]), fmt="text")]
    train, _ = split_files(corpus_files(d.dir), d.heldout_fraction)
    return [Source(name=d.dir, files=tuple(str(f) for f in train), fmt="text")]


def listed_sources(cfg: Config, state: dict[str, Any] | None) -> list[Source]:
    """The training sources with the listing every rank reads: the checkpoint's on resume, else one made
    now by rank 0 and sent to all (a bucket that changes while ranks start cannot split them)."""
    import torch.distributed as dist

    if state is not None and "files" in state:
        return train_sources(cfg, state["files"], state.get("versions"))
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
