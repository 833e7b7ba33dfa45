"""``hyperloop export --int4`` and ``--quantize``: checkpoint, run directory or release in, quantized release
out, loss gap reported.

Calibration batches are the training pipeline's own (``make_batches`` of the run's data config), the
held-out windows the pipeline's held-out split. The report puts held-out loss and size on disk of the
bf16 model (every tensor rounded to bf16) next to the INT4 release's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from hyperloop_dist.checkpoint.store import CheckpointError
from hyperloop_dist.config import Config, ConfigError, ExportConfig, load_config, validate_export
from hyperloop_dist.evaluation.heldout import heldout_windows
from hyperloop_dist.evaluation.heldout import reference_heldout_loss as heldout_loss
from hyperloop_dist.export.compressed import WEIGHTS, is_int4_release, load_int4_release, write_int4_release
from hyperloop_dist.export.int4 import (
    STORAGE_DTYPE,
    QuantizedWeights,
    apply_fake_quantized,
    quantize_rtn_model,
    storage_rounded,
    target_modules,
)
from hyperloop_dist.export.llm_compressor import (
    SCHEMES,
    gptq_weights,
    hf_loss,
    quantize_in_memory,
    release_loss,
    transformers_model,
    weights_bytes,
)
from hyperloop_dist.export.model_card import finish_int4_release, training_facts
from hyperloop_dist.export.release import (
    RELEASE_FORMAT,
    checkpoint_model,
    load_release,
    new_release_dir,
    release_config,
)
from hyperloop_dist.model.reference import ReferenceModel

Log = Callable[[str], object]
QUANTIZED_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape")


def load_source(source: str | Path, overrides: list[str]) -> tuple[ReferenceModel, Config, Path | None]:
    """The float32 model, the run config (data, export settings) and the tokenizer of ``source``: a
    checkpoint, a run directory (its latest good checkpoint) or a bf16/fp32 release."""
    from hyperloop_dist.checkpoint.store import resolve_checkpoint

    source = Path(source)
    if (source / "config.json").is_file():
        if is_int4_release(source):
            raise CheckpointError(f"{source} is already a quantized release; export from its checkpoint or its "
                                  "full-precision release")
        model = load_release(source)
        cfg = load_config(None, overrides)
        cfg.model = release_config(source)  # a release carries no data config: data.* comes from overrides
        validate_export(cfg.export, cfg.model)
        tokenizer = source / "tokenizer.model"
    else:
        checkpoint = resolve_checkpoint(source)
        cfg = load_config(checkpoint / "config.yaml", overrides)
        model = checkpoint_model(checkpoint)
        tokenizer = checkpoint / "tokenizer.model"
    if tokenizer.is_file():
        cfg.data.tokenizer = str(tokenizer)
    return model.eval(), cfg, tokenizer if tokenizer.is_file() else None


def calibration_batches(cfg: Config) -> list[torch.Tensor]:
    """``export.calibration_batches`` training micro-batches from the data pipeline (rank 0 of 1)."""
    from hyperloop_dist.data.batches import make_batches
    from hyperloop_dist.data.token_windows import prepare_corpus

    prepare_corpus(cfg, log=lambda *_: None)
    batches = make_batches(cfg, dp_rank=0, dp_size=1)
    return [batches.next(step, 0)[0] for step in range(cfg.export.calibration_batches)]


def quantize_model(model: ReferenceModel, export: ExportConfig, calibration: list[torch.Tensor] | None = None,
                   tokenizer: str | Path | None = None) -> QuantizedWeights:
    """``export.method`` INT4 of the targeted weights of ``model`` (left unchanged): ``rtn``, or ``gptq``
    through llm-compressor (``calibration`` batches; ``tokenizer``, the run's sentencepiece model, is what
    llm-compressor wants beside them). An embedding, which has no Hessian, is rounded to nearest."""
    if export.method == "rtn":
        return quantize_rtn_model(model, export)
    if not calibration or tokenizer is None:
        raise ValueError("GPTQ needs calibration batches and the tokenizer; none were given")
    rtn = quantize_rtn_model(model, export)
    weights, scales = gptq_weights(model, export, calibration, tokenizer)
    return QuantizedWeights({**rtn.weights, **weights}, {**rtn.scales, **scales}, "gptq", export.group_size)


def quantized_layer_bytes(weights_file: str | Path) -> tuple[int, int]:
    """(bytes the quantized modules take in an INT4 weights file, bytes the same weights take in bf16)."""
    int4_bytes = bf16_bytes = 0
    with safe_open(str(weights_file), "pt") as f:
        for key in f.keys():
            if key.endswith(QUANTIZED_SUFFIXES):
                t = f.get_tensor(key)
                int4_bytes += t.numel() * t.element_size()
                if key.endswith(".weight_shape"):
                    bf16_bytes += int(torch.prod(t)) * 2
    return int4_bytes, bf16_bytes


def bf16_weights_bytes(model: ReferenceModel) -> int:
    """Bytes the model's weights take in bf16 (a bf16 weights file, less its few-KB header), counted rather
    than written out: at 7B a temporary file would be 14 GB of I/O."""
    itemsize = torch.empty((), dtype=STORAGE_DTYPE).element_size()
    return sum(t.numel() * itemsize for t in model.state_dict().values())


@dataclass
class ExportReport:
    out: Path
    method: str
    group_size: int
    bf16_loss: float
    int4_loss: float
    bf16_bytes: int
    int4_bytes: int
    quantized_int4_bytes: int
    quantized_bf16_bytes: int
    heldout_tokens: int
    max_logit_diff: float

    def table(self) -> str:
        rows = [("bf16", self.bf16_loss, "", self.bf16_bytes),
                (f"INT4 {self.method} g{self.group_size}", self.int4_loss,
                 f"{self.int4_loss - self.bf16_loss:+.4f}", self.int4_bytes)]
        lines = [f"{'model':<18} {'held-out loss':>13} {'gap':>8} {'weights on disk':>16}"]
        lines += [f"{name:<18} {loss:>13.4f} {gap:>8} {size / 1e6:>13.2f} MB" for name, loss, gap, size in rows]
        lines.append(f"quantized layers: {self.quantized_int4_bytes / 1e6:.2f} MB INT4 vs "
                     f"{self.quantized_bf16_bytes / 1e6:.2f} MB bf16 "
                     f"({self.quantized_int4_bytes / self.quantized_bf16_bytes:.3f}x); "
                     f"{self.heldout_tokens:,} held-out tokens")
        return "\n".join(lines)


def export_int4(source: str | Path, out: str | Path, overrides: list[str] | None = None,
                log: Log = print) -> ExportReport:
    """Quantize ``source`` by ``export.*`` (in ``overrides``), write the INT4 release ``out``, load it back
    through transformers and report held-out loss and sizes against bf16."""
    model, cfg, tokenizer = load_source(source, overrides or [])
    torch.set_num_threads(cfg.train.threads_per_rank)
    e = cfg.export
    target_modules(model, e)  # a group size that does not fit stops here, before any calibration
    calibration = calibration_batches(cfg) if e.method == "gptq" else []
    log(f"quantizing {cfg.model.kind} to INT4 ({e.method}, group size {e.group_size}"
        f"{f', {len(calibration)} calibration batches' if calibration else ''})")
    quantized = quantize_model(model, e, calibration, cfg.data.tokenizer)
    fake = apply_fake_quantized(copy.deepcopy(model), quantized)
    windows = heldout_windows(cfg, e.heldout_windows, tokenizer=tokenizer)
    bf16_loss = heldout_loss(storage_rounded(copy.deepcopy(model)), windows)
    int4_loss = heldout_loss(fake, windows)
    bf16_bytes = bf16_weights_bytes(model)
    write_int4_release(model, quantized, e, out, tokenizer,
                       extra={"heldout_loss": int4_loss, "bf16_heldout_loss": bf16_loss,
                              "heldout_tokens": windows[:, 1:].numel(), "bf16_weights_bytes": bf16_bytes,
                              "export": dataclasses.asdict(e)}, training=training_facts(source))
    if e.format == "gguf":
        from hyperloop_dist.export.gguf_container import GGUF_FILE, write_gguf

        write_gguf(model, quantized, Path(out) / GGUF_FILE)
    loaded = load_int4_release(out)  # never report on a release that does not load as written
    probe = windows[:2, :-1]
    with torch.no_grad():
        diff = (loaded(probe) - fake(probe)).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"{out}: the written release's logits differ from the quantized model's by {diff}")
    q_int4, q_bf16 = quantized_layer_bytes(Path(out) / WEIGHTS)
    report = ExportReport(Path(out), e.method, e.group_size, bf16_loss, int4_loss, bf16_bytes,
                          (Path(out) / WEIGHTS).stat().st_size, q_int4, q_bf16, windows[:, 1:].numel(), diff)
    return report


@dataclass
class QuantizeReport:
    out: Path
    scheme: str
    bf16_loss: float
    loss: float
    bf16_bytes: int
    bytes: int
    heldout_tokens: int
    seconds: float

    def table(self) -> str:
        rows = [("bf16", self.bf16_loss, "", self.bf16_bytes, ""),
                (self.scheme, self.loss, f"{self.loss - self.bf16_loss:+.4f}", self.bytes, f"{self.seconds:.1f}")]
        lines = [f"{'model':<14} {'held-out loss':>13} {'gap':>8} {'weights on disk':>16} {'quantize s':>10}"]
        lines += [f"{name:<14} {loss:>13.4f} {gap:>8} {size / 1e6:>13.2f} MB {s:>10}" for name, loss, gap, size, s in rows]
        lines.append(f"{self.heldout_tokens:,} held-out tokens; both run by the transformers class in bf16 (the "
                     f"quantized one loaded back from {self.out})")
        return "\n".join(lines)


def export_quantized(source: str | Path, out: str | Path, scheme: str, overrides: list[str] | None = None,
                     log: Log = print) -> QuantizeReport:
    """Quantize ``source`` (checkpoint, run directory or release) with llm-compressor's ``scheme`` and write a
    compressed-tensors release ``out``; report its held-out loss, loaded back, next to the bf16 model's."""
    if scheme not in SCHEMES:
        raise ConfigError(f"--quantize {scheme}: unknown scheme; choose one of {', '.join(SCHEMES)}")
    model, cfg, tokenizer = load_source(source, overrides or [])
    if cfg.export.quantize_embedding:
        raise ConfigError("export.quantize_embedding=true: --quantize leaves the embedding in bf16 (vLLM serves "
                          "quantized Linear layers); use --int4 for an INT4 embedding")
    torch.set_num_threads(cfg.train.threads_per_rank)
    e = cfg.export
    if scheme.startswith("W4A16"):
        target_modules(model, e)  # a group size that does not fit stops here, named, before calibration
    calibration = calibration_batches(cfg) if SCHEMES[scheme].calibrated else []
    windows = heldout_windows(cfg, e.heldout_windows, tokenizer=tokenizer)
    hf = transformers_model(model).to(STORAGE_DTYPE)  # what is not quantized is stored in bf16, as --int4 does
    bf16_loss = hf_loss(hf, windows)  # before quantizing, the bf16 model itself
    bf16_bytes = bf16_weights_bytes(model)
    description = SCHEMES[scheme].description.format(group=e.group_size)
    log(f"quantizing {cfg.model.kind} with llm-compressor: {scheme} ({description}"
        f"{f'; {len(calibration)} calibration batches' if calibration else ''})")
    start = time.perf_counter()
    quantize_in_memory(hf, scheme, e, calibration, cfg.data.tokenizer)
    seconds = time.perf_counter() - start
    with new_release_dir(out) as tmp:
        hf.save_pretrained(str(tmp), save_compressed=True)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        loss = release_loss(tmp, windows)  # what a downstream team loads, not the in-memory model
        info = json.loads((tmp / "config.json").read_text())
        info.update({"format": RELEASE_FORMAT, "model": dataclasses.asdict(model.cfg),
                     "quantized": {"scheme": scheme, "description": description,
                                   "tool": "llm-compressor", "heldout_loss": loss, "bf16_heldout_loss": bf16_loss,
                                   "heldout_tokens": windows[:, 1:].numel(),
                                   "export": {k: v for k, v in dataclasses.asdict(e).items()
                                              if k not in ("method", "format")}}})
        if training := training_facts(source):
            info["training"] = training
        (tmp / "config.json").write_text(json.dumps(info, indent=1))
        finish_int4_release(tmp)  # model code, tokenizer.json, README.md
        size = weights_bytes(tmp)
    return QuantizeReport(Path(out), scheme, bf16_loss, loss, bf16_bytes, size, windows[:, 1:].numel(), seconds)
