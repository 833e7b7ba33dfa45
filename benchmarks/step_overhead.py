"""Our training step vs a bare PyTorch loop of the same math, single process and DP=2 (target <= 1.10x).

Ours: the Megatron model, Megatron DDP and Megatron's Adam (`MegatronEngine.step`).
Bare: the plain-PyTorch twin (`model/reference.py`) with torch DDP (DP=2), `torch.optim.AdamW` and
gradient clipping: what a user would write by hand. Same config, batch and step count, measured side by
side in one run; the ratio is ours / bare. Processes talk over gloo on the CPU (CUDA with ``--device cuda``).

    python benchmarks/step_overhead.py
    python benchmarks/step_overhead.py --kinds hyperloop --steps 30 model.hidden_size=256
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mfu import SyntheticBatches, seconds_per_call  # benchmarks/ is on sys.path when this script runs


def _bare(cfg, data: SyntheticBatches, steps: int, warmup: int) -> float:
    from hyperloop_dist.model.reference import ReferenceModel
    from hyperloop_dist.parallel import cpu_shim

    device = cpu_shim.device()
    model = ReferenceModel(cfg.model).to(device)
    if dist.get_world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay)
    tokens, labels = (t.to(device) for t in data.batch)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=cfg.train.precision == "bf16")

    def step(_: int) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()

    return seconds_per_call(step, steps, warmup)


def _ours(cfg, data: SyntheticBatches, steps: int, warmup: int) -> float:
    from hyperloop_dist.parallel.distributed import RankInfo
    from hyperloop_dist.train.engines.megatron import MegatronEngine

    engine = MegatronEngine(cfg, RankInfo(dist.get_rank(), dist.get_world_size(), 0, dist.get_rank(),
                                          dist.get_world_size()))
    return seconds_per_call(lambda s: engine.step([data.next(s, m) for m in range(cfg.train.grad_accum)], s, None),
                            steps, warmup)


def _worker(rank: int, world: int, port: int, kind: str, recipe: str | None, overrides: list[str], steps: int,
            warmup: int, out: dict) -> None:
    from megatron.core import parallel_state

    from hyperloop_dist.config import load_config
    from hyperloop_dist.parallel import cpu_shim

    cuda = torch.cuda.is_available()
    cfg = load_config(recipe, [f"model.kind={kind}", f"parallel.nproc_per_node={world}", "parallel.tp=1",
                               "parallel.pp=1", *(["train.precision=bf16"] if cuda else []), *overrides])
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
        cpu_shim.enable()
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    parallel_state.initialize_model_parallel(1, 1)
    cpu_shim.seed_model_parallel(cfg.train.seed)
    data = SyntheticBatches(cfg.train.micro_batch_size, cfg.model.seq_length, cfg.model.vocab_size)
    times = {}
    for name, fn in (("bare", _bare), ("ours", _ours), ("bare2", _bare), ("ours2", _ours)):  # interleaved
        dist.barrier()
        times[name] = fn(cfg, data, steps, warmup)
    if rank == 0:
        out[(kind, world)] = (min(times["bare"], times["bare2"]), min(times["ours"], times["ours2"]))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--kinds", nargs="+", default=["transformer", "hyperloop"])
    ap.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None, help="append one JSON line per (kind, DP) to this file")
    ap.add_argument("overrides", nargs="*", default=[])
    args = ap.parse_intermixed_args()
    if args.recipe and "=" in args.recipe:  # an override, not a recipe
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before any process initialises CUDA
    elif max(args.worlds) > torch.cuda.device_count():
        raise SystemExit(f"--device cuda --worlds {max(args.worlds)}: only {torch.cuda.device_count()} GPU(s) "
                         "visible; one rank per GPU")
    out = mp.Manager().dict()
    port = 29700
    for kind in args.kinds:
        for world in args.worlds:
            port += 1
            mp.spawn(_worker, args=(world, port, kind, args.recipe, args.overrides, args.steps, args.warmup, out),
                     nprocs=world)
            bare, ours = out[(kind, world)]
            print(f"[{kind} dp={world}] bare {bare * 1e3:.1f} ms/step, ours {ours * 1e3:.1f} ms/step", flush=True)
    print(f"\n{'kind':<12}{'DP':>4}{'bare ms/step':>14}{'ours ms/step':>14}{'ours/bare':>11}  target <= 1.10x")
    for kind in args.kinds:
        for world in args.worlds:
            bare, ours = out[(kind, world)]
            print(f"{kind:<12}{world:>4}{bare * 1e3:>14.1f}{ours * 1e3:>14.1f}{ours / bare:>10.2f}x")
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"bench": "step_overhead", "recipe": args.recipe, "kind": kind,
                                        "dp": world, "bare_s": bare, "ours_s": ours}) + "\n")


if __name__ == "__main__":
    main()
