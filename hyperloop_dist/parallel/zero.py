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

from hyperloop_dist.config import Config
from hyperloop_dist.model.hyperloop import HyperloopModel, build_model
from hyperloop_dist.parallel import cpu_shim
from hyperloop_dist.train import hang
from hyperloop_dist.train.torch_optim import adamw, lr_scheduler

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

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
        "bf16": {"enabled": t.precision == "bf16"},
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


def build_deepspeed_training(cfg: Config) -> tuple[DeepSpeedEngine, Any, OptimizerParamScheduler]:
    """(DeepSpeed engine around the model, its ZeRO optimizer, LR scheduler) for this rank."""
    from megatron.core import parallel_state

    deepspeed = import_deepspeed()
    # DeepSpeed 0.19.8 calls the deprecated name on every gather; nothing for us to act on, once per step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    model = build_model(cfg.model, tp=cfg.parallel.tp, precision=cfg.train.precision,
                        recompute=cfg.train.recompute == "loop", seed=cfg.train.seed)
    if cpu_shim.cuda_available():
        model.cuda()
    ds_config = deepspeed_config(cfg, parallel_state.get_data_parallel_world_size())
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=adamw(cfg, model.parameters()), config=ds_config, mpu=MegatronMpu(),
        dist_init_required=False,
    )
    if cfg.parallel.zero_stage == 3:
        _register_parameters_used_outside_their_module(model)
    return engine, optimizer, lr_scheduler(cfg, optimizer)


def deepspeed_step(engine: DeepSpeedEngine, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """One optimizer step over the micro-batches; returns (loss averaged over DP ranks, grad norm)."""
    from megatron.core import parallel_state

    device = cpu_shim.device()
    total = torch.zeros((), device=device)  # on the device: NCCL reduces nothing else
    for tokens, labels in batches:
        loss = engine(tokens.to(device), labels=labels.to(device)).mean()
        engine.backward(loss)  # scales by 1 / gradient_accumulation_steps
        engine.step()  # steps the optimizer at the accumulation boundary only
        total += loss.detach().float() / len(batches)
    hang.beat("backward")
    group = parallel_state.get_data_parallel_group()
    dist.all_reduce(total, group=group)
    grad_norm = engine.get_global_grad_norm()
    return float(total) / dist.get_world_size(group), float("nan") if grad_norm is None else float(grad_norm)


# --------------------------------------------------------------------------- checkpoints


def save(engine: DeepSpeedEngine, step_dir: Path) -> None:
    """Every rank: DeepSpeed's own checkpoint (module, ZeRO partitions) into ``step_dir/deepspeed/``."""
    engine.save_checkpoint(str(step_dir / CHECKPOINT_DIR), tag=TAG, client_state={}, save_latest=False)


def load(engine: DeepSpeedEngine, step_dir: Path, saved: dict[str, int], current: dict[str, int]) -> None:
    """Every rank: restore module and optimizer partitions (the scheduler and RNG are ours)."""
    from hyperloop_dist.checkpoint.store import CheckpointError

    if (saved["tp"], saved["dp"]) != (current["tp"], current["dp"]):
        raise CheckpointError(
            f"{step_dir}: a DeepSpeed ZeRO checkpoint resumes only on the layout that saved it (tp={saved['tp']}, "
            f"dp={saved['dp']}); this run has tp={current['tp']}, dp={current['dp']}. Resume with the saved "
            f"layout. `hyperloop export --release {step_dir} OUT` still gives the trained model (for eval and "
            "export), but starting a new training run from a release is not supported yet"
        )
    screen_pickles(step_dir / CHECKPOINT_DIR)
    path, _ = engine.load_checkpoint(str(step_dir / CHECKPOINT_DIR), tag=TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"{step_dir}: DeepSpeed found no checkpoint under {CHECKPOINT_DIR}/{TAG}")


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

    from hyperloop_dist.checkpoint.training_state import read_meta

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
