"""SentencePiece BPE tokenizer: exact round trip (identity normalization, byte fallback)."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | Path,
                    max_sentence_length: int = 16384) -> Path:
    """Train a BPE model on ``texts`` (one sample per line) and write it atomically to ``out_path``."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    try:
        _train(lines, model, vocab_size, max_sentence_length)
    except RuntimeError as exc:
        if "Vocabulary size too high" in str(exc):
            raise ValueError(f"the tokenizer sample has too little distinct text for model.vocab_size={vocab_size} "
                             f"({str(exc).rsplit(']', 1)[-1].strip()}); lower model.vocab_size or sample more text") from exc
        raise
    tmp = out_path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out_path)
    return out_path


def _train(lines: Iterable[str], model: io.BytesIO, vocab_size: int, max_sentence_length: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, model_type="bpe", vocab_size=vocab_size,
        normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
        split_digits=True, character_coverage=1.0, max_sentence_length=max_sentence_length,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, num_threads=2,
        minloglevel=2, train_extremely_large_corpus=False,
    )


def load_tokenizer(path: str | Path, expected_vocab: int | None = None) -> spm.SentencePieceProcessor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {str(path)!r} not found; `hyperloop data prepare` trains one")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    if expected_vocab is not None and sp.vocab_size() != expected_vocab:
        raise ValueError(
            f"tokenizer {str(path)!r} has {sp.vocab_size()} pieces but model.vocab_size={expected_vocab}; "
            "set model.vocab_size to match, or delete the tokenizer so it is retrained"
        )
    return sp
