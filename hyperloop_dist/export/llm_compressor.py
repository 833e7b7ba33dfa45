"""``hyperloop export --quantize SCHEME``: llm-compressor's ``oneshot`` on a release's transformers model.

The schemes are the ones vLLM serves from compressed-tensors checkpoints (docs/export.md). Each recipe
targets the Linear weights of the begin, middle and end blocks (the names ``export/int4.py`` targets), with
the run's own training micro-batches as calibration data.

**Calibration is one full forward per batch** (``CALIBRATION_PIPELINE``). llm-compressor's default,
``sequential``, traces the model with ``torch.fx`` and cuts it into per-layer subgraphs; our forward (data-
dependent checks, a loop over a shared block) does not trace, and a subgraph per layer has no notion of one
module serving L loop passes. A full forward fires every hook once per call, so the shared middle block's
statistics (GPTQ's Hessian, AWQ's and SmoothQuant's activation scales) gather all L passes, and all of them
come from the unquantized model. llm-compressor's own ``basic`` pipeline does the same
forward, but runs the end-of-calibration step (where AWQ measures its reference outputs) with quantization
already switched on and the scales not yet computed, which gives NaN outputs at random (0.14.0.1); ours
runs that step with quantization off, as its ``sequential`` pipeline does.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hyperloop_dist.config import QUANT_SCHEMES, ExportConfig
from hyperloop_dist.evaluation.heldout import reference_heldout_loss
from hyperloop_dist.export.hf_model import HyperloopForCausalLM, hf_config
from hyperloop_dist.export.int4 import BLOCK_LINEARS, HEAD, STORAGE_DTYPE, target_modules, weight_args
from hyperloop_dist.export.remote_code import write_tokenizer
from hyperloop_dist.model.reference import ReferenceModel

Log = Callable[[str], object]
CALIBRATION_PIPELINE = "hyperloop-full-forward"
# Norm -> the Linear(s) it feeds, for AWQ and SmoothQuant (scales move from activations into weights).
# linear_proj and linear_fc2 have no norm of their own in front: they are left unsmoothed.
NORM_TO_LINEAR = (("input_layernorm", "linear_qkv"), ("pre_mlp_layernorm", "linear_fc1"))


@dataclass(frozen=True)
class Scheme:
    description: str
    modifiers: Callable[[list[str], ExportConfig], list[Any]]
    calibrated: bool  # needs calibration data


def _gptq(scheme: str) -> Callable[[list[str], ExportConfig], list[Any]]:
    def build(targets: list[str], e: ExportConfig) -> list[Any]:
        from llmcompressor.modifiers.quantization import GPTQModifier

        return [GPTQModifier(config_groups=_groups(targets, scheme, e), dampening_frac=e.gptq_dampening)]
    return build


def _rtn(scheme: str) -> Callable[[list[str], ExportConfig], list[Any]]:
    def build(targets: list[str], e: ExportConfig) -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(config_groups=_groups(targets, scheme, e))]
    return build


def _awq(targets: list[str], e: ExportConfig) -> list[Any]:
    from llmcompressor.modifiers.awq import AWQMapping, AWQModifier

    mappings = [AWQMapping(f"re:.*{norm}$", [f"re:.*{linear}$"]) for norm, linear in NORM_TO_LINEAR]
    return [AWQModifier(config_groups=_groups(targets, "W4A16", e), mappings=mappings)]


def _smoothquant_gptq(targets: list[str], e: ExportConfig) -> list[Any]:
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    mappings = [[[f"re:.*{linear}$"], f"re:.*{norm}$"] for norm, linear in NORM_TO_LINEAR]
    return [SmoothQuantModifier(smoothing_strength=0.8, mappings=mappings), *_gptq("W8A8")(targets, e)]


def _groups(targets: list[str], preset: str, e: ExportConfig) -> dict[str, Any]:
    """One config group: llm-compressor's preset ``preset``, with ``export.group_size`` for grouped weights."""
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, targets)
    if scheme.weights is not None and scheme.weights.group_size is not None:
        scheme.weights.group_size = e.group_size
    return {"group_0": scheme}


SCHEMES: dict[str, Scheme] = {
    "W4A16": Scheme("INT4 weights (GPTQ, group size {group}), 16-bit activations", _gptq("W4A16"), True),
    "W4A16-RTN": Scheme("INT4 weights (round to nearest, group size {group}), 16-bit activations",
                        _rtn("W4A16"), False),
    "W4A16-AWQ": Scheme("INT4 weights (AWQ scales, group size {group}), 16-bit activations", _awq, True),
    "W8A8-INT8": Scheme("INT8 weights (SmoothQuant 0.8 + GPTQ, per channel), INT8 activations (dynamic, per token)",
                        _smoothquant_gptq, True),
    "W8A8-FP8": Scheme("FP8 weights and activations (static per-tensor scales from calibration)", _rtn("FP8"), True),
    "FP8-dynamic": Scheme("FP8 weights (per channel), FP8 activations (dynamic, per token); no calibration data",
                          _rtn("FP8_DYNAMIC"), False),
}
assert tuple(SCHEMES) == QUANT_SCHEMES, "config.QUANT_SCHEMES names the schemes the CLI accepts"


