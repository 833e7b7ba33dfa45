"""Engine ``deepspeed``: DeepSpeed ZeRO stage 1, 2 or 3 around the same model.

The DeepSpeed config is generated from the recipe (:func:`deepspeed_config`), never written by hand. The
optimizer is the same torch AdamW and Megatron LR schedule as the fsdp engine's, handed to DeepSpeed as a
client optimizer, so every engine trains the same model from the same recipe. Tensor parallelism uses
Megatron-core's parallel state as DeepSpeed's ``mpu`` (:class:`MegatronMpu`).

On CPU DeepSpeed runs on its CPU accelerator (``DS_ACCELERATOR=cpu``, set here before deepspeed is
imported) over the gloo process group that :mod:`hyperloop_dist.parallel.distributed` created.
"""

from __future__ import annotations

import os
import types
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from hyperloop_dist.checkpoint.store import CheckpointError
from hyperloop_dist.checkpoint.training_state import read_meta
from hyperloop_dist.config import Config
from hyperloop_dist.model.hyperloop import HyperloopModel, build_model
from hyperloop_dist.parallel import cpu_shim
from hyperloop_dist.parallel.distributed import RankInfo
from hyperloop_dist.train.engines.base import (
    Engine,
    PlanVariant,
    StepResult,
    accumulate,
    require,
    restore_adam_step,
    tensor_bytes,
    torch_optimizers,
)
from hyperloop_dist.train.nonfinite import TrainingDiverged, all_finite
from hyperloop_dist.train.torch_optim import adamw, lr_scheduler

if TYPE_CHECKING:
    from hyperloop_dist.train.engines.base import Batch
    from hyperloop_dist.train.signals import StopRequest

CHECKPOINT_DIR = "deepspeed"  # inside a step directory: <step>/deepspeed/<TAG>/...
TAG = "zero"


def import_deepspeed() -> types.ModuleType:
    """``import deepspeed`` with the right accelerator: without CUDA, its CPU accelerator."""
    if not cpu_shim.cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def prebuild_ops() -> None:
    """Compile (once, into ~/.cache/torch_extensions) the op DeepSpeed's CPU accelerator loads when its
    communication backend starts: the shared-memory all-reduce, used only by DeepSpeed inference but built
    by every CPU run. Without this the first CPU run compiles it itself (about 2 CPU minutes)."""
    if cpu_shim.cuda_available():
        return
    import_deepspeed()
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


class MegatronMpu:
    """Megatron-core's ``parallel_state`` under the names DeepSpeed's ``mpu`` argument is called with.

    Megatron-core 0.16 dropped ``get_model_parallel_rank`` / ``_world_size`` (DeepSpeed still calls them);
    with pp = 1 (the only layout this engine offers) the model-parallel group is the tensor-parallel group.
    """

    def __getattr__(self, name: str) -> Any:
        from megatron.core import parallel_state

        return getattr(parallel_state, name)

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.get_model_parallel_group())


