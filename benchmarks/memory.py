"""Peak memory per rank of real training steps vs `hyperloop plan`'s estimate, for several layouts.

Each layout trains 2 steps (the second has Adam state allocated) in its own processes over
``torch.distributed``, on synthetic tokens; the peak is the largest over ranks. On CPU the peak is the growth
of the resident set (VmHWM over VmRSS before the model is built; ``MALLOC_MMAP_THRESHOLD_`` makes every large
tensor its own mapping, so the resident set follows live tensors); on CUDA it is
``torch.cuda.max_memory_allocated``. The estimate is ``cluster/plan.py::estimate`` for the same layout
(no allocator reserve; unfused attention on CPU, flash attention assumed on CUDA).

    python benchmarks/memory.py                              # a 2.6M-parameter model, 7 layouts, CPU
    python benchmarks/memory.py --layouts single,pp2 model.kind=transformer
    python benchmarks/memory.py recipes/hyperloop-991m.yaml --device cuda --layouts single train.micro_batch_size=1

``--measure OVERRIDE...`` is the per-rank worker (run under torchrun-style environment variables); it prints
one JSON line. ``tests/test_plan.py`` uses it to hold the estimate within 15% of the measurement.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# Big enough that tensors, not the interpreter, dominate the growth of the resident set; small enough for 2 cores.
CPU_MODEL = ["model.hidden_size=256", "model.num_heads=4", "model.vocab_size=2048", "model.seq_length=256",
             "train.micro_batch_size=4", "model.begin_layers=1", "model.middle_layers=2", "model.end_layers=1",
             "model.loops=3"]
# name: (processes, overrides)
LAYOUTS = {
    "single": (1, []),
    "recompute": (1, ["train.recompute=loop"]),
    "dp2": (2, []),
    "dp2-distopt": (2, ["parallel.distributed_optimizer=true"]),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2", "train.grad_accum=4", "model.tie_embeddings=false"]),  # 4 micro-batches
    "fsdp-dp2": (2, ["parallel.engine=fsdp"]),
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(recipe: str | None, overrides: list[str]) -> int:
    """This rank's peak bytes over 2 training steps (run under torchrun-style environment variables)."""
    from hyperloop_dist.config import load_config
    from hyperloop_dist.parallel import cpu_shim
    from hyperloop_dist.parallel.distributed import init_distributed, shutdown_distributed
    from hyperloop_dist.train import engines

    sys.path.insert(0, str(Path(__file__).parent))
    from mfu import SyntheticBatches

    for name in ("torch._dynamo", "torch._inductor"):  # first imported while the model is built: ~25 MiB not its own
        importlib.import_module(name)

    cfg = load_config(recipe, [f"parallel.nproc_per_node={os.environ.get('WORLD_SIZE', '1')}",
                               "logging.wandb_mode=disabled", *overrides])
    info = init_distributed(cfg)
    cuda = cpu_shim.cuda_available()
    try:
        base = 0 if cuda else _status_kib("VmRSS") * 1024
        engine = engines.build(cfg, info)
        data = SyntheticBatches(cfg.train.micro_batch_size, cfg.model.seq_length, cfg.model.vocab_size)
        for step in range(2):
            engine.step([data.next(step, m) for m in range(cfg.train.grad_accum)], step, None)
        peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    finally:
        shutdown_distributed()
    return peak - base


def start(recipe: str | None, overrides: list[str], world: int, device: str = "cpu",
          script: str = __file__) -> list[subprocess.Popen]:
    """Start ``script --measure`` on ``world`` local processes (collect with :func:`collect`)."""
    from hyperloop_dist.parallel.launch import free_port

    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [sys.executable, script, "--measure", *([recipe] if recipe else []), *overrides]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    return procs


def collect_rows(procs: list[subprocess.Popen], timeout: float = 600) -> list[dict]:
    """Each rank's JSON line, in rank order."""
    rows = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed ({' '.join(proc.args[3:])}):\n{stderr[-3000:]}")
        rows.append(json.loads(stdout.strip().splitlines()[-1]))
    return rows


def collect(procs: list[subprocess.Popen], timeout: float = 600) -> int:
    """The largest peak over the ranks, in bytes."""
    return max(row["peak_bytes"] for row in collect_rows(procs, timeout))


def estimated(recipe: str | None, overrides: list[str], world: int, device: str) -> int:
    from hyperloop_dist.cluster.plan import Hardware, Layout, estimate
    from hyperloop_dist.config import load_config

    cfg = load_config(recipe, [f"parallel.nproc_per_node={world}", *overrides])
    p, t = cfg.parallel, cfg.train
    engine = "fsdp" if p.engine == "fsdp" else "megatron+distopt" if p.distributed_optimizer else "megatron"
    layout = Layout(p.tp, p.pp, world // (p.tp * p.pp), engine, t.recompute, t.micro_batch_size, t.grad_accum)
    hw = Hardware(gpus=world, gpu_mem_bytes=1e15, flash_attention=device == "cuda", reserve_bytes=0)
    return int(estimate(cfg, layout, hw).total_bytes)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        args = sys.argv[2:]
        recipe = args.pop(0) if args and "=" not in args[0] else None
        print(json.dumps({"peak_bytes": measure(recipe, args)}))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of: {', '.join(LAYOUTS)}")
    ap.add_argument("overrides", nargs="*", default=[], help="section.field=value overrides for every layout")
    args = ap.parse_intermixed_args()
    base = [*(CPU_MODEL if args.recipe is None else []),
            *(["train.precision=bf16"] if args.device == "cuda" else []), *args.overrides]
    unknown = [name for name in args.layouts.split(",") if name not in LAYOUTS]
    if unknown:
        ap.error(f"--layouts: unknown {', '.join(unknown)}; choose from {', '.join(LAYOUTS)}")
    rows = []
    for name in args.layouts.split(","):
        world, extra = LAYOUTS[name]
        measured = collect(start(args.recipe, [*base, *extra], world, args.device))
        est = estimated(args.recipe, [*base, *extra], world, args.device)
        rows.append((name, world, est, measured))
        print(f"[{name}] estimate {est / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB", flush=True)
    print(f"\n{args.recipe or 'benchmark model (d 256, 1/2/1 x 3 loops, seq 256, micro-batch 4)'} on {args.device}; "
          "peak per rank over 2 training steps")
    header = f"{'layout':<22}{'ranks':>6}{'plan MiB':>10}{'measured MiB':>14}{'plan/measured':>15}"
    print(header)
    print("-" * len(header))
    for name, world, est, measured in rows:
        print(f"{name:<22}{world:>6}{est / 2**20:>10.1f}{measured / 2**20:>14.1f}{est / measured:>15.3f}")


if __name__ == "__main__":
    main()
