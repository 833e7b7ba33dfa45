"""Megatron-core model vs the plain-PyTorch reference, and the identities between the four kinds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hyperloop_dist.config import HCConfig, ModelConfig
from hyperloop_dist.model.hyper_connections import KINDS
from hyperloop_dist.model.reference import ReferenceModel, from_megatron_state_dict

pytestmark = pytest.mark.usefixtures("megatron_world")

SMALL = ModelConfig(hidden_size=32, num_heads=4, vocab_size=96, seq_length=16, begin_layers=1,
                    middle_layers=2, end_layers=1, loops=3, hc=HCConfig(alpha_init=0.5))


def build(cfg: ModelConfig):
    from hyperloop_dist.model.hyperloop import build_model

    return build_model(cfg)


def perturb_identity_params(model: torch.nn.Module, seed: int = 0) -> None:
    """Move HC / loop-embedding params off their identity-like init so the test sees them act."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("hc.") or name == "loop_embedding":
                p.add_(0.2 * torch.randn(p.shape, generator=gen).to(p.device))


def tokens(cfg: ModelConfig, batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("kind", "variant"), [
    *((k, v) for k in KINDS for v in ("default", "gqa_untied", "shared_hc")),
    *((k, v) for k in ("mhc", "hyperloop") for v in ("res_sinkhorn", "res_identity", "res_diagonal")),
])
def test_megatron_matches_reference(kind: str, variant: str) -> None:
    cfg = dataclasses.replace(SMALL, kind=kind)
    if variant == "gqa_untied":
        cfg = dataclasses.replace(cfg, num_query_groups=2, tie_embeddings=False, begin_layers=0)
    elif variant == "shared_hc":
        cfg = dataclasses.replace(cfg, hc=HCConfig(per_loop_params=False, streams=3), loop_embedding=False)
    elif variant.startswith("res_"):  # every H_res form on both kinds with hyper-connections
        cfg = dataclasses.replace(cfg, hc=HCConfig(res=variant[4:], alpha_init=0.5))
    model = build(cfg)
    perturb_identity_params(model)
    ref = ReferenceModel(cfg)
    ref.load_state_dict(from_megatron_state_dict(model.state_dict()), strict=True)
    x = tokens(cfg)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind: str) -> None:
    cfg = dataclasses.replace(SMALL, kind=kind)
    model = build(cfg)
    perturb_identity_params(model)
    x = tokens(cfg)
    model(x, labels=x).mean().backward()
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("hc.") for n in names) == (kind in ("mhc", "hyperloop"))
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert dead == []


def _copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("_extra_state")}
    result = dst.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    own = ("hc.", "loop_embedding")  # what the destination kind has and the source kind lacks
    assert all(k.startswith(own) or k.endswith("_extra_state") for k in result.missing_keys)


@pytest.mark.parametrize("res", ["diagonal", "identity"])
def test_hyperloop_with_one_stream_reduces_to_the_looped_model(res: str) -> None:
    """n = 1, alpha = 0: H_pre = 1, H_post = 1. A closed diagonal gate (b_res = -40) leaves
    Y' = F(Y) + e, the plain looped model; H_res = I leaves Y' = Y + F(Y) + e, the looped model with a skip
    around each loop. The paper's write of the whole block output, on the looped model's own weights."""
    looped_cfg = dataclasses.replace(SMALL, kind="looped")
    hyper_cfg = dataclasses.replace(SMALL, kind="hyperloop", hc=HCConfig(streams=1, alpha_init=0.0, res=res))
    looped, hyper = build(looped_cfg), build(hyper_cfg)
    with torch.no_grad():
        looped.loop_embedding.normal_(std=0.1)
        if res == "diagonal":
            for hc in hyper.hc:
                hc.bias_res.fill_(-40.0)
    _copy_weights(looped, hyper)
    x = tokens(SMALL)
    if res == "diagonal":
        expected = looped(x)
    else:
        with torch.no_grad():
            state = looped.embed(x)
            for loop in range(SMALL.loops):
                state = state + looped.run_middle(state) + looped.loop_embedding[loop]
            expected = looped.finish(state)
    torch.testing.assert_close(hyper(x), expected, atol=1e-5, rtol=0)


