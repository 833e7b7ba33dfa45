"""Corpus split, tokenizer round trip, and the step-indexed window sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hyperloop_dist.config import load_config
from hyperloop_dist.data.corpus import CorpusError, corpus_files, document_group
from hyperloop_dist.data.token_windows import WindowSampler, load_tokens, prepare_corpus, split_files
from hyperloop_dist.data.tokenizer import EOS_ID, load_tokenizer

from .conftest import FIXTURE_CORPUS


def test_tokenizer_round_trips_exactly(tiny_data: list[str]) -> None:
    cfg = load_config(None, tiny_data)
    sp = load_tokenizer(cfg.data.tokenizer, cfg.model.vocab_size)
    samples = [p.read_text() for p in corpus_files(FIXTURE_CORPUS)][:2]
    samples += ["  two  spaces,\ttabs\nand newlines\n\n", "Ünïcödé ✓ 漢字 🙂 and digits 12345"]
    for text in samples:
        assert sp.decode(sp.encode(text)) == text


def test_tokenizer_vocab_mismatch_names_the_fix(tiny_data: list[str]) -> None:
    cfg = load_config(None, tiny_data)
    with pytest.raises(ValueError, match="model.vocab_size=1000"):
        load_tokenizer(cfg.data.tokenizer, 1000)
    with pytest.raises(FileNotFoundError, match="hyperloop data prepare"):
        load_tokenizer("/nonexistent/tok.model")


def test_heldout_split_keeps_every_version_of_a_work_on_one_side() -> None:
    files = corpus_files(FIXTURE_CORPUS)
    train, heldout = split_files(files, 0.2)
    assert heldout and train and set(train).isdisjoint(heldout)
    assert {document_group(f) for f in train}.isdisjoint({document_group(f) for f in heldout})
    assert all(len([f for f in files if document_group(f) == document_group(h)]) > 1 for h in heldout)
    assert split_files(files, 0.2) == (train, heldout)


def test_prepared_tokens_are_eos_joined_documents(tiny_data: list[str]) -> None:
    cfg = load_config(None, tiny_data)
    tokens_dir = Path(cfg.data.dir) / "tokens"
    meta = json.loads((tokens_dir / "meta.json").read_text())
    sp = load_tokenizer(cfg.data.tokenizer)
    heldout = load_tokens(tokens_dir, "heldout")
    expected = []
    for name in meta["heldout_files"]:
        expected += sp.encode((Path(cfg.data.dir) / name).read_text()) + [EOS_ID]
    assert heldout.tolist() == expected
    assert len(load_tokens(tokens_dir, "train")) == meta["train_tokens"]
    # idempotent: a second prepare with the same tokenizer keeps the files
    mtime = (tokens_dir / "train.bin").stat().st_mtime_ns
    prepare_corpus(cfg, log=lambda *_: None)
    assert (tokens_dir / "train.bin").stat().st_mtime_ns == mtime


def test_empty_corpus_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="no \\*.txt files"):
        corpus_files(tmp_path)


def _sampler(tokens: np.ndarray, mbs: int, accum: int, dp: int) -> WindowSampler:
    return WindowSampler(tokens, seq_len=8, micro_batch_size=mbs, grad_accum=accum, dp_size=dp, seed=5)


def test_windows_are_contiguous_slices_with_shifted_labels() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = _sampler(tokens, 4, 1, 1).batch(step=3, micro=0, dp_rank=0)
    assert x.shape == y.shape == (4, 8)
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    assert all((row[1:] - row[:-1] == 1).all() for row in x) and all(int(row[0]) % 8 == 0 for row in x)


def test_global_batch_does_not_depend_on_the_dp_split() -> None:
    tokens = np.arange(5000, dtype=np.uint16)
    one = _sampler(tokens, 4, 2, 1)
    two = _sampler(tokens, 4, 1, 2)
    for step in (0, 1, 7, 200):  # 200 crosses an epoch boundary (62 windows)
        a = torch.cat([one.batch(step, m, 0)[0] for m in range(2)])
        b = torch.cat([two.batch(step, 0, r)[0] for r in range(2)])
        assert torch.equal(a, b)
    # a fresh sampler (a resumed run) draws the same batch for the same step
    assert torch.equal(_sampler(tokens, 4, 2, 1).batch(7, 1, 0)[0], one.batch(7, 1, 0)[0])


def test_an_epoch_visits_every_window_once() -> None:
    tokens = np.arange(8 * 20 + 1, dtype=np.uint16)
    s = _sampler(tokens, 2, 1, 1)
    starts = sorted(int(s.batch(step, 0, 0)[0][k, 0]) for step in range(10) for k in range(2))
    assert starts == list(range(0, 160, 8))
