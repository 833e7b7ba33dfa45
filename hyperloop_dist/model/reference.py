"""The same network as ``hyperloop.py`` in plain PyTorch: the test oracle and the loader for releases.

Name mapping from the Megatron model's (TP=1, PP=1) state dict: parameter names are identical for the
local layer spec, so a Megatron state dict loads with ``load_state_dict`` after
:func:`from_megatron_state_dict`, which

* drops Megatron's ``*._extra_state`` entries (Transformer Engine bookkeeping, no tensors we need), and
* maps the Transformer-Engine spec's fused-norm names:
  ``*.self_attention.linear_qkv.layer_norm_weight -> *.input_layernorm.weight`` and
  ``*.mlp.linear_fc1.layer_norm_weight -> *.pre_mlp_layernorm.weight``.

Layouts (same as Megatron): ``linear_qkv.weight`` is ``[groups * (heads/groups + 2) * head_dim, hidden]``
with each query group's ``q`` heads, then its ``k``, then its ``v``; ``linear_fc1.weight`` is
``[2 * ffn, hidden]`` with the SiLU gate rows first and the up-projection rows second. Parameter names:

=================================================  ==========================================
``embedding.word_embeddings.weight``               token embedding ``[vocab, hidden]``
``{begin,middle,end}.layers.{i}.*``                 Transformer layers (see above)
``hc.{k}.proj.weight / alpha / bias_*``             hyper-connections (hyperloop: one per loop; mhc: 2k
                                                    around layer k's attention, 2k+1 around its MLP)
``loop_embedding``                                  ``[loops, hidden]`` (looped kinds, optional)
``final_norm.weight``                               final RMSNorm
``output_layer.weight``                             LM head (absent when embeddings are tied)
=================================================  ==========================================
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hyperloop_dist.config import ModelConfig
from hyperloop_dist.model.hyper_connections import LOOPED_KINDS, num_passes, run_body
from hyperloop_dist.model.layout import block_sizes, make_hyper_connections, make_loop_embedding

# A key/value cache slot for one attention call: (cache, slot index). The cache is anything with
# ``update(keys, values, index) -> (all keys, all values)`` and ``get_seq_length()``, in practice
# ``export/loop_cache.py``'s LoopKVCache: slots are numbered in the forward's call order, see
# :meth:`ReferenceModel.cache_layout`.
KVSlot = tuple[Any, int]


def rope_tables(seq_len: int, head_dim: int, base: float, device: torch.device | None = None,
                start: int = 0) -> torch.Tensor:
    """RoPE angles ``[s, 1, 1, head_dim]`` of positions ``start .. start + s - 1`` (non-interleaved halves),
    as Megatron's RotaryEmbedding."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    positions = torch.arange(start, start + seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(positions, inv_freq)
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


