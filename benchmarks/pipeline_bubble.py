"""Idle fraction per pipeline rank: the circular (loop-aware) schedule vs a plain pipeline over the depth.

For L loops and PP stages, trains a tiny ``hyperloop`` (middle block looped L times on the ring) and its
depth-matched ``transformer`` (the same effective depth unrolled, one pass over the pipeline) for a few
steps on real gloo processes, with m = PP micro-batches per step, and reports the time each rank spent
blocked in receives divided by its step time (the first step is warm-up and is dropped). Beside it: the
idealized bubble, ``(P-1)/(mL+P-1)`` circular and ``(P-1)/(m+P-1)`` plain (1F1B's bubble equals GPipe's).

    python benchmarks/pipeline_bubble.py              # L in {2,4,8}, PP in {2,4}
    python benchmarks/pipeline_bubble.py --loops 4 --pp 2 --steps 5 --hidden 256 --layers-per-stage 2

The first stage also runs the loop boundary (hyper-connection gates, 20 Sinkhorn iterations) once per pass:
at toy sizes that costs about one layer, so the last stage waits on it (load imbalance, not bubble);
``--hidden`` / ``--layers-per-stage`` make the per-stage work more realistic.

On a 2-core machine PP=4 oversubscribes the cores: measured idle time then includes waiting for a core,
so read the PP=4 rows for the trend, and GPU runs for absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, kind: str, loops: int, steps: int, hidden: int, per_stage: int,
            out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from megatron.core import parallel_state as ps
    from mfu import SyntheticBatches  # (benchmarks/ is on the path: this script's folder)

    from hyperloop_dist.config import load_config
    from hyperloop_dist.parallel.distributed import init_distributed, shutdown_distributed
    from hyperloop_dist.train.engines.megatron import MegatronEngine

    # middle_layers = per_stage * PP: Hyperloop runs them L times round the ring; the transformer unrolls the
    # same L x middle layers into one pass, so both do L x per_stage layers per micro-batch on every rank.
    cfg = load_config(None, [
        f"model.kind={kind}", f"model.hidden_size={hidden}", "model.num_heads=4", "model.seq_length=64",
        "model.vocab_size=512", "model.begin_layers=0", "model.end_layers=0", "model.tie_embeddings=false",
        f"model.loops={loops}", f"model.middle_layers={per_stage * world}",
        f"parallel.nproc_per_node={world}", f"parallel.pp={world}", f"train.grad_accum={world}",
        "train.micro_batch_size=4", f"train.steps={steps}",
    ])
    info = init_distributed(cfg)
    engine = MegatronEngine(cfg, info)
    pipeline = engine.pipeline
    sampler = SyntheticBatches(cfg.train.micro_batch_size, cfg.model.seq_length, cfg.model.vocab_size)
    idle, seconds = [], []
    for step in range(steps):
        engine.step([sampler.next(step, m) for m in range(cfg.train.grad_accum)], step, None)
        if step > 0:
            idle.append(pipeline.stats.idle_fraction)
            seconds.append(pipeline.stats.total_s)
    Path(out, f"{kind}-{ps.get_pipeline_model_parallel_rank()}.json").write_text(json.dumps([idle, seconds]))
    shutdown_distributed()


def measure(kind: str, loops: int, pp: int, steps: int, hidden: int, per_stage: int) -> tuple[list[float], float]:
    """(mean idle fraction of each rank, mean step seconds)."""
    from hyperloop_dist.parallel.launch import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(pp, free_port(), kind, loops, steps, hidden, per_stage, out), nprocs=pp,
                           start_method="spawn")
        results = [json.loads(Path(out, f"{kind}-{r}.json").read_text()) for r in range(pp)]
    return [statistics.mean(idle) for idle, _ in results], statistics.mean(results[0][1])


def main() -> None:
    from hyperloop_dist.parallel.pipeline import bubble_fraction

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loops", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument("--pp", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers-per-stage", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    header = ("L", "PP", "m", "circular idle/rank (measured)", "circular ideal", "plain idle/rank (measured)",
              "plain ideal", "step s circular", "step s plain", "plain/circular step time")
    rows = []
    for pp in args.pp:
        for loops in args.loops:
            sizes = (args.steps, args.hidden, args.layers_per_stage)
            circ, circ_s = measure("hyperloop", loops, pp, *sizes)
            plain, plain_s = measure("transformer", loops, pp, *sizes)
            rows.append((str(loops), str(pp), str(pp), " ".join(f"{x:.2f}" for x in circ),
                         f"{bubble_fraction(pp, pp, loops):.2f}", " ".join(f"{x:.2f}" for x in plain),
                         f"{bubble_fraction(pp, pp, 1):.2f}", f"{circ_s:.3f}", f"{plain_s:.3f}",
                         f"{plain_s / circ_s:.2f}x"))
            print(f"done L={loops} PP={pp}", flush=True)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
