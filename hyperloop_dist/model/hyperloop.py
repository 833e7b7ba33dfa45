"""The four model kinds on Megatron-core: begin / looped middle / end ``TransformerBlock``s.

The middle block is one ``TransformerBlock`` called L times for the looped kinds, so its weights exist
once. The topology (loops, hyper-connections, loop embeddings) is :func:`run_body`; this file only builds
Megatron modules and knows nothing of ranks beyond what Megatron's layers read from ``parallel_state``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset
from megatron.core.utils import get_pg_rank

from hyperloop_dist.config import ModelConfig
from hyperloop_dist.model.hyper_connections import (
    Block,
    Carry,
    collapse_streams,
    expand_streams,
    loop_boundary,
    num_passes,
    run_body,
)
from hyperloop_dist.model.layout import block_sizes, make_hyper_connections, make_loop_embedding
from hyperloop_dist.parallel import cpu_shim, sequence_parallel
from hyperloop_dist.parallel.sequence_parallel import SequenceParallelTorchNorm
from hyperloop_dist.parallel.tied_embedding import tie_across_stages, tie_in_checkpoint


def transformer_config(cfg: ModelConfig, tp: int = 1, precision: str = "fp32",
                       sequence_parallel: bool = False, fusions: Sequence[str] = ()) -> TransformerConfig:
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
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        sequence_parallel=sequence_parallel,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not cpu_shim.cuda_available(),
        # train.fusions=[swiglu]: SwiGLU as Megatron's fused autograd function, whose pieces are wrapped in
        # its jit_fuser (torch.compile; a plain call on CPU, see hyperloop_dist/__init__.py).
        bias_activation_fusion="swiglu" in fusions,
        # Off: bias-dropout fusion has nothing to fuse here (no biases, no dropout); the other four need Apex
        # or Transformer Engine kernels (the TE spec brings its own on GPU).
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def resolve_attention_backend(backend: str) -> str:
    """``auto`` -> Transformer Engine when it imports on a GPU, else SDPA on a GPU, else Megatron's local one."""
    te_found = cpu_shim.cuda_available() and importlib.util.find_spec("transformer_engine") is not None
    if backend == "auto":
        # CPU keeps the local spec: its losses are this project's recorded reference figures.
        return "te" if te_found else ("sdpa" if cpu_shim.cuda_available() else "local")
    if backend == "te" and not te_found:
        raise ValueError("model.attention_backend='te': Transformer Engine needs a GPU and the "
                         "transformer_engine package; use 'sdpa' or 'local'")
    return backend


def layer_spec(backend: str = "auto") -> tuple[ModuleSpec, type]:
    """(layer spec, norm class) for ``model.attention_backend`` (see :func:`resolve_attention_backend`)."""
    backend = resolve_attention_backend(backend)
    if backend == "te":
        # Megatron's TE extension module imports without TE installed (its names are then undefined).
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(), TENorm
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    # Megatron's torch norm refuses sequence parallelism; ours marks its weight for the SP all-reduce.
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, input_layernorm=SequenceParallelTorchNorm, pre_mlp_layernorm=SequenceParallelTorchNorm))
    if backend == "sdpa":
        from hyperloop_dist.model.attention import SDPAttention

        # Only the core attention changes: the QKV and output projections (and so the checkpoint) stay.
        attn = spec.submodules.self_attention
        attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=SDPAttention))
        spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn))
    return spec, SequenceParallelTorchNorm


@contextlib.contextmanager
def seeded(seed: int, key: str) -> Iterator[None]:
    """Initialize what is built inside from its own seed, derived from (model seed, key).

    Each part of the model then starts from the same weights whichever rank builds it, so every TP / PP
    layout trains the same model as one process (Megatron's CPU init draws a part's full weight, then
    keeps this rank's shard). The surrounding RNG stream is left as it was.
    """
    state = torch.get_rng_state()
    torch.manual_seed(zlib.crc32(f"{seed}/{key}".encode()))
    try:
        yield
    finally:
        torch.set_rng_state(state)


class SeededTransformerLayer(TransformerLayer):
    """A TransformerLayer whose init is seeded by (model seed, block, global layer number)."""

    def __init__(self, config: TransformerConfig, submodules: object, layer_number: int = 1, *,
                 init_seed: int, init_block: str, **kwargs: object) -> None:
        pp = kwargs.get("pg_collection").pp if kwargs.get("pg_collection") is not None else None
        offset = get_transformer_layer_offset(config, kwargs.get("vp_stage"), get_pg_rank(pp))
        with seeded(init_seed, f"{init_block}.layers.{layer_number + offset}"):
            super().__init__(config, submodules, layer_number, **kwargs)


