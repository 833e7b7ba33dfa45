"""Launch `hyperloop train` as a user would and read back what a run wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

# Held-out evaluation is off unless a test turns it on (tests/test_eval_run.py does): it costs seconds per run.
RUN_DEFAULTS = ["train.micro_batch_size=4", "train.log_interval=1", "train.keep_last=2", "optim.warmup_steps=2",
                "eval.interval=0"]


def train_command(args: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "hyperloop_dist.cli", "train", *RUN_DEFAULTS, *args, f"train.run_dir={run_dir}"]


def train(args: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(train_command(args, run_dir), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def train_and_kill_after_first_save(args: list[str], run_dir: Path) -> None:
    """SIGKILL the launcher and every rank as soon as the first checkpoint is published."""
    latest = run_dir / "checkpoints" / "latest"
    proc = subprocess.Popen(train_command(args, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not latest.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.is_file(), "the run ended before its first checkpoint"


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (before a kill and after the resume) keeps its last value."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # (evaluation rows carry eval/* keys instead)


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Full (TP = 1) weights of a checkpoint, whatever layout saved it (needs the megatron_world fixture)."""
    from hyperloop_dist.export.release import load_megatron_weights

    return load_megatron_weights(checkpoint(run_dir, step))[1]
