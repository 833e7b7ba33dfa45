"""Atomic, verified checkpoint directories under ``<run_dir>/checkpoints``.

A checkpoint is written to ``step_XXXXXXXX.tmp``, every file fsynced, a ``manifest.json`` with sizes and
SHA-256 hashes written last, then the directory is renamed into place and ``latest`` is replaced
atomically. Loading verifies the manifest; a damaged checkpoint is refused with the reason and the
previous good one is used. Tensors are stored as safetensors and ``torch.load(weights_only=True)``
pickles (no arbitrary objects are ever unpickled).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """A fresh ``step_XXXXXXXX.tmp`` directory for checkpoint ``step`` (call on one rank, then barrier)."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (step_dir_name(step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, keep_last: int) -> Path:
    """Fsync and hash every file written into ``tmp``, write the manifest last, rename into place and
    point ``latest`` at it (call on one rank after every rank finished writing)."""
    root = tmp.parent
    step = int(tmp.name.removesuffix(".tmp").removeprefix("step_"))
    final = root / step_dir_name(step)
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
        files[str(f.relative_to(tmp))] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, reverse=True):
        _fsync_dir(d)
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    latest_tmp = root / (LATEST + ".tmp")
    latest_tmp.write_text(final.name + "\n")
    latest_tmp.replace(root / LATEST)
    _fsync_dir(root)
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(path: Path) -> dict:
    """Return the manifest if every file matches it; raise CheckpointError naming what is wrong."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: file {name} listed in the manifest is missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{path}: {name} has {f.stat().st_size} bytes, manifest says {info['bytes']} "
                                  "(truncated or overwritten)")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its SHA-256 in the manifest (corrupted)")
    return manifest


def find_resumable(run_dir: str | Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies, starting at ``latest``; damaged ones are reported and skipped."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")),
                        reverse=True)
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    for path in candidates:
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            log(f"refusing checkpoint: {exc}; trying the previous one")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory whose latest good checkpoint is meant."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        verify_checkpoint(path)
        return path
    found = find_resumable(path)
    if found is None:
        raise CheckpointError(f"{path}: neither a checkpoint directory nor a run directory with a good checkpoint")
    return found
