"""Paths that only run on a GPU: bf16 training with Megatron's mixed-precision optimizer, TE and SDPA specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .helpers import losses, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# wandb is not what these tests check, and a bare GPU machine may lack it.
GPU_RUN = ["parallel.nproc_per_node=1", "train.precision=bf16", "logging.wandb_mode=disabled"]


def test_bf16_training_runs_and_learns(tiny_data: list[str], tmp_path: Path) -> None:
    train([*tiny_data, *GPU_RUN, "train.steps=20", "optim.lr=3e-3"], tmp_path / "run")
    curve = losses(tmp_path / "run")
    assert curve[20] < curve[1]


def test_sdpa_and_local_attention_train_alike_in_bf16(tiny_data: list[str], tmp_path: Path) -> None:
    """Same weights, same batches: the curves differ only by bf16 rounding of two attention kernels."""
    curves = {}
    for backend in ("local", "sdpa"):
        train([*tiny_data, *GPU_RUN, "train.steps=8", f"model.attention_backend={backend}"], tmp_path / backend)
        curves[backend] = losses(tmp_path / backend)
    for step, loss in curves["local"].items():
        assert abs(curves["sdpa"][step] - loss) < 2e-2 * max(1.0, abs(loss)), (step, curves)


def test_auto_attention_backend_is_sdpa_or_te_on_gpu() -> None:
    import importlib.util

    from hyperloop_dist.model.hyperloop import resolve_attention_backend

    te = importlib.util.find_spec("transformer_engine") is not None
    assert resolve_attention_backend("auto") == ("te" if te else "sdpa")


def test_layer_spec_uses_transformer_engine_when_it_imports() -> None:
    pytest.importorskip("transformer_engine")
    from hyperloop_dist.model.hyperloop import layer_spec

    spec, norm = layer_spec()
    assert "TENorm" in norm.__name__ or "TE" in str(spec)
