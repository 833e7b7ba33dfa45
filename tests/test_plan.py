"""`hyperloop plan`: the memory formula against measured peaks of real CPU training steps, the layouts it
offers, and the ladder rule every paper-scale recipe follows."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from hyperloop_dist.cli import main
from hyperloop_dist.cluster.ladder import ladder
from hyperloop_dist.cluster.plan import Hardware, Layout, estimate, parse_mem, plan
from hyperloop_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from memory import CPU_MODEL, LAYOUTS, collect, estimated, start  # noqa: E402  (benchmarks/ is not a package)

CASES = {"hyperloop": (1, []), "hyperloop, per-loop recompute": LAYOUTS["recompute"],
         "transformer, GQA": (1, ["model.kind=transformer", "model.num_query_groups=2"]),
         "hyperloop, pp2 x 4 micro-batches": LAYOUTS["pp2"]}


@pytest.fixture(scope="module")
def measured_peaks() -> dict[str, float]:
    """Peak resident-set growth of 2 training steps per case (benchmarks/memory.py), the cases side by side."""
    procs = {name: start(None, [*CPU_MODEL, *extra], world) for name, (world, extra) in CASES.items()}
    return {name: collect(p, timeout=300) for name, p in procs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_memory_estimate_within_15_percent_of_measured_peak(measured_peaks: dict, case: str) -> None:
    world, extra = CASES[case]
    est = estimated(None, [*CPU_MODEL, *extra], world, "cpu")  # CPU: unfused attention, no reserve
    ratio = est / measured_peaks[case]
    assert 0.85 <= ratio <= 1.15, f"{case}: estimate {est / 2**20:.0f} MiB, measured {measured_peaks[case] / 2**20:.0f} MiB"


def test_plan_ranks_fitting_layouts_and_scales_with_the_cluster(capsys) -> None:
    cfg = load_config(REPO / "recipes" / "hyperloop-7b.yaml")
    small = plan(cfg, Hardware(gpus=8, gpu_mem_bytes=80e9))
    big = plan(cfg, Hardware(gpus=64, gpu_mem_bytes=80e9))
    assert small[0].fits and big[0].fits
    fitting = [e for e in big if e.fits]
    assert [e.step_s for e in fitting] == sorted(e.step_s for e in fitting)
    assert big[0].step_s < small[0].step_s / 4  # 8x the GPUs, same global batch
    # Sharding the optimizer state over DP shrinks the state, never the activations.
    by_engine = {(e.layout.tp, e.layout.pp, e.layout.engine, e.layout.micro_batch): e for e in big}
    plain, distopt = by_engine.get((2, 1, "megatron", 1)), by_engine.get((2, 1, "megatron+distopt", 1))
    if plain and distopt:
        assert distopt.state_bytes < plain.state_bytes / 2 and distopt.activation_bytes == plain.activation_bytes
    # Layouts that the config validation refuses never appear (PP must divide the middle block).
    assert all(cfg.model.middle_layers % e.layout.pp == 0 for e in big)
    assert not any(e.fits for e in plan(cfg, Hardware(gpus=8, gpu_mem_bytes=16e9)))

    assert main(["plan", str(REPO / "recipes" / "hyperloop-1.1b.yaml"), "--gpus", "64", "--gpu-mem", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "best: parallel.engine=" in out and "total GiB" in out
    assert main(["plan", "--gpus", "12", "--gpus-per-node", "8"]) == 2


def test_parse_mem() -> None:
    assert parse_mem("80GB") == 80e9 and parse_mem("40GiB") == 40 * 2**30 and parse_mem("141") == 141e9
    with pytest.raises(ConfigError, match="--gpu-mem"):
        parse_mem("lots")


@pytest.mark.parametrize("name", ["180m", "500m", "1.1b", "3b", "7b"])
def test_recipes_follow_the_ladder_rule(name: str) -> None:
    cfg = load_config(REPO / "recipes" / f"hyperloop-{name}.yaml")
    point = ladder(cfg.model)
    t = cfg.train
    assert t.micro_batch_size * t.grad_accum * cfg.data_parallel_size == point.global_batch
    assert cfg.optim.lr == pytest.approx(point.lr, rel=1e-3)
    assert cfg.optim.min_lr == pytest.approx(point.min_lr, rel=1e-3)
    assert (t.steps, cfg.optim.warmup_steps) == (point.steps, point.warmup_steps)
    # The recipe's own layout fits 80 GB GPUs by the planner's estimate.
    p = cfg.parallel
    engine = "megatron+distopt" if p.distributed_optimizer else p.engine
    est = estimate(cfg, Layout(p.tp, p.pp, cfg.data_parallel_size, engine, t.recompute, t.micro_batch_size,
                               t.grad_accum), Hardware(gpus=cfg.world_size, gpu_mem_bytes=80e9))
    assert est.fits, f"{name}: {est.total_bytes / 2**30:.1f} GiB per GPU"


@pytest.mark.slow
def test_validate_builds_every_shard_of_a_1024_gpu_layout() -> None:
    """tp=2 x pp=2 x dp=256 of the 7B recipe: each (TP rank, stage) shard built as its rank would build it,
    in a fresh process (fake process groups must not meet the session's real one)."""
    code = ("from hyperloop_dist.cluster.validate import validate_layout\n"
            "from hyperloop_dist.config import load_config\n"
            f"cfg = load_config({str(REPO / 'recipes' / 'hyperloop-7b.yaml')!r})\n"
            "checks = validate_layout(cfg, 1024, 2, 2)\n"
            "print('SHARDS', [(c.rank, c.tp_rank, c.stage, c.params) for c in checks])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = ast.literal_eval(proc.stdout.split("SHARDS ")[1].strip())
    assert [(r, t, s) for r, t, s, _ in shards] == [(0, 0, 0), (1, 1, 0), (512, 0, 1), (513, 1, 1)]
    assert "add up to the model's 6,896.1M parameters" in proc.stdout
