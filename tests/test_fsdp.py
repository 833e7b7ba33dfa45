"""Engine ``fsdp`` (torch FSDP2): same training as one process, DCP checkpoints that reshard, releases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hyperloop_dist.export.release import export_release, load_release

from .helpers import checkpoint, losses, train, weights

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("megatron_world")]

STEPS = 6
COMMON = ["data.loader=windows", f"train.steps={STEPS}", "train.save_interval=3"]
FSDP2 = ["parallel.engine=fsdp", "parallel.nproc_per_node=2", "eval.interval=3", "eval.windows=8"]  # eval on
SINGLE = ["parallel.nproc_per_node=1", "train.grad_accum=2"]


@pytest.fixture(scope="module")
def runs(tiny_data: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fsdp")
    out = {"single": root / "single", "fsdp": root / "fsdp"}
    out["single_log"] = train([*tiny_data, *COMMON, *SINGLE], out["single"]).stdout
    out["fsdp_log"] = train([*tiny_data, *COMMON, *FSDP2], out["fsdp"]).stdout
    return out


def _state_mib(log: str) -> float:
    line = next(line for line in log.splitlines() if line.startswith("params + optimizer state, rank 0"))
    return float(line.split("|")[1].split()[0])


def test_fsdp_runs_periodic_eval(runs: dict) -> None:
    rows = [json.loads(line) for line in (runs["fsdp"] / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "eval/loss" in r) == [3, 6]


def test_fsdp_holds_about_half_the_state_per_rank_on_two_ranks(runs: dict) -> None:
    """Parameters + Adam moments: a full copy on the single process, a shard (~1/2) per FSDP rank."""
    ratio = _state_mib(runs["fsdp_log"]) / _state_mib(runs["single_log"])
    assert 0.45 <= ratio <= 0.6, ratio


def test_fsdp_matches_single_process(runs: dict) -> None:
    ref, run = losses(runs["single"]), losses(runs["fsdp"])
    for step in range(1, 6):
        assert run[step] == pytest.approx(ref[step], rel=1e-4), step
    a, b = weights(runs["single"], STEPS), weights(runs["fsdp"], STEPS)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("layout", [FSDP2, ["parallel.engine=fsdp", *SINGLE]], ids=["on-2-ranks", "on-1-rank"])
def test_fsdp_checkpoint_resumes_on_two_or_one_ranks(runs: dict, tiny_data: list[str], tmp_path: Path,
                                                     layout: list[str]) -> None:
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint(runs["fsdp"], 3), checkpoint(resumed, 3))
    (resumed / "checkpoints" / "latest").write_text("step_00000003\n")
    log = train([*tiny_data, *COMMON, *layout], resumed)
    assert "resumed from" in log.stdout
    straight, after = losses(runs["fsdp"]), losses(resumed)
    for step in range(4, STEPS + 1):
        assert after[step] == pytest.approx(straight[step], rel=1e-5), step


def test_fsdp_release_gives_the_trained_models_logits(runs: dict, tmp_path: Path) -> None:
    from hyperloop_dist.model.hyperloop import build_model

    model = load_release(export_release(runs["fsdp"], tmp_path / "release"))
    megatron = build_model(model.cfg)
    megatron.load_state_dict(weights(runs["fsdp"], STEPS), strict=False)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.seq_length))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), megatron(tokens), atol=1e-5, rtol=0)


def test_engine_mismatch_on_resume_is_refused(runs: dict, tiny_data: list[str], tmp_path: Path) -> None:
    import subprocess

    from .helpers import train_command

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint(runs["fsdp"], 3), checkpoint(resumed, 3))
    (resumed / "checkpoints" / "latest").write_text("step_00000003\n")
    proc = subprocess.run(train_command([*tiny_data, *COMMON, *SINGLE], resumed), capture_output=True, text=True)
    assert proc.returncode != 0 and "written by the fsdp engine" in proc.stderr
