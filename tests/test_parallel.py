"""Megatron-core parallel layouts against the single-process run, resharding checkpoints, releases.

Every run uses the same global batch (8 windows a step) and seed, and the stateless windows loader (the
streaming loader deals documents by DP rank, so its batches depend on the layout by design), so the loss
trajectory and the weights must not depend on the layout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperloop_dist.export.release import load_release

from .helpers import checkpoint, losses, train, weights

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("megatron_world")]

STEPS = 6
LAYOUTS = {  # name: overrides (every run unties the head; tied embeddings under PP have their own test)
    "single": ["parallel.nproc_per_node=1", "train.grad_accum=2"],
    "tp2": ["parallel.nproc_per_node=2", "parallel.tp=2", "train.grad_accum=2"],
    # 1F1B (the default schedule) with 8 micro-batches: past warm-up, forwards and backwards alternate.
    "pp2": ["parallel.nproc_per_node=2", "parallel.pp=2", "train.micro_batch_size=1", "train.grad_accum=8"],
    "dp2": ["parallel.nproc_per_node=2"],
    "tp2_sp": ["parallel.nproc_per_node=2", "parallel.tp=2", "parallel.sequence_parallel=true", "train.grad_accum=2"],
    # Sequence parallelism across pipeline stages, and the GPipe order kept for comparison.
    "tp2pp2": ["parallel.nproc_per_node=4", "parallel.tp=2", "parallel.pp=2", "train.grad_accum=2",
               "parallel.sequence_parallel=true", "parallel.pp_schedule=gpipe"],
    "dp2_distopt": ["parallel.nproc_per_node=2", "parallel.distributed_optimizer=true"],
    # Overlapped DP reduction while the shared middle block reports one gradient event per recomputed loop.
    "dp2_overlap_recompute": ["parallel.nproc_per_node=2", "parallel.overlap_grad_reduce=true", "train.recompute=loop",
                              "train.micro_batch_size=2", "train.grad_accum=2"],
}
# The transformer (one pass, unrolled depth) runs the same TP / pipeline code as the hyperloop; its
# combined layout covers it. DP alone is tests/test_train.py's.
KIND_LAYOUTS = {
    "hyperloop": ["single", "tp2", "tp2_sp", "pp2", "tp2pp2", "dp2_distopt", "dp2_overlap_recompute"],
    "transformer": ["single", "tp2pp2"],
    "mhc": ["single", "pp2"],  # its n-stream state and per-sub-layer hyper-connections split over the stages
}


@pytest.fixture(scope="module")
def runs(tiny_data: list[str], single_run: tuple[Path, str],
         tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("parallel")
    out = {("hyperloop", "single"): single_run[0]}  # the session's shared single-process run (tests/conftest.py)
    for kind, layouts in KIND_LAYOUTS.items():
        for name in layouts:
            if (kind, name) in out:
                continue
            run_dir = root / f"{kind}-{name}"
            train([*tiny_data, *LAYOUTS[name], f"model.kind={kind}", f"train.steps={STEPS}",
                   "train.save_interval=3", "model.tie_embeddings=false", "data.loader=windows"], run_dir)
            out[kind, name] = run_dir
    return out


@pytest.mark.parametrize(("kind", "layout"), [(k, n) for k, ls in KIND_LAYOUTS.items() for n in ls[1:]])
def test_layout_matches_single_process(runs: dict, kind: str, layout: str) -> None:
    ref, run = losses(runs[kind, "single"]), losses(runs[kind, layout])
    for step in range(1, 6):
        assert run[step] == pytest.approx(ref[step], rel=1e-4), step
    a, b = weights(runs[kind, "single"], STEPS), weights(runs[kind, layout], STEPS)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-4, msg=name)


def test_tied_embeddings_under_pp_match_data_parallel(dp2_run: tuple[Path, str], tiny_data: list[str],
                                                      tmp_path: Path) -> None:
    """The tied embedding on stage 0 and its head copy on stage 1 (embedding-group gradient all-reduce)
    train as the one tied matrix of the session's tied DP2 run (itself the single-process run): same
    losses, same gradient norm (the copy counted once)."""
    from .conftest import DP2_12

    pp2 = [*(o for o in DP2_12 if not o.startswith(("parallel.", "train.save"))), "parallel.nproc_per_node=2",
           "parallel.pp=2", "train.grad_accum=2", "train.save_interval=0"]
    train([*tiny_data, *pp2], tmp_path / "run")
    ref = _rows(dp2_run[0])
    for step, row in _rows(tmp_path / "run").items():
        assert row["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4), step
        assert row["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4), step


def _rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def _resume_copy(run_dir: Path, step: int, dest: Path) -> Path:
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint(run_dir, step), checkpoint(dest, step))
    (dest / "checkpoints" / "latest").write_text(checkpoint(dest, step).name + "\n")
    return dest


@pytest.mark.parametrize(("source", "target"),
                         [("tp2", "single"), ("tp2", "pp2"), ("pp2", "single"), ("pp2", "tp2"),
                          ("dp2_distopt", "dp2_distopt")])
def test_resume_under_another_layout_continues_the_same_run(runs: dict, tiny_data: list[str], tmp_path: Path,
                                                            source: str, target: str) -> None:
    """Saved at step 3 under `source`, resumed under `target`: steps 4-6 as in the uninterrupted run."""
    resumed = _resume_copy(runs["hyperloop", source], 3, tmp_path / "resumed")
    log = train([*tiny_data, *LAYOUTS[target], f"train.steps={STEPS}", "model.tie_embeddings=false",
                 "data.loader=windows"], resumed)
    assert "resumed from" in log.stdout
    straight, after = losses(runs["hyperloop", source]), losses(resumed)
    for step in range(4, STEPS + 1):
        assert after[step] == pytest.approx(straight[step], rel=1e-5), step


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_release_consolidates_a_model_parallel_checkpoint(runs: dict, tmp_path: Path, layout: str) -> None:
    out = tmp_path / "release"
    subprocess.run([sys.executable, "-m", "hyperloop_dist.cli", "export", "--release",
                    str(runs["hyperloop", layout]), str(out)], check=True, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "configuration_hyperloop.py", "model.safetensors", "modeling_hyperloop.py",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    model = load_release(out)
    trained = weights(runs["hyperloop", layout], STEPS)
    # middle block stored once: the release has exactly the looped model's unique layers
    assert sum(1 for k in model.state_dict() if k.endswith("linear_proj.weight")) == 4
    from hyperloop_dist.model.hyperloop import build_model

    megatron = build_model(model.cfg)
    result = megatron.load_state_dict(trained, strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.seq_length))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), megatron(tokens), atol=1e-5, rtol=0)
    again = subprocess.run([sys.executable, "-m", "hyperloop_dist.cli", "export", "--release",
                            str(runs["hyperloop", layout]), str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr
