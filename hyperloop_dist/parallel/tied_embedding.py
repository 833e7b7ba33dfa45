"""Tied input embedding and LM head under pipeline parallelism, as Megatron-core's GPTModel does it.

The embedding lives on the first stage, the head on the last. The last stage keeps its own copy of the
word-embedding matrix as the head's weight:

* at build, the copy is zeroed and all-reduced over Megatron's embedding group (first and last stage of
  each pipeline), so it starts equal to the first stage's seeded embedding;
* every step, ``finalize_model_grads`` all-reduces the gradient of ``shared_embedding_or_output_weight()``
  over the same group (after the DP reduction), so both copies take the same update: the sum of the
  embedding's and the head's gradient, as the one tied matrix of a single process gets;
* the copy is marked ``shared``, so the gradient norm (and clipping) counts the matrix once;
* in checkpoints it is a replica of ``embedding.word_embeddings.weight`` (Megatron's
  ``tie_embeddings_and_output_weights_state_dict``): saved once, loadable under any layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def tie_across_stages(model: torch.nn.Module) -> None:
    """Make the last stage's head weight a copy of the first stage's embedding (called at build)."""
    from megatron.core import parallel_state as ps

    weight = model.shared_embedding_or_output_weight()
    if weight is None:  # a middle stage
        return
    if not model.pre_process:
        weight.data.fill_(0)
        weight.shared = True
        weight.shared_embedding = True
    else:
        weight.shared_embedding = True
    if weight.device.type != "meta" and dist.is_initialized() and ps.is_rank_in_embedding_group():
        dist.all_reduce(weight.data, group=ps.get_embedding_group())


def tie_in_checkpoint(model: torch.nn.Module, state: dict, prefix: str) -> None:
    """Store the last stage's copy under the embedding's key, as a replica (not written twice)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

    key = f"{prefix}output_layer.weight"
    if model.pre_process or key not in state:
        return
    state[key] = make_tp_sharded_tensor_for_checkpoint(
        tensor=model.output_layer.weight, key=f"{prefix}embedding.word_embeddings.weight",
        replica_id=(1, 0, ps.get_data_parallel_rank(with_context_parallel=True)), allow_shape_mismatch=True)
