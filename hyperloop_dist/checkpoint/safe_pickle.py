"""Refuse a torch DCP ``.metadata`` that would run code when unpickled, before torch reads it.

Sharded checkpoints of both engines (Megatron's ``torch_dist`` and FSDP's DCP) keep their index in a
``.metadata`` file that torch loads with plain ``pickle.load``. Everything else we read is safetensors, JSON
or ``torch.load(weights_only=True)``. This module replays the pickle with an allow-list of the globals DCP
writes (its own metadata dataclasses, ``torch.Size``, dtypes, layouts, paths), so a tampered file is refused
naming the global it asked for, and nothing in it is executed.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from hyperloop_dist.checkpoint.store import CheckpointError

_DCP_MODULES = ("torch.distributed.checkpoint.",)
_ALLOWED = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _ALLOWED or dtype or (module.startswith(_DCP_MODULES) and not name.startswith("__")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not something a checkpoint index holds")


def check_dcp_metadata(directory: Path) -> None:
    """Raise :class:`CheckpointError` unless ``directory/.metadata`` unpickles with the allow-list alone."""
    path = Path(directory) / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no .metadata (not a finished torch distributed checkpoint)")
    try:
        with path.open("rb") as f:
            _AllowListUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: refused to load, it is not a plain checkpoint index ({exc}); nothing in "
                              "it was executed. Use checkpoints written by hyperloop_dist only") from exc
