"""What a training checkpoint holds (TP = PP = 1 layout) and how it is restored.

``model.safetensors`` (weights, Megatron names), ``optimizer.pt`` (optimizer, LR scheduler and RNG
states; tensors and plain Python values only, loaded with ``weights_only=True``), ``meta.json`` (step,
format version, the model config) and the run's ``config.yaml`` and ``tokenizer.model``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from hyperloop_dist.checkpoint.store import CheckpointError
from hyperloop_dist.config import Config, dump_config

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

FORMAT_VERSION = 1


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as plain contiguous CPU tensors (Megatron's ``_extra_state`` entries dropped)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def write(directory: Path, cfg: Config, step: int, model: torch.nn.Module, optimizer: MegatronOptimizer,
          scheduler: OptimizerParamScheduler) -> None:
    save_file(model_tensors(model), str(directory / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "cpu_rng": torch.get_rng_state()}, directory / "optimizer.pt")
    meta = {"format_version": FORMAT_VERSION, "step": step, "model": dataclasses.asdict(cfg.model)}
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))
    dump_config(cfg, directory / "config.yaml")
    tokenizer = Path(cfg.data.tokenizer)
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, directory / "tokenizer.model")


def check_compatible(meta: dict, cfg: Config, path: Path) -> None:
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')} is not {FORMAT_VERSION} "
                              "(written by another hyperloop_dist version)")
    saved, current = meta["model"], dataclasses.asdict(cfg.model)
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs recipe {v!r}" for k, v in current.items()
             if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"{path} was trained with another model config: " + "; ".join(diffs)
                              + ". Use the checkpoint's own config.yaml, or a new train.run_dir")


def load(path: Path, cfg: Config, model: torch.nn.Module, optimizer: MegatronOptimizer,
         scheduler: OptimizerParamScheduler) -> int:
    """Restore model, optimizer, scheduler and RNG from a verified checkpoint; return its step."""
    meta = json.loads((path / "meta.json").read_text())
    check_compatible(meta, cfg, path)
    tensors = load_file(str(path / "model.safetensors"))
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not fit the model (missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]})")
    state = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["cpu_rng"])
    return int(meta["step"])
