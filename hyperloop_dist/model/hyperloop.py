"""The four model kinds on Megatron-core: begin / looped middle / end ``TransformerBlock``s.

The middle block is one ``TransformerBlock`` called L times for the looped kinds, so its weights exist
once. The topology (loops, hyper-connections, loop embeddings) is :func:`run_body`; this file only builds
Megatron modules and knows nothing of ranks beyond what Megatron's layers read from ``parallel_state``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from hyperloop_dist.config import ModelConfig
from hyperloop_dist.model.hyper_connections import run_body
from hyperloop_dist.model.layout import block_sizes, make_hyper_connections, make_loop_embedding
from hyperloop_dist.parallel import cpu_shim


def transformer_config(cfg: ModelConfig, tp: int = 1, pp: int = 1, precision: str = "fp32",
                       sequence_parallel: bool = False) -> TransformerConfig:
    """Megatron's TransformerConfig for our layers (RMSNorm, SwiGLU, RoPE, no biases, no dropout)."""
    bf16 = precision == "bf16"
    return TransformerConfig(
        num_layers=cfg.effective_depth,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        num_query_groups=cfg.query_groups,
        ffn_hidden_size=cfg.ffn_size,
        kv_channels=cfg.hidden_size // cfg.num_heads,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not cpu_shim.cuda_available(),
        # Fusions that need CUDA kernels; the TE spec brings its own on GPU.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def layer_spec() -> tuple[ModuleSpec, type]:
    """(layer spec, norm class): Transformer Engine's when it imports on a GPU, else Megatron's local one."""
    if cpu_shim.cuda_available():
        try:
            from megatron.core.extensions.transformer_engine import TENorm
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

            return get_gpt_layer_with_transformer_engine_spec(), TENorm
        except ImportError:
            pass
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return get_gpt_layer_local_spec(normalization="RMSNorm"), WrappedTorchNorm


class HyperloopModel(MegatronModule):
    """Embedding -> :func:`run_body` over Megatron blocks -> RMSNorm -> (tied) LM head.

    ``forward(tokens [b, s])`` returns the full logits ``[b, s, vocab]`` (gathered over TP ranks), or with
    ``labels [b, s]`` the per-token loss ``[b, s]`` (vocab-parallel cross entropy, nothing gathered).
    """

    def __init__(self, cfg: ModelConfig, config: TransformerConfig) -> None:
        super().__init__(config=config)
        self.cfg = cfg
        spec, norm_cls = layer_spec()
        sizes = block_sizes(cfg)

        def block(num_layers: int) -> TransformerBlock | None:
            if num_layers == 0:
                return None
            # Each block is its own stack for Megatron: an explicit layer list (Megatron's per-stage count
            # would split the whole depth) and num_layers = the block's size, which sizes the layer axis of
            # its sharded checkpoint. Init scaling stays that of the full depth (replace() keeps the
            # init methods __post_init__ derived from it).
            sub = TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=norm_cls)
            return TransformerBlock(dataclasses.replace(config, num_layers=num_layers), sub, post_layer_norm=False)

        self.embedding = LanguageModelEmbedding(config, cfg.vocab_size, cfg.seq_length, position_embedding_type="rope")
        self.rotary = RotaryEmbedding(config.kv_channels, rotary_percent=1.0, rotary_base=cfg.rope_base,
                                      use_cpu_initialization=config.use_cpu_initialization)
        self.begin = block(sizes["begin"])
        self.middle = block(sizes["middle"])
        self.end = block(sizes["end"])
        self.hc = make_hyper_connections(cfg)
        self.loop_embedding = make_loop_embedding(cfg)
        self.final_norm = build_module(norm_cls, config=config, hidden_size=cfg.hidden_size, eps=cfg.norm_eps)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size, cfg.vocab_size, config=config, init_method=config.init_method, bias=False,
            gather_output=False, skip_weight_param_allocation=cfg.tie_embeddings,
        )
        if config.params_dtype != torch.float32:
            self.hc.to(config.params_dtype)

    def blocks(self) -> list[TransformerBlock]:
        return [b for b in (self.begin, self.middle, self.end) if b is not None]

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final normalized hidden states ``[s, b, d]``."""
        cfg = self.cfg
        x = self.embedding(tokens, position_ids=None)
        rope = self.rotary(tokens.shape[1])
        mask = cpu_shim.causal_mask(tokens.shape[1])

        def run_block(blk: TransformerBlock):
            return lambda h: blk(h, attention_mask=mask, rotary_pos_emb=rope)

        layers = [
            (lambda h, layer=layer: layer(h, attention_mask=mask, rotary_pos_emb=rope)[0])
            for blk in self.blocks() for layer in blk.layers
        ]
        x = run_body(
            cfg.kind, x,
            begin=None if self.begin is None else run_block(self.begin),
            middle=run_block(self.middle),
            end=None if self.end is None else run_block(self.end),
            loops=cfg.loops, layers=layers, hcs=list(self.hc),
            loop_embedding=self.loop_embedding, streams=cfg.hc.streams,
        )
        return self.final_norm(x)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.embedding.word_embeddings.weight if self.cfg.tie_embeddings else None
        logits, _ = self.output_layer(self.hidden(tokens), weight=weight)
        if labels is None:
            return tensor_parallel.gather_from_tensor_model_parallel_region(logits).transpose(0, 1).contiguous()
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())
        return loss.transpose(0, 1).contiguous()


def build_model(cfg: ModelConfig, tp: int = 1, pp: int = 1, precision: str = "fp32") -> HyperloopModel:
    """Build the Megatron model for this rank (``parallel_state`` must be initialized)."""
    config = transformer_config(cfg, tp=tp, pp=pp, precision=precision)
    return HyperloopModel(dataclasses.replace(cfg), config)
