"""Pre-tokenize the training sources into Megatron-core's indexed dataset format (``PREFIX.bin`` / ``.idx``).

One pass over every source (each document once, EOS-terminated). The ``.bin`` file holds the documents'
tokens back to back, so ``data.loader=windows`` with ``data.pretokenized=PREFIX`` reads it as one token
stream (memory-mapped); Megatron's own ``IndexedDataset(PREFIX)`` reads the same files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from hyperloop_dist.config import Config
from hyperloop_dist.data.sources import train_sources
from hyperloop_dist.data.stream import DataStats, _SourceReader
from hyperloop_dist.data.tokenizer import EOS_ID, load_tokenizer


def token_dtype(vocab_size: int) -> type[np.number]:
    return np.uint16 if vocab_size <= 65536 else np.int32


def pretokenize(cfg: Config, prefix: str | Path, log: Callable[[str], object] = print) -> dict[str, int]:
    """Write ``prefix.bin`` / ``prefix.idx``; returns the counts (documents, tokens, skipped records)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path
    from tqdm import tqdm

    sp = load_tokenizer(cfg.data.tokenizer, cfg.model.vocab_size)
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(sp.vocab_size())
    builder = IndexedDatasetBuilder(get_bin_path(prefix) + ".tmp", dtype=dtype)
    stats = DataStats()
    with tqdm(desc="pretokenize", unit=" docs") as bar:
        for source in train_sources(cfg):
            reader = _SourceReader(source, 0, 1, stats)
            for position, text in reader._records():
                if position[0] > 0:
                    break
                ids = sp.encode(text) + [EOS_ID]
                builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
                stats.add("documents")
                stats.add("tokens", len(ids))
                bar.update(1)
    builder.finalize(get_idx_path(prefix) + ".tmp")
    # publish both files only once complete
    Path(get_bin_path(prefix) + ".tmp").replace(get_bin_path(prefix))
    Path(get_idx_path(prefix) + ".tmp").replace(get_idx_path(prefix))
    log(f"wrote {prefix}.bin/.idx: {stats.counts['documents']:,} documents, {stats.counts['tokens']:,} tokens")
    return stats.counts


def load_pretokenized(prefix: str | Path) -> np.ndarray:
    """The token stream of a pre-tokenized dataset (memory-mapped ``.bin``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path

    prefix = str(prefix)
    if not Path(get_bin_path(prefix)).is_file():
        raise FileNotFoundError(f"{get_bin_path(prefix)} not found; write it with `hyperloop data pretokenize`")
    dtype = IndexedDataset(prefix).index.dtype
    return np.memmap(get_bin_path(prefix), dtype=dtype, mode="r")
