"""Per-loop diagnostics for the looped kinds: the loss read out after every loop, and at other loop counts.

After loop k the n-stream state is collapsed and run through the end block, final norm and head (a logit
lens). The readout uses :func:`~hyperloop_dist.model.hyper_connections.loop_boundary` with ``passes = k``,
which is exactly what the model computes when it stops after k loops, so the curve's last point is the
model's own output and the point at k equals a model run with ``loops = k``.

Running *more* loops than trained (``K > model.loops``) needs a rule for the per-loop parameters: the extra
loops reuse the last trained loop's hyper-connection and loop embedding (our choice; the paper does not
evaluate past its trained depth).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hyperloop_dist.model.hyper_connections import LOOPED_KINDS, HyperConnection, loop_boundary


@dataclass
class LoopParts:
    """The pieces of a looped model that a per-loop readout needs (sequence-first ``[s, b, d]`` tensors)."""

    kind: str
    loops: int  # as trained
    streams: int
    hcs: Sequence[HyperConnection]
    loop_embedding: torch.Tensor | None
    embed: Callable[[torch.Tensor], torch.Tensor]  # tokens [b, s] -> begin block output [s, b, d]
    middle: Callable[[torch.Tensor], torch.Tensor]  # the middle block, one pass
    # (x [s, b, d], labels [b, s]) -> NLL [b, s]; labels None -> logits [b, s, vocab]
    readout: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def megatron_parts(model: torch.nn.Module) -> LoopParts:
    """:class:`~hyperloop_dist.model.hyperloop.HyperloopModel` on one pipeline stage (any TP)."""
    cfg = model.cfg
    return LoopParts(cfg.kind, cfg.loops, cfg.hc.streams, list(model.hc), model.loop_embedding,
                     embed=model.embed, middle=model.run_middle, readout=model.finish)


def reference_parts(model: torch.nn.Module) -> LoopParts:
    """:class:`~hyperloop_dist.model.reference.ReferenceModel` (a release)."""
    from hyperloop_dist.model.reference import rope_tables

    cfg = model.cfg
    head_dim = cfg.hidden_size // cfg.num_heads

    def angles(x: torch.Tensor) -> torch.Tensor:
        return rope_tables(x.shape[0], head_dim, cfg.rope_base, x.device)

    def embed(tokens: torch.Tensor) -> torch.Tensor:
        x = model.embedding.word_embeddings(tokens).transpose(0, 1)
        return x if model.begin is None else model.begin(x, angles(x))

    def readout(x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if model.end is not None:
            x = model.end(x, angles(x))
        logits = F.linear(model.final_norm(x), model.head_weight).transpose(0, 1)
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)

    return LoopParts(cfg.kind, cfg.loops, cfg.hc.streams, list(model.hc), model.loop_embedding,
                     embed=embed, middle=lambda x: model.middle(x, angles(x)), readout=readout)


def _extended(parts: LoopParts, loops: int) -> tuple[list[HyperConnection], torch.Tensor | None]:
    """HC modules and loop embeddings for ``loops`` passes: extra loops reuse the last trained loop's."""
    hcs = list(parts.hcs)
    if len(hcs) > 1:  # per-loop HC weights
        hcs = [hcs[min(i, len(hcs) - 1)] for i in range(loops)]
    emb = parts.loop_embedding
    if emb is not None and loops > emb.shape[0]:
        emb = torch.cat([emb, emb[-1:].expand(loops - emb.shape[0], -1)])
    return hcs, emb


def _check(parts: LoopParts, loops: int | None) -> int:
    if parts.kind not in LOOPED_KINDS:
        raise ValueError(f"per-loop readouts need a looped model kind ({', '.join(LOOPED_KINDS)}), not {parts.kind!r}")
    loops = parts.loops if loops is None else loops
    if loops < 1:
        raise ValueError(f"loops={loops}: must be >= 1")
    return loops


def _run(parts: LoopParts, loops: int, tokens: torch.Tensor, labels: torch.Tensor | None,
         every_loop: bool) -> list[torch.Tensor]:
    hcs, emb = _extended(parts, loops)
    y, carry, out = parts.embed(tokens), None, []
    for loop in range(loops + 1):
        if loop == loops or (every_loop and loop > 0):  # collapse as if the model ended after this loop
            _, collapsed = loop_boundary(parts.kind, loop, loop, carry, y, hcs, emb, parts.streams)
            out.append(parts.readout(collapsed, labels))
        if loop < loops:
            carry, x = loop_boundary(parts.kind, loop, loops, carry, y, hcs, emb, parts.streams)
            y = parts.middle(x)
    return out


def loop_nll(parts: LoopParts, loops: int | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(tokens, labels) -> NLL [K, b, s]``: the readout after each of K loops (default: as trained)."""
    k = _check(parts, loops)
    return lambda tokens, labels: torch.stack(_run(parts, k, tokens, labels, every_loop=True))


def loop_logits(parts: LoopParts, loops: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``tokens -> logits [b, s, vocab]`` of the model run for ``loops`` loops."""
    k = _check(parts, loops)
    return lambda tokens: _run(parts, k, tokens, None, every_loop=False)[0]
