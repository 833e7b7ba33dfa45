"""Shared fixtures: offline logging, a single-process Megatron world, a tiny tokenized corpus."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hyperloop_dist.parallel.launch import free_port  # (the spawn tests import it from here too)

FIXTURE_CORPUS = Path(__file__).parent / "fixtures" / "corpus"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _offline_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    wandb_dir = tmp_path_factory.mktemp("wandb")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        os.environ[var] = str(wandb_dir)
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed (gloo, world size 1) + Megatron parallel state in this process."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from hyperloop_dist.parallel import cpu_shim

    cpu_shim.enable()
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    cpu_shim.seed_model_parallel(1234)
    torch.manual_seed(0)
    yield
    parallel_state.destroy_model_parallel()


TINY_MODEL = [
    "model.hidden_size=32", "model.num_heads=4", "model.vocab_size=512", "model.seq_length=32",
    "model.begin_layers=1", "model.middle_layers=2", "model.end_layers=1", "model.loops=2",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides pointing a run at a tokenized copy of the fixture corpus (vocab 512)."""
    from hyperloop_dist.config import load_config
    from hyperloop_dist.data.token_windows import prepare_corpus

    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(FIXTURE_CORPUS, root / "texts")
    overrides = [*TINY_MODEL, "data.corpus=dir", f"data.dir={root / 'texts'}",
                 f"data.tokenizer={root / 'tokenizer.model'}"]
    prepare_corpus(load_config(None, overrides), log=lambda *_: None)
    return overrides


# Runs that several modules compare against, trained once per session (tests/helpers.py adds RUN_DEFAULTS).
SINGLE_6 = ["train.steps=6", "train.save_interval=3", "data.loader=windows", "model.tie_embeddings=false",
            "parallel.nproc_per_node=1", "train.grad_accum=2"]  # 8 windows per step, as 2 ranks x 4
DP2_12 = ["train.steps=12", "train.save_interval=4", "data.loader=windows", "parallel.nproc_per_node=2"]


@pytest.fixture(scope="session")
def single_run(tiny_data: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Hyperloop, one process, 6 steps (saved at 3 and 6): the reference of the layout and ZeRO tests."""
    from .helpers import train

    run = tmp_path_factory.mktemp("single") / "run"
    return run, train([*tiny_data, *SINGLE_6], run).stdout


@pytest.fixture(scope="session")
def dp2_run(tiny_data: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Hyperloop on 2 DP ranks, 12 steps (saved every 4): the reference of the train and fault tests."""
    from .helpers import train

    run = tmp_path_factory.mktemp("dp2") / "run"
    return run, train([*tiny_data, *DP2_12], run).stdout
