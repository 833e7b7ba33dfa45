"""The INT4 release: compressed-tensors ``pack-quantized`` (W4A16) in a release directory.

``model.safetensors`` holds the reference parameter names (shared middle block once); each quantized
module ``M`` stores ``M.weight_packed`` (int32, 8 INT4 values a word, packed by compressed-tensors),
``M.weight_scale`` (bf16, one per row and group) and ``M.weight_shape`` instead of ``M.weight``; every
other tensor is bf16. ``config.json`` is the transformers config of :mod:`hyperloop_dist.export.hf_model`
plus compressed-tensors' ``quantization_config``, so ``AutoModelForCausalLM.from_pretrained`` loads it
(and vLLM's compressed-tensors loader reads the same keys).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.base import compress_module
from compressed_tensors.quantization import apply_quantization_config
from safetensors.torch import save_file

from hyperloop_dist.config import ExportConfig
from hyperloop_dist.export.hf_model import hf_config
from hyperloop_dist.export.int4 import STORAGE_DTYPE, QuantizedWeights, quantization_config
from hyperloop_dist.export.model_card import finish_int4_release
from hyperloop_dist.export.release import RELEASE_FORMAT, new_release_dir
from hyperloop_dist.model.reference import ReferenceModel

WEIGHTS = "model.safetensors"


def compressed_state_dict(model: ReferenceModel, quantized: QuantizedWeights,
                          export: ExportConfig) -> tuple[dict[str, torch.Tensor], ReferenceModel]:
    """A copy of ``model`` in bf16 with the quantized modules compressed by compressed-tensors."""
    work = copy.deepcopy(model).to(STORAGE_DTYPE)
    apply_quantization_config(work, quantization_config(export), show_progress=False)
    modules = dict(work.named_modules())
    if set(quantized.weights) != {n for n, m in modules.items() if hasattr(m, "quantization_scheme")}:
        raise ValueError("the quantized weights do not match the modules the quantization config targets")
    with torch.no_grad():
        for name, weight in quantized.weights.items():
            module = modules[name]
            module.weight.copy_(weight.to(STORAGE_DTYPE))  # exactly q * scale: it quantizes back to q
            module.weight_scale.data = quantized.scales[name].clone()
            compress_module(module)
    return {k: v.detach().contiguous() for k, v in work.state_dict().items()}, work


def write_int4_release(model: ReferenceModel, quantized: QuantizedWeights, export: ExportConfig, out: str | Path,
                       tokenizer: str | Path | None = None, extra: dict | None = None,
                       training: dict | None = None) -> Path:
    """Write the INT4 release directory ``out`` (refused when it exists and is not empty)."""
    tensors, work = compressed_state_dict(model, quantized, export)
    with new_release_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        info = {**hf_config(model.cfg).to_dict(), "format": RELEASE_FORMAT, "model": dataclasses.asdict(model.cfg),
                "int4": {"method": quantized.method, "group_size": quantized.group_size, **(extra or {})},
                **({"training": training} if training else {})}
        (tmp / "config.json").write_text(json.dumps(info, indent=1))
        ModelCompressor.from_pretrained_model(work, "pack-quantized").update_config(str(tmp))
        if tokenizer is not None and Path(tokenizer).is_file():
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        finish_int4_release(tmp)  # model code, tokenizer.json, README.md
    return Path(out)


def is_int4_release(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def load_int4_release(path: str | Path) -> ReferenceModel:
    """An INT4 release as a float32 :class:`ReferenceModel` with the dequantized weights, loaded the way a
    downstream team would: ``AutoModelForCausalLM.from_pretrained`` (compressed-tensors decompresses)."""
    from transformers import AutoModelForCausalLM

    from hyperloop_dist.export.hf_model import register

    register()
    # Loaded in bf16, the storage dtype, so the decompressed weights are exactly q * scale in bf16 (what
    # vLLM computes with); float32 afterwards for the loss.
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=STORAGE_DTYPE)
    hf(torch.zeros(1, 1, dtype=torch.long))  # compressed-tensors decompresses on the first forward
    # A plain model from the dequantized tensors: the quantized forward compressed-tensors installed would
    # re-quantize with float32 scales once the model is float32, and q * scale would no longer round to bf16.
    model = ReferenceModel(hf.config.model_config())
    state = hf.model.state_dict()
    model.load_state_dict({k: state[k].float() for k in model.state_dict()}, strict=True)
    return model.eval()
