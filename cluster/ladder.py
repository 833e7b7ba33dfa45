"""The one rule that sizes batch, learning rate and token budget of the recipes beyond the paper (3b, 7b).

As OLMo-core's model ladder, from N = the Hyperloop recipe's parameters in the paper's convention (its
unique weights, LM head included, input embedding not):

* global batch  B = 160 · (N / 108M)^(2/3) sequences of 2048 tokens, rounded to a power of two
  (scaled by 2048 / seq_length for other sequence lengths);
* peak LR      = 0.0047 · (N / 108M)^(-1/3), cosine decay to LR / 10;
* tokens       D = 20 · N (Chinchilla), so train.steps = D / (B · seq_length);
* warm-up      N tokens, i.e. N / (B · seq_length) steps.

The depth-matched Transformer and mHC baselines run the Hyperloop recipe with only ``model.kind``
changed: same effective depth, same tokens, same optimizer and schedule. The paper's own configurations
(hyperloop-136m, -579m, -991m) carry the paper's setup instead; tests/test_plan.py checks the 3b and 7b
recipes against this rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hyperloop_dist.config import ModelConfig
from hyperloop_dist.model.params import report

REFERENCE_PARAMS = 108e6


@dataclass(frozen=True)
class LadderPoint:
    non_embedding_params: int
    global_batch: int  # sequences
    lr: float
    min_lr: float
    steps: int
    warmup_steps: int


def ladder(model: ModelConfig) -> LadderPoint:
    n = report(model.as_kind("hyperloop") if model.kind == "hyperloop" else model).paper
    scale = n / REFERENCE_PARAMS
    batch = 160 * scale ** (2 / 3) * 2048 / model.seq_length
    batch = 2 ** round(math.log2(batch))
    lr = 0.0047 * scale ** (-1 / 3)
    tokens_per_step = batch * model.seq_length
    return LadderPoint(n, batch, lr, lr / 10, round(20 * n / tokens_per_step), max(1, round(n / tokens_per_step)))
