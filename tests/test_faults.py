"""Faults with real processes: a rank killed mid-step, a crash or a full disk while saving, NaN losses, and
checkpoints that must be refused (another version, a tampered index that would run code)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hyperloop_dist.checkpoint.store import CheckpointError, find_resumable, verify_checkpoint
from hyperloop_dist.checkpoint.training_state import check_compatible, read_meta
from hyperloop_dist.config import load_config

from .helpers import checkpoint, losses, train, train_and_kill_after_first_save, train_command, weights

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("megatron_world")]

STEPS, SAVE_EVERY = 12, 4


@pytest.fixture(scope="module")
def args(tiny_data: list[str]) -> list[str]:
    return [*tiny_data, f"train.steps={STEPS}", "data.loader=windows", "parallel.nproc_per_node=2",
            f"train.save_interval={SAVE_EVERY}", "logging.wandb_mode=disabled"]


@pytest.fixture(scope="module")
def reference(dp2_run: tuple[Path, str]) -> dict[int, float]:
    """The uninterrupted run of ``args`` (the session's shared DP=2 run, tests/conftest.py)."""
    return losses(dp2_run[0])


def _popen(args: list[str], run: Path, **kwargs: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.Popen(train_command(args, run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True, **kwargs)


def _worker_pids(launcher: int) -> list[int]:
    """The training ranks: the launcher's spawned children (read from /proc), in start order."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == launcher and b"spawn_main" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(pids)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def _logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _assert_resumes_to_reference(args: list[str], run: Path, reference: dict[int, float], start: int) -> None:
    log = train(args, run).stdout
    assert f"at step {start}" in log, log[-2000:]
    resumed = losses(run)
    assert all(resumed[s] == reference[s] for s in range(1, STEPS + 1)), (resumed, reference)


def test_killing_one_rank_fails_the_job_fast_and_resume_continues(args: list[str], reference: dict[int, float],
                                                                 tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _popen(args, run)
    _wait_for(lambda: _logged_steps(run) >= SAVE_EVERY + 2, proc)
    ranks = _worker_pids(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGKILL)
    killed = time.monotonic()
    proc.wait(timeout=120)
    assert proc.returncode != 0

    def survivors() -> list[Path]:
        return [p for p in Path("/proc").iterdir()
                if p.name.isdigit() and _pgid(p) == proc.pid and b"spawn_main" in _cmdline(p)]

    while survivors() and time.monotonic() - killed < 120:
        time.sleep(0.2)
    assert not survivors(), "every rank must be gone within 2 minutes"
    _assert_resumes_to_reference(args, run, reference, SAVE_EVERY)


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def _pgid(proc: Path) -> int | None:
    try:
        return os.getpgid(int(proc.name))
    except (OSError, ProcessLookupError):
        return None


def test_kill_during_a_checkpoint_save_keeps_the_previous_one(args: list[str], reference: dict[int, float],
                                                              tmp_path: Path) -> None:
    run = tmp_path / "run"
    staging = run / "checkpoints" / f"step_{2 * SAVE_EVERY:08d}.tmp"
    proc = _popen(args, run)
    _wait_for(staging.exists, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not checkpoint(run, 2 * SAVE_EVERY).exists(), "killed before the rename: nothing published"
    assert find_resumable(run, log=lambda _: None) == checkpoint(run, SAVE_EVERY)
    verify_checkpoint(checkpoint(run, SAVE_EVERY))
    _assert_resumes_to_reference(args, run, reference, SAVE_EVERY)


def test_a_full_disk_during_a_save_fails_cleanly_and_keeps_the_previous_checkpoint(
        args: list[str], reference: dict[int, float], tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_and_kill_after_first_save(args, run)

    def small_disk() -> None:  # files stop growing at 64 KiB: the checkpoint shards cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    proc = _popen(args, run, preexec_fn=small_disk)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "hyperloop: training failed (first failure: rank" in out, out[-3000:]
    assert not checkpoint(run, 2 * SAVE_EVERY).exists()
    assert find_resumable(run, log=lambda _: None) == checkpoint(run, SAVE_EVERY)
    _assert_resumes_to_reference(args, run, reference, SAVE_EVERY)


def test_nan_steps_are_skipped_and_too_many_in_a_row_stop_with_a_checkpoint(args: list[str], tmp_path: Path) -> None:
    # One NaN step on one rank only: every rank skips that update, the run finishes.
    run = tmp_path / "once"
    proc = _popen([*args, "train.steps=6", "train.save_interval=0"], run, env={"HYPERLOOP_INJECT_NAN_STEPS": "3@1"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert rows[3]["loss"] is None and rows[3]["skipped_steps"] == 1 and rows[6]["skipped_steps"] == 1
    assert all(rows[s]["loss"] is not None for s in (1, 2, 4, 5, 6))
    assert "step 3: non-finite loss, update skipped (1/3 in a row)" in out
    assert "skipped steps (non-finite loss)" in out

    # Three in a row (train.max_bad_steps=3): stop at step 7 with a diagnostic and the last good state saved.
    run = tmp_path / "diverged"
    proc = _popen(args, run, env={"HYPERLOOP_INJECT_NAN_STEPS": "5,6,7"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:]
    assert "3 consecutive steps with a non-finite loss" in out
    assert "step 5: non-finite loss in micro-batch(es) [0] on rank 0" in out
    assert "last good steps (step, loss, grad norm): (1," in out
    assert "stopped at step 7" in out
    good, stopped = weights(run, SAVE_EVERY), weights(run, 7)
    assert all(torch.equal(good[k], stopped[k]) for k in good), "skipped steps must not change the model"
    assert read_meta(checkpoint(run, 7))["optimizer_step"] == read_meta(checkpoint(run, SAVE_EVERY))["optimizer_step"]


def test_incompatible_or_tampered_checkpoints_are_refused(args: list[str], reference: dict[int, float],
                                                          tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_and_kill_after_first_save(args, run)
    ckpt = checkpoint(run, SAVE_EVERY)
    meta = read_meta(ckpt)
    with pytest.raises(CheckpointError, match="format version 999 is not"):
        check_compatible({**meta, "format_version": 999}, load_config(None, args), ckpt)

    # A .metadata that runs a command when unpickled, with a manifest made to match: refused, never executed.
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    index = ckpt / "dist" / ".metadata"
    index.write_bytes(pickle.dumps(Payload()))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["dist/.metadata"] = {"bytes": index.stat().st_size,
                                           "sha256": hashlib.sha256(index.read_bytes()).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    verify_checkpoint(ckpt)
    proc = subprocess.run([sys.executable, "-m", "hyperloop_dist.cli", "export", "--release", str(ckpt),
                           str(tmp_path / "release")], capture_output=True, text=True)
    assert proc.returncode == 2 and "posix.system is not something a checkpoint index holds" in proc.stderr, \
        proc.stderr[-2000:]
    assert not marker.exists()