def apply_rope(t: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    half1, half2 = t.chunk(2, dim=-1)
    rotated = torch.cat((-half2, half1), dim=-1)
    return t * angles.cos().to(t.dtype) + rotated * angles.sin().to(t.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.groups = cfg.num_heads, cfg.query_groups
        self.head_dim = cfg.hidden_size // cfg.num_heads
        qkv_out = self.groups * (self.heads // self.groups + 2) * self.head_dim
        self.linear_qkv = nn.Linear(cfg.hidden_size, qkv_out, bias=False)
        self.linear_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, angles: torch.Tensor, kv: KVSlot | None = None) -> torch.Tensor:
        """``x [s, b, d]`` at the positions of ``angles``; with ``kv``, the cached earlier positions' keys and
        values are attended to as well and this call's are appended to them."""
        s, b, _ = x.shape
        per_group = self.heads // self.groups
        qkv = self.linear_qkv(x).view(s, b, self.groups, (per_group + 2) * self.head_dim)
        q, k, v = qkv.split((per_group * self.head_dim, self.head_dim, self.head_dim), dim=-1)
        q = q.reshape(s, b, self.heads, self.head_dim)
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        if kv is None:
            # [s, b, h, d] -> [b, h, s, d]; GQA: each group's k/v serves its per_group query heads.
            k = k.repeat_interleave(per_group, dim=2).permute(1, 2, 0, 3)
            v = v.repeat_interleave(per_group, dim=2).permute(1, 2, 0, 3)
        else:  # the cache keeps the groups' k/v ([b, groups, s, d]): per_group times smaller
            cache, slot = kv
            k, v = cache.update(k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), slot)
            k, v = k.repeat_interleave(per_group, dim=1), v.repeat_interleave(per_group, dim=1)
        q = q.permute(1, 2, 0, 3)
        sq, sk = q.shape[2], k.shape[2]
        mask = None  # one new query sees every cached key; sq == sk is plain causal
        if 1 < sq < sk:  # queries are the last sq positions: causal aligned bottom-right
            mask = torch.ones(sq, sk, dtype=torch.bool, device=x.device).tril(diagonal=sk - sq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=sq == sk)
        return self.linear_proj(out.permute(2, 0, 1, 3).reshape(s, b, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_size, bias=False)
        self.linear_fc2 = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attention = Attention(cfg)
        self.pre_mlp_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def attention_branch(self, x: torch.Tensor, angles: torch.Tensor, kv: KVSlot | None = None) -> torch.Tensor:
        """``attn(norm(x))``: the sub-layer without its residual add (what an mHC hyper-connection wraps)."""
        return self.self_attention(self.input_layernorm(x), angles, kv)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pre_mlp_layernorm(x))

    def forward(self, x: torch.Tensor, angles: torch.Tensor, kv: KVSlot | None = None) -> torch.Tensor:
        x = x + self.attention_branch(x, angles, kv)
        return x + self.mlp_branch(x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, angles: torch.Tensor, cache: Any = None, first_slot: int = 0) -> torch.Tensor:
        """With ``cache``, layer i uses cache slot ``first_slot + i``."""
        for i, layer in enumerate(self.layers):
            x = layer(x, angles, None if cache is None else (cache, first_slot + i))
        return x


class ReferenceModel(nn.Module):
    """Plain-PyTorch twin of :class:`hyperloop_dist.model.hyperloop.HyperloopModel` (all four kinds)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        sizes = block_sizes(cfg)
        self.embedding = nn.Module()
        self.embedding.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.begin = Block(cfg, sizes["begin"]) if sizes["begin"] else None
        self.middle = Block(cfg, sizes["middle"])
        self.end = Block(cfg, sizes["end"]) if sizes["end"] else None
        self.hc: nn.ModuleList = make_hyper_connections(cfg)
        self.loop_embedding = make_loop_embedding(cfg)
        self.final_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.output_layer = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, param in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "final_norm.weight":
                continue
            if name.startswith("hc.") or name == "loop_embedding":
                continue  # HyperConnection / loop embedding keep their own identity-like init
            nn.init.normal_(param, std=std)

    def blocks(self) -> list[Block]:
        return [b for b in (self.begin, self.middle, self.end) if b is not None]

    def inference_loops(self, loops: int | None) -> int:
        """The loop count to run: ``loops`` (1 .. trained, looped kinds only) or, when None, the trained one.
        Fewer loops exit through the collapse, end block and head: ``eval/loops.py``'s per-loop readout."""
        cfg = self.cfg
        if loops is None or loops == cfg.loops:
            return cfg.loops
        if not cfg.looped:
            raise ValueError(f"num_loops_inference={loops}: a {cfg.kind} model unrolls its {cfg.loops} loops into "
                             f"distinct layers; only {', '.join(LOOPED_KINDS)} models run fewer loops")
        if not 1 <= loops <= cfg.loops:
            raise ValueError(f"num_loops_inference={loops}: must be between 1 and the trained loops {cfg.loops}")
        return loops

    def cache_layout(self, loops: int | None = None) -> tuple[int, int, int, int]:
        """``(begin, middle, passes, end)`` layer counts: a key/value cache has one slot per attention call
        of a forward, in call order: begin layers, then middle layer m of pass p at
        ``begin + p * middle + m``, then end layers. Looped kinds run their one middle block ``passes`` times;
        the others unroll it (one pass over ``loops * middle_layers`` distinct layers)."""
        loops = self.inference_loops(loops)
        return (len(self.begin.layers) if self.begin is not None else 0, len(self.middle.layers),
                num_passes(self.cfg.kind, loops), len(self.end.layers) if self.end is not None else 0)

    def angles(self, seq_len: int, device: torch.device, start: int = 0) -> torch.Tensor:
        cfg = self.cfg
        return rope_tables(seq_len, cfg.hidden_size // cfg.num_heads, cfg.rope_base, device, start)

    def hidden(self, tokens: torch.Tensor, cache: Any = None, loops: int | None = None) -> torch.Tensor:
        """Final hidden states ``[s, b, d]`` for tokens ``[b, s]``, run for ``loops`` loops (default: as
        trained). With ``cache`` (see :meth:`cache_layout`) the tokens follow the cached positions."""
        cfg = self.cfg
        loops = self.inference_loops(loops)
        begin, middle, passes, _ = self.cache_layout(loops)
        x = self.embedding.word_embeddings(tokens).transpose(0, 1)
        angles = self.angles(tokens.shape[1], x.device, 0 if cache is None else cache.get_seq_length())
        layers = [layer for blk in self.blocks() for layer in blk.layers]  # mhc: slot i is layer i
        branches = [f for i, layer in enumerate(layers)
                    for f in (lambda h, layer=layer, i=i: layer.attention_branch(h, angles, None if cache is None
                                                                                  else (cache, i)),
                              layer.mlp_branch)]
        pass_index = itertools.count()  # run_body calls the middle block once per pass, in order
        x = run_body(
            cfg.kind, x,
            begin=None if self.begin is None else (lambda h: self.begin(h, angles, cache, 0)),
            middle=lambda h: self.middle(h, angles, cache, begin + next(pass_index) * middle),
            end=None if self.end is None else (lambda h: self.end(h, angles, cache, begin + passes * middle)),
            loops=loops, layers=branches, hcs=list(self.hc),
            loop_embedding=self.loop_embedding, streams=cfg.hc.streams,
        )
        return self.final_norm(x)

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's ``[vocab, hidden]`` weight: the embedding's when tied."""
        return self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight

    def forward(self, tokens: torch.Tensor, cache: Any = None, loops: int | None = None) -> torch.Tensor:
        """Logits ``[b, s, vocab]`` for tokens ``[b, s]`` (``cache`` and ``loops`` as :meth:`hidden`)."""
        return F.linear(self.hidden(tokens, cache, loops), self.head_weight).transpose(0, 1)


def from_megatron_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a (TP=1, PP=1 or consolidated) Megatron state dict to :class:`ReferenceModel` names."""
    renames = {
        ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
        ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
    }
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("_extra_state") or tensor is None:
            continue
        for old, new in renames.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
        out[name] = tensor
    return out

