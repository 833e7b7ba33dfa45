"""Paths that only run on a GPU: bf16 training with Megatron's mixed-precision optimizer, TE specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .helpers import losses, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_training_runs_and_learns(tiny_data: list[str], tmp_path: Path) -> None:
    train([*tiny_data, "parallel.nproc_per_node=1", "train.precision=bf16", "train.steps=20", "optim.lr=3e-3"],
          tmp_path / "run")
    curve = losses(tmp_path / "run")
    assert curve[20] < curve[1]


def test_layer_spec_uses_transformer_engine_when_it_imports() -> None:
    pytest.importorskip("transformer_engine")
    from hyperloop_dist.model.hyperloop import layer_spec

    spec, norm = layer_spec()
    assert "TENorm" in norm.__name__ or "TE" in str(spec)
