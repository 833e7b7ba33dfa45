"""The Hugging Face ``transformers`` face of a release: ``AutoModelForCausalLM.from_pretrained(release)``.

The network is :class:`~hyperloop_dist.model.reference.ReferenceModel`, held as ``self.model``: nothing is
re-implemented here, and parameter names are the reference names behind a ``model.`` prefix. Generation
uses :class:`~hyperloop_dist.export.loop_cache.LoopKVCache` (one entry per loop pass of each middle
layer). A release ships this module, with what it imports, as its ``modeling_hyperloop.py``
(``export/remote_code.py``), so ``trust_remote_code=True`` loads it without this package.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from hyperloop_dist.config import ModelConfig
from hyperloop_dist.export.early_exit import confident_exit_hidden
from hyperloop_dist.export.hf_config import MODEL_TYPE, HyperloopConfig
from hyperloop_dist.export.loop_cache import LoopKVCache
from hyperloop_dist.model.hyper_connections import LOOPED_KINDS
from hyperloop_dist.model.reference import ReferenceModel


class HyperloopForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HyperloopConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: HyperloopConfig) -> None:
        super().__init__(config)
        self.model = ReferenceModel(config.model_config())
        self.loops()  # a bad num_loops_inference / exit_threshold stops here, not at the first forward
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # ReferenceModel initializes itself; from_pretrained then overwrites every tensor

    def loops(self) -> int:
        """The loops a forward runs: ``config.num_loops_inference`` (read each call, so it can be changed)."""
        threshold = self.config.exit_threshold
        if threshold is not None:
            if self.model.cfg.kind not in LOOPED_KINDS:
                raise ValueError(f"exit_threshold={threshold}: only {', '.join(LOOPED_KINDS)} models exit early")
            if not 0.0 < threshold <= 1.0:
                raise ValueError(f"exit_threshold={threshold}: a probability in (0, 1], or None for no exit")
        return self.model.inference_loops(self.config.num_loops_inference)

    def new_cache(self) -> LoopKVCache:
        return LoopKVCache(*self.model.cache_layout(self.loops()))

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any,
                                      **kwargs: Any) -> None:
        # generate() would build a DynamicCache sized from config fields we do not have; ours instead.
        if (model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False
                and generation_config.cache_implementation in (None, "dynamic")):
            model_kwargs["past_key_values"] = self.new_cache()
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: Any = None, use_cache: bool | None = None, labels: torch.Tensor | None = None,
                **_: Any) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask with padding: a Hyperloop release attends causally over every "
                             "position; generate from prompts of equal length (or one at a time)")
        loops = self.loops()
        cache = None if use_cache is False else past_key_values
        if use_cache and cache is None:
            cache = self.new_cache()
        if isinstance(cache, LoopKVCache) and cache.passes != self.model.cache_layout(loops)[2]:
            raise ValueError(f"the cache holds {cache.passes} passes per middle layer but the model runs {loops} "
                             "loops; start a new cache after changing num_loops_inference")
        threshold = self.config.exit_threshold
        if (isinstance(cache, LoopKVCache) and threshold is not None and input_ids.shape[1] == 1
                and cache.get_seq_length() > 0):
            hidden, _ = confident_exit_hidden(self.model, input_ids, cache, loops, threshold)
        else:
            hidden = self.model.hidden(input_ids, cache, loops)
        logits = F.linear(hidden, self.model.head_weight).transpose(0, 1)
        loss = None
        if labels is not None:  # labels as transformers passes them: the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)


def hf_config(cfg: ModelConfig) -> HyperloopConfig:
    return HyperloopConfig(model=dataclasses.asdict(cfg), architectures=[HyperloopForCausalLM.__name__])


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``model_type: hyperloop`` (idempotent)."""
    AutoConfig.register(MODEL_TYPE, HyperloopConfig, exist_ok=True)
    AutoModelForCausalLM.register(HyperloopConfig, HyperloopForCausalLM, exist_ok=True)


register()  # importing this module is all a downstream script needs before from_pretrained
