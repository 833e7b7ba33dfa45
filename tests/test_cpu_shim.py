"""Canary for the CPU shim: the private Megatron names it patches, and what it makes work.

Run on every megatron-core upgrade; a failure here names the patch point that moved.
"""

from __future__ import annotations

from importlib.metadata import version

import pytest
import torch

from hyperloop_dist.parallel import cpu_shim

pytestmark = pytest.mark.usefixtures("megatron_world")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is inert with CUDA")


def test_pinned_megatron_version_and_patch_points() -> None:
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import utils as transformer_utils

    assert version("megatron-core") == "0.16.1", "the shim is written against 0.16.1: re-run this canary"
    for name in ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED", "_get_cuda_rng_state",
                 "_set_cuda_rng_state", "get_cuda_rng_tracker", "model_parallel_cuda_manual_seed", "checkpoint"):
        assert hasattr(mp_random, name), f"megatron.core.tensor_parallel.random.{name} moved"
    assert hasattr(transformer_utils, "get_default_causal_mask")
    from megatron.core import jit
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    assert hasattr(filesystem_async, "_results_queue"), "checkpoint/training_state.py presets it"
    if not torch.cuda.is_available():  # hyperloop_dist/__init__.py: Megatron imported without TorchInductor
        assert jit.jit_fuser is not torch.compile


@cpu_only
def test_tracker_forks_named_streams_and_restores_the_outer_one() -> None:
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_shim.CpuRNGStatesTracker)
    cpu_shim.seed_model_parallel(7)
    outer = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer)
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b), "the forked stream must advance"
    cpu_shim.seed_model_parallel(7)
    with tracker.fork():
        assert torch.equal(torch.rand(3), a), "reseeding must replay the stream"
    with pytest.raises(KeyError):
        with tracker.fork("no-such-stream"):
            pass


@cpu_only
def test_activation_recompute_replays_dropout() -> None:
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.random import checkpoint

    weight = torch.randn(8, 8, requires_grad=True)

    def fn(x: torch.Tensor) -> torch.Tensor:
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(x @ weight, p=0.5, training=True)

    x = torch.randn(4, 8, requires_grad=True)
    cpu_shim.seed_model_parallel(3)
    fn(x).sum().backward()
    plain = weight.grad.clone()
    weight.grad = None
    cpu_shim.seed_model_parallel(3)
    checkpoint(fn, False, x).sum().backward()
    torch.testing.assert_close(weight.grad, plain)


@cpu_only
def test_device_mode_maps_cuda_literals_to_cpu() -> None:
    from megatron.core.transformer.utils import get_default_causal_mask

    with cpu_shim.device_mode():
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(2, device=0).device.type == "cpu"
        t = torch.ones(2)
        assert t.cuda() is t
        assert t.to("cuda").device.type == "cpu"
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.to(torch.float64).dtype == torch.float64
        assert get_default_causal_mask(4).shape == (4, 4)
    assert torch.ones(2).type() == "torch.FloatTensor"
    assert cpu_shim.causal_mask(3)[0, 0].tolist() == [[False, True, True], [False, False, True], [False] * 3]


@cpu_only
def test_megatron_optimizer_and_ddp_build_and_step_on_cpu() -> None:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from hyperloop_dist.config import ModelConfig
    from hyperloop_dist.model.hyperloop import build_model

    model = build_model(ModelConfig(hidden_size=32, num_heads=4, vocab_size=64, seq_length=8, loops=2))
    with cpu_shim.device_mode():
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, clip_grad=1.0), [ddp])
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, 64, (2, 8))
    ddp(x, labels=x).mean().backward()
    with cpu_shim.device_mode():
        ok, grad_norm, _ = opt.step()
    assert ok and grad_norm > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shim_is_inert_with_cuda() -> None:
    current = torch.cuda.current_device
    cpu_shim.enable()
    assert torch.cuda.current_device is current and not cpu_shim.is_active()
    assert isinstance(cpu_shim.device_mode(), type(__import__("contextlib").nullcontext()))
