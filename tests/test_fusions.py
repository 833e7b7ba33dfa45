"""Torch-only fusions (hyperloop_dist/fusions.py): each gives the same training as without it, on CPU."""

from __future__ import annotations

import functools
import re

import pytest
import torch

from hyperloop_dist.config import FUSIONS, load_config
from hyperloop_dist.parallel import cpu_shim
from hyperloop_dist.train.engines.base import torch_optimizers

from .conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("megatron_world")


class _Batches:
    def __init__(self, vocab: int, seq: int) -> None:
        tokens = torch.randint(0, vocab, (4, seq + 1), generator=torch.Generator().manual_seed(0))
        self.batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())

    def next(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch


@pytest.fixture(autouse=True)
def _unpatched_afterwards():
    from hyperloop_dist.fusions import apply_process_fusions

    yield
    apply_process_fusions([])


def _train(fusions: tuple[str, ...] = (), steps: int = 3, extra: tuple[str, ...] = ()
           ) -> tuple[list[float], dict[str, torch.Tensor]]:
    from hyperloop_dist.parallel.distributed import RankInfo
    from hyperloop_dist.train.engines.megatron import MegatronEngine

    # grad_clip small enough that every step clips: the clip path is exercised, not only the norm.
    cfg = load_config(None, [*TINY_MODEL, "parallel.nproc_per_node=1", "optim.warmup_steps=0", "optim.grad_clip=0.05",
                             "logging.wandb_mode=disabled", f"train.fusions=[{','.join(fusions)}]", *extra])
    torch.manual_seed(0)
    engine = MegatronEngine(cfg, RankInfo(0, 1, 0, 0, 1))
    _assert_in_place(fusions, engine)
    data = _Batches(cfg.model.vocab_size, cfg.model.seq_length)
    losses = []
    for step in range(1, steps + 1):
        losses.append(engine.step([data.next(step, 0)], step, None).loss)
        engine.scheduler.step(1)
    return losses, {n: p.detach().clone() for n, p in engine.model.named_parameters()}


def _assert_in_place(fusions: tuple[str, ...], engine: object) -> None:
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.optimizer import clip_grads

    from hyperloop_dist import fusions as fu

    assert all(bool(g.get("fused")) == ("adamw" in fusions) for opt in torch_optimizers(engine.optimizer)
               for g in opt.param_groups)
    assert (clip_grads.l2_norm_impl is fu._foreach_l2_norm) == ("grad_norm" in fusions)
    assert (rope_utils._apply_rotary_pos_emb_bshd is fu._rope_bshd_cached) == ("rope" in fusions)
    assert engine.model.config.bias_activation_fusion == ("swiglu" in fusions)


@functools.cache
def _unfused() -> tuple[list[float], dict[str, torch.Tensor]]:
    return _train()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_fusion_trains_like_the_unfused_path(fusion: str) -> None:
    plain_losses, plain = _unfused()
    fused_losses, fused = _train((fusion,))
    assert fused_losses == pytest.approx(plain_losses, abs=1e-5)
    for name, p in plain.items():
        torch.testing.assert_close(fused[name], p, atol=1e-5, rtol=1e-5, msg=name)


def test_foreach_grad_norm_pins_megatrons_clip_grads() -> None:
    """The names replaced are the ones megatron-core 0.16.1 looks up per call, holding its local loops."""
    import inspect

    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    from hyperloop_dist.fusions import use_foreach_grad_norm

    assert clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm
    assert clip_grads.multi_tensor_scale_impl is utils.local_multi_tensor_scale
    assert "torch.tensor(l2)" in inspect.getsource(utils.local_multi_tensor_l2_norm)  # the per-parameter sync
    assert "multi_tensor_applier(\n                    l2_norm_impl" in inspect.getsource(clip_grads.get_grad_norm_fp32)
    assert "multi_tensor_scale_impl, dummy_overflow_buf, [grads, grads]" in inspect.getsource(
        clip_grads.clip_grad_by_total_norm_fp32)
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (3, 70, 1000)]
    flag = torch.zeros(1, dtype=torch.int)
    with cpu_shim.device_mode():  # the local loop puts its result on "cuda"
        ref, _ = clip_grads.l2_norm_impl(2048, flag, [grads], False)
    ref_scaled = [g.clone() for g in grads]
    clip_grads.multi_tensor_scale_impl(2048, flag, [ref_scaled, ref_scaled], 0.3)
    assert use_foreach_grad_norm(True)
    norm, _ = clip_grads.l2_norm_impl(2048, flag, [grads], False)
    scaled = [g.clone() for g in grads]
    clip_grads.multi_tensor_scale_impl(2048, flag, [scaled, scaled], 0.3)
    copied = [torch.empty_like(g) for g in grads]
    clip_grads.multi_tensor_scale_impl(2048, flag, [grads, copied], 0.3)
    torch.testing.assert_close(norm.cpu(), ref.cpu())  # the local loop's result is on "cuda" on a GPU
    for a, b, c in zip(scaled, ref_scaled, copied, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(c, b)
    assert not use_foreach_grad_norm(False) and clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm


def test_rope_tables_pin_megatrons_rope_and_follow_the_freqs() -> None:
    import inspect

    from megatron.core.models.common.embeddings import rope_utils

    from hyperloop_dist.fusions import use_rope_tables

    original = rope_utils._apply_rotary_pos_emb_bshd
    assert "torch.cos(freqs)" in inspect.getsource(original)  # what the tables replace
    t = torch.randn(6, 2, 4, 8)
    freqs = torch.randn(6, 1, 1, 8)
    ref = original(t, freqs)
    use_rope_tables(True)
    assert rope_utils._apply_rotary_pos_emb_bshd is not original
    torch.testing.assert_close(rope_utils._apply_rotary_pos_emb_bshd(t, freqs), ref)
    torch.testing.assert_close(rope_utils._apply_rotary_pos_emb_bshd(t, freqs), ref)  # from the table
    freqs.mul_(2)  # changed in place: the table is rebuilt
    torch.testing.assert_close(rope_utils._apply_rotary_pos_emb_bshd(t, freqs), original(t, freqs))
    use_rope_tables(False)
    assert rope_utils._apply_rotary_pos_emb_bshd is original


@pytest.mark.parametrize(("override", "field"), [("train.fusions=[adamw,fast]", "train.fusions[1]"),
                                                 ("model.compile=all", "model.compile")])
def test_bad_switch_names_its_field(override: str, field: str) -> None:
    from hyperloop_dist.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(None, [override])
    from hyperloop_dist.train import engines

    with pytest.raises(ConfigError, match="parallel.engine=megatron"):
        engines.validate(load_config(None, ["train.fusions=[adamw]", "parallel.engine=fsdp"]))


def test_fused_adamw_refuses_an_optimizer_that_has_stepped() -> None:
    from hyperloop_dist.fusions import use_fused_adamw

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(3)
    opt.step()
    with pytest.raises(RuntimeError, match="already stepped"):
        use_fused_adamw(opt)


def _rms_norm_ops(device: str) -> set[str]:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from hyperloop_dist.model.hyperloop import transformer_config

    cfg = load_config(None, TINY_MODEL).model
    norm = WrappedTorchNorm(config=transformer_config(cfg), hidden_size=cfg.hidden_size, eps=cfg.norm_eps).to(device)
    x = torch.randn(8, 2, cfg.hidden_size, device=device, requires_grad=True)
    with torch.profiler.profile() as prof:
        norm(x).sum().backward()
    return {e.name for e in prof.events()}


def test_megatrons_torch_rmsnorm_is_torchs_fused_op() -> None:
    """No switch for RMSNorm: the local spec's norm is torch.nn.RMSNorm, which runs aten::_fused_rms_norm
    (a fused CUDA kernel on GPU; composed of plain ops on CPU)."""
    assert "aten::_fused_rms_norm" in _rms_norm_ops("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused RMSNorm kernels are CUDA's")
def test_rmsnorm_runs_fused_kernels_on_gpu() -> None:
    ops = _rms_norm_ops("cuda")
    assert "aten::_fused_rms_norm" in ops and "aten::_fused_rms_norm_backward" in ops, sorted(ops)
