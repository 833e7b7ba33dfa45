"""Consolidate a training checkpoint (any engine, any layout) into a one-file release ``reference.py`` loads.

A release directory holds ``model.safetensors`` (reference parameter names, the shared middle block once),
``config.json`` (the model config and format version) and ``tokenizer.model``. It loads with torch and
safetensors alone: :func:`load_release`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hyperloop_dist.checkpoint.store import CheckpointError, resolve_checkpoint
from hyperloop_dist.config import ModelConfig, build_section, load_config
from hyperloop_dist.model.reference import ReferenceModel, from_megatron_state_dict
from hyperloop_dist.parallel.distributed import single_process_world

RELEASE_FORMAT = "hyperloop-release-2"


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as plain contiguous CPU tensors (Megatron's ``_extra_state`` entries dropped)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def load_megatron_weights(checkpoint: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A checkpoint of any engine as full (TP = 1) tensors with Megatron names. Needs a one-rank world."""
    from hyperloop_dist.model.hyperloop import build_model
    from hyperloop_dist.train.engines import for_checkpoint

    cfg = load_config(checkpoint / "config.yaml")
    model = build_model(cfg.model)  # TP = 1: the names and splits every engine's shards map onto
    model.load_state_dict(for_checkpoint(checkpoint).full_state_dict(checkpoint, model), strict=False)
    return cfg.model, model_tensors(model)


def checkpoint_model(checkpoint: Path) -> ReferenceModel:
    """A training checkpoint of any engine and layout as one plain-PyTorch :class:`ReferenceModel`."""
    with single_process_world():
        cfg, tensors = load_megatron_weights(checkpoint)
    model = ReferenceModel(cfg)
    model.load_state_dict(from_megatron_state_dict(tensors), strict=True)
    return model.eval()


@contextlib.contextmanager
def new_release_dir(out: str | Path) -> Iterator[Path]:
    """A staging directory next to ``out``, renamed to ``out`` when the block succeeds: a release directory
    either is whole or does not exist. ``out`` must be new or empty."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new release directory")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def export_release(source: str | Path, out: str | Path) -> Path:
    """Write a release from a checkpoint directory or a run directory (its latest good checkpoint)."""
    from hyperloop_dist.export.hf_model import hf_config  # config.json doubles as the transformers config

    checkpoint = resolve_checkpoint(source)
    model = checkpoint_model(checkpoint)
    with new_release_dir(out) as tmp:
        save_file(model_tensors(model), str(tmp / "model.safetensors"), metadata={"format": RELEASE_FORMAT})
        (tmp / "config.json").write_text(json.dumps(
            {**hf_config(model.cfg).to_dict(), "format": RELEASE_FORMAT, "model": dataclasses.asdict(model.cfg),
             "source_checkpoint": str(checkpoint.resolve())}, indent=1))
        if (checkpoint / "tokenizer.model").is_file():
            shutil.copyfile(checkpoint / "tokenizer.model", tmp / "tokenizer.model")
        from hyperloop_dist.export.model_card import finish_release  # model code, tokenizer.json, README.md

        finish_release(tmp, checkpoint, model)
        load_release(tmp)  # never publish a release that does not load
    return Path(out)


def release_config(path: str | Path) -> ModelConfig:
    info = json.loads((Path(path) / "config.json").read_text())
    if info.get("format") == "hyperloop-release-1":
        from hyperloop_dist.checkpoint.training_state import HC_FORM_CHANGE

        raise CheckpointError(f"{path}: a hyperloop-release-1 release holds the earlier model form "
                              f"({HC_FORM_CHANGE}); {RELEASE_FORMAT} follows the paper. Export again from a "
                              "checkpoint trained with this version")
    if info.get("format") != RELEASE_FORMAT:
        raise CheckpointError(f"{path}: not a {RELEASE_FORMAT} release (format {info.get('format')!r})")
    return build_section(ModelConfig, info["model"], "model.")


def load_release(path: str | Path) -> ReferenceModel:
    """A release as a plain-PyTorch :class:`ReferenceModel` (torch + safetensors only, no pickle)."""
    path = Path(path)
    model = ReferenceModel(release_config(path))
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.eval()
