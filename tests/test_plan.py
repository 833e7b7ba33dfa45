"""`hyperloop plan`: the memory formula against measured peaks of real CPU training steps, the layouts it
offers, the paper's training setup in its three recipes, and the ladder rule of the two larger ones."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from hyperloop_dist.cli import main
from hyperloop_dist.cluster.ladder import ladder
from hyperloop_dist.cluster.plan import Hardware, Layout, estimate, parse_mem, plan
from hyperloop_dist.config import Config, ConfigError, load_config

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

    assert main(["plan", str(REPO / "recipes" / "hyperloop-991m.yaml"), "--gpus", "64", "--gpu-mem", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "best: parallel.engine=" in out and "total GiB" in out
    assert main(["plan", "--gpus", "12", "--gpus-per-node", "8"]) == 2


def test_plan_offers_pipeline_layouts_with_the_1f1b_bound() -> None:
    """Under 1F1B a stage holds about pp + 2pp/L micro-batches, not grad_accum: PP layouts fit again."""
    import dataclasses

    cfg = load_config(REPO / "recipes" / "hyperloop-7b.yaml")
    hw = Hardware(gpus=64, gpu_mem_bytes=80e9)
    shown = plan(cfg, hw)[:12]
    piped = [e for e in shown if e.fits and e.layout.pp > 1]
    assert piped, "no PP layout among the plan's first rows"
    gpipe = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pp_schedule="gpipe"))
    lay = piped[0].layout
    assert lay.grad_accum >= 32  # the large accumulation that GPipe could not hold
    assert estimate(gpipe, lay, hw).activation_bytes > 8 * piped[0].activation_bytes


def test_parse_mem() -> None:
    assert parse_mem("80GB") == 80e9 and parse_mem("40GiB") == 40 * 2**30 and parse_mem("141") == 141e9
    with pytest.raises(ConfigError, match="--gpu-mem"):
        parse_mem("lots")


# The paper's section 4.1 and appendix A: (d, begin / middle / end, warm-up steps, Table 1's tokens).
PAPER_SETUP = {"136m": (1024, (2, 4, 2), 1000, 12.5e9), "579m": (2048, (3, 4, 3), 2000, 50e9),
               "991m": (2048, (4, 10, 4), 2000, 100e9)}
PAPER_TASKS = ["arc_challenge", "arc_easy", "copa", "hellaswag", "lambada_openai", "lambada_standard", "openbookqa",
               "piqa", "race", "sciq", "winogrande"]


@pytest.mark.parametrize("name", list(PAPER_SETUP))
def test_paper_recipes_carry_the_paper_setup(name: str) -> None:
    cfg = load_config(REPO / "recipes" / f"hyperloop-{name}.yaml")
    d, (begin, middle, end), warmup, tokens = PAPER_SETUP[name]
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.kind, m.hidden_size, m.num_heads, m.query_groups, m.ffn_size) == ("hyperloop", d, 16, 16, 11 * d // 4)
    assert (m.begin_layers, m.middle_layers, m.end_layers, m.loops) == (begin, middle, end, 3)
    assert (m.vocab_size, m.seq_length, m.rope_base, m.tie_embeddings, m.loop_embedding) == (32000, 2048, 1e4, False, True)
    assert (m.hc.streams, m.hc.res_for("hyperloop"), m.hc.res_for("mhc"), m.hc.per_loop_params) == (
        4, "diagonal", "sinkhorn", True)
    assert (o.lr, o.min_lr, o.warmup_steps, o.schedule) == (4e-4, 4e-5, warmup, "cosine")
    assert (o.beta1, o.beta2, o.weight_decay, o.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert t.micro_batch_size * t.grad_accum * cfg.data_parallel_size == 256
    assert t.steps == round(tokens / (256 * 2048))
    assert cfg.eval.tasks == PAPER_TASKS
    assert cfg.eval.windows * m.seq_length == pytest.approx(50e6, rel=1e-4)  # the paper's 50M held-out tokens
    _assert_own_layout_fits(cfg, name)


@pytest.mark.parametrize("name", ["3b", "7b"])
def test_larger_recipes_follow_the_ladder_rule(name: str) -> None:
    cfg = load_config(REPO / "recipes" / f"hyperloop-{name}.yaml")
    point = ladder(cfg.model)
    t = cfg.train
    assert t.micro_batch_size * t.grad_accum * cfg.data_parallel_size == point.global_batch
    assert cfg.optim.lr == pytest.approx(point.lr, rel=1e-3)
    assert cfg.optim.min_lr == pytest.approx(point.min_lr, rel=1e-3)
    assert (t.steps, cfg.optim.warmup_steps) == (point.steps, point.warmup_steps)
    # The paper's family rule: FFN 2.75 d, MHA with head dim 128, 32k vocabulary untied, 3 loops, begin = end.
    m = cfg.model
    assert (m.ffn_size, m.query_groups, m.hidden_size // m.num_heads) == (11 * m.hidden_size // 4, m.num_heads, 128)
    assert (m.vocab_size, m.tie_embeddings, m.loops, m.begin_layers) == (32000, False, 3, m.end_layers)
    assert 0.2 <= m.begin_layers / m.unique_layers <= 0.3
    _assert_own_layout_fits(cfg, name)


def _assert_own_layout_fits(cfg: Config, name: str) -> None:
    """The recipe's own layout fits 80 GB GPUs by the planner's estimate."""
    t = cfg.train
    p = cfg.parallel
    engine = "megatron+distopt" if p.distributed_optimizer else p.engine
    est = estimate(cfg, Layout(p.tp, p.pp, cfg.data_parallel_size, engine, t.recompute, t.micro_batch_size,
                               t.grad_accum), Hardware(gpus=cfg.world_size, gpu_mem_bytes=80e9))
    assert est.fits, f"{name}: {est.total_bytes / 2**30:.1f} GiB per GPU"


@pytest.mark.slow
def test_validate_builds_every_shard_of_a_1024_gpu_layout() -> None:
    """tp=2 x pp=2 x dp=256 of the 7B recipe: each (TP rank, stage) shard built as its rank would build it,
    in a fresh process (fake process groups must not meet the session's real one); then TP2 x PP2 of the
    tiny recipe (tied embeddings) and of its mhc."""
    code = ("from hyperloop_dist.cluster.validate import validate_layout\n"
            "from hyperloop_dist.config import load_config\n"
            f"cfg = load_config({str(REPO / 'recipes' / 'hyperloop-7b.yaml')!r})\n"
            "checks = validate_layout(cfg, 1024, 2, 2)\n"
            "print('SHARDS', [(c.rank, c.tp_rank, c.stage, c.params) for c in checks])\n"
            # a tied head's last-stage copy, mHC's hyper-connections split with their layers
            "for extra in ([], ['model.kind=mhc']):\n"
            "    validate_layout(load_config(None, ['parallel.nproc_per_node=4', *extra]), 4, 2, 2)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = ast.literal_eval(proc.stdout.split("SHARDS ")[1].splitlines()[0])
    assert [(r, t, s) for r, t, s, _ in shards] == [(0, 0, 0), (1, 1, 0), (512, 0, 1), (513, 1, 1)]
    assert "add up to the model's 7,393.4M parameters" in proc.stdout
    assert proc.stdout.count("all 2 stages x 2 TP shards add up") == 3
