"""Training-step throughput and model FLOPs utilisation (MFU) of one device, for a recipe and its baselines.

Runs our real training step (Megatron DDP + optimizer, `MegatronEngine.step`) on
synthetic tokens, so the figure is the model's and the step's, not the data pipeline's. FLOPs per token come
from `hyperloop params` (6·N_matmul plus attention, loop repeats counted). Peak is the dense bf16 figure of
the device (H100 SXM 989, H200 989 TFLOP/s) unless ``--peak-tflops`` says otherwise; on CPU MFU is not
printed.

Two MFU figures: "full" counts the attention score and value products over the whole s x s square (the
FLOPs of `hyperloop params`), "causal" halves that attention term as Megatron's own MFU formula does (a
causal kernel skips the masked half). ``--backends`` runs each kind once per ``model.attention_backend``; a
``+fused`` suffix also switches Megatron's torch AdamW to ``fused=True`` (hyperloop_dist/fusions.py).

    python benchmarks/mfu.py                                   # tiny-cpu on CPU, fp32
    python benchmarks/mfu.py recipes/hyperloop-991m.yaml --device cuda --kinds hyperloop transformer
    python benchmarks/mfu.py recipes/hyperloop-579m.yaml --device cuda --kinds hyperloop transformer \
        --backends local sdpa sdpa+fused
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch

# Dense bf16 peaks by device name, most specific first: the H100's PCIe and NVL parts are slower than SXM.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
# The paper's own per-GPU training throughput (Table 1, plain PyTorch + torch.compile on 8x H100), printed
# beside ours for the recipe of that size.
PAPER_TOKENS_PER_S = {"hyperloop-579m": ("Hyperloop 579M, Table 1, per H100", 44_250.0)}


def seconds_per_call(fn: Callable[[int], object], reps: int, warmup: int) -> float:
    """Mean wall seconds of ``fn(i)`` over ``reps`` calls after ``warmup`` untimed ones, with the device's
    queued work finished on both sides of the timed calls (the benchmarks' one timing loop)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for i in range(warmup):
        fn(i)
    sync()
    t0 = time.perf_counter()
    for i in range(reps):
        fn(i)
    sync()
    return (time.perf_counter() - t0) / reps


class SyntheticBatches:
    """Random tokens in the shape the trainer asks for (the same every step: throughput only)."""

    def __init__(self, micro_batch: int, seq: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(4, vocab, (micro_batch, seq + 1), generator=g)
        self.batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())

    def next(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch


def measure(recipe: str | None, overrides: list[str], steps: int, warmup: int,
            fused_adamw: bool = False) -> dict[str, float]:
    from hyperloop_dist.config import load_config
    from hyperloop_dist.model.params import report
    from hyperloop_dist.parallel import cpu_shim
    from hyperloop_dist.parallel.distributed import init_distributed, shutdown_distributed
    from hyperloop_dist.train.engines.megatron import MegatronEngine

    cfg = load_config(recipe, ["parallel.nproc_per_node=1", "parallel.nnodes=1", "parallel.tp=1", "parallel.pp=1",
                               *overrides])
    info = init_distributed(cfg)
    engine = None
    try:
        engine = MegatronEngine(cfg, info)
        if fused_adamw:
            from hyperloop_dist.fusions import use_fused_adamw

            use_fused_adamw(engine.optimizer)
        data = SyntheticBatches(cfg.train.micro_batch_size, cfg.model.seq_length, cfg.model.vocab_size)
        if cpu_shim.cuda_available():
            torch.cuda.reset_peak_memory_stats()
        losses: list[float] = []
        def one_step(step: int, engine=engine) -> None:  # bound now: `finally` deletes it
            batches = [data.next(step, m) for m in range(cfg.train.grad_accum)]
            losses.append(engine.step(batches, step, None).loss)

        dt = seconds_per_call(one_step, steps, warmup)
        loss = losses[-1]
        tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.model.seq_length
        rep = report(cfg.model)
        m = cfg.model
        # report() counts QK^T and AV over the full s x s square, forward + backward (3x forward).
        attention = 3 * 2 * 2 * m.effective_depth * m.seq_length * m.hidden_size
        causal_flops = rep.train_flops_per_token - attention / 2
        peak_mem = torch.cuda.max_memory_allocated() / 2**30 if cpu_shim.cuda_available() else float("nan")
        return {"params": rep.total, "step_s": dt, "tokens_per_s": tokens / dt,
                "tflops": rep.train_flops_per_token * tokens / dt / 1e12,
                "tflops_causal": causal_flops * tokens / dt / 1e12, "peak_gib": peak_mem, "loss": loss,
                "micro_batch": cfg.train.micro_batch_size, "grad_accum": cfg.train.grad_accum}
    finally:
        del engine
        shutdown_distributed()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--kinds", nargs="+", default=["hyperloop", "looped", "transformer"])
    ap.add_argument("--backends", nargs="+", default=[None],
                    help="model.attention_backend values (auto, local, sdpa, te), each optionally +fused")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--json", default=None, help="append one JSON line per row to this file")
    ap.add_argument("overrides", nargs="*", default=[], help="section.field=value overrides for every kind")
    args = ap.parse_intermixed_args()
    if args.recipe and "=" in args.recipe:  # an override, not a recipe
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA: the CPU path throughout
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    peak = args.peak_tflops
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    if peak is None and args.device == "cuda":
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
    precision = ["train.precision=bf16"] if args.device == "cuda" else []
    recipe_name = os.path.splitext(os.path.basename(args.recipe))[0] if args.recipe else "tiny-cpu"
    rows = []
    port = 29611
    for kind in args.kinds:
        for variant in args.backends:
            backend, _, fused = (variant or "").partition("+")
            label = f"{kind}/{variant}" if variant else kind
            extra = [f"model.attention_backend={backend}"] if backend else []
            os.environ["MASTER_PORT"] = str(port)
            port += 1
            try:
                r = measure(args.recipe, [*precision, *args.overrides, *extra, f"model.kind={kind}",
                                          "logging.wandb_mode=disabled"], args.steps, args.warmup,
                            fused_adamw=fused == "fused")
            except Exception as exc:  # one failing row (out of memory, a kernel missing) must not lose the rest
                print(f"[{label}] FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                continue
            rows.append((label, r))
            print(f"[{label}] {r['step_s'] * 1e3:.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s, "
                  f"loss {r['loss']:.4f}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"recipe": recipe_name, "device": device_name, "row": label,
                                        "peak_tflops": peak, **r}) + "\n")
    if not rows:
        raise SystemExit("every row failed")
    base = rows[0][1]["step_s"]
    print(f"\nrecipe {args.recipe or 'tiny-cpu'} on {device_name}; {args.steps} timed steps after {args.warmup} "
          f"warm-up; micro-batch {rows[0][1]['micro_batch']} x grad_accum {rows[0][1]['grad_accum']}")
    print("MFU full: attention over the whole s x s square; MFU causal: attention term halved (Megatron's)")
    header = f"{'kind/backend':<24}{'params':>10}{'ms/step':>10}{'tok/s':>12}{'TFLOP/s':>10}{'MFU full':>10}" \
             f"{'MFU causal':>12}{'peak GiB':>10}{'step vs ' + rows[0][0]:>30}"
    print(header)
    print("-" * len(header))
    for label, r in rows:
        mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak else "-"
        mfu_causal = f"{100 * r['tflops_causal'] / peak:.1f}%" if peak else "-"
        print(f"{label:<24}{r['params'] / 1e6:>9.1f}M{r['step_s'] * 1e3:>10.1f}{r['tokens_per_s']:>12,.0f}"
              f"{r['tflops']:>10.2f}{mfu:>10}{mfu_causal:>12}{r['peak_gib']:>10.1f}{r['step_s'] / base:>29.2f}x")
    if recipe_name in PAPER_TOKENS_PER_S:
        what, tps = PAPER_TOKENS_PER_S[recipe_name]
        print(f"paper: {what}: {tps:,.0f} tok/s")


if __name__ == "__main__":
    main()
