"""Optional GGUF container of an INT4 export (``--format gguf``): ``model.gguf`` next to the release.

Quantized weights are stored as GGUF ``Q4_0`` (blocks of 32, one fp16 scale each, packed by the ``gguf``
package), every other tensor as BF16 (F32 for 1-D ones). Q4_0 has its own scale rule, so it re-rounds our
RTN/GPTQ weights: close to the compressed-tensors release (within half a Q4_0 step), not bit-identical.
The architecture is ``hyperloop``, which llama.cpp does not implement: this is a container for teams whose
tooling reads GGUF, not a file llama.cpp can run. Names are the reference parameter names.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import numpy as np
import torch

from hyperloop_dist.export.int4 import QuantizedWeights
from hyperloop_dist.model.reference import ReferenceModel

ARCH = "hyperloop"
GGUF_FILE = "model.gguf"


def write_gguf(model: ReferenceModel, quantized: QuantizedWeights, path: str | Path) -> Path:
    path = Path(path)
    int4_weights = {f"{name}.weight": w for name, w in quantized.weights.items()}
    writer = gguf.GGUFWriter(str(path), arch=ARCH)
    writer.add_name(f"hyperloop-{model.cfg.kind}-int4-{quantized.method}")
    writer.add_string(f"{ARCH}.config", json.dumps(dataclasses.asdict(model.cfg)))
    writer.add_string(f"{ARCH}.int4.method", quantized.method)
    writer.add_uint32(f"{ARCH}.int4.group_size", quantized.group_size)
    for name, tensor in model.state_dict().items():
        if name in int4_weights:
            qtype = gguf.GGMLQuantizationType.Q4_0
            data = int4_weights[name].float().numpy()
        else:
            qtype = gguf.GGMLQuantizationType.BF16 if tensor.dim() > 1 else gguf.GGMLQuantizationType.F32
            data = tensor.detach().float().numpy()
        writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_gguf(path: str | Path) -> dict[str, tuple[str, torch.Tensor]]:
    """Every tensor of a GGUF file, dequantized to float32 by the ``gguf`` package: name -> (type, tensor)."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        out[t.name] = (t.tensor_type.name, torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape))
    return out
