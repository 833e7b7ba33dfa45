"""Experimental: a confidence-based per-token exit for looped models, while decoding with a cache.

After each loop the token's state is read out as ``eval/loops.py`` does (collapse the streams, end block,
final norm, head). Once the largest probability passes ``exit_threshold`` (for every row of the batch),
the remaining loops are skipped and that readout is the output. The paper motivates it (section 4.4: the
logit lens aligns at loop ends) but does not evaluate it; it is off by default.

What the skipped passes leave in the cache is our choice: later tokens attend, in pass p, to keys and
values this token never computed, so its last computed pass's entries are repeated into the skipped
passes' entries. Prompt (prefill) positions always run every loop; only one-token decoding steps exit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hyperloop_dist.export.loop_cache import LoopKVCache
from hyperloop_dist.model.hyper_connections import loop_boundary
from hyperloop_dist.model.reference import ReferenceModel


def confident_exit_hidden(model: ReferenceModel, tokens: torch.Tensor, cache: LoopKVCache, loops: int,
                          threshold: float) -> tuple[torch.Tensor, int]:
    """Final hidden states ``[s, b, d]`` of ``tokens [b, s]`` after the loops run, and how many ran."""
    cfg = model.cfg
    passes = model.cache_layout(loops)[2]
    x = model.embedding.word_embeddings(tokens).transpose(0, 1)
    angles = model.angles(tokens.shape[1], x.device, cache.get_seq_length())
    y = x if model.begin is None else model.begin(x, angles, cache, 0)
    hcs, carry, done = list(model.hc), None, 0
    while True:
        carry, h = loop_boundary(cfg.kind, done, passes, carry, y, hcs, model.loop_embedding, cfg.hc.streams)
        y = model.middle(h, angles, cache, cache.middle_slot(done))
        done += 1
        _, out = loop_boundary(cfg.kind, done, done, carry, y, hcs, model.loop_embedding, cfg.hc.streams)
        if model.end is not None:
            out = model.end(out, angles, cache, cache.end_slots.start)
        out = model.final_norm(out)
        if done == passes:
            cache.loops_run.append(done)
            return out, done
        confidence = F.linear(out, model.head_weight).float().softmax(-1).amax(-1)
        if bool((confidence >= threshold).all()):
            for skipped in range(done, passes):
                for layer in range(cache.middle_layers):
                    cache.repeat_last(cache.middle_slot(done - 1, layer), cache.middle_slot(skipped, layer),
                                      tokens.shape[1])
            cache.loops_run.append(done)
            return out, done
        cache.drop_last(cache.end_slots, tokens.shape[1])  # this readout is not the output: forget its keys