def _register_pipeline() -> None:
    from llmcompressor.core import LifecycleCallbacks
    from llmcompressor.pipelines.registry import CalibrationPipeline
    from llmcompressor.utils.helpers import DisableQuantization, calibration_forward_context

    if CALIBRATION_PIPELINE in CalibrationPipeline.registered_names():
        return

    @CalibrationPipeline.register(CALIBRATION_PIPELINE)
    class FullForwardPipeline(CalibrationPipeline):
        @staticmethod
        def __call__(model: torch.nn.Module, dataloader: Any, dataset_args: Any) -> None:
            LifecycleCallbacks.calibration_start()
            with calibration_forward_context(model), DisableQuantization(model):
                for batch in dataloader:
                    model(**{k: v.to(model.device) for k, v in batch.items()})
                LifecycleCallbacks.sequential_epoch_end(list(model.modules()))
            LifecycleCallbacks.calibration_end()


@contextlib.contextmanager
def _cpu_without_pinned_memory() -> Any:
    """AWQ pins its cached activations for faster host-to-device copies; with no accelerator,
    ``Tensor.pin_memory`` raises (llm-compressor 0.14.0.1), so pinning is skipped there."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


@contextlib.contextmanager
def _library_logs_quiet() -> Any:
    """llm-compressor logs every module it touches, and warnings that do not apply here (no lm_head, the
    pipeline choice above); its progress bars stay. Errors still raise."""
    from loguru import logger

    for name in ("llmcompressor", "compressed_tensors"):
        logger.disable(name)
    try:
        yield
    finally:
        for name in ("llmcompressor", "compressed_tensors"):
            logger.enable(name)


def transformers_model(model: ReferenceModel) -> HyperloopForCausalLM:
    """The release's transformers class around ``model``'s weights (float32)."""
    hf = HyperloopForCausalLM(hf_config(model.cfg))
    hf.model.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


def quantize_in_memory(hf: HyperloopForCausalLM, scheme: str, e: ExportConfig, calibration: list[torch.Tensor],
                       tokenizer: str | Path) -> None:
    """Run llm-compressor's ``oneshot`` with ``scheme`` on ``hf`` in place (the weights become quantized).
    ``calibration`` is already tokenized; ``oneshot`` still wants the tokenizer (sentencepiece ``tokenizer``)."""
    from compressed_tensors.offload.utils import as_single_threaded
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import PreTrainedTokenizerFast

    _register_pipeline()
    targets = [BLOCK_LINEARS] + ([HEAD] if e.quantize_head else [])
    recipe = SCHEMES[scheme].modifiers(targets, e)
    tokens = torch.cat(calibration) if calibration else torch.zeros(1, 1, dtype=torch.long)
    data = Dataset.from_dict({"input_ids": tokens.tolist()})
    # One process quantizes: a torch.distributed world around it (a training job's, a test session's) must
    # not turn llm-compressor's statistics into all-reduces over it.
    with (tempfile.TemporaryDirectory() as tmp, _cpu_without_pinned_memory(), _library_logs_quiet(),
          as_single_threaded()):
        write_tokenizer(Path(tokenizer), Path(tmp))
        hf.config.save_pretrained(tmp)  # oneshot re-reads the model's config from its name_or_path
        hf.config.name_or_path = tmp
        try:
            oneshot(model=hf, recipe=recipe, dataset=data, processor=PreTrainedTokenizerFast.from_pretrained(tmp),
                    pipeline=CALIBRATION_PIPELINE, num_calibration_samples=tokens.shape[0],
                    max_seq_length=tokens.shape[1], shuffle_calibration_samples=False)
        finally:
            hf.config.name_or_path = ""


def gptq_weights(model: ReferenceModel, export: ExportConfig, calibration: list[torch.Tensor],
                 tokenizer: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """llm-compressor's GPTQ (``W4A16``) of ``model``'s targeted Linear weights, as (fake-quantized float32
    weight, bf16 scales) per reference module name: what ``hyperloop export --int4 method=gptq`` writes.
    The model is left unchanged."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    hf = transformers_model(model).to(STORAGE_DTYPE)
    quantize_in_memory(hf, "W4A16", export, calibration, tokenizer)
    args = weight_args(export.group_size)
    modules = dict(hf.model.named_modules())
    weights, scales = {}, {}
    for name, module in target_modules(model, export).items():
        if not isinstance(module, torch.nn.Linear):
            continue  # an embedding has no Hessian: the caller rounds it to nearest
        quantized = modules[name]
        scale = quantized.weight_scale.detach().to(STORAGE_DTYPE).clone()
        # Exactly q * scale as compressed-tensors rebuilds it from the packed file.
        weights[name] = fake_quantize(quantized.weight.detach().float(), scale, None, args)
        scales[name] = scale
    return weights, scales


def release_loss(path: str | Path, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean held-out next-token loss of a release loaded through ``AutoModelForCausalLM`` in bf16, its
    storage dtype (a quantized release runs compressed-tensors' quantized forward)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=STORAGE_DTYPE)
    return hf_loss(model, windows, batch_size)


def hf_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean held-out NLL of a transformers causal LM, reduced as every held-out figure here is."""
    return reference_heldout_loss(lambda tokens: model(input_ids=tokens).logits, windows, batch_size)


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


