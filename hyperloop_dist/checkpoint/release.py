"""Consolidate a training checkpoint (any TP / DP layout) into a one-file release ``reference.py`` loads.

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

from hyperloop_dist.checkpoint.safe_pickle import check_dcp_metadata
from hyperloop_dist.checkpoint.store import CheckpointError, resolve_checkpoint
from hyperloop_dist.config import HCConfig, ModelConfig, load_config
from hyperloop_dist.model.reference import ReferenceModel, from_megatron_state_dict

RELEASE_FORMAT = "hyperloop-release-2"


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as plain contiguous CPU tensors (Megatron's ``_extra_state`` entries dropped)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


@contextlib.contextmanager
def single_process_world() -> Iterator[None]:
    """A one-rank gloo world with Megatron parallel state (TP = PP = 1), unless one exists already."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from hyperloop_dist.parallel import cpu_shim
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


def load_megatron_weights(checkpoint: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The checkpoint's model as full (TP = 1) tensors with Megatron names. Needs a one-rank world."""
    from megatron.core import dist_checkpointing

    from hyperloop_dist.model.hyperloop import build_model
    from hyperloop_dist.parallel import cpu_shim

    cfg = load_config(checkpoint / "config.yaml")
    model = build_model(cfg.model)
    if (checkpoint / "dcp").is_dir():  # engine fsdp: torch DCP keeps the model's own parameter names
        import torch.distributed.checkpoint as dcp

        check_dcp_metadata(checkpoint / "dcp")
        state = {"model": {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}}
        dcp.load(state, checkpoint_id=str(checkpoint / "dcp"))
    elif (checkpoint / "deepspeed").is_dir():  # engine deepspeed: DeepSpeed's zero_to_fp32 gathers the shards
        from hyperloop_dist.parallel.zero import consolidated_state_dict

        state = {"model": consolidated_state_dict(checkpoint, model)}
    else:
        check_dcp_metadata(checkpoint / "dist")
        with cpu_shim.device_mode():
            state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(checkpoint / "dist"))
    model.load_state_dict(state["model"], strict=False)
    return cfg.model, model_tensors(model)


def export_release(source: str | Path, out: str | Path) -> Path:
    """Write a release from a checkpoint directory or a run directory (its latest good checkpoint)."""
    checkpoint = resolve_checkpoint(source)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new release directory")
    with single_process_world():
        model_cfg, tensors = load_megatron_weights(checkpoint)
    tensors = from_megatron_state_dict(tensors)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": RELEASE_FORMAT})
    from hyperloop_dist.export.hf_model import hf_config  # config.json doubles as the transformers config

    (tmp / "config.json").write_text(json.dumps(
        {**hf_config(model_cfg).to_dict(), "format": RELEASE_FORMAT, "model": dataclasses.asdict(model_cfg),
         "source_checkpoint": str(checkpoint.resolve())}, indent=1))
    if (checkpoint / "tokenizer.model").is_file():
        shutil.copyfile(checkpoint / "tokenizer.model", tmp / "tokenizer.model")
    load_release(tmp)  # never publish a release that does not load
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def release_config(path: str | Path) -> ModelConfig:
    info = json.loads((Path(path) / "config.json").read_text())
    if info.get("format") == "hyperloop-release-1":
        from hyperloop_dist.checkpoint.training_state import HC_FORM_CHANGE

        raise CheckpointError(f"{path}: a hyperloop-release-1 release holds the earlier model form "
                              f"({HC_FORM_CHANGE}); {RELEASE_FORMAT} follows the paper. Export again from a "
                              "checkpoint trained with this version")
    if info.get("format") != RELEASE_FORMAT:
        raise CheckpointError(f"{path}: not a {RELEASE_FORMAT} release (format {info.get('format')!r})")
    fields = dict(info["model"])
    fields["hc"] = HCConfig(**fields["hc"])
    return ModelConfig(**fields)


def load_release(path: str | Path) -> ReferenceModel:
    """A release as a plain-PyTorch :class:`ReferenceModel` (torch + safetensors only, no pickle)."""
    path = Path(path)
    model = ReferenceModel(release_config(path))
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.eval()
