"""`hyperloop train` end to end: real processes over gloo, against a single-process reference."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyperloop_dist.checkpoint.store import CheckpointError, find_resumable, verify_checkpoint
from hyperloop_dist.checkpoint.training_state import check_compatible
from hyperloop_dist.config import load_config

pytestmark = pytest.mark.slow

STEPS = 24
SAVE_EVERY = 4


def _command(args: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "hyperloop_dist.cli", "train", *args, f"train.run_dir={run_dir}",
            "train.micro_batch_size=4", "train.log_interval=1", "train.keep_last=2", "optim.warmup_steps=2",
            f"train.steps={STEPS}"]


def train(args: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(_command(args, run_dir), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def train_and_kill_after_first_save(args: list[str], run_dir: Path) -> None:
    """SIGKILL the launcher and every rank as soon as the first checkpoint is published."""
    latest = run_dir / "checkpoints" / "latest"
    proc = subprocess.Popen(_command(args, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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
    return {r["step"]: r["loss"] for r in rows}


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tiny_data: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    out: dict = {name: root / name for name in ("dp2", "single", "resumed")}
    dp2 = [*tiny_data, "parallel.nproc_per_node=2", f"train.save_interval={SAVE_EVERY}"]
    out["dp2_log"] = train(dp2, out["dp2"])
    # Same global batch (8 windows) on one process: two micro-batches of 4.
    train([*tiny_data, "parallel.nproc_per_node=1", "train.grad_accum=2"], out["single"])
    train_and_kill_after_first_save(dp2, out["resumed"])
    out["resumed_log"] = train(dp2, out["resumed"])
    return out


def test_data_parallel_matches_single_process(runs: dict) -> None:
    dp2, single = losses(runs["dp2"]), losses(runs["single"])
    assert sorted(dp2) == list(range(1, STEPS + 1))
    for step in range(1, 6):
        assert dp2[step] == pytest.approx(single[step], rel=1e-5), step
    a, b = weights(runs["dp2"], STEPS), weights(runs["single"], STEPS)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-4, msg=name)


def test_killed_and_resumed_run_equals_uninterrupted_run_bitwise(runs: dict) -> None:
    assert "resumed from" in runs["resumed_log"].stdout
    straight, resumed = losses(runs["dp2"]), losses(runs["resumed"])
    for step in range(1, STEPS + 1):
        assert resumed[step] == straight[step], step
    a, b = weights(runs["dp2"], STEPS), weights(runs["resumed"], STEPS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_directory_contract(runs: dict) -> None:
    run = runs["dp2"]
    assert load_config(run / "config.yaml").train.steps == STEPS
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in rows)
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{STEPS - SAVE_EVERY:08d}", f"step_{STEPS:08d}"]  # keep_last=2
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    for name in ckpts:
        manifest = verify_checkpoint(run / "checkpoints" / name)
        assert {"model.safetensors", "optimizer.pt", "meta.json", "config.yaml", "tokenizer.model"} <= set(
            manifest["files"])
    log = runs["dp2_log"].stdout
    assert f"step {STEPS:>6}/{STEPS}" in log and "loss, last" in log  # progress + summary, rank 0 only
    assert log.count("saved checkpoint") == STEPS // SAVE_EVERY
    wandb_dir = Path(os.environ["WANDB_DIR"]) / "wandb"
    assert any(wandb_dir.glob("offline-run-*")), "wandb should log an offline run"


def test_damaged_checkpoint_is_refused_and_the_previous_one_used(runs: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["dp2"], run)
    newer, older = (run / "checkpoints" / f"step_{s:08d}" for s in (STEPS, STEPS - SAVE_EVERY))
    weights_file = newer / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-100])
    messages: list[str] = []
    assert find_resumable(run, log=messages.append) == older
    assert "truncated" in messages[0] and newer.name in messages[0]
    meta = bytearray((older / "meta.json").read_bytes())
    meta[-3] ^= 1  # same size, one bit flipped
    (older / "meta.json").write_bytes(bytes(meta))
    with pytest.raises(CheckpointError, match="SHA-256"):
        verify_checkpoint(older)
    assert find_resumable(run, log=messages.append) is None


def test_checkpoint_from_another_model_config_is_refused(runs: dict, tiny_data: list[str]) -> None:
    ckpt = runs["dp2"] / "checkpoints" / f"step_{STEPS:08d}"
    meta = json.loads((ckpt / "meta.json").read_text())
    with pytest.raises(CheckpointError, match="model.loops: checkpoint 2 vs recipe 3"):
        check_compatible(meta, load_config(None, [*tiny_data, "model.loops=3"]), ckpt)
