"""Held-out text and the held-out loss: one reduction for every engine and parallel layout.

The held-out split is the data pipeline's: for the ``english``, ``shakespeare`` and ``dir`` corpora the
works :func:`~hyperloop_dist.data.corpus.split_files` holds out of training; for ``sources`` the
documents listed in ``eval.heldout_sources``. Its first documents, joined with EOS, are cut into
consecutive ``seq_length + 1`` windows: a fixed set, whatever the layout.

:func:`heldout_nll` spreads the windows over data-parallel ranks and all-reduces float64 sums of the
per-token NLL and the token counts, so the loss is the same on 1 rank or many. It only needs a callable
``(tokens [b, s], labels [b, s]) -> per-token NLL [..., b, s]``: the Megatron model, the FSDP model, a
pipeline's forward, or :class:`~hyperloop_dist.model.reference.ReferenceModel` through
:func:`reference_token_nll`. Every rank makes the same number of calls (short ranks run a padded batch
that counts zero), because an FSDP or ZeRO-3 forward is a collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hyperloop_dist.config import Config
from hyperloop_dist.data.tokenizer import EOS_ID, load_tokenizer

TokenNll = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class HeldoutError(ValueError):
    """There is no held-out text to evaluate on."""


def heldout_documents(cfg: Config) -> Iterator[str]:
    """The held-out documents of the run's data, in a fixed order (never seen in training)."""
    from hyperloop_dist.data.corpus import corpus_files
    from hyperloop_dist.data.sources import configured_source
    from hyperloop_dist.data.stream import DataStats, _SourceReader
    from hyperloop_dist.data.token_windows import split_files

    if cfg.data.corpus != "sources":
        _, heldout = split_files(corpus_files(cfg.data.dir), cfg.data.heldout_fraction)
        for path in heldout:
            yield path.read_text(encoding="utf-8", errors="replace")
        return
    if not cfg.eval.heldout_sources:
        raise HeldoutError("data.corpus=sources has no held-out split: list held-out files in "
                           "eval.heldout_sources (never also in data.sources)")
    for spec in cfg.eval.heldout_sources:
        reader = _SourceReader(configured_source(spec, cfg), 0, 1, DataStats())
        while True:
            text = reader.next_document()
            if reader.position[0] > 0:  # one pass: the reader starts its second epoch
                break
            yield text


def heldout_windows(cfg: Config, n: int, tokenizer: str | Path | None = None) -> torch.Tensor:
    """Up to ``n`` held-out windows ``[m, seq_length + 1]`` (int64), tokenized with ``tokenizer``
    (default: the run's ``data.tokenizer``). Fewer when the held-out text is shorter."""
    sp = load_tokenizer(tokenizer or cfg.data.tokenizer, cfg.model.vocab_size)
    seq = cfg.model.seq_length
    need = n * seq + 1
    ids: list[int] = []
    for text in heldout_documents(cfg):
        ids.extend(sp.encode(text))
        ids.append(EOS_ID)
        if len(ids) >= need:
            break
    m = min(n, (len(ids) - 1) // seq)
    if m < 1:
        raise HeldoutError(f"the held-out text has {len(ids)} tokens, fewer than one window of {seq + 1}")
    stream = np.asarray(ids[: m * seq + 1], dtype=np.int64)
    rows = np.stack([stream[i * seq: i * seq + seq + 1] for i in range(m)])
    return torch.from_numpy(rows)


def heldout_nll(token_nll: TokenNll, windows: torch.Tensor, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                group: dist.ProcessGroup | None = None, device: torch.device | None = None
                ) -> tuple[torch.Tensor, int]:
    """Summed NLL over all ``windows`` (float64, one entry per leading dim of ``token_nll``'s output) and
    the number of tokens, reduced over the data-parallel ``group``: identical on every rank."""
    mine = windows[dp_rank::dp_size]
    per_rank = math.ceil(len(windows) / dp_size)
    calls = math.ceil(per_rank / batch_size)
    total: torch.Tensor | None = None
    with torch.no_grad():
        for call in range(calls):
            rows = mine[call * batch_size:(call + 1) * batch_size]
            weight = torch.ones(batch_size, dtype=torch.float64)
            if len(rows) < batch_size:  # pad with copies of window 0; they count zero
                weight[len(rows):] = 0
                rows = torch.cat([rows, windows[:1].expand(batch_size - len(rows), -1)])
            tokens, labels = rows[:, :-1], rows[:, 1:]
            if device is not None:
                tokens, labels = tokens.to(device), labels.to(device)
            nll = token_nll(tokens, labels).detach().to("cpu", torch.float64)  # [..., b, s]
            sums = (nll.sum(-1) * weight).sum(-1)
            total = sums if total is None else total + sums
    assert total is not None
    if dp_size > 1:  # on the model's device: NCCL reduces GPU tensors only
        total = total.to(device or "cpu")
        dist.all_reduce(total, group=group)
        total = total.cpu()
    return total, len(windows) * (windows.shape[1] - 1)


def reference_token_nll(model: torch.nn.Module) -> TokenNll:
    """Per-token NLL ``[b, s]`` of a plain-PyTorch model returning logits ``[b, s, vocab]``."""

    def token_nll(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model(tokens).float()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)

    return token_nll


def reference_heldout_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean held-out NLL of a plain-PyTorch model (e.g. a release), single process."""
    total, count = heldout_nll(reference_token_nll(model), windows, batch_size)
    return float(total.item()) / count