def seeded_spec(spec: ModuleSpec, seed: int, block: str) -> ModuleSpec:
    return ModuleSpec(module=SeededTransformerLayer, submodules=spec.submodules,
                      params={**(spec.params or {}), "init_seed": seed, "init_block": block})


@dataclass(frozen=True)
class Stage:
    """This rank's pipeline stage: which parts of the model it holds."""

    rank: int = 0
    size: int = 1

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1


class HyperloopModel(MegatronModule):
    """Embedding -> :func:`run_body` over Megatron blocks -> RMSNorm -> (tied) LM head.

    ``forward(tokens [b, s])`` returns the full logits ``[b, s, vocab]`` (gathered over TP ranks), or with
    ``labels [b, s]`` the per-token loss ``[b, s]`` (vocab-parallel cross entropy, nothing gathered).

    Under pipeline parallelism (``stage.size > 1``) a rank holds its contiguous slice of the middle block
    (Megatron's own even split of the middle block's layers, so checkpoint keys use global layer numbers);
    the first stage also holds the embedding, the begin block and the hyper-connections (the loop boundary
    runs there), the last stage the end block, final norm and head. ``parallel/pipeline.py`` drives the
    pieces: :meth:`embed`, :meth:`boundary`, :meth:`run_middle`, :meth:`finish`.
    """

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, stage: Stage = Stage(),
                 recompute: bool = False, seed: int = 1234) -> None:
        super().__init__(config=config)
        self.cfg, self.stage, self.recompute = cfg, stage, recompute
        # Read by Megatron's finalize_model_grads (GPTModel's names): with tied embeddings under PP it
        # all-reduces the gradient of shared_embedding_or_output_weight() over the embedding group.
        self.pre_process, self.post_process = stage.first, stage.last
        self.share_embeddings_and_output_weights = cfg.tie_embeddings
        spec, norm_cls = layer_spec(cfg.attention_backend)
        sizes = block_sizes(cfg)

        def block(num_layers: int, name: str) -> TransformerBlock | None:
            if num_layers == 0:
                return None
            # Each block is its own stack for Megatron: an explicit layer list and num_layers = the block's
            # size, which sizes the layer axis of its sharded checkpoint. Init scaling stays that of the full
            # depth (replace() keeps the init methods __post_init__ derived from it).
            sub = TransformerBlockSubmodules(layer_specs=[seeded_spec(spec, seed, name)] * num_layers,
                                             layer_norm=norm_cls)
            block_config = dataclasses.replace(config, num_layers=num_layers, pipeline_model_parallel_size=1)
            return TransformerBlock(block_config, sub, post_layer_norm=False)

        # The middle block is split by Megatron over the pipeline: each stage builds its slice with
        # global layer numbers (layer offset = stage * layers per stage).
        middle_config = dataclasses.replace(config, num_layers=sizes["middle"],
                                            pipeline_model_parallel_size=stage.size)
        self.rotary = RotaryEmbedding(config.kv_channels, rotary_percent=1.0, rotary_base=cfg.rope_base,
                                      use_cpu_initialization=config.use_cpu_initialization)
        self.embedding = self.begin = self.end = self.final_norm = self.output_layer = None
        self.loop_embedding = None
        self.hc = torch.nn.ModuleList()
        if stage.first:
            with seeded(seed, "embedding"):
                self.embedding = LanguageModelEmbedding(config, cfg.vocab_size, cfg.seq_length,
                                                        position_embedding_type="rope")
            self.begin = block(sizes["begin"], "begin")
        self.middle = TransformerBlock(middle_config, seeded_spec(spec, seed, "middle"), post_layer_norm=False)
        if stage.first or cfg.kind == "mhc":
            with seeded(seed, "hc"):
                self.hc = make_hyper_connections(cfg)
            if cfg.kind == "mhc" and stage.size > 1:
                # mHC under PP: each stage keeps the hyper-connections of its own sub-layers, under their
                # global index (``hc.<i>``, the single-process keys, so checkpoints reshard).
                self.hc = torch.nn.ModuleDict({str(i): self.hc[i] for i in mhc_stage_indices(cfg, stage)})
            self.loop_embedding = make_loop_embedding(cfg)
        if stage.last:
            self.end = block(sizes["end"], "end")
            self.final_norm = build_module(norm_cls, config=config, hidden_size=cfg.hidden_size, eps=cfg.norm_eps)
            with seeded(seed, "output_layer"):
                self.output_layer = tensor_parallel.ColumnParallelLinear(
                    cfg.hidden_size, cfg.vocab_size, config=config, init_method=config.init_method, bias=False,
                    gather_output=False, skip_weight_param_allocation=cfg.tie_embeddings and stage.first,
                )
        if cfg.tie_embeddings and stage.size > 1:
            tie_across_stages(self)
        if config.sequence_parallel:  # applied to this rank's tokens only: gradients summed over TP
            sequence_parallel.mark([*self.hc.parameters(), *([self.loop_embedding] if self.loop_embedding is not None
                                                             else [])])
        # Every parameter in the training dtype (HC, loop embedding too): Megatron's mixed-precision optimizer
        # maps its fp32 master copies to model parameters assuming all of them are half precision.
        if config.params_dtype != torch.float32:
            for p in self.parameters():
                p.data = p.data.to(config.params_dtype)

    def shared_embedding_or_output_weight(self) -> torch.nn.Parameter | None:
        """The tied embedding on this stage: the embedding (first stage) or the head's copy (last stage)."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight if self.post_process else None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None,
                           ) -> dict:
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.cfg.tie_embeddings and self.stage.size > 1:
            tie_in_checkpoint(self, state, prefix)
        return state

    def blocks(self) -> list[TransformerBlock]:
        return [b for b in (self.begin, self.middle, self.end) if b is not None]

    def _run(self, blk: TransformerBlock, x: torch.Tensor) -> torch.Tensor:
        seq = sequence_parallel.full_length(self.config, x)
        return blk(x, attention_mask=cpu_shim.causal_mask(seq), rotary_pos_emb=self.rotary(seq))

    def _run_mhc(self, blk: TransformerBlock | None, state: torch.Tensor, first_layer: int) -> torch.Tensor:
        """mHC under PP: the n-stream state through ``blk``'s sub-layers, each in its hyper-connection
        (``first_layer``: global index of the block's first layer in the whole stack)."""
        if blk is None:
            return state
        for i, layer in enumerate(blk.layers):
            local = layer.layer_number - 1 if blk is self.middle else i  # the middle slice numbers globally
            for j, branch in enumerate(sub_layer_branches(layer, self.rotary)):
                state = self.hc[str(2 * (first_layer + local) + j)](state, branch)
        return state

    def run_middle(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's middle block (slice); with recompute, activations are kept per loop pass only."""
        if self.cfg.kind == "mhc":
            return self._run_mhc(self.middle, x, self.cfg.begin_layers)
        if self.recompute and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._run, self.middle, x, use_reentrant=False)
        return self._run(self.middle, x)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """First stage: embeddings through the begin block, ``[s, b, d]``."""
        x = self.embedding(tokens, position_ids=None)
        if self.cfg.kind == "mhc":  # (pipelined only) the n-stream state through the begin block
            return self._run_mhc(self.begin, expand_streams(x, self.cfg.hc.streams), 0)
        return x if self.begin is None else self._run(self.begin, x)

    def boundary(self, loop: int, carry: Carry, y: torch.Tensor) -> tuple[Carry, torch.Tensor]:
        """First stage: the loop boundary before pass ``loop`` (hyper-connection read / write)."""
        cfg = self.cfg
        return loop_boundary(cfg.kind, loop, num_passes(cfg.kind, cfg.loops), carry, y, list(self.hc),
                             self.loop_embedding, cfg.hc.streams)

    def finish(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Last stage: end block, norm and head; logits ``[b, s, vocab]`` or per-token loss ``[b, s]``."""
        if self.cfg.kind == "mhc":  # (pipelined only) ``x`` is the n-stream state
            end = self._run_mhc(self.end, x, self.cfg.begin_layers + block_sizes(self.cfg)["middle"])
            return self.head(collapse_streams(end), labels)
        return self.head(x if self.end is None else self._run(self.end, x), labels)

    def head(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Last stage: final norm and LM head (see :meth:`finish`)."""
        x = self.final_norm(x)
        weight = self.embedding.word_embeddings.weight if self.output_layer.weight is None else None
        logits, _ = self.output_layer(x, weight=weight)
        if labels is None:
            return tensor_parallel.gather_from_tensor_model_parallel_region(logits).transpose(0, 1).contiguous()
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())
        return loss.transpose(0, 1).contiguous()

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                pieces: Callable[[HyperloopModel, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
                ) -> torch.Tensor:
        """The whole model on one pipeline stage.

        With ``pieces``, returns ``pieces(self, tokens, labels)`` instead: code that calls the model's parts
        one by one (the per-loop readout) runs inside this forward, so a sharding engine (ZeRO-3, FSDP)
        gathers the root's parameters for it exactly as for a normal forward.
        """
        if pieces is not None:
            return pieces(self, tokens, labels)
        cfg = self.cfg
        assert self.stage.size == 1, "a pipelined model runs through parallel/pipeline.py"
        x = self.embedding(tokens, position_ids=None)
        branches = [f for blk in self.blocks() for layer in blk.layers for f in sub_layer_branches(layer, self.rotary)]
        x = run_body(
            cfg.kind, x,
            begin=None if self.begin is None else (lambda h: self._run(self.begin, h)),
            middle=self.run_middle,
            end=None,
            loops=cfg.loops, layers=branches, hcs=list(self.hc),
            loop_embedding=self.loop_embedding, streams=cfg.hc.streams,
        )
        if cfg.kind == "mhc":  # mhc's layers include the end block's; finish() must not run it again
            return self.head(x, labels)
        return self.finish(x, labels)


def mhc_stage_indices(cfg: ModelConfig, stage: Stage) -> range:
    """Global indices of the hyper-connections of ``stage``'s sub-layers (two per layer) in an mHC stack."""
    sizes = block_sizes(cfg)
    per_stage = sizes["middle"] // stage.size
    start = 0 if stage.first else 2 * (sizes["begin"] + stage.rank * per_stage)
    stop = 2 * (sizes["begin"] + (stage.rank + 1) * per_stage + (sizes["end"] if stage.last else 0))
    return range(start, stop)


def sub_layer_branches(layer: TransformerLayer, rotary: RotaryEmbedding) -> tuple[Block, Block]:
    """A Megatron layer's two residual-free branches, ``attn(norm(x))`` and ``mlp(norm(x))``: what the mHC
    baseline wraps, one hyper-connection each. The layer's own modules, called from outside: with the
    Transformer-Engine spec ``input_layernorm`` is an identity and the norm is fused into ``linear_qkv``."""

    def attention(h: torch.Tensor) -> torch.Tensor:
        seq = sequence_parallel.full_length(layer.config, h)
        out, bias = layer.self_attention(layer.input_layernorm(h), attention_mask=cpu_shim.causal_mask(seq),
                                         rotary_pos_emb=rotary(seq))
        return out if bias is None else out + bias

    def mlp(h: torch.Tensor) -> torch.Tensor:
        out, bias = layer.mlp(layer.pre_mlp_layernorm(h))
        return out if bias is None else out + bias

    return attention, mlp


def build_model(cfg: ModelConfig, tp: int = 1, stage: Stage = Stage(), precision: str = "fp32",
                recompute: bool = False, seed: int = 1234, fusions: Sequence[str] = (),
                sequence_parallel: bool = False) -> HyperloopModel:
    """Build the Megatron model (this rank's stage of it) once ``parallel_state`` is initialized."""
    config = transformer_config(cfg, tp=tp, precision=precision, sequence_parallel=sequence_parallel,
                                fusions=fusions)
    model = HyperloopModel(dataclasses.replace(cfg), config, stage, recompute, seed)
    if cfg.compile == "blocks":
        compile_layer_parts(model)
    # Megatron creates its layers on the GPU when there is one; our own parameters (HC, loop embedding) follow.
    return model.cuda() if cpu_shim.cuda_available() else model


def compile_layer_parts(model: HyperloopModel) -> None:
    """``model.compile=blocks``: each layer's norms, core attention and MLP compiled in place (state-dict
    names unchanged; layers of one shape share the graphs). Never the whole ``TransformerLayer``: its RNG
    tracker, NVTX ranges and ``main_grad`` hooks break graphs.
    """
    for blk in model.blocks():
        for layer in blk.layers:
            for part in (layer.input_layernorm, layer.self_attention.core_attention, layer.pre_mlp_layernorm,
                         layer.mlp):
                part.compile()
