"""INT4 weight-only quantization (symmetric, grouped), in compressed-tensors' own terms: targets, RTN, the
fake-quantized weights our releases are written from.

Scales come from compressed-tensors (``calculate_qparams``) and are kept in the release's storage dtype
(bf16), and every fake-quantized weight is ``fake_quantize(W, scale)`` from the same library, so the
weights that the library's decompressor (and so ``transformers`` or vLLM) rebuilds from the packed file
are bit-identical to the ones we evaluate.

GPTQ is llm-compressor's (``export/llm_compressor.py``: ``gptq_weights``). Ours, with the looped middle
block's Hessian gathered over all L passes, was removed once ``benchmarks/int4_compare.py`` showed
llm-compressor's, calibrated with one whole forward per batch, within 0.001 nats of it (docs/export.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
)
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from torch import nn

from hyperloop_dist.config import ConfigError, ExportConfig

STORAGE_DTYPE = torch.bfloat16
# Module-name patterns (compressed-tensors ``re:`` targets, matched with re.match). They allow a prefix
# (``model.`` in the transformers class) so the same config serves our ReferenceModel and the HF wrapper.
BLOCK_LINEARS = r"re:(.*\.)?(begin|middle|end)\.layers\.\d+\.(self_attention|mlp)\.linear_(qkv|proj|fc1|fc2)$"
EMBEDDING = r"re:(.*\.)?embedding\.word_embeddings$"
HEAD = r"re:(.*\.)?output_layer$"


def weight_args(group_size: int) -> QuantizationArgs:
    return QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)


def quantization_config(export: ExportConfig) -> QuantizationConfig:
    """The compressed-tensors W4A16 config written into the release's ``config.json``."""
    targets = [BLOCK_LINEARS]
    if export.quantize_embedding:
        targets.append(EMBEDDING)
    if export.quantize_head:
        targets.append(HEAD)
    scheme = QuantizationScheme(targets=targets, weights=weight_args(export.group_size))
    return QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized")


def target_modules(model: nn.Module, export: ExportConfig) -> dict[str, nn.Module]:
    """The modules the config quantizes, by name; checks the group size against each one's input width."""
    (scheme,) = quantization_config(export).config_groups.values()
    patterns = [re.compile(t.removeprefix("re:")) for t in scheme.targets]
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.Linear | nn.Embedding) and any(p.match(name) for p in patterns)}
    for name, module in found.items():
        width = module.weight.shape[1]
        if width % export.group_size:
            valid = [g for g in (32, 64, 128, 256) if width % g == 0] or [width]
            raise ConfigError(f"export.group_size={export.group_size}: must divide the input width {width} of "
                              f"{name}; try {' or '.join(map(str, valid))}")
    return found


def group_scales(weight: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """Per-(row, group) scales ``[out, in / group]`` in the storage dtype (compressed-tensors' formula)."""
    groups = weight.detach().float().unflatten(-1, (-1, args.group_size))
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    return scale.to(STORAGE_DTYPE)


def quantize_rtn(weight: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(fake-quantized weight (float32), scales)``."""
    scale = group_scales(weight, args)
    return fake_quantize(weight.detach().float(), scale, None, args), scale


@dataclass
class QuantizedWeights:
    """Per module name: the fake-quantized weight (float32) and its scales (storage dtype)."""

    weights: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    method: str
    group_size: int


def quantize_rtn_model(model: nn.Module, export: ExportConfig) -> QuantizedWeights:
    """Round-to-nearest INT4 of the targeted weights of ``model`` (left unchanged)."""
    args = weight_args(export.group_size)
    weights, scales = {}, {}
    for name, module in target_modules(model, export).items():
        weights[name], scales[name] = quantize_rtn(module.weight, args)
    return QuantizedWeights(weights, scales, "rtn", export.group_size)


def storage_rounded(model: nn.Module) -> nn.Module:
    """``model`` with every tensor rounded to the storage dtype and kept in float32 for compute."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.copy_(t.to(STORAGE_DTYPE).float())
    return model


def apply_fake_quantized(model: nn.Module, quantized: QuantizedWeights) -> nn.Module:
    """Our fake-quantized model in place: storage-rounded tensors, then the INT4 weights put in."""
    storage_rounded(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in quantized.weights.items():
            modules[name].weight.copy_(weight)
    return model

