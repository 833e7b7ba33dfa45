"""Held-out loss, the per-loop curve and lm-eval requests on 2 real ranks, against one process and reference.py.

One spawn group of 2 gloo processes evaluates the same seeded model (CPU initialization is layout
independent) as DP=2, TP=2, PP=2, FSDP2 (DP=2) and DeepSpeed ZeRO-3 (DP=2), then runs lm-eval local tasks with the requests split
over the two data-parallel ranks. The test process computes the single-process figures and the
plain-PyTorch reference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from hyperloop_dist.config import Config, load_config

from .conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("megatron_world")]

# Untied head (needed under PP) and a wide init, so the loss is far from uniform and depends on every weight.
MODEL = ["model.tie_embeddings=false", "model.init_std=0.1", "model.loops=3"]
WINDOWS, BATCH = 10, 4  # 5 windows per DP rank: two calls, the second padded
TASKS = ["hyperloop_next_line", "hyperloop_heldout_ppl", "hyperloop_continue"]
TASK_LIMIT = 6


def _config(overrides: list[str]) -> Config:
    return load_config(None, [*overrides, *MODEL])


def _heldout(cfg: Config, model: torch.nn.Module, token_nll, dp_rank: int, dp_size: int, group) -> dict:
    from hyperloop_dist.evaluation.heldout import heldout_nll, heldout_windows
    from hyperloop_dist.evaluation.loops import loop_nll, megatron_parts

    windows = heldout_windows(cfg, WINDOWS)
    total, count = heldout_nll(token_nll, windows, BATCH, dp_rank, dp_size, group)
    out = {"loss": float(total.sum()) / count}
    if model is not None:  # the per-loop readout runs inside the model's forward, as periodic eval runs it
        def curve_nll(t: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
            return model(t, labels=lab, pieces=lambda m, tt, ll: loop_nll(megatron_parts(m))(tt, ll))

        curve, _ = heldout_nll(curve_nll, windows, BATCH, dp_rank, dp_size, group)
        out["curve"] = (curve / count).tolist()
    return out


def _worker(rank: int, world: int, port: int, overrides: list[str], task_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from hyperloop_dist.model.hyperloop import Stage, build_model
    from hyperloop_dist.parallel import cpu_shim
    from hyperloop_dist.parallel.pipeline import CircularPipeline
    from hyperloop_dist.train.engines.fsdp import shard_model

    cpu_shim.enable()
    os.environ["LOCAL_RANK"] = str(rank)  # what torchrun sets; DeepSpeed insists on it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = _config(overrides)
    report = {}
    for name, tp, pp in (("dp2", 1, 1), ("tp2", 2, 1), ("pp2", 1, 2), ("fsdp", 1, 1)):
        ps.initialize_model_parallel(tp, pp)
        cpu_shim.seed_model_parallel(0)
        dp_rank, dp_size, group = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), \
            ps.get_data_parallel_group()
        model = build_model(cfg.model, tp=tp, stage=Stage(ps.get_pipeline_model_parallel_rank(), pp),
                            seed=cfg.train.seed)
        if name == "fsdp":
            shard_model(model, cfg)
        if pp > 1:
            report[name] = _heldout(cfg, None, CircularPipeline(model, BATCH).token_nll, dp_rank, dp_size, group)
        else:
            report[name] = _heldout(cfg, model, lambda t, lab, m=model: m(t, labels=lab), dp_rank, dp_size, group)
        if name == "dp2":
            from hyperloop_dist.data.tokenizer import load_tokenizer
            from hyperloop_dist.evaluation.harness import run_tasks
            from hyperloop_dist.evaluation.lm_eval_model import HyperloopLM

            lm = HyperloopLM.from_logits(model, load_tokenizer(cfg.data.tokenizer), cfg.model.seq_length,
                                         batch_size=3, rank=dp_rank, world_size=dp_size, group=group)
            with torch.no_grad():
                report["tasks"] = run_tasks(lm, TASKS, task_dir, TASK_LIMIT)
        ps.destroy_model_parallel()
    # ZeRO-3 (DP=2): parameters partitioned, gathered by DeepSpeed's hooks, the per-loop readout included.
    from hyperloop_dist.parallel.distributed import RankInfo
    from hyperloop_dist.train.engines.deepspeed import DeepSpeedEngine

    ps.initialize_model_parallel(1, 1)
    cpu_shim.seed_model_parallel(0)
    zero3 = _config([*overrides, "parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.nproc_per_node=2"])
    engine = DeepSpeedEngine(zero3, RankInfo(rank, 2, rank, ps.get_data_parallel_rank(), 2))
    engine.model.eval()
    with torch.no_grad():
        report["zero3"] = _heldout(zero3, engine.model, engine.forward_for_eval, ps.get_data_parallel_rank(),
                                   ps.get_data_parallel_world_size(), ps.get_data_parallel_group())
    ps.destroy_model_parallel()
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def layouts(tiny_data: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    from hyperloop_dist.evaluation.heldout import heldout_documents
    from hyperloop_dist.evaluation.local_tasks import build_task_dir

    out = tmp_path_factory.mktemp("eval_layouts")
    task_dir = build_task_dir(list(heldout_documents(_config(tiny_data))), out / "tasks")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(2, free_port(), tiny_data, str(task_dir), str(out)), nprocs=2,
                       start_method="spawn")
    return {"ranks": [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], "task_dir": task_dir}


@pytest.fixture(scope="module")
def single(tiny_data: list[str]) -> dict:
    """One process: the Megatron model at TP = PP = DP = 1 and its reference.py twin with the same weights."""
    from hyperloop_dist.evaluation.heldout import heldout_windows, reference_heldout_loss
    from hyperloop_dist.model.hyperloop import build_model
    from hyperloop_dist.model.reference import ReferenceModel, from_megatron_state_dict

    cfg = _config(tiny_data)
    model = build_model(cfg.model, seed=cfg.train.seed)
    reference = ReferenceModel(cfg.model)
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    reference.load_state_dict(from_megatron_state_dict(state))
    with torch.no_grad():
        megatron = _heldout(cfg, model, lambda t, lab: model(t, labels=lab), 0, 1, None)
        ref = reference_heldout_loss(reference.eval(), heldout_windows(cfg, WINDOWS), batch_size=3)
    return {"cfg": cfg, "megatron": megatron, "reference": ref, "reference_model": reference}


def test_heldout_loss_is_the_same_on_every_layout_and_equals_reference(layouts: dict, single: dict) -> None:
    expected = single["reference"]
    assert single["megatron"]["loss"] == pytest.approx(expected, rel=1e-6)
    assert abs(expected - 6.24) > 0.05, "the wide init should move the loss away from uniform"
    for report in layouts["ranks"]:
        for name in ("dp2", "tp2", "pp2", "fsdp", "zero3"):
            assert report[name]["loss"] == pytest.approx(expected, rel=1e-6), name


def test_per_loop_curve_has_one_point_per_loop_and_ends_at_the_loss(layouts: dict, single: dict) -> None:
    loops = single["cfg"].model.loops
    reference_curve = single["megatron"]["curve"]
    assert len(reference_curve) == loops
    assert reference_curve[-1] == pytest.approx(single["megatron"]["loss"], rel=1e-6)
    assert len(set(round(v, 6) for v in reference_curve)) == loops, "each loop changes the readout"
    for report in layouts["ranks"]:
        for name in ("dp2", "tp2", "fsdp", "zero3"):
            assert report[name]["curve"] == pytest.approx(reference_curve, rel=1e-6), name
    from hyperloop_dist.evaluation.heldout import heldout_nll, heldout_windows
    from hyperloop_dist.evaluation.loops import loop_nll, reference_parts

    with torch.no_grad():  # the reference.py twin gives the same curve
        totals, count = heldout_nll(loop_nll(reference_parts(single["reference_model"])),
                                    heldout_windows(single["cfg"], WINDOWS), BATCH)
    assert (totals / count).tolist() == pytest.approx(reference_curve, rel=1e-6)


def test_lm_eval_requests_split_over_ranks_give_the_single_process_scores(layouts: dict, single: dict) -> None:
    from hyperloop_dist.data.tokenizer import load_tokenizer
    from hyperloop_dist.evaluation.harness import run_tasks
    from hyperloop_dist.evaluation.lm_eval_model import HyperloopLM

    cfg = single["cfg"]
    lm = HyperloopLM.from_logits(single["reference_model"], load_tokenizer(cfg.data.tokenizer), cfg.model.seq_length)
    expected = run_tasks(lm, TASKS, layouts["task_dir"], TASK_LIMIT)
    distributed, other = layouts["ranks"][0]["tasks"], layouts["ranks"][1]["tasks"]
    assert other is None, "only the evaluator's rank 0 aggregates"
    assert set(expected) == set(TASKS)
    for task, metrics in expected.items():
        assert distributed[task] == pytest.approx(metrics, rel=1e-6), task
    assert expected["hyperloop_next_line"]["acc"] in {i / TASK_LIMIT for i in range(TASK_LIMIT + 1)}
