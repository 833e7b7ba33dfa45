"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for Megatron's local spec.

Megatron-core's local ``DotProductAttention`` materialises the ``[b, heads, s, s]`` score matrix (baddbmm,
an fp32 softmax, bmm) and keeps it for the backward: about half a GiB per layer at s = 2048. Transformer
Engine's fused attention avoids that but is a source build. torch's SDPA ships flash, cuDNN and
memory-efficient kernels, so :class:`SDPAttention` plugs in as
``submodules.self_attention.submodules.core_attention`` with the same constructor and forward interface and
the same result (``tests/test_attention.py`` compares the two).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

try:  # torch >= 2.3; the CUDA kernel preference below is an optimisation, not a requirement
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover
    SDPBackend = sdpa_kernel = None

# Flash first: it handles the head sizes of our recipes (64 to 128) in bf16 and is torch's own build. cuDNN
# is often as fast on Hopper; benchmarks/gpu_check.sh times both so the order can follow a measurement.
CUDA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def _cuda_kernels() -> contextlib.AbstractContextManager:
    if sdpa_kernel is None:
        return contextlib.nullcontext()
    backends = [getattr(SDPBackend, name) for name in CUDA_BACKENDS if hasattr(SDPBackend, name)]
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # torch without set_priority: allow them all, in torch's own order
        return sdpa_kernel(backends)


class SDPAttention(MegatronModule):
    """Causal (or masked) softmax attention of one tensor-parallel rank's heads, via torch SDPA.

    Megatron's notation: ``query [sq, b, np, hn]``, ``key`` / ``value [sk, b, ng, hn]`` (``ng`` query groups,
    ``np`` a multiple of it), result ``[sq, b, np * hn]``. No parameters, so checkpoints are the same as with
    Megatron's ``DotProductAttention``.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: ProcessGroupCollection | None = None) -> None:
        super().__init__(config=config)
        # Refuse what this module does not implement rather than compute something else silently.
        if config.context_parallel_size != 1:
            raise ValueError("model.attention_backend='sdpa' does not support context parallelism; use 'te'")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"model.attention_backend='sdpa': softmax_type={config.softmax_type!r} is not "
                             "supported (only 'vanilla')")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("model.attention_backend='sdpa': sliding-window attention is not supported")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"model.attention_backend='sdpa': attention_dropout={dropout} is not supported "
                             "(our models train without it)")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        if config.num_attention_heads % tp or config.num_query_groups % tp:
            raise ValueError(f"tensor-parallel size {tp} must divide the heads ({config.num_attention_heads}) "
                             f"and query groups ({config.num_query_groups})")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        # Megatron's query-key layer scaling divides the scores by the layer number and multiplies them back
        # inside its fp32 softmax: the net scale is this one.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: Any = None,
                **kwargs: Any) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("model.attention_backend='sdpa': packed sequences and attention bias "
                                      "are not supported; use 'te'")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b, heads, hn = query.shape
        sk = key.shape[0]
        # [s, b, h, hn] -> [b, h, s, hn]: SDPA's layout, a view (the kernels need only hn contiguous).
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        causal = False
        if mask_type == AttnMaskType.causal:
            if sq == sk:
                causal = True
            else:
                # SDPA's is_causal aligns the mask top-left; Megatron's causal mask is bottom-right (queries are
                # the last sq positions of the keys), so build that one.
                mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(diagonal=sk - sq)
        elif attention_mask is not None:
            mask = ~attention_mask  # Megatron: True = masked out; SDPA: True = may attend
        gqa = key.shape[2] != heads
        extra = {"enable_gqa": True} if gqa else {}
        with _cuda_kernels() if query.is_cuda else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                 scale=self.softmax_scale, **extra)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)
