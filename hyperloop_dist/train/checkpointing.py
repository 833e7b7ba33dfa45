"""Save and resume a run: the engine's shards plus the engine-neutral state, staged and published atomically."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hyperloop_dist.checkpoint import training_state
from hyperloop_dist.checkpoint.store import CheckpointError, find_resumable, publish, staging_dir
from hyperloop_dist.config import Config
from hyperloop_dist.data.batches import Batches
from hyperloop_dist.parallel.distributed import RankInfo, agree
from hyperloop_dist.train import engines, hang


def save(cfg: Config, step: int, engine: engines.Engine, info: RankInfo, data: Batches) -> None:
    """Every rank: stage the checkpoint of ``step``, then rank 0 publishes it (``checkpoints/latest``)."""
    hang.section("checkpoint", step)
    run_dir = Path(cfg.train.run_dir)
    tmp = agree(staging_dir(run_dir, step) if info.is_main else None)
    engine.save(tmp)
    training_state.write(tmp, cfg, step, engine.optimizer_step(), engine.scheduler, data.windows_per_step,
                         info.dp_rank, data.state_dict())
    dist.barrier()
    if info.is_main:
        print(f"saved checkpoint {publish(tmp, cfg.train.keep_last)}", flush=True)
    dist.barrier()


def resume(cfg: Config, engine: engines.Engine, info: RankInfo, windows_per_step: int,
           say: Callable[..., object]) -> tuple[int, dict[str, Any] | None]:
    """Restore the newest good checkpoint of the run, if any: (step to continue after, data position)."""
    path = agree(find_resumable(Path(cfg.train.run_dir), log=say) if info.is_main else None)
    if path is None:
        return 0, None
    meta = training_state.read_meta(path)
    training_state.check_compatible(meta, cfg, path, windows_per_step)
    saved = engines.for_checkpoint(path)
    if saved is not type(engine):
        raise CheckpointError(f"{path} was written by the {saved.name} engine; resume it with "
                              f"parallel.engine={saved.name} (`hyperloop export --release` reads it under any "
                              "engine, for eval and export)")
    engine.load(path, meta["layout"], training_state.layout(cfg, windows_per_step), meta["optimizer_step"])
    step = training_state.restore(path, meta, cfg, engine.scheduler, windows_per_step)
    say(f"resumed from {path} at step {step}")
    return step, training_state.load_data_state(path, info.dp_rank)
