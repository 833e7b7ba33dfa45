"""What each model kind owns, shared by the Megatron model and its plain-PyTorch twin."""

from __future__ import annotations

import torch
from torch import nn

from hyperloop_dist.config import ModelConfig
from hyperloop_dist.model.hyper_connections import HyperConnection, num_hyper_connections


def block_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Distinct layers per block. Looped kinds hold the middle block once; the others unroll it."""
    middle = cfg.middle_layers_built
    return {"begin": cfg.begin_layers, "middle": middle, "end": cfg.end_layers}


def make_hyper_connections(cfg: ModelConfig) -> nn.ModuleList:
    count = num_hyper_connections(cfg.kind, cfg.loops, cfg.effective_depth, cfg.hc.per_loop_params)
    hcs = nn.ModuleList(
        HyperConnection(cfg.hidden_size, cfg.hc.streams, cfg.hc.res_for(cfg.kind), cfg.hc.sinkhorn_iters,
                        cfg.hc.alpha_init)
        for _ in range(count)
    )
    for hc in hcs:
        hc.compiled = cfg.compile in ("hc", "blocks")
    return hcs


def make_loop_embedding(cfg: ModelConfig) -> nn.Parameter | None:
    """Zero-initialized per-loop vectors, so a fresh model equals the one without them."""
    if not cfg.looped or not cfg.loop_embedding:
        return None
    return nn.Parameter(torch.zeros(cfg.loops, cfg.hidden_size))
