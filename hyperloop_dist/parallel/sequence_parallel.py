"""Megatron sequence parallelism (``parallel.sequence_parallel``) for the Hyperloop's own pieces.

With SP the activations between layers are split along the sequence over the TP ranks (``[s/tp, b, d]``):
Megatron's column-parallel inputs all-gather them, its row-parallel outputs reduce-scatter. Everything
that runs between the layers then sees only this rank's tokens:

* the RMSNorms (the layers' and the final one),
* the hyper-connections (read / write, the gates, Sinkhorn: all per token) and the loop embedding
  (added to every token): the loop boundary runs on the sequence shard as it is, no gather needed,
  so the n-stream residual is split over TP too.

Their parameters are replicated over TP but each rank's gradient covers its tokens only, so they are
marked ``sequence_parallel``: Megatron's ``finalize_model_grads`` all-reduces such gradients over the TP
group (``_allreduce_non_tensor_model_parallel_grads``), giving the gradient over the whole sequence.
The pipeline sends ``[s/tp, b, d]`` between stages (Megatron's own SP + PP behaviour).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SequenceParallelTorchNorm:
    """Megatron's ``WrappedTorchNorm`` (which refuses SP) with its parameters marked for the SP all-reduce."""

    def __new__(cls, config: object, hidden_size: int, eps: float = 1e-5, **kwargs: object) -> torch.nn.Module:
        import dataclasses

        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        sp = config.sequence_parallel
        norm = WrappedTorchNorm(dataclasses.replace(config, sequence_parallel=False) if sp else config,
                                hidden_size, eps, **kwargs)
        mark(norm.parameters(), sp)
        return norm


def mark(params: Iterable[torch.nn.Parameter], enabled: bool = True) -> None:
    for p in params:
        p.sequence_parallel = enabled


def full_length(config: object, x: torch.Tensor) -> int:
    """The sequence length of ``x [s(/tp), b, ...]`` before SP split it (for the causal mask and RoPE)."""
    return x.shape[0] * (config.tensor_model_parallel_size if config.sequence_parallel else 1)
