"""The paper's main table in miniature: Hyperloop, looped, mHC and the depth-matched Transformer trained on
the same tokens with the same seed, side by side: parameters, held-out loss and INT4 (RTN and GPTQ)
held-out loss; with ``--ablation``, also the paper's Table 6 rows (the Hyperloop's H_res as Sinkhorn and
as the identity).

Each kind is the tiny-cpu recipe (`recipes/tiny-cpu.yaml`: d 128, 1/2/1 layers x 3 loops, the `english`
corpus, 2 processes) with only ``model.kind`` changed; the Transformer and mHC unroll the loops into 8
distinct layers. Every model is scored on the same held-out windows (the held-out play), in bf16 storage
and after INT4 weight-only RTN quantization exactly as ``hyperloop export --int4`` does it
(``benchmarks/int4_compare.py`` holds the scoring). About 15 minutes on 2 cores at the default 300 steps.

    python benchmarks/paper_miniature.py
    python benchmarks/paper_miniature.py --steps 600 --runs runs/miniature      # keeps and reuses the runs
    python benchmarks/paper_miniature.py --device cuda     # one GPU, bf16, 2 micro-batches per step (same tokens)
    python benchmarks/paper_miniature.py --ablation --runs runs/miniature train.seed=1   # + Table 6, another seed

At this size the table shows the mechanics and the ordering, not the paper's magnitudes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from int4_compare import evaluate  # benchmarks/ is on sys.path when this script runs

REPO = Path(__file__).resolve().parents[1]
KINDS = ("hyperloop", "looped", "mhc", "transformer")
ABLATION = {"hyperloop-sinkhorn": ["model.hc.res=sinkhorn"], "hyperloop-identity": ["model.hc.res=identity"]}
METHODS = ("rtn", "gptq")


def train(name: str, run_dir: Path, recipe: str, overrides: list[str]) -> float | None:
    """Train ``name`` (a kind, or an ablation row) into ``run_dir`` (skipped when it already holds a
    checkpoint); seconds taken."""
    if (run_dir / "checkpoints" / "latest").is_file():
        print(f"{name}: using the checkpoint in {run_dir}", flush=True)
        return None
    kind = name.split("-")[0]
    cmd = [sys.executable, "-m", "hyperloop_dist.cli", "train", recipe, f"model.kind={kind}", *ABLATION.get(name, []),
           f"train.run_dir={run_dir}", "eval.interval=0", "logging.wandb_mode=disabled", *overrides]
    print(f"{name}: {' '.join(cmd[3:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def last_train_loss(run_dir: Path, window: int = 20) -> float:
    """Mean training loss of the last ``window`` logged steps (metrics.jsonl)."""
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r.get("loss") is not None]
    tail = losses[-window:]
    return sum(tail) / len(tail) if tail else math.nan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/tiny-cpu.yaml")
    p.add_argument("--steps", type=int, default=None, help="train.steps (default: the recipe's)")
    p.add_argument("--runs", type=Path, default=None, help="keep/reuse run directories here (default: temporary)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--heldout-windows", type=int, default=256)
    p.add_argument("--ablation", action="store_true", help="also the Table 6 rows: hc.res sinkhorn and identity")
    p.add_argument("overrides", nargs="*", default=[], help="section.field=value overrides for every kind")
    args = p.parse_intermixed_args()
    torch.set_num_threads(2)

    work = args.runs or Path(tempfile.mkdtemp(prefix="paper-miniature-"))
    from hyperloop_dist.config import load_config

    recipe_cfg = load_config(args.recipe, args.overrides)
    # On one GPU: the recipe's ranks become micro-batches, so every kind still sees the same tokens per step.
    gpu = ["parallel.nproc_per_node=1", "train.precision=bf16",
           f"train.grad_accum={recipe_cfg.train.grad_accum * recipe_cfg.parallel.nproc_per_node}"]
    overrides = [*([f"train.steps={args.steps}"] if args.steps else []), *(gpu if args.device == "cuda" else []),
                 *args.overrides]
    rows = {}
    for name in [*args.kinds, *(ABLATION if args.ablation else ())]:
        run_dir = (work / name).resolve()
        seconds = train(name, run_dir, args.recipe, overrides)
        settings = [f"export.heldout_windows={args.heldout_windows}"]
        rows[name] = {**evaluate(run_dir, settings, methods=METHODS), "train_s": seconds,
                      "train_loss": last_train_loss(run_dir)}
        r = rows[name]
        print(f"{name}: held-out {r['bf16']:.4f}, INT4 RTN {r['rtn']:.4f}, GPTQ {r['gptq']:.4f}", flush=True)

    cfg = load_config(args.recipe, overrides)
    tokens = cfg.train.steps * cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.parallel.nproc_per_node \
        * cfg.model.seq_length
    ref = rows.get("transformer")
    print(f"\n{args.recipe}: d {cfg.model.hidden_size}, {cfg.model.begin_layers}/{cfg.model.middle_layers}/"
          f"{cfg.model.end_layers} layers x {cfg.model.loops} loops, {cfg.model.hc.streams} streams; "
          f"{cfg.train.steps} steps, {tokens:,} training tokens, seed {cfg.train.seed}; "
          f"{next(iter(rows.values()))['tokens']:,} held-out tokens; INT4 RTN and GPTQ group {cfg.export.group_size}")
    header = (f"{'model':<20}{'params':>11}{'vs transf.':>11}{'train loss':>11}{'held-out':>10}{'ppl':>8}"
              f"{'INT4 RTN':>10}{'INT4 GPTQ':>11}{'GPTQ gap':>10}{'train s':>9}")
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        rel = f"{r['params'] / ref['params']:.2f}x" if ref else "-"
        secs = f"{r['train_s']:.0f}" if r["train_s"] is not None else "reused"
        print(f"{name:<20}{r['params']:>11,}{rel:>11}{r['train_loss']:>11.4f}{r['bf16']:>10.4f}"
              f"{math.exp(r['bf16']):>8.2f}{r['rtn']:>10.4f}{r['gptq']:>11.4f}{r['gptq'] - r['bf16']:>+10.4f}"
              f"{secs:>9}")
    if "hyperloop" in rows and ref:
        h = rows["hyperloop"]
        print(f"\nhyperloop vs depth-matched transformer: {h['params'] / ref['params']:.2f}x the parameters, "
              f"held-out loss {h['bf16'] - ref['bf16']:+.4f} (bf16), {h['gptq'] - ref['gptq']:+.4f} (INT4 GPTQ)")
    if args.runs is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
