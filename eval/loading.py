"""Load a trained model for evaluation from whatever the user points at.

Formats are tried in order; each is a ``(name, detect, load)`` entry of :data:`LOADERS`:

* ``release``: ``hyperloop export --release`` output (``config.json`` + ``model.safetensors``),
* ``checkpoint``: a training checkpoint or a run directory (its latest good checkpoint), consolidated in
  memory through the release code (any engine and layout).

* ``int4-release``: ``hyperloop export --int4`` output (compressed-tensors W4A16), loaded through
  ``transformers`` and dequantized; its table rows add the bf16 loss measured at export and both sizes.

Another format plugs in with :func:`register_loader`; it returns a :class:`LoadedModel` whose ``model``
maps tokens ``[b, s]`` to logits ``[b, s, vocab]``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hyperloop_dist.checkpoint.store import CheckpointError
from hyperloop_dist.config import ModelConfig
from hyperloop_dist.data.tokenizer import load_tokenizer


class EvalError(ValueError):
    """What to evaluate, or on what, cannot be used; the message names the problem and the fix."""


@dataclass
class LoadedModel:
    model: torch.nn.Module  # tokens [b, s] -> logits [b, s, vocab]; a ReferenceModel for our own formats
    cfg: ModelConfig
    tokenizer_path: Path
    source: str  # what was loaded, for tables
    notes: list[tuple[str, str]] = field(default_factory=list)  # extra summary-table rows about the source

    @property
    def tokenizer(self):
        return load_tokenizer(self.tokenizer_path, self.cfg.vocab_size)

    def logits_fn(self, loops: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """Logits at the trained loop count, or after ``loops`` loops (looped kinds, see loops.py)."""
        if loops is None or loops == self.cfg.loops:
            return self.model
        from hyperloop_dist.evaluation.loops import loop_logits, reference_parts

        return loop_logits(reference_parts(self.model), loops)


def _is_release(path: Path) -> bool:
    from hyperloop_dist.export.release import RELEASE_FORMAT

    config = path / "config.json"
    if not config.is_file() or not (path / "model.safetensors").is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == RELEASE_FORMAT
    except ValueError:
        return False


def _load_release(path: Path) -> LoadedModel:
    from hyperloop_dist.export.release import load_release

    model = load_release(path)
    return LoadedModel(model, model.cfg, path / "tokenizer.model", f"release {path}")


def _is_checkpoint(path: Path) -> bool:
    return (path / "manifest.json").is_file() or (path / "checkpoints").is_dir()


def _load_checkpoint(path: Path) -> LoadedModel:
    from hyperloop_dist.checkpoint.store import resolve_checkpoint
    from hyperloop_dist.export.release import checkpoint_model

    checkpoint = resolve_checkpoint(path)
    model = checkpoint_model(checkpoint)
    return LoadedModel(model, model.cfg, checkpoint / "tokenizer.model", f"checkpoint {checkpoint}")


def _is_int4_release(path: Path) -> bool:
    from hyperloop_dist.export.compressed import is_int4_release

    return is_int4_release(path)


def _load_int4_release(path: Path) -> LoadedModel:
    from hyperloop_dist.export.compressed import WEIGHTS, load_int4_release

    config = json.loads((path / "config.json").read_text())
    if "quantized" in config:
        return _load_quantized_release(path, config["quantized"])
    model = load_int4_release(path)
    info = config.get("int4", {})
    notes = [("INT4", f"{info.get('method', '?')}, group size {info.get('group_size', '?')}, "
                      f"{(path / WEIGHTS).stat().st_size / 1e6:.2f} MB on disk")]
    if "bf16_heldout_loss" in info:
        notes.append(_at_export(info, "INT4"))
    if "bf16_weights_bytes" in info:
        notes.append(("bf16 weights would take", f"{info['bf16_weights_bytes'] / 1e6:.2f} MB"))
    return LoadedModel(model, model.cfg, path / "tokenizer.model", f"INT4 release {path}", notes)


def _at_export(info: dict, name: str) -> tuple[str, str]:
    """The note row for the losses a quantized release recorded at export."""
    bf16, quantized = info["bf16_heldout_loss"], info["heldout_loss"]
    return ("at export (same held-out windows)",
            f"bf16 {bf16:.4f} vs {name} {quantized:.4f} (gap {quantized - bf16:+.4f}, {info['heldout_tokens']:,} tokens)")


def _load_quantized_release(path: Path, info: dict) -> LoadedModel:
    """An llm-compressor release (``hyperloop export --quantize``). A weight-only scheme loads as its
    dequantized weights, exactly what its quantized forward computes; a scheme that also quantizes
    activations cannot be evaluated that way, so it is refused rather than reported as if unquantized."""
    from hyperloop_dist.export.compressed import load_int4_release

    scheme = info["scheme"]
    if not scheme.startswith("W4A16"):
        raise CheckpointError(f"{path}: a {scheme} release quantizes activations too, which hyperloop eval's "
                              f"models do not; its held-out loss at export is in config.json (quantized."
                              f"heldout_loss = {info['heldout_loss']:.4f}); run it through AutoModelForCausalLM "
                              "or vLLM for other measurements")
    model = load_int4_release(path)
    notes = [(scheme, f"{info['description']} (llm-compressor)"), _at_export(info, scheme)]
    return LoadedModel(model, model.cfg, path / "tokenizer.model", f"{scheme} release {path}", notes)


LOADERS: list[tuple[str, Callable[[Path], bool], Callable[[Path], LoadedModel]]] = [
    ("int4-release", _is_int4_release, _load_int4_release),
    ("release", _is_release, _load_release),
    ("checkpoint", _is_checkpoint, _load_checkpoint),
]


def register_loader(name: str, detect: Callable[[Path], bool], load: Callable[[Path], LoadedModel]) -> None:
    """Add a checkpoint format (tried before the built-in ones)."""
    LOADERS.insert(0, (name, detect, load))


def load_for_eval(path: str | Path) -> LoadedModel:
    path = Path(path)
    if not path.is_dir():
        raise EvalError(f"{path} does not exist or is not a directory; pass a release (hyperloop export "
                        "--release), a run directory or a checkpoint directory")
    for _, detect, load in LOADERS:
        if detect(path):
            loaded = load(path)
            if not loaded.tokenizer_path.is_file():
                raise EvalError(f"{path}: no tokenizer.model next to the weights; copy the run's tokenizer there")
            return loaded
    names = ", ".join(name for name, _, _ in LOADERS)
    raise EvalError(f"{path}: not a model directory this version reads ({names}); pass a release "
                    "(hyperloop export --release), a run directory or a checkpoint directory")
