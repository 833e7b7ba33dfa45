"""Faults with real processes: a rank killed mid-step, a crash or a full disk while saving, NaN losses, and
checkpoints that must be refused (another version, a tampered index that would run code). Every failure
must end the job (exit 1, within a deadline, the error in its last lines) under every loader, the README's
default (the stream loader with workers) included; a hung rank must be found by the hang watchdog."""

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

import numpy as np
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
    # Rank 1 is also made slow (0.3 s more per step): the summary flags it as a straggler.
    proc = _popen([*args, "train.steps=6", "train.save_interval=0"], run,
                  env={"HYPERLOOP_INJECT_NAN_STEPS": "3@1", "HYPERLOOP_INJECT_SLOW": "1:0.3"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert rows[3]["loss"] is None and rows[3]["skipped_steps"] == 1 and rows[6]["skipped_steps"] == 1
    assert all(rows[s]["loss"] is not None for s in (1, 2, 4, 5, 6))
    assert "step 3: non-finite loss, update skipped (1/3 in a row)" in out
    assert "skipped steps (non-finite loss)" in out

    assert "step compute time per rank (median)" in out
    assert "STRAGGLERS (> 20% over the median)" in out and "rank 1 " in out, out[-2000:]

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


# --------------------------------------------------------------------------- every failure ends the job

FAIL_DEADLINE_S = 150  # the bound on a 2-core machine: start-up, the failure, and the shutdown


def _fails(args: list[str], run: Path, what: str, env: dict[str, str] | None = None, **kwargs: object) -> str:
    """Run to its failure: exit code 1 within the deadline; returns the output. A hang fails the test,
    naming what hung, instead of hanging the suite."""
    start = time.monotonic()
    proc = _popen(args, run, env=env or {}, **kwargs)
    try:
        out, _ = proc.communicate(timeout=FAIL_DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{what}: the job did not end within {FAIL_DEADLINE_S} s (hung); its output:\n{out[-3000:]}")
    assert proc.returncode == 1, f"{what}: exit code {proc.returncode}\n{out[-3000:]}"
    assert time.monotonic() - start < FAIL_DEADLINE_S
    assert not _survivors(proc.pid), f"{what}: ranks or loader workers outlived the job"
    return "\n".join(out.splitlines()[-40:])


def _survivors(pgid: int) -> list[str]:
    deadline = time.monotonic() + 10  # (multiprocessing's resource tracker ends just after the launcher)
    while True:
        alive = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) == pgid]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


STREAM = ["data.loader=stream", "train.save_interval=0"]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_divergence_ends_the_job_under_the_stream_loader(args: list[str], tmp_path: Path, workers: int) -> None:
    tail = _fails([*args, *STREAM, f"data.workers={workers}"], tmp_path / "run", f"divergence, {workers} workers",
                  env={"HYPERLOOP_INJECT_NAN_STEPS": "5,6,7"})
    assert "consecutive steps with a non-finite loss" in tail and "first failure: rank" in tail, tail


def _noise(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 2_000_000, dtype=np.uint8).tobytes())
    return path


@pytest.mark.parametrize("name", ["noise.jsonl", "noise.parquet", "no_text_field.jsonl"])
def test_a_source_without_documents_stops_before_the_first_step(args: list[str], tmp_path: Path, name: str) -> None:
    source = tmp_path / name
    if name.startswith("noise"):
        _noise(source)
    else:
        source.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(500)))
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"a good document {i}. " * 30}) + "\n" for i in range(200)))
    # The bad source beside a good one: a run must not quietly train on fewer sources than configured.
    sources = f"data.sources=[{{path: '{good}'}}, {{path: '{source}', weight: 0.1}}]"
    tail = _fails([*args, *STREAM, "data.corpus=sources", sources], tmp_path / "run", name)
    assert f"data source '{source}'" in tail and "DataError" in tail, tail
    expected = {"noise.jsonl": "0 documents in", "noise.parquet": "is not a parquet file",
                "no_text_field.jsonl": "0 documents in 500 records"}[name]
    assert expected in tail, tail
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "no step may run on bad data"


def test_a_bad_file_in_one_readers_share_fails_with_its_name(args: list[str], tmp_path: Path) -> None:
    """The source as a whole has documents, but one rank's file has none: the error crosses the loader
    worker as itself (not DataLoader's wrapper) and names the file."""
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": f"a good document {i}. " * 30}) + "\n"
                                            for i in range(200)))
    _noise(folder / "b.jsonl")
    tail = _fails([*args, *STREAM, "data.workers=1", "data.corpus=sources", f"data.sources=[{{path: '{folder}'}}]"],
                  tmp_path / "run", "one rank's file without documents")
    assert "DataError: data source" in tail, tail
    assert "reader slot 1 of 2" in tail and str(folder / "b.jsonl") in tail, tail
    assert "Caught DataError in DataLoader worker" not in tail


def test_an_error_inside_eval_ends_the_job(args: list[str], tmp_path: Path) -> None:
    tail = _fails([*args, *STREAM, "data.workers=1", "eval.interval=3", "eval.windows=8"], tmp_path / "run",
                  "an exception in eval", env={"HYPERLOOP_INJECT_EVAL_ERROR": "3@1"})
    assert "first failure: rank 1" in tail and "HYPERLOOP_INJECT_EVAL_ERROR: evaluation after step 3" in tail, tail


def test_a_full_disk_ends_the_job_under_the_stream_loader(args: list[str], tmp_path: Path) -> None:
    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    tail = _fails([*args, "data.loader=stream", "data.workers=1", "train.save_interval=3"], tmp_path / "run",
                  "a full disk during a save", preexec_fn=small_disk)
    assert "first failure: rank" in tail, tail
    assert not checkpoint(tmp_path / "run", 3).exists()


def test_a_hung_rank_is_found_its_stacks_written_and_the_job_ended(args: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    tail = _fails([*args, *STREAM, "data.workers=1", "train.hang_timeout_s=8"], run, "an injected hang",
                  env={"HYPERLOOP_INJECT_HANG": "3@1"})
    assert "HangDetected: megatron engine: rank 1 stopped making progress in section 'step' at step 3" in tail, tail
    stacks = sorted(p.name for p in (run / "hang").glob("rank_*.txt"))
    assert stacks == ["rank_00000.txt", "rank_00001.txt"], stacks
    assert "inject_faults" in (run / "hang" / "rank_00001.txt").read_text()
    assert "all_reduce" in (run / "hang" / "rank_00000.txt").read_text() or "finalize" in (
        run / "hang" / "rank_00000.txt").read_text()
