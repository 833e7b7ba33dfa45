"""The Hugging Face ``transformers`` face of a release: ``AutoModelForCausalLM.from_pretrained(release)``.

The network is :class:`~hyperloop_dist.model.reference.ReferenceModel`, held as ``self.model``: nothing is
re-implemented here, and parameter names are the reference names behind a ``model.`` prefix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from hyperloop_dist.config import ModelConfig, build_section
from hyperloop_dist.model.reference import ReferenceModel

MODEL_TYPE = "hyperloop"


class HyperloopConfig(PretrainedConfig):
    """``config.json`` of a release: our :class:`ModelConfig` as the ``model`` mapping."""

    model_type = MODEL_TYPE

    def __init__(self, model: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.model = dict(model) if model is not None else dataclasses.asdict(ModelConfig())
        kwargs.setdefault("vocab_size", self.model["vocab_size"])
        # Tying is ReferenceModel's business (no output_layer when tied): transformers must not tie anything.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return build_section(ModelConfig, self.model, "model.")


class HyperloopForCausalLM(PreTrainedModel):
    config_class = HyperloopConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: HyperloopConfig) -> None:
        super().__init__(config)
        self.model = ReferenceModel(config.model_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # ReferenceModel initializes itself; from_pretrained then overwrites every tensor

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **_: Any) -> CausalLMOutput:
        logits = self.model(input_ids)
        loss = None
        if labels is not None:  # labels as transformers passes them: the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)


def hf_config(cfg: ModelConfig) -> HyperloopConfig:
    return HyperloopConfig(model=dataclasses.asdict(cfg), architectures=[HyperloopForCausalLM.__name__])


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``model_type: hyperloop`` (idempotent)."""
    AutoConfig.register(MODEL_TYPE, HyperloopConfig, exist_ok=True)
    AutoModelForCausalLM.register(HyperloopConfig, HyperloopForCausalLM, exist_ok=True)


register()  # importing this module is all a downstream script needs before from_pretrained
