"""Process group and Megatron parallel state for one rank."""

from __future__ import annotations

import contextlib
import datetime
import math
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hyperloop_dist.config import Config
from hyperloop_dist.parallel import cpu_shim


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: Config) -> RankInfo:
    """Join the process group named by torchrun's environment and initialize Megatron's parallel state."""
    from megatron.core import parallel_state

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"not launched by torchrun/srun: {', '.join(missing)} unset; use `hyperloop train`")
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != cfg.world_size:
        raise RuntimeError(
            f"the launcher started {world_size} processes but the recipe asks for "
            f"parallel.nproc_per_node*parallel.nnodes={cfg.world_size}; make them agree"
        )
    torch.set_num_threads(cfg.train.threads_per_rank)
    cpu_shim.enable()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if cpu_shim.cuda_available() else "gloo"
    if cpu_shim.cuda_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s))
    # Megatron's groups (TP, PP, DP, ...) get the run's collective timeout too, so a collective that never
    # completes in eval or a save ends the job with an error instead of waiting Megatron's default 30 min.
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.parallel.tp, pipeline_model_parallel_size=cfg.parallel.pp,
        distributed_timeout_minutes=max(1, math.ceil(cfg.parallel.timeout_s / 60)),
    )
    cpu_shim.seed_model_parallel(cfg.train.seed)
    return RankInfo(
        rank=dist.get_rank(), world_size=world_size, local_rank=local_rank,
        dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
    )


def shutdown_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def reap_children(grace_s: float = 5.0) -> None:
    """End this process's children (loader workers) still alive when the rank stops.

    A worker that outlives its loader would block Python's exit, which joins every child, and the
    launcher would never see this rank end. Workers ignore SIGTERM (data_pipeline/stream.py), so SIGKILL.
    """
    children = multiprocessing.active_children()
    deadline = time.monotonic() + grace_s
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.is_alive():
            child.kill()
            child.join(timeout=5)


def agree(value: object) -> object:
    """Rank 0's value on every rank (checkpoint discovery hashes files once, not once per rank)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: object) -> list[object]:
    """Every rank's value, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


@contextlib.contextmanager
def single_process_world() -> Iterator[None]:
    """A one-rank gloo world with Megatron parallel state (TP = PP = 1), unless one exists already."""
    from megatron.core import parallel_state

    from hyperloop_dist.parallel.launch import free_port

    cpu_shim.enable()
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        if owned:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
