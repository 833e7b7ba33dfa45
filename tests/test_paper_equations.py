"""The Hyperloop forward written from the paper's equations (section 3), one stream and one loop at a time.

Deliberately independent of the implementation's topology code: no ``run_body``, ``loop_boundary`` or
``HyperConnection``; the hyper-connection parameters are read from the state dict by name and every gate
is computed per stream. ``F`` is the reference model's middle block (its layers, with their own skips).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hyperloop_dist.config import HCConfig, ModelConfig
from hyperloop_dist.model.reference import ReferenceModel, from_megatron_state_dict, rope_tables

pytestmark = pytest.mark.usefixtures("megatron_world")

CFG = ModelConfig(kind="hyperloop", hidden_size=32, num_heads=4, vocab_size=96, seq_length=16, begin_layers=1,
                  middle_layers=2, end_layers=1, loops=3, tie_embeddings=False)
EPS = 1e-6  # the hyper-connection's RMSNorm epsilon


def paper_forward(model: ReferenceModel, cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, s, vocab]`` from PAPER section 3, with explicit loops over loops and streams."""
    p = dict(model.named_parameters())
    n, res = cfg.hc.streams, cfg.hc.res_for(cfg.kind)
    angles = rope_tables(tokens.shape[1], cfg.hidden_size // cfg.num_heads, cfg.rope_base)
    x = model.embedding.word_embeddings(tokens).transpose(0, 1)  # [s, b, C]
    x_begin = model.begin(x, angles) if model.begin is not None else x
    streams = [x_begin.clone() for _ in range(n)]  # Y(0): n copies of the begin block's output
    for loop in range(cfg.loops):
        k = loop if cfg.hc.per_loop_params else 0
        w, a = p[f"hc.{k}.proj.weight"], p[f"hc.{k}.alpha"]
        flat = torch.cat(streams, dim=-1)  # flatten(Y_t): stream 0's C values, then stream 1's, ...
        z = flat / torch.sqrt(flat.pow(2).mean(-1, keepdim=True) + EPS)
        proj = [z @ w[row] for row in range(w.shape[0])]  # one scalar per token for each row of W
        h_pre = [torch.sigmoid(a[0] * proj[i] + p[f"hc.{k}.bias_pre"][i]) for i in range(n)]
        h_post = [2 * torch.sigmoid(a[1] * proj[n + i] + p[f"hc.{k}.bias_post"][i]) for i in range(n)]
        block_in = sum(h_pre[i].unsqueeze(-1) * streams[i] for i in range(n))
        out = model.middle(block_in, angles)  # F(x): the whole middle block
        if model.loop_embedding is not None:
            out = out + model.loop_embedding[loop]
        if res == "identity":
            carried = streams
        elif res == "diagonal":
            gate = [torch.sigmoid(a[2] * proj[2 * n + i] + p[f"hc.{k}.bias_res"][i]) for i in range(n)]
            carried = [gate[i].unsqueeze(-1) * streams[i] for i in range(n)]
        else:
            h = _sinkhorn([[a[2] * proj[2 * n + i * n + j] + p[f"hc.{k}.bias_res"][i, j] for j in range(n)]
                           for i in range(n)], cfg.hc.sinkhorn_iters)
            carried = [sum(h[i][j].unsqueeze(-1) * streams[j] for j in range(n)) for i in range(n)]
        streams = [carried[i] + h_post[i].unsqueeze(-1) * out for i in range(n)]
    x_end = sum(streams) / n  # averaged before the end block
    hidden = model.final_norm(model.end(x_end, angles) if model.end is not None else x_end)
    return (hidden @ model.output_layer.weight.T).transpose(0, 1)


def _sinkhorn(logits: list[list[torch.Tensor]], iters: int) -> list[list[torch.Tensor]]:
    """exp, then alternately normalize rows and columns (mHC's Sinkhorn-Knopp), entry by entry."""
    n = len(logits)
    m = [[logits[i][j].exp() for j in range(n)] for i in range(n)]
    for _ in range(iters):
        m = [[m[i][j] / sum(m[i]) for j in range(n)] for i in range(n)]
        cols = [sum(m[i][j] for i in range(n)) for j in range(n)]
        m = [[m[i][j] / cols[j] for j in range(n)] for i in range(n)]
    return m


@pytest.mark.parametrize("res", ["diagonal", "sinkhorn", "identity"])
@pytest.mark.parametrize("per_loop", [True, False])
def test_megatron_and_reference_follow_the_papers_equations(res: str, per_loop: bool) -> None:
    from hyperloop_dist.model.hyperloop import build_model

    cfg = dataclasses.replace(CFG, hc=HCConfig(res=res, per_loop_params=per_loop, alpha_init=0.5))
    megatron = build_model(cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # move every HC parameter and e_l off its init, so each one acts
        for name, param in megatron.named_parameters():
            if name.startswith("hc.") or name == "loop_embedding":
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    reference = ReferenceModel(cfg)
    reference.load_state_dict(from_megatron_state_dict(megatron.state_dict()), strict=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=gen)
    with torch.no_grad():
        expected = paper_forward(reference, cfg, tokens)
        torch.testing.assert_close(reference(tokens), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(megatron(tokens), expected, atol=1e-5, rtol=0)
    assert expected.abs().max() > 0.1 and math.isfinite(float(expected.sum()))


def test_checkpoints_and_releases_of_the_earlier_form_are_refused(tmp_path) -> None:
    import json

    from hyperloop_dist.checkpoint.store import CheckpointError
    from hyperloop_dist.checkpoint.training_state import check_compatible
    from hyperloop_dist.config import Config
    from hyperloop_dist.export.release import release_config

    with pytest.raises(CheckpointError, match="format version 2 holds the earlier model form.*diagonal sigmoid"):
        check_compatible({"format_version": 2, "model": {}}, Config(), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "hyperloop-release-1", "model": {}}))
    with pytest.raises(CheckpointError, match="hyperloop-release-1 release holds the earlier model form"):
        release_config(tmp_path)
