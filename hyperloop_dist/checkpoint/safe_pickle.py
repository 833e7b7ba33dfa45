"""Refuse a pickle that would run code, before a library that unpickles it without care reads it.

Everything we read ourselves is safetensors, JSON or ``torch.load(weights_only=True)``. Two libraries
unpickle checkpoint files with plain pickle, so their files are screened first, with allow-lists:

- torch DCP's ``.metadata`` (the index of Megatron ``torch_dist`` and FSDP checkpoints), read by torch with
  ``pickle.load``: :func:`check_dcp_metadata` replays it allowing the globals DCP writes (its metadata
  dataclasses, ``torch.Size``, dtypes, layouts, paths);
- DeepSpeed's ``.pt`` files, read with ``torch.load(weights_only=False)``: :func:`check_torch_pickles` opens
  them with ``weights_only=True`` and the few plain types DeepSpeed stores.

A tampered file is refused naming the global it asked for, and nothing in it is executed.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
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


def check_torch_pickles(directory: Path, allowed: Sequence[type], pattern: str = "*.pt") -> None:
    """Raise :class:`CheckpointError` unless every ``pattern`` file under ``directory`` loads with
    ``weights_only=True`` and ``allowed`` as the only extra globals."""
    with torch.serialization.safe_globals(list(allowed)):
        for f in sorted(Path(directory).rglob(pattern)):
            try:
                torch.load(f, map_location="cpu", weights_only=True)
            except Exception as exc:  # an unpickling error names the offending global
                raise CheckpointError(f"{f}: refused to load, it holds more than tensors and plain values ({exc}); "
                                      "nothing in it was executed. Use checkpoints written by hyperloop_dist "
                                      "only") from exc
