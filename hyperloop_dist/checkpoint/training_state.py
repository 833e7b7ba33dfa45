"""What a training checkpoint holds and how every rank writes and restores its part.

``dist/``: model and optimizer as ``megatron.core.dist_checkpointing`` (torch_dist) shards, so a
checkpoint saved under one TP / PP / DP layout loads under another (engine megatron); ``dcp/``: the same as
torch Distributed Checkpoint shards (engine fsdp; loads under any number of ranks); ``deepspeed/``: DeepSpeed's
own ZeRO checkpoint (engine deepspeed; resumes on the layout that saved it, see parallel/zero.py). ``rng/rank_XXXXX.pt``: each rank's CPU RNG
and Megatron RNG-tracker states (restored when the layout is unchanged). ``meta.json``: format version,
step, optimizer step, LR-scheduler state, the layout and the model config. ``data/dp_XXXXX.json``: the
streaming pipeline's position of each data-parallel replica. ``config.yaml`` and
``tokenizer.model``: the run's recipe and tokenizer.

Nothing is unpickled beyond tensors and plain values (``torch.load(weights_only=True)``; torch_dist shards
are read by Megatron's loader). The two files libraries unpickle with plain pickle, DCP's ``.metadata`` and
DeepSpeed's ``.pt`` files, are screened with allow-lists first (:mod:`hyperloop_dist.checkpoint.safe_pickle`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from hyperloop_dist.checkpoint.safe_pickle import check_dcp_metadata
from hyperloop_dist.checkpoint.store import CheckpointError
from hyperloop_dist.config import RUNTIME_MODEL_FIELDS, Config, dump_config

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from hyperloop_dist.model.hyperloop import HyperloopModel

FORMAT_VERSION = 3
OLD_HC_FORMATS = (1, 2)  # before the paper's hyper-connection form
HC_FORM_CHANGE = ("the Hyperloop's H_res became the paper's diagonal sigmoid gate (was a dense Sinkhorn matrix), "
                  "the loop writes the middle block's whole output (was F(x) - x), and the mhc baseline has two "
                  "hyper-connections per layer (was one)")
# The distributed optimizer's default ('fully_sharded_model_space') fails in 0.16.1 (Megatron-LM #2956).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def layout(cfg: Config, windows_per_step: int) -> dict[str, int]:
    p = cfg.parallel
    return {"world_size": cfg.world_size, "tp": p.tp, "pp": p.pp, "dp": cfg.data_parallel_size,
            "windows_per_step": windows_per_step}


def torch_optimizers(optimizer: MegatronOptimizer | torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [opt.optimizer for opt in chained if getattr(opt, "optimizer", None) is not None]


def optimizer_step(optimizer: MegatronOptimizer) -> int:
    for opt in torch_optimizers(optimizer):
        for state in opt.state.values():
            if "step" in state:
                return int(state["step"])
    return 0


def restore_adam_step(optimizer: MegatronOptimizer, step: int) -> None:
    for opt in torch_optimizers(optimizer):
        for state in opt.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(step), dtype=state["step"].dtype)


def prepare_adam_state_for_loading(optimizer: MegatronOptimizer) -> None:
    """Give a fresh torch-Adam fallback optimizer its full state (moments and ``step``) before Megatron
    builds the loading template: without ``step`` in the template the checkpoint's step is not read and
    Adam silently restarts its bias correction (``docs/megatron_cpu.md``, item 5b)."""
    for opt in torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state[p]
                state.setdefault("exp_avg", torch.zeros_like(p.data))
                state.setdefault("exp_avg_sq", torch.zeros_like(p.data))
                state.setdefault("step", torch.zeros((), dtype=torch.float32))


def _sharded_state(model: HyperloopModel, optimizer: MegatronOptimizer, loading: bool) -> dict[str, Any]:
    model_sd = model.sharded_state_dict()
    return {"model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=OPTIMIZER_METADATA)}


def _fsdp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {"cpu_rng": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


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


def write(directory: Path, cfg: Config, step: int, model: HyperloopModel, optimizer: MegatronOptimizer,
          scheduler: OptimizerParamScheduler, windows_per_step: int, dp_rank: int = 0,
          data_state: dict[str, Any] | None = None) -> None:
    """Every rank calls this with the same staging ``directory``."""
    from megatron.core import dist_checkpointing

    from hyperloop_dist.parallel import cpu_shim

    if cfg.parallel.engine == "fsdp":
        import torch.distributed.checkpoint as dcp

        dcp.save(_fsdp_state(model, optimizer), checkpoint_id=str(directory / "dcp"))
    elif cfg.parallel.engine == "deepspeed":
        from hyperloop_dist.parallel import zero

        zero.save(model, directory)
    else:
        _in_process_results_queue()
        with cpu_shim.device_mode():
            dist_checkpointing.save(_sharded_state(model, optimizer, loading=False), str(directory / "dist"))
    rank = dist.get_rank()
    if data_state is not None and _first_in_data_replica():
        (directory / "data").mkdir(exist_ok=True)
        (directory / "data" / f"dp_{dp_rank:05d}.json").write_text(json.dumps(data_state))
    (directory / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), directory / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        meta = {"format_version": FORMAT_VERSION, "step": step, "optimizer_step": optimizer_step(optimizer),
                "scheduler": scheduler.state_dict(), "layout": layout(cfg, windows_per_step),
                "model": dataclasses.asdict(cfg.model)}
        (directory / "meta.json").write_text(json.dumps(meta, indent=1))
        dump_config(cfg, directory / "config.yaml")
        tokenizer = Path(cfg.data.tokenizer)
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, directory / "tokenizer.model")


def _first_in_data_replica() -> bool:
    """All ranks of one data-parallel replica (its TP x PP ranks) consume the same data: one writes it."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0


