"""The mHC math on its own (no Megatron)."""

from __future__ import annotations

import pytest
import torch

from hyperloop_dist.model.hyper_connections import (
    HyperConnection,
    collapse_streams,
    expand_streams,
    mix_streams,
    num_hyper_connections,
    sinkhorn,
)

SHAPES = [(1, 1), (2, 2), (4, 4), (8, 8), (3, 5, 4, 4), (16, 2, 6, 6)]


def _assert_doubly_stochastic(out: torch.Tensor) -> None:
    shape = out.shape
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sum(-2), torch.ones(shape[:-2] + shape[-1:]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_sinkhorn_is_doubly_stochastic(shape: tuple[int, ...], scale: float) -> None:
    gen = torch.Generator().manual_seed(len(shape) * 100 + shape[-1] + int(10 * scale))
    _assert_doubly_stochastic(sinkhorn(scale * torch.randn(shape, generator=gen), iters=50))


@pytest.mark.parametrize("shape", SHAPES)
def test_sinkhorn_default_iterations_on_model_like_logits(shape: tuple[int, ...]) -> None:
    """Near init, H_res logits are b_res (= I) + alpha * z W with small alpha: mHC's 20 iterations suffice."""
    gen = torch.Generator().manual_seed(shape[-1])
    logits = torch.eye(shape[-1]) + 0.1 * torch.randn(shape, generator=gen)
    _assert_doubly_stochastic(sinkhorn(logits, iters=20))


def test_sinkhorn_keeps_dtype_and_gradients() -> None:
    logits = torch.randn(4, 4, requires_grad=True)
    sinkhorn(logits, 20).diagonal().sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert sinkhorn(torch.randn(4, 4, dtype=torch.float64), 5).dtype == torch.float64


def _unrolled_sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Plain autograd through every normalization (in log space): the oracle of the hand-written backward."""
    log_p = logits
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
    return log_p.exp()


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_sinkhorn_backward_equals_autograd_through_the_iterations(scale: float) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = scale * torch.randn(6, 5, 4, 4, generator=gen, dtype=torch.float64) + torch.eye(4, dtype=torch.float64)
    weight = torch.randn(logits.shape, generator=gen, dtype=torch.float64)
    ours, oracle = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    (sinkhorn(ours, 20) * weight).sum().backward()
    (_unrolled_sinkhorn(oracle, 20) * weight).sum().backward()
    torch.testing.assert_close(sinkhorn(logits, 20), _unrolled_sinkhorn(logits, 20), atol=1e-12, rtol=0)
    torch.testing.assert_close(ours.grad, oracle.grad, atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(lambda t: sinkhorn(t, 4), logits[:2, :1].clone().requires_grad_())


def test_stream_mixing_gradients() -> None:
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    streams = torch.randn(3, 2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(mix_streams(h, streams), torch.einsum("...ij,...jd->...id", h, streams))
    assert torch.autograd.gradcheck(mix_streams, (h, streams))


def test_expand_collapse_round_trip() -> None:
    x = torch.randn(5, 2, 8)
    s = expand_streams(x, 4)
    assert s.shape == (5, 2, 4, 8)
    torch.testing.assert_close(collapse_streams(s), x)


@pytest.mark.parametrize("res", ["diagonal", "sinkhorn", "identity"])
def test_fresh_hyper_connection_reads_the_mean_and_writes_the_whole_output(res: str) -> None:
    """At init (the paper gives none; docs/model.md): H_pre reads the stream mean, H_post writes F(x) to every
    stream, H_res keeps half of each stream (diagonal), mixes them doubly stochastically (sinkhorn) or keeps
    them (identity). Equal streams stay equal: Y' = r Y + F(x) with r = 0.5, 1, 1."""
    torch.manual_seed(0)
    hc = HyperConnection(hidden_size=8, streams=4, res=res)
    x = torch.randn(3, 2, 8)
    f = torch.nn.Linear(8, 8)
    out = hc(expand_streams(x, 4), lambda h: h + f(h))
    keep = 0.5 if res == "diagonal" else 1.0
    for i in range(4):
        torch.testing.assert_close(out[..., i, :], keep * x + x + f(x), atol=2e-2, rtol=0)  # alphas small, not 0
    h_pre, h_post, h_res = hc.gates(expand_streams(x, 4))
    assert h_pre.shape == (3, 2, 4) and h_post.shape == (3, 2, 4)
    res_params = {n for n, _ in hc.named_parameters()}
    if res == "diagonal":
        assert h_res.shape == (3, 2, 4) and ((h_res > 0) & (h_res < 1)).all()
        assert hc.proj.weight.shape == (12, 32) and hc.bias_res.shape == (4,)
    elif res == "sinkhorn":
        assert h_res.shape == (3, 2, 4, 4) and hc.proj.weight.shape == (24, 32) and hc.bias_res.shape == (4, 4)
        torch.testing.assert_close(h_res.sum(-1), torch.ones(3, 2, 4), atol=1e-5, rtol=0)
    else:
        assert h_res is None and "bias_res" not in res_params and hc.proj.weight.shape == (8, 32)
        assert hc.alpha.shape == (2,)


def test_hyper_connection_counts() -> None:
    assert num_hyper_connections("hyperloop", loops=3, depth=8, per_loop_params=True) == 3
    assert num_hyper_connections("hyperloop", loops=3, depth=8, per_loop_params=False) == 1
    assert num_hyper_connections("mhc", loops=3, depth=8, per_loop_params=True) == 16  # attention + MLP
    assert num_hyper_connections("looped", loops=3, depth=8, per_loop_params=True) == 0
