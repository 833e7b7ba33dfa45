"""model.compile: the hyper-connection as one compiled graph gives the same model, and never recompiles
per loop (hyperloop_dist/model/hyper_connections.py: compiled_hc)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hyperloop_dist.config import HCConfig, ModelConfig
from hyperloop_dist.model import hyper_connections as hcm

from .test_model import perturb_identity_params, tokens

CFG = ModelConfig(hidden_size=32, num_heads=4, vocab_size=96, seq_length=16, begin_layers=1, middle_layers=1,
                  end_layers=1, loops=3, hc=HCConfig(alpha_init=0.5))


def _loss_and_grads(compile_mode: str, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    from hyperloop_dist.model.hyperloop import build_model
    from hyperloop_dist.parallel import cpu_shim

    model = build_model(dataclasses.replace(CFG, compile=compile_mode))
    device = cpu_shim.device()
    perturb_identity_params(model)
    losses = []
    for step in range(steps):
        model.zero_grad()
        loss = model(tokens(CFG, seed=step).to(device), labels=tokens(CFG, seed=step + 10).to(device)).mean()
        loss.backward()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.usefixtures("megatron_world")
def test_compiled_hc_equals_eager_and_compiles_once_for_every_loop() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    hcm._COMPILED.clear()
    eager_losses, eager = _loss_and_grads("none", steps=2)
    # Three loops, each with its own HC parameters, over two steps: one read graph and one write graph.
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled_losses, compiled = _loss_and_grads("hc", steps=2)
    assert torch.compile.__module__ == "torch"
    assert set(hcm._COMPILED) == {"read", "write"}
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    for name, g in eager.items():
        torch.testing.assert_close(compiled[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_unrolled_sinkhorn_is_the_hand_written_one() -> None:
    """What the compiled graph runs for hc.res=sinkhorn: same values and gradients as the autograd.Function."""
    logits = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    weight = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    outs = []
    for fn in (hcm.sinkhorn, hcm.sinkhorn_unrolled):
        out = fn(logits, 20)
        (grad,) = torch.autograd.grad((out * weight).sum(), logits)
        outs.append((out, grad))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-6, rtol=1e-5)


@pytest.mark.usefixtures("megatron_world")
def test_compiled_blocks_equal_eager() -> None:
    eager_losses, eager = _loss_and_grads("none", steps=2)
    blocks_losses, blocks = _loss_and_grads("blocks", steps=2)
    assert blocks_losses == pytest.approx(eager_losses, abs=1e-5)
    for name, g in eager.items():
        torch.testing.assert_close(blocks[name], g, atol=1e-5, rtol=1e-4, msg=name)
