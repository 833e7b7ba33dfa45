"""The paper's INT4 comparison in miniature: held-out loss of Hyperloop and its depth-matched Transformer
in bf16, INT4 RTN and INT4 GPTQ (same calibration batches and held-out windows for every row).

Trains both models with ``hyperloop train`` (one process, pre-tokenized windows) unless their run
directories already hold a checkpoint, then quantizes each in memory exactly as ``hyperloop export --int4``
does (the release's dequantized weights are bit-identical to these; tests/test_export.py checks it).

    python benchmarks/quantization.py                       # fixture corpus, hidden 64, 300 steps, group 64
    python benchmarks/quantization.py --runs runs/quant --steps 600 --hidden 128 --group-size 128
    python benchmarks/quantization.py --corpus data/english/   # any directory of .txt files

Paper-scale numbers need paper-scale models: at this size the table shows the mechanics and the ordering.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KINDS = ("hyperloop", "transformer")


def model_overrides(args: argparse.Namespace) -> list[str]:
    return [f"model.hidden_size={args.hidden}", "model.num_heads=4", f"model.vocab_size={args.vocab}",
            f"model.seq_length={args.seq}", "model.begin_layers=1", "model.middle_layers=2", "model.end_layers=1",
            f"model.loops={args.loops}"]


def data_overrides(corpus: Path, work: Path) -> list[str]:
    return ["data.corpus=dir", f"data.dir={corpus}", f"data.tokenizer={work / 'tokenizer.model'}",
            "data.loader=windows"]


def train(kind: str, run_dir: Path, overrides: list[str], args: argparse.Namespace) -> float:
    if (run_dir / "checkpoints" / "latest").is_file():
        print(f"{kind}: using the checkpoint in {run_dir}")
        return 0.0
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "hyperloop_dist.cli", "train", *overrides, f"model.kind={kind}",
           f"train.steps={args.steps}", "train.micro_batch_size=16", f"optim.lr={args.lr}", "optim.warmup_steps=20",
           "train.log_interval=50", "parallel.nproc_per_node=1", f"train.run_dir={run_dir}"]
    print(f"{kind}: training {args.steps} steps -> {run_dir}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def evaluate(run_dir: Path, settings: list[str], methods: tuple[str, ...] = ("rtn", "gptq")) -> dict:
    """Parameters, held-out tokens, and the held-out loss in bf16 and after each INT4 ``methods``."""
    from hyperloop_dist.export.int4 import apply_fake_quantized, quantize_model, storage_rounded
    from hyperloop_dist.export.quantize_release import (
        calibration_batches,
        heldout_loss,
        heldout_windows,
        load_source,
    )

    model, cfg, _ = load_source(run_dir, settings)
    windows = heldout_windows(cfg, cfg.export.heldout_windows)
    calibration = calibration_batches(cfg) if "gptq" in methods else []
    row = {"params": sum(p.numel() for p in model.parameters()), "tokens": windows[:, 1:].numel(),
           "bf16": heldout_loss(storage_rounded(copy.deepcopy(model)), windows)}
    for method in methods:
        start = time.perf_counter()
        q = quantize_model(model, dataclasses.replace(cfg.export, method=method), calibration)
        row[f"{method}_s"] = time.perf_counter() - start
        row[method] = heldout_loss(apply_fake_quantized(copy.deepcopy(model), q), windows)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=REPO / "tests" / "fixtures" / "corpus",
                   help="directory of .txt files (copied; default: the test fixture corpus)")
    p.add_argument("--runs", type=Path, default=None, help="keep/reuse run directories here (default: temporary)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--loops", type=int, default=3)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--heldout-windows", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(1)

    work = args.runs or Path(tempfile.mkdtemp(prefix="quant-bench-"))
    corpus = work / "corpus"
    if not corpus.is_dir():
        shutil.copytree(args.corpus, corpus, ignore=shutil.ignore_patterns("tokens"))
    overrides = [*model_overrides(args), *data_overrides(corpus, work)]
    settings = [*overrides, f"export.group_size={args.group_size}",
                f"export.calibration_batches={args.calibration_batches}",
                f"export.heldout_windows={args.heldout_windows}"]
    rows = {}
    for kind in KINDS:
        train_s = train(kind, work / kind, overrides, args)
        rows[kind] = {**evaluate(work / kind, settings), "train_s": train_s}

    print(f"\nINT4 weight-only, symmetric, group {args.group_size}; hidden {args.hidden}, 1/2/1 layers x "
          f"{args.loops} loops (transformer: {2 + 2 * args.loops} distinct layers), {args.steps} steps; "
          f"{rows['hyperloop']['tokens']:,} held-out tokens, {args.calibration_batches} calibration batches")
    print(f"{'model':<12} {'params':>9} {'bf16':>8} {'RTN':>8} {'gap':>8} {'GPTQ':>8} {'gap':>8} {'GPTQ s':>7}")
    for kind, r in rows.items():
        print(f"{kind:<12} {r['params']:>9,} {r['bf16']:>8.4f} {r['rtn']:>8.4f} {r['rtn'] - r['bf16']:>+8.4f} "
              f"{r['gptq']:>8.4f} {r['gptq'] - r['bf16']:>+8.4f} {r['gptq_s']:>7.1f}")
    if args.runs is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
