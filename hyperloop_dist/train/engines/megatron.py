"""Engine ``megatron``: Megatron-core DDP and optimizer (optionally distributed: ZeRO-1) around the model,
tensor parallelism from Megatron's layers, the loop-aware circular pipeline for PP, and
``megatron.core.dist_checkpointing`` (torch_dist) checkpoints that load under another TP / PP / DP layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from hyperloop_dist.checkpoint.safe_pickle import check_dcp_metadata
from hyperloop_dist.config import Config
from hyperloop_dist.fusions import apply_process_fusions, use_fused_adamw
from hyperloop_dist.parallel import cpu_shim
from hyperloop_dist.parallel.distributed import RankInfo
from hyperloop_dist.train import hang
from hyperloop_dist.train.engines.base import (
    Engine,
    PlanVariant,
    StepResult,
    accumulate,
    prepare_adam_state_for_loading,
    require,
    restore_adam_step,
)
from hyperloop_dist.train.nonfinite import MicroLosses, all_finite
from hyperloop_dist.train.torch_optim import lr_scheduler

if TYPE_CHECKING:
    from hyperloop_dist.model.hyperloop import HyperloopModel
    from hyperloop_dist.train.engines.base import Batch
    from hyperloop_dist.train.signals import StopRequest

# The distributed optimizer's default ('fully_sharded_model_space') fails in 0.16.1 (Megatron-LM #2956).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


class MegatronEngine(Engine):
    name = "megatron"
    checkpoint_dir = "dist"
    supports_tp = supports_pp = True
    settings = {"distributed_optimizer": False, "overlap_grad_reduce": False, "pp_schedule": "1f1b",
                "sequence_parallel": False}
    supports_fusions = True
    plan_variants = (PlanVariant("megatron", {"distributed_optimizer": False}),
                     PlanVariant("megatron+distopt", {"distributed_optimizer": True}))

    def __init__(self, cfg: Config, info: RankInfo) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from hyperloop_dist.model.hyperloop import Stage, build_model
        from hyperloop_dist.parallel.pipeline import CircularPipeline

        super().__init__(cfg, info)
        stage = Stage(rank=parallel_state.get_pipeline_model_parallel_rank(), size=cfg.parallel.pp)
        apply_process_fusions(cfg.train.fusions)
        model = build_model(cfg.model, tp=cfg.parallel.tp, stage=stage, precision=cfg.train.precision,
                            recompute=cfg.train.recompute == "loop", seed=cfg.train.seed, fusions=cfg.train.fusions,
                            sequence_parallel=cfg.parallel.sequence_parallel)
        distopt = cfg.parallel.distributed_optimizer
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                   overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
                                                   use_distributed_optimizer=distopt)
        with cpu_shim.device_mode():
            self.ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
        o, bf16 = cfg.optim, cfg.train.precision == "bf16"
        opt_config = OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
            adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.grad_clip, bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32, use_distributed_optimizer=distopt,
        )
        with cpu_shim.device_mode():
            self.optimizer = get_megatron_optimizer(opt_config, [self.ddp])
        if "adamw" in cfg.train.fusions:
            use_fused_adamw(self.optimizer)
        self.scheduler = lr_scheduler(cfg, self.optimizer)
        self.model: HyperloopModel = self.ddp.module
        self.pipeline = (CircularPipeline(self.model, cfg.train.micro_batch_size, cfg.parallel.pp_schedule)
                         if cfg.parallel.pp > 1 else None)
        self.pipelined = self.pipeline is not None

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        m, p = cfg.model, cfg.parallel
        require(p.pp_schedule in ("1f1b", "gpipe"),
                f"parallel.pp_schedule={p.pp_schedule!r}: must be one of '1f1b', 'gpipe'")
        if p.sequence_parallel:
            require(p.tp > 1, f"parallel.sequence_parallel=true with tp={p.tp}: sequence parallelism splits the "
                              "sequence over the tensor-parallel ranks; set parallel.tp >= 2 or "
                              "parallel.sequence_parallel=false")
            require(m.seq_length % p.tp == 0,
                    f"parallel.sequence_parallel=true: parallel.tp={p.tp} must divide model.seq_length={m.seq_length}")
        if p.pp == 1:
            return
        require(not p.overlap_grad_reduce, f"parallel.overlap_grad_reduce=true with parallel.pp={p.pp}: not offered "
                                           "with the circular pipeline yet; set parallel.overlap_grad_reduce=false")
        middle = m.middle_layers_built
        valid = [d for d in range(1, middle + 1) if middle % d == 0]
        require(middle % p.pp == 0,
                f"parallel.pp={p.pp}: the middle block's {middle} layers are split evenly over the pipeline "
                f"(model.middle_layers{'' if m.looped else ' x model.loops'}); valid parallel.pp: "
                f"{', '.join(map(str, valid))}")

    @classmethod
    def state_bytes_per_param(cls, variant: PlanVariant, bf16: bool, dp: int) -> float:
        weights, grads, master, adam = (2, 4, 4, 8) if bf16 else (4, 4, 0, 8)
        if variant.overrides["distributed_optimizer"]:
            return weights + grads + (master + adam) / dp
        return weights + grads + master + adam

    # ---------------------------------------------------------------- training

    def step(self, batches: list[Batch], index: int, stop: StopRequest | None) -> StepResult:
        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.pipeline is not None:
            losses = MicroLosses()
            losses.add(torch.tensor(self.pipeline.step(batches), device=cpu_shim.device()))
            hang.beat("backward")
        else:
            # Megatron DDP reduces a bucket once every parameter in it reported all its gradient events of
            # the last micro-batch (a looped weight reports once per recomputed loop): no_sync before that.
            losses = accumulate(batches, index, lambda t, y: self.ddp(t, labels=y), no_sync=self.ddp.no_sync)
        total = losses.total()
        with cpu_shim.device_mode():
            finalize_model_grads([self.ddp])
            if not all_finite(total, stop):
                return StepResult.skipped([] if self.pipeline is not None else losses.non_finite())
            _, grad_norm, _ = self.optimizer.step()
        if self.info.dp_size > 1:
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
            total /= self.info.dp_size
        return StepResult(float(total), float("nan") if grad_norm is None else float(grad_norm), [])

    def forward_for_eval(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.pipeline is not None:
            return self.pipeline.token_nll(tokens, labels)
        return self.model(tokens, labels=labels)

    # ---------------------------------------------------------------- checkpoints

    def _sharded_state(self, loading: bool) -> dict[str, Any]:
        model_sd = self.model.sharded_state_dict()
        return {"model": model_sd, "optimizer": self.optimizer.sharded_state_dict(
            model_sd, is_loading=loading, metadata=OPTIMIZER_METADATA)}

    def save(self, step_dir: Path) -> None:
        from megatron.core import dist_checkpointing

        (step_dir / self.checkpoint_dir).mkdir(exist_ok=True)  # dist_checkpointing writes into an existing one
        dist.barrier()
        _in_process_results_queue()
        with cpu_shim.device_mode():
            dist_checkpointing.save(self._sharded_state(loading=False), str(step_dir / self.checkpoint_dir))

    def load(self, step_dir: Path, saved_layout: dict[str, int], layout: dict[str, int],
             optimizer_step: int) -> None:
        from megatron.core import dist_checkpointing

        check_dcp_metadata(step_dir / self.checkpoint_dir)
        prepare_adam_state_for_loading(self.optimizer)
        with cpu_shim.device_mode():
            state = dist_checkpointing.load(self._sharded_state(loading=True), str(step_dir / self.checkpoint_dir))
            self.model.load_state_dict(state["model"])
            with torch.no_grad():  # fp32: main params are views of the leaf params
                self.optimizer.load_state_dict(state["optimizer"])
        # The distributed optimizer's 'dp_reshardable' format does not carry Adam's step (the plain
        # optimizer's does, as 'common_step'); every parameter shares one step, so set it from meta.
        restore_adam_step(self.optimizer, optimizer_step)

    @classmethod
    def full_state_dict(cls, step_dir: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from megatron.core import dist_checkpointing

        check_dcp_metadata(step_dir / cls.checkpoint_dir)
        with cpu_shim.device_mode():
            return dist_checkpointing.load({"model": model.sharded_state_dict()},
                                           str(step_dir / cls.checkpoint_dir))["model"]


def _in_process_results_queue() -> None:
    """Give Megatron's file writer a plain in-process queue for its write results.

    By default it creates a ``multiprocessing`` Manager queue on the first save, for its asynchronous mode,
    where the results come from a persistent process: starting the Manager spawns a Python interpreter
    (about 5 s per rank on CPU). Our saves are synchronous, so the writer's results are put and taken in
    this process (megatron-core 0.16.1, ``filesystem_async._results_queue``; tests/test_cpu_shim.py pins it).
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
