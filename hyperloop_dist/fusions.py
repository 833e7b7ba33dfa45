"""Torch-only fusions that megatron-core 0.16 allows without Apex or Transformer Engine.

Without either, ``megatron.core.optimizer`` builds ``torch.optim.AdamW`` with ``fused`` left unset, so torch
picks its multi-tensor ``foreach`` path: several kernels per parameter group and step. torch's fused AdamW
does the whole update in one kernel per group and device. The flag is read from each parameter group at
every step, so it can be switched on from outside after Megatron built the optimizer, without copying any
of Megatron's construction code.
"""

from __future__ import annotations

import torch

from hyperloop_dist.train.engines.base import torch_optimizers


def use_fused_adamw(optimizer: object) -> int:
    """Switch every torch Adam/AdamW inside ``optimizer`` to ``fused=True``; returns the groups switched.

    Call it before the first step: a fused step keeps its step counter on the parameter's device, while an
    unfused one already taken keeps it on the host.
    """
    switched = 0
    for opt in torch_optimizers(optimizer):
        if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            continue
        if any(opt.state.get(p) for group in opt.param_groups for p in group["params"]):
            raise RuntimeError("use_fused_adamw: the optimizer has already stepped; switch before the first step")
        for group in opt.param_groups:
            if group.get("differentiable"):
                raise RuntimeError("use_fused_adamw: a differentiable optimizer cannot be fused")
            group["foreach"], group["fused"] = False, True
            switched += 1
    return switched
