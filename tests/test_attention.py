"""``model.attention_backend``: the SDPA core attention computes what Megatron's DotProductAttention does."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hyperloop_dist.config import ConfigError, HCConfig, ModelConfig, load_config

from .helpers import losses, train

pytestmark = pytest.mark.usefixtures("megatron_world")


class _Group:
    """Stands in for a tensor-parallel process group: the modules only ask it for its size."""

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size


def _pair(heads: int, groups: int, tp: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from hyperloop_dist.model.attention import SDPAttention
    from hyperloop_dist.model.hyperloop import transformer_config

    cfg = ModelConfig(hidden_size=16 * heads, num_heads=heads, num_query_groups=groups, vocab_size=64)
    config = transformer_config(cfg)
    kw = dict(config=config, layer_number=3, attn_mask_type=AttnMaskType.causal, attention_type="self",
              cp_comm_type=None, softmax_scale=None, pg_collection=SimpleNamespace(tp=_Group(tp)))
    return DotProductAttention(**kw), SDPAttention(**kw)


@pytest.mark.parametrize(("heads", "groups", "tp"), [(4, 4, 1), (8, 2, 1), (8, 8, 2), (8, 4, 2)],
                         ids=["mha", "gqa", "mha-tp2-shard", "gqa-tp2-shard"])
def test_sdpa_matches_dot_product_attention(heads: int, groups: int, tp: int) -> None:
    """Forward and input gradients within 1e-5 in fp32, on one rank's share of heads under TP."""
    from hyperloop_dist.parallel import cpu_shim

    local, sdpa = _pair(heads, groups, tp)
    sq, b, hn = 24, 3, 16
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(sq, b, heads // tp, hn, generator=gen, requires_grad=True)
    k = torch.randn(sq, b, groups // tp, hn, generator=gen, requires_grad=True)
    v = torch.randn(sq, b, groups // tp, hn, generator=gen, requires_grad=True)
    mask = cpu_shim.causal_mask(sq)
    outs, grads = [], []
    for module in (local, sdpa):
        out = module(q, k, v, mask)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        qg, kg, vg = torch.autograd.grad(out, (q, k, v), g)
        outs.append(out)
        grads.append((qg, kg, vg))
    assert outs[1].shape == (sq, b, heads // tp * hn)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_sdpa_causal_mask_is_bottom_right_when_keys_are_longer() -> None:
    """With fewer queries than keys the queries are the last positions (Megatron's convention)."""
    _, sdpa = _pair(4, 4, 1)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(s, 2, 4, 16, generator=gen) for s in (5, 9, 9))
    full = sdpa(torch.cat([torch.zeros(4, 2, 4, 16), q]), k, v, None)
    torch.testing.assert_close(sdpa(q, k, v, None), full[4:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("gqa", [False, True])
def test_model_logits_and_gradients_equal_across_backends(gqa: bool) -> None:
    from hyperloop_dist.model.hyperloop import build_model

    cfg = ModelConfig(hidden_size=32, num_heads=4, num_query_groups=2 if gqa else None, vocab_size=96,
                      seq_length=16, loops=2, hc=HCConfig(alpha_init=0.5))
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for backend in ("local", "sdpa"):
        model = build_model(dataclasses.replace(cfg, attention_backend=backend))
        kinds = {type(m).__name__ for m in model.modules()}
        assert ("SDPAttention" in kinds) == (backend == "sdpa") and ("DotProductAttention" in kinds) != (
            backend == "sdpa")
        loss = model(tokens, labels=tokens.roll(-1, 1)).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=0)
    assert results[1][1].keys() == results[0][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=0, msg=name)


def test_attention_backend_is_validated_and_auto_is_local_on_cpu() -> None:
    from hyperloop_dist.model.hyperloop import resolve_attention_backend

    with pytest.raises(ConfigError, match="model.attention_backend='flash'"):
        load_config(None, ["model.attention_backend=flash"])
    assert resolve_attention_backend("auto") == "local"
    with pytest.raises(ValueError, match="model.attention_backend='te'"):
        resolve_attention_backend("te")


@pytest.mark.slow
def test_training_losses_equal_across_backends(tiny_data: list[str], tmp_path: Path) -> None:
    """`hyperloop train` with sdpa and local attention: same losses within 1e-4 over 4 steps."""
    curves = {}
    for backend in ("local", "sdpa"):
        run = tmp_path / backend
        train([*tiny_data, "parallel.nproc_per_node=1", "train.steps=4", f"model.attention_backend={backend}"], run)
        curves[backend] = losses(run)
    assert curves["sdpa"].keys() == curves["local"].keys() == {1, 2, 3, 4}
    for step, loss in curves["local"].items():
        assert abs(curves["sdpa"][step] - loss) < 1e-4, (step, curves)


def test_a_checkpoint_resumes_under_any_attention_backend(tmp_path: Path) -> None:
    """The backend picks kernels, not weights: neither another value nor its absence (older checkpoints)
    makes a checkpoint incompatible; another model field still does."""
    from hyperloop_dist.checkpoint.store import CheckpointError
    from hyperloop_dist.checkpoint.training_state import FORMAT_VERSION, check_compatible

    saved = dataclasses.asdict(load_config(None, ["model.attention_backend=local"]).model)
    older = {k: v for k, v in saved.items() if k != "attention_backend"}
    for model in (saved, older):
        meta = {"format_version": FORMAT_VERSION, "model": model, "layout": {"windows_per_step": 8}}
        check_compatible(meta, load_config(None, ["model.attention_backend=sdpa"]), tmp_path)
    with pytest.raises(CheckpointError, match="model.loops"):
        check_compatible({"format_version": FORMAT_VERSION, "model": saved, "layout": {"windows_per_step": 8}},
                         load_config(None, ["model.loops=5"]), tmp_path)
