"""What a training checkpoint holds besides the engine's own shards, and how every rank writes and
restores it.

A step directory holds the engine's model and optimizer shards in the engine's sub-directory
(:mod:`hyperloop_dist.train.engines`: its ``save`` / ``load``; ``docs/checkpoints.md`` lists which loads
under which layout) and, written here for every engine: ``rng/rank_XXXXX.pt``, each rank's CPU RNG and
Megatron RNG-tracker states (restored when the layout is unchanged); ``meta.json``, the format version, step,
optimizer step, LR-scheduler state, the layout and the model config; ``data/dp_XXXXX.json``, the streaming
pipeline's position of each data-parallel replica, and ``data/listing.json``, the source files it reads (the
same for every replica: stored once); ``config.yaml`` and ``tokenizer.model``, the run's
recipe and tokenizer.

Nothing is unpickled beyond tensors and plain values (``torch.load(weights_only=True)``); the files
libraries unpickle with plain pickle are screened with allow-lists first
(:mod:`hyperloop_dist.checkpoint.safe_pickle`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hyperloop_dist.checkpoint.store import CheckpointError
from hyperloop_dist.config import RUNTIME_MODEL_FIELDS, Config, dump_config

FORMAT_VERSION = 3
SHARED_DATA_KEYS = ("files", "versions")  # the data state every replica has alike: data/listing.json
OLD_HC_FORMATS = (1, 2)  # before the paper's hyper-connection form
HC_FORM_CHANGE = ("the Hyperloop's H_res became the paper's diagonal sigmoid gate (was a dense Sinkhorn matrix), "
                  "the loop writes the middle block's whole output (was F(x) - x), and the mhc baseline has two "
                  "hyper-connections per layer (was one)")


def layout(cfg: Config, windows_per_step: int) -> dict[str, int]:
    p = cfg.parallel
    return {"world_size": cfg.world_size, "tp": p.tp, "pp": p.pp, "dp": cfg.data_parallel_size,
            "windows_per_step": windows_per_step}


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {"cpu_rng": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def write(directory: Path, cfg: Config, step: int, optimizer_step: int, scheduler: Any, windows_per_step: int,
          dp_rank: int = 0, data_state: dict[str, Any] | None = None) -> None:
    """Every rank calls this with the same staging ``directory``, after the engine saved its part."""
    rank = dist.get_rank()
    if data_state is not None and _first_in_data_replica():
        (directory / "data").mkdir(exist_ok=True)
        shared = {k: data_state[k] for k in SHARED_DATA_KEYS if k in data_state}
        own = {k: v for k, v in data_state.items() if k not in shared}
        (directory / "data" / f"dp_{dp_rank:05d}.json").write_text(json.dumps(own))
        if dp_rank == 0 and shared:
            (directory / "data" / "listing.json").write_text(json.dumps(shared))
    (directory / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), directory / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        meta = {"format_version": FORMAT_VERSION, "step": step, "optimizer_step": optimizer_step,
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
    state, listing = path / "data" / f"dp_{dp_rank:05d}.json", path / "data" / "listing.json"
    if not state.is_file():
        return None
    return {**json.loads(state.read_text()), **(json.loads(listing.read_text()) if listing.is_file() else {})}


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


def restore(path: Path, meta: dict[str, Any], cfg: Config, scheduler: Any, windows_per_step: int) -> int:
    """After the engine restored model and optimizer: the LR schedule, and the RNG when the layout is
    unchanged. Returns the step to continue after."""
    scheduler.load_state_dict(meta["scheduler"])
    if meta["layout"] == layout(cfg, windows_per_step):
        from megatron.core import tensor_parallel

        rng = torch.load(path / "rng" / f"rank_{dist.get_rank():05d}.pt", weights_only=True)
        torch.set_rng_state(rng["cpu_rng"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    return int(meta["step"])
