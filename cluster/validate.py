"""``hyperloop plan --validate``: build every rank's real model shard of a large layout on one CPU.

Each (TP rank, pipeline stage) coordinate is built as its rank would build it: torch.distributed joined as
that rank of a world of ``gpus`` ranks through PyTorch's fake process group (collectives are no-ops),
Megatron's parallel state initialized for the layout, ``build_model`` run with weights on the meta device
(no memory). Ranks that differ only in their data-parallel index build identical shards, so one per
coordinate is built. Checked: Megatron puts the rank at the expected coordinates; every parameter's shape
is the full (reference model) shape, divided by TP along its partition dimension when TP-sharded; the
shard's parameter count equals the planner's; the shards of a stage add up to the reference model's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hyperloop_dist.cluster.plan import ParamSplit, param_split, params_on_stage
from hyperloop_dist.config import Config
from hyperloop_dist.model.reference import ReferenceModel


class LayoutError(RuntimeError):
    """A layout did not construct as planned (wrong coordinates, shapes or parameter counts)."""


@dataclass
class ShardCheck:
    rank: int
    tp_rank: int
    stage: int
    params: int  # built on this rank
    planned: int  # the planner's count
    tensors: int


def _generic(name: str) -> str:
    """``middle.layers.7.mlp...`` -> ``middle.layers.*.mlp...``: layers of a block share shapes."""
    return re.sub(r"\.layers\.\d+\.", ".layers.*.", name)


def reference_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = ReferenceModel(cfg.model)
    shapes = {_generic(n): tuple(p.shape) for n, p in model.named_parameters()}
    if cfg.model.tie_embeddings:  # under PP the last stage holds the tied head as its own copy
        shapes.setdefault("output_layer.weight", shapes["embedding.word_embeddings.weight"])
    return shapes


def _check_shapes(model: torch.nn.Module, ref: dict[str, tuple[int, ...]], tp: int, where: str) -> int:
    count = 0
    for name, p in model.named_parameters():
        key = _generic(name)
        if key not in ref:
            raise LayoutError(f"{where}: parameter {name} has no counterpart in the reference model")
        full = list(ref[key])
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            full[p.partition_dim] //= tp
        if tuple(p.shape) != tuple(full):
            raise LayoutError(f"{where}: {name} has shape {tuple(p.shape)}, expected {tuple(full)} "
                              f"(reference {ref[key]}, tp={tp})")
        count += 1
    return count


def validate_layout(cfg: Config, gpus: int, tp: int, pp: int,
                    log: Callable[[str], None] = print) -> list[ShardCheck]:
    """Build the shard of every (TP rank, stage) of ``tp x pp x (gpus / tp / pp)`` and check it."""
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from hyperloop_dist.model.hyperloop import Stage, build_model
    from hyperloop_dist.parallel import cpu_shim

    if dist.is_initialized():
        raise LayoutError("validate_layout joins fake process groups: run it in a process without torch.distributed")
    if gpus % (tp * pp):
        raise LayoutError(f"--gpus={gpus} is not divisible by tp*pp={tp * pp}")
    cpu_shim.enable()
    dp = gpus // (tp * pp)
    ref = reference_shapes(cfg)
    split: ParamSplit = param_split(cfg.model)
    checks: list[ShardCheck] = []
    full_equivalent = 0  # stage by stage, TP shards scaled back to full size
    for stage in range(pp):
        for tp_rank in range(tp):
            rank = tp_rank + tp * dp * stage  # Megatron's default order tp-cp-ep-dp-pp, DP index 0
            where = f"rank {rank} (tp {tp_rank}, stage {stage}) of {gpus}"
            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=gpus)
            try:
                parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                         pipeline_model_parallel_size=pp,
                                                         create_gloo_process_groups=False)
                got = (parallel_state.get_tensor_model_parallel_rank(),
                       parallel_state.get_pipeline_model_parallel_rank(),
                       parallel_state.get_data_parallel_world_size())
                if got != (tp_rank, stage, dp):
                    raise LayoutError(f"{where}: Megatron placed it at tp {got[0]}, stage {got[1]}, dp size {got[2]}")
                cpu_shim.seed_model_parallel(cfg.train.seed)
                with torch.device("meta"):
                    model = build_model(cfg.model, tp=tp, stage=Stage(rank=stage, size=pp),
                                        precision=cfg.train.precision)
                tensors = _check_shapes(model, ref, tp, where)
                n = sum(p.numel() for p in model.parameters())
                if tp_rank == 0:
                    full_equivalent += sum(p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
                                           for p in model.parameters()
                                           if not getattr(p, "shared", False))  # (a tied head's copy)
            finally:
                parallel_state.destroy_model_parallel()
                dist.destroy_process_group()
            planned = params_on_stage(split, cfg.model, tp, pp, stage)
            if n != planned:
                raise LayoutError(f"{where}: built {n:,} parameters, the planner counts {planned:,}")
            checks.append(ShardCheck(rank, tp_rank, stage, n, planned, tensors))
            log(f"  {where}: {tensors} tensors, {n / 1e6:,.1f}M parameters, shapes and count as planned")
    reference_total = _reference_total(cfg)
    if full_equivalent != reference_total:
        raise LayoutError(f"the stages' shards add up to {full_equivalent:,} parameters, the model has "
                          f"{reference_total:,}")
    log(f"  all {pp} stages x {tp} TP shards add up to the model's {reference_total / 1e6:,.1f}M parameters")
    return checks


def _reference_total(cfg: Config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in ReferenceModel(cfg.model).parameters())
