"""Causal attention forward + backward per torch SDPA kernel, against Megatron's unfused local attention.

Tells which kernel ``model.attention_backend=sdpa`` should prefer (hyperloop_dist/model/attention.py's
``CUDA_BACKENDS`` order) and what the local spec's attention costs, at one layer's shape.

    python benchmarks/sdpa_kernels.py --device cuda                 # the 579M shape: b 4, 16 heads, s 2048, hn 128
    python benchmarks/sdpa_kernels.py --device cpu --batch 2 --seq 128 --heads 4 --head-dim 32
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from mfu import seconds_per_call  # benchmarks/ is on sys.path when this script runs


def unfused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What Megatron's local DotProductAttention computes: scores, fp32 masked softmax, then AV."""
    s = q.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.float().masked_fill(mask, float("-inf")).softmax(-1).to(q.dtype)
    return torch.matmul(probs, v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape, device=args.device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=args.device, dtype=dtype)
    with torch.no_grad():
        ref = unfused(q.double(), k.double(), v.double())
    # Causal attention FLOPs, forward + backward (2.5x forward with recomputation ignored): the masked half
    # of the square is not counted, so this is what a causal kernel must do.
    flops = 3.5 * 2 * 2 * args.batch * args.heads * args.seq * args.seq * args.head_dim / 2
    variants = {"unfused (local spec)": lambda: unfused(q, k, v)}
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is not None:
            def run(backend: SDPBackend = backend) -> torch.Tensor:
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            variants[name.lower()] = run
    print(f"causal attention fwd+bwd, [b {args.batch}, heads {args.heads}, s {args.seq}, hn {args.head_dim}], "
          f"{dtype}, {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}")
    print(f"{'kernel':<24}{'ms':>10}{'TFLOP/s':>10}{'rel err':>10}")
    for name, fn in variants.items():
        try:
            out = fn()
            err = ((out.double() - ref).norm() / ref.norm()).item()

            def step(_: int, fn=fn) -> None:
                q.grad = k.grad = v.grad = None
                fn().backward(grad)

            dt = seconds_per_call(step, args.reps, 3)
        except Exception as exc:  # a kernel this device or shape does not support: say so and go on
            print(f"{name:<24}{'n/a':>10}  {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            continue
        print(f"{name:<24}{dt * 1e3:>10.3f}{flops / dt / 1e12:>10.1f}{err:>10.1e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
