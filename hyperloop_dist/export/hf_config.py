"""``config.json`` of a release as a transformers config: our :class:`ModelConfig` plus inference settings.

Kept apart from ``hf_model.py`` because a release ships it as its own ``configuration_hyperloop.py``
(``export/remote_code.py``): transformers requires the config class of remote code in its own module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from hyperloop_dist.config import HCConfig, ModelConfig

MODEL_TYPE = "hyperloop"


class HyperloopConfig(PretrainedConfig):
    """``model``: the training :class:`ModelConfig` as a mapping. Inference settings (not training ones):

    * ``num_loops_inference``: run K of the L trained loops (looped kinds; None = L). Fewer loops exit
      through the collapse and end block, as ``hyperloop eval --loops`` reads them out.
    * ``exit_threshold``: experimental per-token exit while decoding with the cache: skip a token's
      remaining loops once its readout's largest probability reaches this value (None = off).
    """

    model_type = MODEL_TYPE

    def __init__(self, model: dict[str, Any] | None = None, num_loops_inference: int | None = None,
                 exit_threshold: float | None = None, **kwargs: Any) -> None:
        self.model = dict(model) if model is not None else dataclasses.asdict(ModelConfig())
        self.num_loops_inference = num_loops_inference
        self.exit_threshold = exit_threshold
        kwargs.setdefault("vocab_size", self.model["vocab_size"])
        # Tying is ReferenceModel's business (no output_layer when tied): transformers must not tie anything.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        fields = dict(self.model)
        fields["hc"] = HCConfig(**fields["hc"])
        return ModelConfig(**fields)
