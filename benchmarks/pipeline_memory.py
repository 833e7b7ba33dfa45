"""Peak activation memory per pipeline stage, 1F1B against GPipe, as ``grad_accum`` grows (PP = 2).

Each case trains a warm-up step (which allocates the optimizer state) and ``--steps`` measured steps on
2 gloo processes (``parallel.pp=2``), synthetic tokens, ``benchmarks/memory.py``'s model (d 256, 1/2/1
layers x 3 loops, seq 256, micro-batch 4). A stage's peak is the high-water mark of the measured steps
over what the process held before them (model, gradients, Adam state): the activations in flight plus
the step's transients. On CPU that is the resident set (``/proc/self/clear_refs`` resets its peak;
``MALLOC_MMAP_THRESHOLD_`` makes every large tensor its own mapping, so it follows live tensors); on CUDA
``torch.cuda.max_memory_allocated`` over ``memory_allocated``. Also per case: median step time, the
measured idle fraction per stage (time blocked in receives / step time) and the idealized bubble
``(P-1)/(m·L+P-1)``.

Under 1F1B a stage holds a bounded number of micro-batches (``parallel/pipeline_schedule.py``), so going
from 4 to 8 micro-batches leaves the peak where it is; under GPipe it doubles.

    python benchmarks/pipeline_memory.py
    python benchmarks/pipeline_memory.py --steps 3 --accum 4,8,16 model.loops=4

The last line reads ``peak ratio grad_accum 8 / 4: R`` for the default schedule (1F1B).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from memory import CPU_MODEL, _status_kib, collect_rows, start

SCHEDULES = ("1f1b", "gpipe")  # the first is the default


def measure(overrides: list[str], steps: int) -> dict:
    """This rank's figures (run under torchrun-style environment variables)."""
    from mfu import SyntheticBatches

    from hyperloop_dist.config import load_config
    from hyperloop_dist.parallel import cpu_shim
    from hyperloop_dist.parallel.distributed import init_distributed, shutdown_distributed
    from hyperloop_dist.train import engines

    for name in ("torch._dynamo", "torch._inductor"):  # imported lazily during the first step otherwise
        importlib.import_module(name)
    cfg = load_config(None, [f"parallel.nproc_per_node={os.environ['WORLD_SIZE']}", "logging.wandb_mode=disabled",
                             *overrides])
    info = init_distributed(cfg)
    cuda = cpu_shim.cuda_available()
    try:
        engine = engines.build(cfg, info)
        data = SyntheticBatches(cfg.train.micro_batch_size, cfg.model.seq_length, cfg.model.vocab_size)
        engine.step([data.next(0, m) for m in range(cfg.train.grad_accum)], 0, None)  # warm-up: Adam state, communication buffers
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = _status_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        seconds, idle = [], []
        for step in range(1, steps + 1):
            start_s = time.perf_counter()
            engine.step([data.next(step, m) for m in range(cfg.train.grad_accum)], step, None)
            seconds.append(time.perf_counter() - start_s)
            idle.append(engine.pipeline.stats.idle_fraction)
        peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    finally:
        shutdown_distributed()
    return {"peak_bytes": peak - base, "step_s": statistics.median(seconds), "idle": statistics.mean(idle)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        steps, overrides = int(sys.argv[2]), sys.argv[3:]
        print(json.dumps(measure(overrides, steps)))
        return
    from hyperloop_dist.config import load_config
    from hyperloop_dist.model.hyper_connections import num_passes
    from hyperloop_dist.parallel.pipeline import bubble_fraction

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="measured steps per case (after one warm-up step)")
    ap.add_argument("--accum", default="4,8", help="comma-separated grad_accum values (micro-batches per step)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("overrides", nargs="*", default=[], help="section.field=value overrides for every case")
    args = ap.parse_intermixed_args()
    accums = [int(a) for a in args.accum.split(",")]
    base = [*CPU_MODEL, "parallel.pp=2", *(["train.precision=bf16"] if args.device == "cuda" else []),
            *args.overrides]
    cfg = load_config(None, [*base, "parallel.nproc_per_node=2"])
    model = cfg.model
    passes = num_passes(model.kind, model.loops)
    rows = {}
    for schedule in SCHEDULES:
        for accum in accums:
            overrides = [*base, f"parallel.pp_schedule={schedule}", f"train.grad_accum={accum}"]
            script = [str(args.steps), *overrides]  # the worker reads its step count first
            ranks = collect_rows(start(None, script, 2, args.device, script=__file__))
            rows[schedule, accum] = ranks
            peaks = ", ".join(f"{r['peak_bytes'] / 2**20:.0f}" for r in ranks)
            print(f"[{schedule} x {accum}] peak per stage {peaks} MiB", flush=True)

    print(f"\nPP=2, {model.kind} d {model.hidden_size}, {passes} passes, seq {model.seq_length}, micro-batch "
          f"{cfg.train.micro_batch_size}, {args.device}; peak over the pre-step resident memory, {args.steps} steps")
    header = (f"{'schedule':<9}{'accum':>6}{'stage 0 MiB':>13}{'stage 1 MiB':>13}{'step s':>9}"
              f"{'idle s0':>9}{'idle s1':>9}{'ideal bubble':>14}")
    print(header)
    print("-" * len(header))
    for (schedule, accum), ranks in rows.items():
        peaks = "".join(f"{r['peak_bytes'] / 2**20:>13.1f}" for r in ranks)
        idle = "".join(f"{r['idle']:>9.3f}" for r in ranks)
        print(f"{schedule:<9}{accum:>6}{peaks}{ranks[0]['step_s']:>9.2f}{idle}"
              f"{bubble_fraction(2, accum, passes):>14.3f}")
    lo, hi = min(accums), max(accums)

    def ratio(schedule: str) -> float:
        return max(r["peak_bytes"] for r in rows[schedule, hi]) / max(r["peak_bytes"] for r in rows[schedule, lo])

    for schedule in reversed(SCHEDULES):  # the default schedule's line last
        print(f"{'' if schedule == SCHEDULES[0] else f'({schedule}) '}peak ratio grad_accum {hi} / {lo}: "
              f"{ratio(schedule):.2f}")


if __name__ == "__main__":
    main()
