"""The release's ``README.md`` (model card) and the training facts it reports.

``config.json`` keeps the facts under ``training`` (steps, tokens, held-out loss of the exported weights)
and, for INT4, under ``int4`` (both losses); the card is written from ``config.json`` alone, so an INT4
release exported from a release carries its source's training facts forward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hyperloop_dist.config import HCConfig, ModelConfig
from hyperloop_dist.model.params import PAPER_LABEL, report

CARD = "README.md"


def training_facts(source: str | Path) -> dict[str, Any]:
    """Steps and tokens trained, from a checkpoint (``meta.json``) or a release (its ``training``)."""
    source = Path(source)
    if (source / "config.json").is_file():
        return dict(json.loads((source / "config.json").read_text()).get("training", {}))
    from hyperloop_dist.checkpoint.store import resolve_checkpoint
    from hyperloop_dist.config import load_config

    checkpoint = resolve_checkpoint(source)
    meta = json.loads((checkpoint / "meta.json").read_text())
    seq = load_config(checkpoint / "config.yaml").model.seq_length
    windows = meta.get("layout", {}).get("windows_per_step")
    return {"steps": meta["step"], "tokens": None if windows is None else meta["step"] * windows * seq}


def heldout_facts(checkpoint: Path, model: Any) -> dict[str, Any]:
    """The held-out loss of ``model`` on the checkpoint's run's held-out split (``export.heldout_windows``),
    or why it could not be measured (the run's data is not on this machine, for instance)."""
    from hyperloop_dist.config import load_config
    from hyperloop_dist.evaluation.heldout import heldout_windows, reference_heldout_loss

    cfg = load_config(checkpoint / "config.yaml")
    tokenizer = checkpoint / "tokenizer.model"
    try:
        windows = heldout_windows(cfg, cfg.export.heldout_windows, tokenizer=tokenizer if tokenizer.is_file() else None)
    except (OSError, ValueError) as exc:
        return {"heldout_loss": None, "heldout_note": f"not measured: {exc}"}
    return {"heldout_loss": reference_heldout_loss(model, windows), "heldout_tokens": windows[:, 1:].numel()}


def finish_release(release: Path, checkpoint: Path, model: Any) -> None:
    """Complete a full-precision release being written from ``checkpoint`` (whose weights ``model`` holds):
    training facts, model code, tokenizer, card."""
    from hyperloop_dist.export.remote_code import add_remote_code

    facts = {**training_facts(checkpoint), **heldout_facts(checkpoint, model)}
    config = release / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "training": facts}, indent=1))
    add_remote_code(release)
    write_model_card(release)


def finish_int4_release(release: Path) -> None:
    from hyperloop_dist.export.remote_code import add_remote_code

    add_remote_code(release)
    write_model_card(release)


def _loss(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4f}"


def write_model_card(release: Path) -> Path:
    info = json.loads((release / "config.json").read_text())
    fields = dict(info["model"])
    fields["hc"] = HCConfig(**fields["hc"])
    cfg = ModelConfig(**fields)
    params = report(cfg)
    training = info.get("training", {})
    int4, quantized = info.get("int4"), info.get("quantized")
    hc = f", {cfg.hc.streams} streams, H_res {cfg.hc.res_for(cfg.kind)}" if cfg.kind in ("hyperloop", "mhc") else ""
    tokens = training.get("tokens")
    rows = [
        ("kind", f"`{cfg.kind}`{hc}"),
        ("layers", f"begin {cfg.begin_layers} / middle {cfg.middle_layers} x {cfg.loops} loops / end {cfg.end_layers}"
                   f" ({cfg.unique_layers} distinct, effective depth {cfg.effective_depth})"),
        ("hidden / heads / query groups / FFN", f"{cfg.hidden_size} / {cfg.num_heads} / {cfg.query_groups} / "
                                                f"{cfg.ffn_size}"),
        ("vocabulary / training sequence", f"{cfg.vocab_size} / {cfg.seq_length}"),
        ("tied embeddings", "yes" if cfg.tie_embeddings else "no"),
        (PAPER_LABEL, f"{params.paper:,}"),
        ("params (total)", f"{params.total:,}"),
        ("training steps / tokens", f"{training.get('steps', 'unknown')} / "
                                    f"{'unknown' if tokens is None else f'{tokens:,}'}"),
    ]
    if quantized is not None:
        bf16, q = quantized["bf16_heldout_loss"], quantized["heldout_loss"]
        rows.append(("weights", f"{quantized['scheme']}: {quantized['description']} (llm-compressor, "
                                "compressed-tensors)"))
        rows.append((f"held-out loss bf16 / {quantized['scheme']}", f"{_loss(bf16)} / {_loss(q)} (gap {q - bf16:+.4f})"))
    elif int4 is None:
        note = training.get("heldout_note", "")
        rows.append(("held-out loss", _loss(training.get("heldout_loss")) + (f" ({note})" if note else "")
                     + (f" over {training['heldout_tokens']:,} tokens" if "heldout_tokens" in training else "")))
    else:
        bf16, q = int4.get("bf16_heldout_loss"), int4.get("heldout_loss")
        gap = "" if bf16 is None or q is None else f" (gap {q - bf16:+.4f})"
        rows.append(("weights", f"INT4 {int4['method']}, group size {int4['group_size']} (compressed-tensors "
                                "pack-quantized W4A16)"))
        rows.append(("held-out loss bf16 / INT4", f"{_loss(bf16)} / {_loss(q)}{gap}"))
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    dtype = "torch.bfloat16" if int4 or quantized else "torch.float32"
    name = release.name.removesuffix(".tmp")
    needs = "torch, transformers, safetensors and compressed-tensors" if int4 or quantized else "torch, transformers and safetensors"
    text = f"""# Hyperloop release: {cfg.kind}

A {'Hyperloop Transformer (arXiv 2604.21254)' if cfg.kind == 'hyperloop' else f'`{cfg.kind}` baseline'} exported by
`hyperloop export`. The model code ships in this directory (`modeling_hyperloop.py`), so it loads with
{needs} alone.

{table}

## Loading

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True, dtype={dtype})
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)  # reads config.json too
ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))
```

Generation uses a loop-aware key/value cache (one entry per loop pass of each middle layer). Inference
settings, set at load (`from_pretrained(..., num_loops_inference=2)`) or on `model.config`:

- `num_loops_inference`: run K <= {cfg.loops} loops (looped kinds); fewer loops read out through the end block.
- `exit_threshold` (experimental): while decoding with the cache, skip a token's remaining loops once the
  readout's largest probability reaches this value.

The tokenizer gives the ids of the training tokenizer (`tokenizer.model`, sentencepiece) and adds no BOS/EOS.
"""
    (release / CARD).write_text(text)
    return release / CARD
