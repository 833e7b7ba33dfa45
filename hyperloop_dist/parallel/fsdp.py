"""Engine ``fsdp``: torch FSDP2 ``fully_shard`` around the same model, with DCP checkpoints.

Begin and end layers are sharded one layer each. The looped middle block is sharded as one unit, called L
times per forward. With ``parallel.fsdp_reshard_middle=false`` (the default) it keeps its gathered weights
between those calls instead of all-gathering them again every loop. Full shard shards over every rank;
hybrid shards within a node and replicates across nodes. Parameters are fp32, or bf16 compute with fp32
gradient reduction on GPU.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from hyperloop_dist.config import Config
from hyperloop_dist.model.hyperloop import HyperloopModel, build_model
from hyperloop_dist.parallel import cpu_shim
from hyperloop_dist.train import hang
from hyperloop_dist.train.nonfinite import MicroLosses, all_finite, poison
from hyperloop_dist.train.torch_optim import adamw, lr_scheduler

if TYPE_CHECKING:
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from hyperloop_dist.train.signals import StopRequest


def device_mesh(cfg: Config):
    from torch.distributed.device_mesh import init_device_mesh

    kind = "cuda" if cpu_shim.cuda_available() else "cpu"
    if cfg.parallel.fsdp_shard == "hybrid":
        return init_device_mesh(kind, (cfg.parallel.nnodes, cfg.parallel.nproc_per_node),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(kind, (cfg.world_size,), mesh_dim_names=("shard",))


def shard_model(model: HyperloopModel, cfg: Config) -> HyperloopModel:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = device_mesh(cfg)
    bf16 = cfg.train.precision == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in (model.begin, model.end):
        for layer in (block.layers if block is not None else []):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model.middle, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.parallel.fsdp_reshard_middle)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def build_fsdp_training(cfg: Config) -> tuple[HyperloopModel, torch.optim.Optimizer, OptimizerParamScheduler]:
    model = build_model(cfg.model, seed=cfg.train.seed, recompute=cfg.train.recompute == "loop")
    shard_model(model, cfg)
    optimizer = adamw(cfg, model.parameters())
    scheduler = lr_scheduler(cfg, optimizer)
    return model, optimizer, scheduler


def fsdp_step(cfg: Config, model: HyperloopModel, optimizer: torch.optim.Optimizer,
              batches: list[tuple[torch.Tensor, torch.Tensor]], step: int = 0,
              stop: StopRequest | None = None) -> tuple[float, float, list[int]]:
    """One optimizer step: (loss averaged over ranks, grad norm before clipping, non-finite micro-batches);
    a non-finite loss on any rank skips the update everywhere (NaN figures), as the megatron engine's step."""
    optimizer.zero_grad(set_to_none=True)
    device = cpu_shim.device()
    losses = MicroLosses()
    for micro, (tokens, labels) in enumerate(batches):
        model.set_requires_gradient_sync(micro == len(batches) - 1)  # reduce-scatter once, after the last
        loss = poison(model(tokens.to(device), labels=labels.to(device)).mean() / len(batches), step, micro)
        loss.backward()
        losses.add(loss)
    hang.beat("backward")
    total = losses.total()
    if not all_finite(total, stop):
        return math.nan, math.nan, losses.non_finite()
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    optimizer.step()
    dist.all_reduce(total)
    return float(total) / dist.get_world_size(), float(grad_norm), []
