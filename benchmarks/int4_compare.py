"""INT4 side by side: the exports' W4A16 methods for Hyperloop and its depth-matched Transformer, with the same
calibration batches and held-out windows in every row: ``--int4 method=rtn`` (compressed-tensors' own
rounding), ``--int4 method=gptq`` (llm-compressor's GPTQ, written by our INT4 writer), and ``--quantize``
``W4A16-RTN`` / ``W4A16`` (GPTQ) / ``W4A16-AWQ`` (llm-compressor end to end).

Trains both models with ``hyperloop train`` (one process, pre-tokenized windows) unless their run
directories already hold a checkpoint. Every quantized row is a release written to disk and loaded back
through ``AutoModelForCausalLM`` in bf16 (compressed-tensors decompresses), so the losses are what a
downstream team gets; the bf16 row runs the same class on the bf16 weights.

    python benchmarks/int4_compare.py                      # fixture corpus, hidden 128, 300 steps, group 128
    python benchmarks/int4_compare.py --runs runs/int4 --steps 6000 --corpus data/english/
    python benchmarks/int4_compare.py --runs runs/int4-wd0 --steps 6000 --weight-decay 0 --corpus data/english/

The last one is where both kinds' RTN gap passes 0.02 nats (docs/export.md has its table).

The methods differ only where RTN costs something: the script says whether RTN's gap reaches
``--decisive-gap`` (0.02 nats) and how much of it GPTQ and AWQ win back. (This script also made the
decision recorded in docs/export.md, when our own GPTQ was one of its rows.)
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
INT4_METHODS = ("rtn", "gptq")  # hyperloop export --int4 method=...
SCHEMES = ("W4A16-RTN", "W4A16", "W4A16-AWQ")  # hyperloop export --quantize ...


def model_overrides(args: argparse.Namespace) -> list[str]:
    return [f"model.hidden_size={args.hidden}", "model.num_heads=4", f"model.vocab_size={args.vocab}",
            f"model.seq_length={args.seq}", "model.begin_layers=1", "model.middle_layers=2", "model.end_layers=1",
            f"model.loops={args.loops}", *([f"model.ffn_hidden_size={args.ffn}"] if args.ffn else [])]


def data_overrides(corpus: Path, work: Path) -> list[str]:
    return ["data.corpus=dir", f"data.dir={corpus}", f"data.tokenizer={work / 'tokenizer.model'}",
            "data.loader=windows"]


def train(kind: str, run_dir: Path, overrides: list[str], args: argparse.Namespace) -> float:
    if (run_dir / "checkpoints" / "latest").is_file():
        print(f"{kind}: using the checkpoint in {run_dir}")
        return 0.0
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "hyperloop_dist.cli", "train", *overrides, f"model.kind={kind}",
           f"train.steps={args.steps}", "train.micro_batch_size=16", f"optim.lr={args.lr}",
           f"optim.weight_decay={args.weight_decay}", "optim.warmup_steps=20",
           "train.log_interval=50", "parallel.nproc_per_node=1", f"train.run_dir={run_dir}"]
    print(f"{kind}: training {args.steps} steps -> {run_dir}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def evaluate(run_dir: Path, settings: list[str], methods: tuple[str, ...] = ("rtn", "gptq")) -> dict:
    """Parameters, held-out tokens, and the held-out loss in bf16 and after each INT4 ``methods``."""
    from hyperloop_dist.export.int4 import apply_fake_quantized, storage_rounded
    from hyperloop_dist.export.quantize_release import (
        calibration_batches,
        heldout_loss,
        heldout_windows,
        load_source,
        quantize_model,
    )

    model, cfg, _ = load_source(run_dir, settings)
    windows = heldout_windows(cfg, cfg.export.heldout_windows)
    calibration = calibration_batches(cfg) if "gptq" in methods else []
    row = {"params": sum(p.numel() for p in model.parameters()), "tokens": windows[:, 1:].numel(),
           "bf16": heldout_loss(storage_rounded(copy.deepcopy(model)), windows)}
    for method in methods:
        start = time.perf_counter()
        q = quantize_model(model, dataclasses.replace(cfg.export, method=method), calibration, cfg.data.tokenizer)
        row[f"{method}_s"] = time.perf_counter() - start
        row[method] = heldout_loss(apply_fake_quantized(copy.deepcopy(model), q), windows)
    return row


def side_by_side(run_dir: Path, settings: list[str], work: Path) -> dict[str, dict[str, float]]:
    """Per row (bf16, each --int4 method, each --quantize scheme): held-out loss of the release loaded back,
    seconds to quantize, weights bytes on disk."""
    from hyperloop_dist.evaluation.heldout import heldout_windows
    from hyperloop_dist.export.compressed import write_int4_release
    from hyperloop_dist.export.llm_compressor import release_loss, weights_bytes
    from hyperloop_dist.export.quantize_release import (
        calibration_batches,
        export_quantized,
        load_source,
        quantize_model,
    )

    reports = {scheme: export_quantized(run_dir, work / f"{run_dir.name}-{scheme}", scheme, settings,
                                        log=lambda *_: None) for scheme in SCHEMES}
    model, cfg, _ = load_source(run_dir, settings)
    windows = heldout_windows(cfg, cfg.export.heldout_windows)
    calibration = calibration_batches(cfg)
    first = reports[SCHEMES[0]]
    rows = {"bf16": {"loss": first.bf16_loss, "s": 0.0, "bytes": first.bf16_bytes,
                     "tokens": first.heldout_tokens}}
    for method in INT4_METHODS:
        out = work / f"{run_dir.name}-int4-{method}"
        start = time.perf_counter()
        e = dataclasses.replace(cfg.export, method=method)
        q = quantize_model(model, e, calibration, cfg.data.tokenizer)
        seconds = time.perf_counter() - start
        write_int4_release(model, q, e, out)
        rows[f"--int4 {method}"] = {"loss": release_loss(out, windows), "s": seconds, "bytes": weights_bytes(out)}
    for scheme, report in reports.items():
        rows[f"--quantize {scheme}"] = {"loss": report.loss, "s": report.seconds, "bytes": report.bytes}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=REPO / "tests" / "fixtures" / "corpus",
                   help="directory of .txt files (copied; default: the test fixture corpus)")
    p.add_argument("--runs", type=Path, default=None, help="keep/reuse run directories here (default: temporary)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=None, help="FFN width (default 8/3 hidden, rounded up to 64)")
    p.add_argument("--loops", type=int, default=3)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay (the recipes' 0.1; 0 lets weights grow outliers, so RTN costs more)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--heldout-windows", type=int, default=256)
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated model kinds (default: both)")
    p.add_argument("--decisive-gap", type=float, default=0.02, help="RTN gap (nats) below which nothing is decided")
    args = p.parse_args()
    torch.set_num_threads(1)

    work = args.runs or Path(tempfile.mkdtemp(prefix="int4-compare-"))
    corpus = work / "corpus"
    if not corpus.is_dir():
        shutil.copytree(args.corpus, corpus, ignore=shutil.ignore_patterns("tokens"))
    overrides = [*model_overrides(args), *data_overrides(corpus, work)]
    settings = [*overrides, f"export.group_size={args.group_size}",
                f"export.calibration_batches={args.calibration_batches}",
                f"export.heldout_windows={args.heldout_windows}"]
    tables = {}
    with tempfile.TemporaryDirectory(prefix="int4-releases-") as releases:
        for kind in args.kinds.split(","):
            train(kind, work / kind, overrides, args)
            tables[kind] = side_by_side(work / kind, settings, Path(releases))

    tokens = next(iter(tables.values()))["bf16"]["tokens"]
    print(f"\nW4A16, symmetric, group {args.group_size}; hidden {args.hidden}, 1/2/1 layers x {args.loops} loops "
          f"(transformer: {2 + 2 * args.loops} distinct layers), {args.steps} steps, weight decay {args.weight_decay:g}; "
          f"{tokens:,} held-out tokens, "
          f"{args.calibration_batches} calibration batches; every row loaded back through AutoModelForCausalLM (bf16)")
    print(f"{'kind':<12} {'method':<22} {'held-out':>9} {'gap':>8} {'quantize s':>10} {'weights MB':>10}")
    for kind, rows in tables.items():
        bf16 = rows["bf16"]["loss"]
        for name, r in rows.items():
            gap = "" if name == "bf16" else f"{r['loss'] - bf16:+.4f}"
            print(f"{kind:<12} {name:<22} {r['loss']:>9.4f} {gap:>8} {r['s']:>10.1f} {r['bytes'] / 1e6:>10.2f}")
    print()
    for kind, rows in tables.items():
        bf16, rtn = rows["bf16"]["loss"], rows["--int4 rtn"]["loss"]
        won = {name: (rtn - rows[name]["loss"]) / (rtn - bf16) for name in ("--int4 gptq", "--quantize W4A16-AWQ")
               if rtn > bf16}
        decisive = "" if rtn - bf16 >= args.decisive_gap else f" (< {args.decisive_gap}: too small to tell methods apart)"
        print(f"{kind}: RTN gap {rtn - bf16:+.4f}{decisive}; share of it won back: "
              + ", ".join(f"{name} {share:.0%}" for name, share in won.items()))
    if set(KINDS) <= set(tables):
        h, t = tables["hyperloop"], tables["transformer"]
        print("Hyperloop - Transformer held-out loss (negative = Hyperloop ahead): "
              + ", ".join(f"{name} {h[name]['loss'] - t[name]['loss']:+.4f}" for name in h))
    if args.runs is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