def load_data_state(path: Path, dp_rank: int) -> dict[str, Any] | None:
    """The data pipeline's position for this data-parallel rank (None: the run used stateless windows)."""
    state = path / "data" / f"dp_{dp_rank:05d}.json"
    return json.loads(state.read_text()) if state.is_file() else None


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "meta.json").read_text())


def check_compatible(meta: dict, cfg: Config, path: Path, windows_per_step: int | None = None) -> None:
    if meta.get("format_version") in OLD_HC_FORMATS:
        raise CheckpointError(f"{path}: format version {meta['format_version']} holds the earlier model form "
                              f"(version {FORMAT_VERSION} follows the paper): {HC_FORM_CHANGE}. It cannot be "
                              "resumed or converted; train again (a new train.run_dir)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')} is not {FORMAT_VERSION} "
                              "(written by another hyperloop_dist version)")
    saved, current = meta["model"], dataclasses.asdict(cfg.model)
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs recipe {v!r}" for k, v in current.items()
             if saved.get(k) != v and k not in RUNTIME_MODEL_FIELDS]
    if diffs:
        raise CheckpointError(f"{path} was trained with another model config: " + "; ".join(diffs)
                              + ". Use the checkpoint's own config.yaml, or a new train.run_dir")
    saved_windows = meta["layout"]["windows_per_step"]
    if windows_per_step is not None and saved_windows != windows_per_step:
        raise CheckpointError(
            f"{path}: saved with a global batch of {saved_windows} windows per step, this layout gives "
            f"{windows_per_step} (train.micro_batch_size x train.grad_accum x data-parallel size); keep the "
            "global batch when changing the layout so the resumed run sees the same data"
        )


ENGINE_DIRS = {"dist": "megatron", "dcp": "fsdp", "deepspeed": "deepspeed"}


def checkpoint_engine(path: Path) -> str:
    """Which engine wrote a checkpoint, from the directory its model shards are in."""
    found = [engine for sub, engine in ENGINE_DIRS.items() if (path / sub).is_dir()]
    if len(found) != 1:
        raise CheckpointError(f"{path}: expected exactly one of {', '.join(ENGINE_DIRS)}/, found {found or 'none'}")
    return found[0]


def load(path: Path, cfg: Config, model: HyperloopModel, optimizer: MegatronOptimizer,
         scheduler: OptimizerParamScheduler, windows_per_step: int) -> int:
    """Restore model, optimizer, scheduler (and RNG when the layout is unchanged); return the step."""
    from megatron.core import dist_checkpointing

    from hyperloop_dist.parallel import cpu_shim

    meta = read_meta(path)
    check_compatible(meta, cfg, path, windows_per_step)
    saved = checkpoint_engine(path)
    if saved != cfg.parallel.engine:
        raise CheckpointError(f"{path} was written by the {saved} engine; resume it with parallel.engine={saved} "
                              "(`hyperloop export --release` reads it under any engine, for eval and export)")
    if cfg.parallel.engine == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        check_dcp_metadata(path / "dcp")
        prepare_adam_state_for_loading(optimizer)
        state = _fsdp_state(model, optimizer)
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    elif cfg.parallel.engine == "deepspeed":
        from hyperloop_dist.parallel import zero

        zero.load(model, path, meta["layout"], layout(cfg, windows_per_step))
    else:
        check_dcp_metadata(path / "dist")
        prepare_adam_state_for_loading(optimizer)
        with cpu_shim.device_mode():
            state = dist_checkpointing.load(_sharded_state(model, optimizer, loading=True), str(path / "dist"))
            model.load_state_dict(state["model"])
            with torch.no_grad():  # fp32: main params are views of the leaf params
                optimizer.load_state_dict(state["optimizer"])
    # The distributed optimizer's 'dp_reshardable' format does not carry Adam's step (the plain
    # optimizer's does, as 'common_step'); every parameter shares one step, so set it from meta.
    restore_adam_step(optimizer, meta["optimizer_step"])
    scheduler.load_state_dict(meta["scheduler"])
    if meta["layout"] == layout(cfg, windows_per_step):
        rng = torch.load(path / "rng" / f"rank_{dist.get_rank():05d}.pt", weights_only=True)
        torch.set_rng_state(rng["cpu_rng"])
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    return int(meta["step"])
