"""Hyper-connection overhead: `hyperloop` vs `looped` training-step time at the same size (target <= 3% more).

Both kinds run our real training step (see `mfu.py`) side by side in one run. Then, to show where the extra
time goes, one hyper-connection (read + write, forward + backward, at the step's shapes) is timed in isolation
next to one pass of the middle block: the expected overhead is ``loops x t_hc / t_step``.

    python benchmarks/hc_overhead.py                                   # tiny-cpu on CPU
    python benchmarks/hc_overhead.py recipes/hyperloop-991m.yaml --device cuda train.micro_batch_size=1
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from mfu import measure, seconds_per_call  # benchmarks/ is on sys.path when this script runs


def hc_breakdown(recipe: str | None, overrides: list[str], reps: int) -> dict[str, float]:
    """Seconds for one HC read+write and one middle-block pass (forward + backward) at the step's shapes."""
    from hyperloop_dist.config import load_config
    from hyperloop_dist.export.release import single_process_world
    from hyperloop_dist.model.hyperloop import build_model
    from hyperloop_dist.parallel import cpu_shim

    cfg = load_config(recipe, [*overrides, "model.kind=hyperloop"])
    m = cfg.model
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    device = cpu_shim.device()
    with single_process_world():
        cpu_shim.seed_model_parallel(0)
        model = build_model(m, precision=cfg.train.precision)
        hc = model.hc[0]
        b, s, n, d = cfg.train.micro_batch_size, m.seq_length, m.hc.streams, m.hidden_size
        streams = torch.randn(s, b, n, d, device=device, dtype=dtype, requires_grad=True)
        x_mid = torch.randn(s, b, d, device=device, dtype=dtype, requires_grad=True)

        def hc_step() -> None:
            x, h_post, h_res = hc.read(streams)
            hc.write_back(streams, x * 1.5, h_post, h_res).float().sum().backward()

        def middle_step() -> None:
            model.run_middle(x_mid).float().sum().backward()

        return {"hc": seconds_per_call(lambda _: hc_step(), reps, 1),
                "middle": seconds_per_call(lambda _: middle_step(), reps, 1), "loops": m.loops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None, help="append the figures as one JSON line to this file")
    ap.add_argument("overrides", nargs="*", default=[])
    args = ap.parse_intermixed_args()
    if args.recipe and "=" in args.recipe:  # an override, not a recipe
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    if args.device == "cpu":
        torch.set_num_threads(1)
    overrides = [*(["train.precision=bf16"] if args.device == "cuda" else []), *args.overrides,
                 "logging.wandb_mode=disabled"]
    steps = {}
    for i, kind in enumerate(["looped", "hyperloop", "looped", "hyperloop"]):  # interleaved, best of two
        os.environ["MASTER_PORT"] = str(29651 + i)
        t = measure(args.recipe, [*overrides, f"model.kind={kind}"], args.steps, args.warmup)["step_s"]
        steps[kind] = min(steps.get(kind, t), t)
    parts = hc_breakdown(args.recipe, overrides, reps=max(args.steps, 5))
    expected = parts["loops"] * parts["hc"] / steps["hyperloop"]
    print(f"\nrecipe {args.recipe or 'tiny-cpu'} on {args.device}")
    print(f"{'looped ms/step':>16}{'hyperloop ms/step':>19}{'overhead':>10}  target <= 3%")
    print(f"{steps['looped'] * 1e3:>16.1f}{steps['hyperloop'] * 1e3:>19.1f}"
          f"{100 * (steps['hyperloop'] / steps['looped'] - 1):>9.1f}%")
    print("\nwhere it goes (forward + backward, one micro-batch):")
    print(f"  one hyper-connection read+write   {parts['hc'] * 1e3:8.2f} ms  (x {parts['loops']} loops per step)")
    print(f"  one middle-block pass             {parts['middle'] * 1e3:8.2f} ms")
    print(f"  HC share of a hyperloop step      {100 * expected:8.1f}%  (loops x HC / step)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"bench": "hc_overhead", "recipe": args.recipe, "looped_s": steps["looped"],
                                "hyperloop_s": steps["hyperloop"], "hc_s": parts["hc"],
                                "middle_s": parts["middle"], "loops": parts["loops"],
                                "hc_share": expected}) + "\n")


if __name__ == "__main__":
    main()
