"""Engine ``fsdp``: torch FSDP2 ``fully_shard`` around the same model, with DCP checkpoints.

Begin and end layers are sharded one layer each. The looped middle block is sharded as one unit, called L
times per forward. With ``parallel.fsdp_reshard_middle=false`` (the default) it keeps its gathered weights
between those calls instead of all-gathering them again every loop. Full shard shards over every rank;
hybrid shards within a node and replicates across nodes. Parameters are fp32, or bf16 compute with fp32
gradient reduction on GPU. Checkpoints are torch Distributed Checkpoint shards (``dcp/``), which load
under any number of ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from hyperloop_dist.checkpoint.safe_pickle import check_dcp_metadata
from hyperloop_dist.config import Config
from hyperloop_dist.model.hyperloop import HyperloopModel, build_model
from hyperloop_dist.parallel import cpu_shim
from hyperloop_dist.parallel.distributed import RankInfo
from hyperloop_dist.train.engines.base import (
    Engine,
    PlanVariant,
    StepResult,
    accumulate,
    prepare_adam_state_for_loading,
    require,
    restore_adam_step,
)
from hyperloop_dist.train.nonfinite import all_finite
from hyperloop_dist.train.torch_optim import adamw, lr_scheduler

if TYPE_CHECKING:
    from hyperloop_dist.train.engines.base import Batch
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


class FsdpEngine(Engine):
    name = "fsdp"
    checkpoint_dir = "dcp"  # torch Distributed Checkpoint: loads under any number of ranks
    settings = {"fsdp_shard": "full", "fsdp_reshard_middle": False}
    plan_variants = (PlanVariant("fsdp", {}),)

    def __init__(self, cfg: Config, info: RankInfo) -> None:
        super().__init__(cfg, info)
        # FSDP2 shards the model in place: no wrapper
        self.model = shard_model(build_model(cfg.model, seed=cfg.train.seed, recompute=cfg.train.recompute == "loop"),
                                 cfg)
        self.optimizer = adamw(cfg, self.model.parameters())
        self.scheduler = lr_scheduler(cfg, self.optimizer)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require(cfg.parallel.fsdp_shard in ("full", "hybrid"), f"parallel.fsdp_shard={cfg.parallel.fsdp_shard!r}: must be one of 'full', 'hybrid'")

    @classmethod
    def state_bytes_per_param(cls, variant: PlanVariant, bf16: bool, dp: int) -> float:
        return ((2 + 4 + 4 + 8) if bf16 else (4 + 4 + 8)) / dp

    @classmethod
    def gathered_bytes(cls, variant: PlanVariant, largest_unit: int, bf16: bool) -> float:
        return largest_unit * (2 if bf16 else 4)  # the looped middle block, gathered for its L passes

    def step(self, batches: list[Batch], index: int, stop: StopRequest | None) -> StepResult:
        """A non-finite loss on any rank skips the update everywhere, as in every engine."""
        self.optimizer.zero_grad(set_to_none=True)
        losses = accumulate(batches, index, lambda t, y: self.model(t, labels=y), no_sync=self._no_sync)
        total = losses.total()
        if not all_finite(total, stop):
            return StepResult.skipped(losses.non_finite())
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        self.optimizer.step()
        dist.all_reduce(total)
        return StepResult(float(total) / dist.get_world_size(), float(grad_norm), [])

    @contextlib.contextmanager
    def _no_sync(self) -> Iterator[None]:
        self.model.set_requires_gradient_sync(False)  # reduce-scatter once, after the last micro-batch
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, step_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(step_dir / self.checkpoint_dir))

    def load(self, step_dir: Path, saved_layout: dict[str, int], layout: dict[str, int],
             optimizer_step: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        check_dcp_metadata(step_dir / self.checkpoint_dir)
        prepare_adam_state_for_loading(self.optimizer)
        state = self._state()
        dcp.load(state, checkpoint_id=str(step_dir / self.checkpoint_dir))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        restore_adam_step(self.optimizer, optimizer_step)

    @classmethod
    def full_state_dict(cls, step_dir: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        check_dcp_metadata(step_dir / cls.checkpoint_dir)  # DCP keeps the model's own parameter names
        state = {"model": {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}}
        dcp.load(state, checkpoint_id=str(step_dir / cls.checkpoint_dir))
        return state["model"]
