"""AdamW and Megatron's LR schedule for the engines that use a plain torch optimizer (fsdp, deepspeed).

Both match the megatron engine's optimizer (no weight decay on norms, biases and other vectors) and its
warmup + decay schedule, so every engine trains the same model from the same recipe.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from hyperloop_dist.config import Config

if TYPE_CHECKING:
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def adamw(cfg: Config, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.AdamW:
    o = cfg.optim
    params = list(parameters)
    # ZeRO-3 parameters are empty placeholders; their real rank is in ds_shape.
    rank = [len(getattr(p, "ds_shape", p.shape)) for p in params]
    decay = [p for p, r in zip(params, rank, strict=True) if r >= 2]
    no_decay = [p for p, r in zip(params, rank, strict=True) if r < 2]
    return torch.optim.AdamW(
        [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}],
        lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
    )


def lr_scheduler(cfg: Config, optimizer: object) -> OptimizerParamScheduler:
    """Megatron's scheduler over ``optimizer.param_groups`` (any object that has them)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(cfg.train.steps, o.warmup_steps + 1), lr_decay_style=o.schedule,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=cfg.train.steps, wd_incr_style="constant",
    )
