"""INT4 weight-only quantization (symmetric, grouped): RTN and GPTQ, in compressed-tensors' own terms.

Scales come from compressed-tensors (``calculate_qparams``) and are kept in the release's storage dtype
(bf16), and every fake-quantized weight is ``fake_quantize(W, scale)`` from the same library, so the
weights that the library's decompressor (and so ``transformers`` or vLLM) rebuilds from the packed file
are bit-identical to the ones we evaluate.

GPTQ is our own (Frantar et al. 2022, the lazy-batch form without act-order, blocks aligned to groups),
because of the looped middle block: its weights serve L passes, so each Linear's Hessian ``2/N sum x x^T``
must gather the inputs of *all* L uses. A forward pre-hook on the shared module sees every call, so one
calibration pass collects them all. (llmcompressor's GPTQ works by pipelines that trace and split the model
into per-layer subgraphs and pins transformers / compressed-tensors versions of its own; see
docs/export.md.) All Hessians come from one pass of the unquantized model: with shared weights there is no
"previous layers already quantized" order to follow.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
)
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams, calculate_range
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
class HessianStats:
    """Running ``sum x x^T`` of one Linear's inputs and how many rows went in."""

    sum_xxt: torch.Tensor
    rows: int = 0

    def hessian(self) -> torch.Tensor:
        return 2.0 * self.sum_xxt / max(self.rows, 1)


def collect_hessians(model: nn.Module, modules: dict[str, nn.Module],
                     batches: Iterable[torch.Tensor]) -> dict[str, HessianStats]:
    """Run ``model(tokens)`` on each calibration batch, summing every call's inputs of every Linear.

    A module called L times per forward (the looped middle block) adds all L inputs.
    """
    stats: dict[str, HessianStats] = {}
    handles = []
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            continue  # an embedding has no input activations to weigh: it stays RTN
        stats[name] = HessianStats(torch.zeros(module.in_features, module.in_features, dtype=torch.float64))

        def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], s: HessianStats = stats[name]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            s.sum_xxt += x.T @ x
            s.rows += x.shape[0]

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for tokens in batches:
                model(tokens)
    finally:
        for h in handles:
            h.remove()
    return stats


def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, args: QuantizationArgs,
                  dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ with groups: ``(fake-quantized weight (float32), scales)``.

    Columns are quantized left to right; each column's rounding error is spread over the columns not yet
    quantized through the inverse Hessian's Cholesky factor. A group's scale is taken when its first
    column comes up, from the weights as updated so far (blocks equal groups, so they are up to date).
    """
    w = weight.detach().float().clone()
    h = hessian.double().clone()
    cols, group = w.shape[1], args.group_size
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += dampening * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    q_min, q_max = calculate_range(args, w.device)
    scales = torch.empty(w.shape[0], cols // group, dtype=STORAGE_DTYPE)
    for start in range(0, cols, group):
        stop = start + group
        block, h_blk = w[:, start:stop].clone(), h_inv[start:stop, start:stop]
        errors = torch.zeros_like(block)
        scale = group_scales(block, args)  # [out, 1]
        scales[:, start // group] = scale[:, 0]
        s = scale.float()
        for i in range(group):
            col = block[:, i:i + 1]
            q = torch.clamp(torch.round(col / s), q_min, q_max)
            deq = (q.to(STORAGE_DTYPE) * scale).float()  # what the decompressor will rebuild
            err = (col - deq) / h_blk[i, i]
            block[:, i:] -= err @ h_blk[i:i + 1, i:]
            block[:, i] = deq[:, 0]
            errors[:, i] = err[:, 0]
        w[:, start:stop] = block
        w[:, stop:] -= errors @ h_inv[start:stop, stop:]
    # The exact library result for the final weights: GPTQ's own columns already are ``q * scale``.
    return fake_quantize(w, scales, None, args), scales


@dataclass
class QuantizedWeights:
    """Per module name: the fake-quantized weight (float32) and its scales (storage dtype)."""

    weights: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    method: str
    group_size: int


def quantize_model(model: nn.Module, export: ExportConfig,
                   calibration: Iterable[torch.Tensor] = ()) -> QuantizedWeights:
    """Quantize the targeted weights of ``model`` (left unchanged) by ``export.method``."""
    args = weight_args(export.group_size)
    modules = target_modules(model, export)
    hessians = collect_hessians(model, modules, calibration) if export.method == "gptq" else {}
    if export.method == "gptq" and not any(s.rows for s in hessians.values()):
        raise ValueError("GPTQ needs calibration batches; none were given")
    weights, scales = {}, {}
    for name, module in modules.items():
        if name in hessians:
            weights[name], scales[name] = quantize_gptq(module.weight, hessians[name].hessian(), args,
                                                        export.gptq_dampening)
        else:
            weights[name], scales[name] = quantize_rtn(module.weight, args)
    return QuantizedWeights(weights, scales, export.method, export.group_size)


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

