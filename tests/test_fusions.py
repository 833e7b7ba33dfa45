"""Torch-only fusions (hyperloop_dist/fusions.py): each gives the same training as without it, on CPU."""

from __future__ import annotations

import pytest
import torch

from hyperloop_dist.config import load_config

from .conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("megatron_world")


class _Batches:
    def __init__(self, vocab: int, seq: int) -> None:
        tokens = torch.randint(0, vocab, (4, seq + 1), generator=torch.Generator().manual_seed(0))
        self.batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())

    def next(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch


def _train(fused: bool, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    from hyperloop_dist.fusions import use_fused_adamw
    from hyperloop_dist.parallel.distributed import RankInfo
    from hyperloop_dist.train.engines.megatron import MegatronEngine

    cfg = load_config(None, [*TINY_MODEL, "parallel.nproc_per_node=1", "optim.warmup_steps=0",
                             "logging.wandb_mode=disabled"])
    torch.manual_seed(0)
    engine = MegatronEngine(cfg, RankInfo(0, 1, 0, 0, 1))
    if fused:
        assert use_fused_adamw(engine.optimizer) > 0
    data = _Batches(cfg.model.vocab_size, cfg.model.seq_length)
    losses = []
    for step in range(1, steps + 1):
        losses.append(engine.step([data.next(step, 0)], step, None).loss)
        engine.scheduler.step(1)
    return losses, {n: p.detach().clone() for n, p in engine.model.named_parameters()}


def test_fused_adamw_trains_like_megatrons_default() -> None:
    plain_losses, plain = _train(fused=False)
    fused_losses, fused = _train(fused=True)
    assert fused_losses == pytest.approx(plain_losses, abs=1e-6)
    for name, p in plain.items():
        torch.testing.assert_close(fused[name], p, atol=1e-6, rtol=1e-5, msg=name)


def test_fused_adamw_refuses_an_optimizer_that_has_stepped() -> None:
    from hyperloop_dist.fusions import use_fused_adamw

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(3)
    opt.step()
    with pytest.raises(RuntimeError, match="already stepped"):
        use_fused_adamw(opt)
