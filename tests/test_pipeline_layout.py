"""Under pipeline parallelism each rank holds exactly its share of the model, the middle block once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from hyperloop_dist.config import ModelConfig

from .conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("megatron_world")]

KINDS = ("hyperloop", "looped", "transformer")


def model_config(kind: str) -> ModelConfig:
    return ModelConfig(kind=kind, hidden_size=32, num_heads=4, vocab_size=64, seq_length=8, begin_layers=1,
                       middle_layers=4, end_layers=1, loops=3, tie_embeddings=False)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from hyperloop_dist.model.hyperloop import Stage, build_model
    from hyperloop_dist.parallel import cpu_shim

    cpu_shim.enable()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ps.initialize_model_parallel(1, world)
    cpu_shim.seed_model_parallel(0)
    report = {}
    for kind in KINDS:
        model = build_model(model_config(kind), stage=Stage(ps.get_pipeline_model_parallel_rank(), world))
        params = list(model.parameters())
        report[kind] = {
            "params": {n: p.numel() for n, p in model.named_parameters()},
            "middle_layer_numbers": [layer.layer_number for layer in model.middle.layers],
            "distinct_storage": len({p.data_ptr() for p in params}) == len(params),
        }
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _expected_share(single: dict[str, int], stage: int, stages: int, middle_layers: int) -> dict[str, int]:
    per_stage = middle_layers // stages
    share = {}
    for name, numel in single.items():
        if name.startswith("middle.layers."):
            index, rest = name.removeprefix("middle.layers.").split(".", 1)
            if int(index) // per_stage == stage:
                share[f"middle.layers.{int(index) % per_stage}.{rest}"] = numel
        elif name.startswith(("embedding.", "begin.", "hc.", "loop_embedding")):
            if stage == 0:
                share[name] = numel
        elif stage == stages - 1:
            share[name] = numel
    return share


@pytest.mark.parametrize("stages", [2, 4])
def test_each_stage_holds_exactly_its_share(stages: int, tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(stages, free_port(), str(tmp_path)), nprocs=stages, start_method="spawn")
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(stages)]
    from hyperloop_dist.model.hyperloop import build_model

    for kind in KINDS:
        single = {n: p.numel() for n, p in build_model(model_config(kind)).named_parameters()}
        middle = len([n for n in single if n.startswith("middle.layers.") and n.endswith("linear_proj.weight")])
        for stage, report in enumerate(reports):
            assert report[kind]["params"] == _expected_share(single, stage, stages, middle), (kind, stage)
            assert report[kind]["distinct_storage"]
        numbers = [n for r in reports for n in r[kind]["middle_layer_numbers"]]
        assert sorted(numbers) == list(range(1, middle + 1)), "each middle layer once, with its global number"
        assert sum(sum(r[kind]["params"].values()) for r in reports) == sum(single.values())