def deepspeed_config(cfg: Config, dp_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON config for this recipe (written into every checkpoint by DeepSpeed itself)."""
    p, t = cfg.parallel, cfg.train
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cpu_shim.cuda_available()}
    if p.zero_stage == 3:
        # Vectors (norms, hyper-connection gates) stay whole on every rank: gathering them would cost a
        # collective each for almost no memory. Everything of hidden_size elements or more is sharded.
        zero["stage3_param_persistence_threshold"] = cfg.model.hidden_size
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp_size,
        "gradient_clipping": cfg.optim.grad_clip,  # 0 = off, as in the other engines
        # bf16: DeepSpeed skips a step whose gradient norm is not finite (fp32 does so whenever it computes
        # the norm), so a NaN loss skips the update as in the other engines.
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": True},
        "zero_optimization": zero,
        # The optimizer is ours (torch AdamW, as the other engines); with offload it runs on the CPU copy.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,  # progress is ours (rank 0, train/metrics.py)
        "wall_clock_breakdown": False,
    }


def _register_parameters_used_outside_their_module(model: HyperloopModel) -> None:
    """ZeRO-3 gathers a parameter when its own module runs. A tied head reads the embedding's weight, and a
    hyper-connection's gates read its own vectors from ``read()`` (not ``forward``): gather those with the
    whole model instead."""
    register_external_parameter = import_deepspeed().zero.register_external_parameter
    if model.cfg.tie_embeddings and model.embedding is not None:
        register_external_parameter(model, model.embedding.word_embeddings.weight)
    for hc in model.hc:
        for param in hc.parameters(recurse=False):
            register_external_parameter(model, param)


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    checkpoint_dir = CHECKPOINT_DIR
    supports_tp = True
    settings = {"zero_stage": 1, "offload_optimizer": False}
    plan_variants = tuple(PlanVariant(f"deepspeed-z{stage}", {"zero_stage": stage}) for stage in (1, 2, 3))

    def __init__(self, cfg: Config, info: RankInfo) -> None:
        """The DeepSpeed engine around the model (called like the model), its ZeRO optimizer, our LR schedule."""
        from megatron.core import parallel_state

        super().__init__(cfg, info)
        deepspeed = import_deepspeed()
        # DeepSpeed 0.19.8 calls deprecated torch names on every gather and reduce-scatter; nothing for us to act
        # on, printed by every rank at every step.
        for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
            warnings.filterwarnings("ignore", message=f".*{name}.* is deprecated", category=FutureWarning)
        model = build_model(cfg.model, tp=cfg.parallel.tp, precision=cfg.train.precision,
                            recompute=cfg.train.recompute == "loop", seed=cfg.train.seed)
        if cpu_shim.cuda_available():
            model.cuda()
        ds_config = deepspeed_config(cfg, parallel_state.get_data_parallel_world_size())
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=adamw(cfg, model.parameters()), config=ds_config, mpu=MegatronMpu(),
            dist_init_required=False,
        )
        if cfg.parallel.zero_stage == 3:
            _register_parameters_used_outside_their_module(model)
        self.model = self.ds.module
        self.scheduler = lr_scheduler(cfg, self.optimizer)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        p = cfg.parallel
        require(p.zero_stage in (1, 2, 3), f"parallel.zero_stage={p.zero_stage!r}: must be one of 1, 2, 3")
        require(p.tp == 1 or p.zero_stage < 3,
                f"parallel.engine='deepspeed' with tp={p.tp} and zero_stage=3: ZeRO-3 would shard Megatron's "
                "tensor-parallel weights a second time; use zero_stage=1 or 2 with TP")

    @classmethod
    def state_bytes_per_param(cls, variant: PlanVariant, bf16: bool, dp: int) -> float:
        # Weights and gradients in the compute precision; an fp32 master copy and Adam's two moments per
        # partition. Stage 1 partitions the optimizer state, 2 also the gradients, 3 also the weights.
        weights = grads = 2 if bf16 else 4
        optimizer = 4 + 8
        stage = variant.overrides["zero_stage"]
        if stage == 1:
            return weights + grads + optimizer / dp
        if stage == 2:
            return weights + (grads + optimizer) / dp
        return (weights + grads + optimizer) / dp

    @classmethod
    def gathered_bytes(cls, variant: PlanVariant, largest_unit: int, bf16: bool) -> float:
        return largest_unit * (2 if bf16 else 4) if variant.overrides["zero_stage"] == 3 else 0.0

    def step(self, batches: list[Batch], index: int, stop: StopRequest | None) -> StepResult:
        """DeepSpeed steps the optimizer inside ``engine.step()`` at the accumulation boundary, after its own
        check of the gradient norm: a non-finite norm skips the update there (every rank, the norm is global)."""
        from megatron.core import parallel_state

        skipped_before = self.ds.skipped_steps

        def backward(loss: torch.Tensor) -> None:
            self.ds.backward(loss, scale_wrt_gas=False)  # accumulate() already divided by the micro-batches
            self.ds.step()  # steps the optimizer at the accumulation boundary only

        losses = accumulate(batches, index, lambda t, y: self.ds(t, labels=y), backward=backward)
        total = losses.total()
        if not all_finite(total, stop):
            if self.ds.skipped_steps == skipped_before:  # cannot happen with the generated config
                raise TrainingDiverged(f"step {index + 1}: non-finite loss, and DeepSpeed applied the update; "
                                       "resume from the last checkpoint")
            return StepResult.skipped(losses.non_finite())
        group = parallel_state.get_data_parallel_group()
        dist.all_reduce(total, group=group)
        grad_norm = self.ds.get_global_grad_norm()
        return StepResult(float(total) / dist.get_world_size(group),
                          float("nan") if grad_norm is None else float(grad_norm), [])

    def forward_for_eval(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.ds(tokens, labels=labels)  # ZeRO-3 gathers each module's weights as it runs

    def local_state_bytes(self) -> int:
        # DeepSpeed's ZeRO optimizers step fp32 copies of this rank's partition: they are extra state.
        return super().local_state_bytes() + sum(
            tensor_bytes(p) for opt in torch_optimizers(self.optimizer) for g in opt.param_groups for p in g["params"])

    def save(self, step_dir: Path) -> None:
        """Every rank: DeepSpeed's own checkpoint (module, ZeRO partitions) into ``step_dir/deepspeed/``."""
        self.ds.save_checkpoint(str(step_dir / CHECKPOINT_DIR), tag=TAG, client_state={}, save_latest=False)

    def load(self, step_dir: Path, saved_layout: dict[str, int], layout: dict[str, int],
             optimizer_step: int) -> None:
        """Every rank: restore module and optimizer partitions (the scheduler and RNG are ours)."""
        if (saved_layout["tp"], saved_layout["dp"]) != (layout["tp"], layout["dp"]):
            raise CheckpointError(
                f"{step_dir}: a DeepSpeed ZeRO checkpoint resumes only on the layout that saved it "
                f"(tp={saved_layout['tp']}, dp={saved_layout['dp']}); this run has tp={layout['tp']}, "
                f"dp={layout['dp']}. Resume with the saved layout. `hyperloop export --release {step_dir} OUT` "
                "still gives the trained model (for eval and export), but starting a new training run from a "
                "release is not supported yet"
            )
        screen_pickles(step_dir / CHECKPOINT_DIR)
        path, _ = self.ds.load_checkpoint(str(step_dir / CHECKPOINT_DIR), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{step_dir}: DeepSpeed found no checkpoint under {CHECKPOINT_DIR}/{TAG}")
        restore_adam_step(self.optimizer, optimizer_step)

    @classmethod
    def full_state_dict(cls, step_dir: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return consolidated_state_dict(step_dir, model)


def screen_pickles(directory: Path) -> None:
    """Screen DeepSpeed's files before its own ``torch.load(weights_only=False)`` meets them."""
    from hyperloop_dist.checkpoint.safe_pickle import check_torch_pickles

    check_torch_pickles(directory, _allowed_globals())


def _allowed_globals() -> list[type]:
    """The non-tensor types DeepSpeed 0.19.8 pickles into ZeRO checkpoints (stages 1-3, fp32): plain
    records without code of their own. A new one shows up as a refusal naming it."""
    import_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def consolidated_state_dict(step_dir: Path, model: HyperloopModel) -> dict[str, torch.Tensor]:
    """The full fp32 model (Megatron names) from a ZeRO checkpoint of any stage and TP size, in one process.

    DeepSpeed's ``zero_to_fp32`` gathers the ZeRO partitions of one model-parallel rank; with TP each rank's
    files are gathered apart (through a directory of links to them) and the TP shards are joined as
    Megatron split them, read from ``model`` (built at TP = 1, where Megatron still marks each split weight).
    """
    import tempfile

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = step_dir / CHECKPOINT_DIR
    screen_pickles(root)
    tp = read_meta(step_dir)["layout"]["tp"]
    if tp == 1:
        return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(root), tag=TAG).items()}
    shards = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in range(tp):
            one = Path(tmp) / f"mp_{rank}"
            (one / TAG).mkdir(parents=True)
            for f in (root / TAG).glob(f"*mp_rank_{rank:02d}_*.pt"):
                (one / TAG / f.name).symlink_to(f.resolve())
            shards.append(get_fp32_state_dict_from_zero_checkpoint(str(one), tag=TAG))
    return join_tensor_parallel(shards, model)


def join_tensor_parallel(shards: list[dict[str, torch.Tensor]], model: HyperloopModel) -> dict[str, torch.Tensor]:
    """One state dict from TP ranks' state dicts (rank order); replicated tensors are taken from rank 0."""
    params = dict(model.named_parameters())
    out = {}
    for name, first in shards[0].items():
        param = params.get(name)
        if param is None or not getattr(param, "tensor_model_parallel", False):
            out[name] = first.float()
            continue
        parts = [shard[name].float() for shard in shards]
        if name.endswith("mlp.linear_fc1.weight") and model.config.gated_linear_unit:
            # SwiGLU: each rank holds [its gate rows; its up rows], the whole weight is [all gates; all ups].
            halves = [part.chunk(2, dim=0) for part in parts]
            parts = [h[0] for h in halves] + [h[1] for h in halves]
        out[name] = torch.cat(parts, dim=param.partition_dim)
    return out
