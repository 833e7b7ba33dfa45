"""`hyperloop train` end to end: real processes over gloo, against a single-process reference."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from hyperloop_dist.checkpoint.store import CheckpointError, find_resumable, verify_checkpoint
from hyperloop_dist.checkpoint.training_state import check_compatible
from hyperloop_dist.config import load_config

from .helpers import losses, train, train_and_kill_after_first_save, weights

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("megatron_world")]

STEPS = 12
SAVE_EVERY = 4


@pytest.fixture(scope="module")
def runs(tiny_data: list[str], dp2_run: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    out: dict = {name: root / name for name in ("single", "stream", "resumed")}
    windows = [*tiny_data, f"train.steps={STEPS}", "data.loader=windows"]
    dp2 = ["parallel.nproc_per_node=2", f"train.save_interval={SAVE_EVERY}"]
    out["dp2"], out["dp2_log"] = dp2_run  # [*windows, *dp2], shared with tests/test_faults.py
    # Same global batch (8 windows) on one process: two micro-batches of 4.
    train([*windows, "parallel.nproc_per_node=1", "train.grad_accum=2"], out["single"])
    # The default streaming loader with 2 workers per rank: killed after its first save, then resumed.
    stream = [*tiny_data, f"train.steps={STEPS}", *dp2, "data.workers=2"]
    out["stream_log"] = train(stream, out["stream"])
    train_and_kill_after_first_save(stream, out["resumed"])
    out["resumed_log"] = train(stream, out["resumed"])
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
    straight, resumed = losses(runs["stream"]), losses(runs["resumed"])
    for step in range(1, STEPS + 1):
        assert resumed[step] == straight[step], step
    a, b = weights(runs["stream"], STEPS), weights(runs["resumed"], STEPS)
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
        files = set(manifest["files"])
        assert {"meta.json", "config.yaml", "tokenizer.model", "dist/metadata.json", "rng/rank_00000.pt",
                "rng/rank_00001.pt"} <= files
        assert any(f.endswith(".distcp") for f in files)
    stream_ckpt = runs["stream"] / "checkpoints" / f"step_{STEPS:08d}"
    assert {"data/dp_00000.json", "data/dp_00001.json", "data/listing.json"} <= set(verify_checkpoint(stream_ckpt)["files"])
    listing = json.loads((stream_ckpt / "data" / "listing.json").read_text())  # the files the stream reads, once
    assert listing["files"] and len(listing["versions"]) == len(listing["files"])
    assert all("files" not in json.loads((stream_ckpt / "data" / f"dp_{r:05d}.json").read_text()) for r in (0, 1))
    assert "data stream loader" in runs["stream_log"].stdout and "bad records skipped" in runs["stream_log"].stdout
    log = runs["dp2_log"]
    assert f"step {STEPS:>6}/{STEPS}" in log and "loss, last" in log  # progress + summary, rank 0 only
    assert log.count("saved checkpoint") == STEPS // SAVE_EVERY
    wandb_dir = Path(os.environ["WANDB_DIR"]) / "wandb"
    assert any(wandb_dir.glob("offline-run-*")), "wandb should log an offline run"


def test_damaged_checkpoint_is_refused_and_the_previous_one_used(runs: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["dp2"], run)
    newer, older = (run / "checkpoints" / f"step_{s:08d}" for s in (STEPS, STEPS - SAVE_EVERY))
    shard = next((newer / "dist").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    messages: list[str] = []
    assert find_resumable(run, log=messages.append) == older
    assert "truncated" in messages[0] and newer.name in messages[0] and shard.name in messages[0]
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
    with pytest.raises(CheckpointError, match="global batch of 8 windows per step, this layout gives 16"):
        check_compatible(meta, load_config(None, tiny_data), ckpt, windows_per_step=16)
