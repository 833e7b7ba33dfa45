"""Pre-tokenized corpus on disk and the deterministic, step-indexed batches drawn from it.

``prepare_corpus`` turns the corpus into ``tokens/train.bin`` and ``tokens/heldout.bin`` (documents
joined with EOS, uint16/uint32) with a ``meta.json`` that records the tokenizer's hash, so a changed
tokenizer rebuilds the tokens. ``WindowSampler`` cuts ``seq_len + 1`` windows and assigns them to
(step, micro-batch, DP rank) by a seeded permutation: the global batch of a step does not depend on how it
is split over ranks, and resuming at step k yields exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from hyperloop_dist.config import Config
from hyperloop_dist.data.corpus import corpus_files, obtain_english, obtain_shakespeare, split_files
from hyperloop_dist.data.tokenizer import EOS_ID, load_tokenizer, train_tokenizer

TOKENIZER_SAMPLE_BYTES = 32 * 1024 * 1024


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_tokens(sp: spm.SentencePieceProcessor, files: list[Path], out: Path, dtype: np.dtype) -> int:
    ids: list[int] = []
    for f in files:
        ids.extend(sp.encode(f.read_text(encoding="utf-8", errors="replace")))
        ids.append(EOS_ID)
    arr = np.asarray(ids, dtype=dtype)
    tmp = out.with_suffix(".tmp")
    arr.tofile(tmp)
    tmp.replace(out)
    return int(arr.size)


def prepare_corpus(cfg: Config, log: Callable[[str], object] = print) -> Path:
    """Obtain the corpus, train the tokenizer if missing, tokenize; idempotent. Returns the tokens dir."""
    from hyperloop_dist.data.sources import tokenizer_sample, train_sources
    from hyperloop_dist.data.stream import check_sources

    d = cfg.data
    if d.corpus == "shakespeare":
        obtain_shakespeare(d.dir)
    elif d.corpus == "english":
        obtain_english(d.dir, log=log)
    # A missing, unreadable or unusable source (no document in a whole pass) stops here, before training.
    check_sources(train_sources(cfg))
    tok_path = Path(d.tokenizer)
    if not tok_path.is_file():
        log(f"training a {cfg.model.vocab_size}-piece BPE tokenizer on the training sources")
        train_tokenizer(tokenizer_sample(cfg, TOKENIZER_SAMPLE_BYTES, progress=False), cfg.model.vocab_size, tok_path)
    sp = load_tokenizer(tok_path, cfg.model.vocab_size)
    if d.corpus == "sources":
        return tok_path.parent  # streamed: nothing to pre-tokenize
    files = corpus_files(d.dir)
    tokens_dir = Path(d.dir) / "tokens"
    meta_path = tokens_dir / "meta.json"
    tok_hash = _sha256(tok_path)
    train_files, heldout_files = split_files(files, d.heldout_fraction)
    key = {"tokenizer_sha256": tok_hash, "files": [f.name for f in files],
           "heldout_files": [f.name for f in heldout_files]}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in key} == key:
            return tokens_dir
    tokens_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.uint16 if sp.vocab_size() <= 65536 else np.uint32)
    n_train = _write_tokens(sp, train_files, tokens_dir / "train.bin", dtype)
    n_heldout = _write_tokens(sp, heldout_files, tokens_dir / "heldout.bin", dtype)
    meta = {**key, "dtype": dtype.name, "train_tokens": n_train, "heldout_tokens": n_heldout}
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"tokenized {len(train_files)} train files ({n_train:,} tokens) and "
        f"{len(heldout_files)} held-out files ({n_heldout:,} tokens) into {tokens_dir}")
    return tokens_dir


def load_tokens(tokens_dir: str | Path, split: str) -> np.ndarray:
    tokens_dir = Path(tokens_dir)
    meta_path = tokens_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found; run `hyperloop data prepare` first")
    meta = json.loads(meta_path.read_text())
    return np.memmap(tokens_dir / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")


@dataclass
class WindowSampler:
    """Windows of ``seq_len + 1`` tokens, drawn for (step, micro-batch, rank) by a per-epoch permutation."""

    tokens: np.ndarray
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    dp_size: int
    seed: int

    def __post_init__(self) -> None:
        self.num_windows = (len(self.tokens) - 1) // self.seq_len
        if self.num_windows < 1:
            raise ValueError(f"{len(self.tokens)} tokens are fewer than one window of {self.seq_len + 1}")
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    @property
    def windows_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_size

    def _window(self, index: int) -> np.ndarray:
        epoch, pos = divmod(index, self.num_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        start = int(self._perm[pos]) * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def batch(self, step: int, micro: int, dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels), each ``[micro_batch_size, seq_len]``."""
        first = step * self.windows_per_step + (micro * self.dp_size + dp_rank) * self.micro_batch_size
        rows = np.stack([self._window(first + k) for k in range(self.micro_batch_size)])
        data = torch.from_numpy(rows)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()