def test_looped_once_without_hc_equals_transformer() -> None:
    looped_cfg = dataclasses.replace(SMALL, kind="looped", loops=1)
    transformer_cfg = dataclasses.replace(SMALL, kind="transformer", loops=1)
    looped, transformer = build(looped_cfg), build(transformer_cfg)
    _copy_weights(transformer, looped)
    with torch.no_grad():
        looped.loop_embedding.zero_()
    x = tokens(SMALL)
    torch.testing.assert_close(looped(x), transformer(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["looped", "hyperloop"])
def test_middle_block_weights_exist_once(kind: str) -> None:
    counts = {}
    for loops in (1, 2, 5):
        cfg = dataclasses.replace(SMALL, kind=kind, loops=loops, loop_embedding=False,
                                  hc=HCConfig(per_loop_params=False))
        model = build(cfg)
        counts[loops] = sum(p.numel() for p in model.parameters())
        middle = list(model.middle.parameters())
        assert len(model.middle.layers) == cfg.middle_layers
        pointers = [p.data_ptr() for p in model.parameters()]
        assert len(pointers) == len(set(pointers)), "a parameter tensor is stored twice"
        assert len({p.data_ptr() for p in middle}) == len(middle)
    assert counts[1] == counts[2] == counts[5], counts


def test_unique_layers_per_kind() -> None:
    for kind, expected in {"transformer": 8, "mhc": 8, "looped": 4, "hyperloop": 4}.items():
        model = build(dataclasses.replace(SMALL, kind=kind, loops=3))
        assert sum(len(b.layers) for b in model.blocks()) == expected


@pytest.mark.parametrize("kind", ["hyperloop", "looped"])
def test_per_loop_recompute_gives_the_same_loss_and_gradients(kind: str) -> None:
    from hyperloop_dist.model.hyperloop import build_model

    cfg = dataclasses.replace(SMALL, kind=kind)
    grads = []
    for recompute in (False, True):
        model = build_model(cfg, recompute=recompute)
        perturb_identity_params(model)
        x = tokens(cfg)
        loss = model(x, labels=x).mean()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=0, rtol=0)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_model_runs_and_tracks_fp32(kind: str) -> None:
    """bf16 weights and activations (the GPU recipe's precision) on CPU: HC gates and loop embeddings must
    follow the activation dtype, and the loss stays near the fp32 model's with the same weights."""
    from hyperloop_dist.model.hyperloop import build_model

    cfg = dataclasses.replace(SMALL, kind=kind)
    fp32 = build(cfg)
    perturb_identity_params(fp32)
    bf16 = build_model(cfg, precision="bf16")
    bf16.load_state_dict(fp32.state_dict(), strict=False)
    x = tokens(cfg).to(next(bf16.parameters()).device)  # Megatron builds on the GPU when there is one
    loss = bf16(x, labels=x).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bf16.parameters() if p.requires_grad)
    torch.testing.assert_close(loss, fp32(x, labels=x).mean(), rtol=2e-2, atol=0)


def test_bf16_optimizer_checkpoint_state_maps_to_every_parameter() -> None:
    """Megatron's mixed-precision optimizer pairs its fp32 master copies with the model's parameters by
    position among the half-precision ones: a parameter left in fp32 (HC, loop embedding) shifted that pairing
    and broke the first bf16 checkpoint (seen on an H100)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from hyperloop_dist.model.hyperloop import build_model
    from hyperloop_dist.parallel import cpu_shim

    model = build_model(SMALL, precision="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with cpu_shim.device_mode():
        ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True,
                                                     params_dtype=torch.bfloat16), [ddp])
    x = tokens(SMALL).to(next(model.parameters()).device)
    ddp(x, labels=x).mean().backward()
    with cpu_shim.device_mode():
        finalize_model_grads([ddp])
        assert opt.step()[0]
        opt.sharded_state_dict(model.sharded_state_dict())  # raised "Optimizer shape (3,) ... (4,)"
