"""Training-step throughput and model FLOPs utilisation (MFU) of one device, for a recipe and its baselines.

Runs our real training step (Megatron DDP + optimizer, `MegatronEngine.step`) on
synthetic tokens, so the figure is the model's and the step's, not the data pipeline's. FLOPs per token come
from `hyperloop params` (6·N_matmul plus attention, loop repeats counted). Peak is the dense bf16 figure of
the device (H100 SXM 989, H200 989 TFLOP/s) unless ``--peak-tflops`` says otherwise; on CPU MFU is not
printed.

Two MFU figures: "full" counts the attention score and value products over the whole s x s square (the
FLOPs of `hyperloop params`), "causal" halves that attention term as Megatron's own MFU formula does (a
causal kernel skips the masked half). ``--backends`` runs each kind once per variant: a
``model.attention_backend`` value, then optional ``+`` suffixes: ``hc`` or ``blocks`` (``model.compile``),
``fused`` (every ``train.fusions`` switch) or one fusion's name (``adamw``, ``grad_norm``, ``rope``, ``swiglu``).

After the timed steps one more step runs with the device synchronized around its parts, for the step
breakdown: forward (all micro-batches), backward (with the gradient reduction), optimizer (norm, clip,
update) and, inside the forward, the hyper-connections' read and write ("HC fwd"; their backward is in
``backward``: benchmarks/hc_overhead.py measures the HC's full share). The synchronizations make this step
slower than the timed ones, so the parts are given as shares of it.

    python benchmarks/mfu.py                                   # tiny-cpu on CPU, fp32
    python benchmarks/mfu.py recipes/hyperloop-991m.yaml --device cuda --kinds hyperloop transformer
    python benchmarks/mfu.py recipes/hyperloop-579m.yaml --device cuda --kinds hyperloop transformer \
        --backends local sdpa sdpa+fused sdpa+hc+fused
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


def variant_overrides(variant: str) -> list[str]:
    """``sdpa+hc+fused`` -> the recipe overrides of that row (see the module docstring)."""
    from hyperloop_dist.config import COMPILE_MODES, FUSIONS

    backend, *suffixes = variant.split("+")
    out = [f"model.attention_backend={backend}"] if backend else []
    fusions: list[str] = []
    for suffix in suffixes:
        if suffix in COMPILE_MODES:
            out.append(f"model.compile={suffix}")
        elif suffix == "fused":
            fusions = list(FUSIONS)
        elif suffix in FUSIONS:
            fusions.append(suffix)
        else:
            raise SystemExit(f"--backends {variant}: unknown suffix {suffix!r}; use one of "
                             f"{', '.join((*COMPILE_MODES, 'fused', *FUSIONS))}")
    return out + ([f"train.fusions=[{','.join(fusions)}]"] if fusions else [])


def step_breakdown(engine: object, batches: list, step: int) -> dict[str, float]:
    """Seconds of one step spent in forward, backward, optimizer and the HC's forward (device synced)."""
    from hyperloop_dist.model.hyper_connections import HyperConnection

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    spent = {"forward": 0.0, "optimizer": 0.0, "hc_fwd": 0.0}

    def timed(key: str, fn: Callable) -> Callable:
        def wrapper(*args: object, **kwargs: object) -> object:
            sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                spent[key] += time.perf_counter() - start
        return wrapper

    hc_methods = {name: getattr(HyperConnection, name) for name in ("read", "write_back")}
    engine.ddp.forward = timed("forward", engine.ddp.forward)
    engine.optimizer.step = timed("optimizer", engine.optimizer.step)
    for name, fn in hc_methods.items():
        setattr(HyperConnection, name, timed("hc_fwd", fn))
    try:
        sync()
        start = time.perf_counter()
        engine.step(batches, step, None)
        sync()
        total = time.perf_counter() - start
    finally:
        del engine.ddp.forward, engine.optimizer.step
        for name, fn in hc_methods.items():
            setattr(HyperConnection, name, fn)
    return {"total": total, "backward": total - spent["forward"] - spent["optimizer"], **spent}


def measure(recipe: str | None, overrides: list[str], steps: int, warmup: int) -> dict[str, float]:
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
        data = SyntheticBatches(cfg.train.micro_batch_size, cfg.model.seq_length, cfg.model.vocab_size)
        if cpu_shim.cuda_available():
            torch.cuda.reset_peak_memory_stats()
        losses: list[float] = []
        def one_step(step: int, engine=engine) -> None:  # bound now: `finally` deletes it
            batches = [data.next(step, m) for m in range(cfg.train.grad_accum)]
            losses.append(engine.step(batches, step, None).loss)

        dt = seconds_per_call(one_step, steps, warmup)
        loss = losses[-1]
        parts = step_breakdown(engine, [data.next(0, m) for m in range(cfg.train.grad_accum)], warmup + steps + 1)
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
                "micro_batch": cfg.train.micro_batch_size, "grad_accum": cfg.train.grad_accum,
                **{f"{k}_share": v / parts["total"] for k, v in parts.items() if k != "total"}}
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
            label = f"{kind}/{variant}" if variant else kind
            extra = variant_overrides(variant or "")
            os.environ["MASTER_PORT"] = str(port)
            port += 1
            try:
                r = measure(args.recipe, [*precision, *args.overrides, *extra, f"model.kind={kind}",
                                          "logging.wandb_mode=disabled"], args.steps, args.warmup)
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
    paper = PAPER_TOKENS_PER_S.get(recipe_name)
    width = max(24, *(len(label) + 2 for label, _ in rows))
    last = len(rows[0][0]) + 10
    header = f"{'kind/backend':<{width}}{'params':>10}{'ms/step':>10}{'tok/s':>12}{'TFLOP/s':>10}{'MFU full':>10}" \
             f"{'MFU causal':>12}{'peak GiB':>10}{'fwd':>6}{'bwd':>6}{'opt':>6}{'HC fwd':>7}" \
             f"{'vs paper':>10}{'step vs ' + rows[0][0]:>{last}}"
    print(header)
    print("-" * len(header))
    for label, r in rows:
        mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak else "-"
        mfu_causal = f"{100 * r['tflops_causal'] / peak:.1f}%" if peak else "-"
        print(f"{label:<{width}}{r['params'] / 1e6:>9.1f}M{r['step_s'] * 1e3:>10.1f}{r['tokens_per_s']:>12,.0f}"
              f"{r['tflops']:>10.2f}{mfu:>10}{mfu_causal:>12}{r['peak_gib']:>10.1f}"
              + "".join(f"{100 * r[k + '_share']:>{w}.0f}%" for k, w in
                        (("forward", 5), ("backward", 5), ("optimizer", 5), ("hc_fwd", 6)))
              + (f"{r['tokens_per_s'] / paper[1]:>9.2f}x" if paper else f"{'-':>10}")
              + f"{r['step_s'] / base:>{last - 1}.2f}x")
    print("fwd / bwd / opt / HC fwd: shares of one device-synchronized step (HC fwd is inside fwd)")
    if paper:
        print(f"paper: {paper[0]}: {paper[1]:,.0f} tok/s per GPU ('vs paper' = our tok/s per GPU / this)")


if __name__ == "__main__":
    main()
