"""FSDP2: keep the looped middle block's gathered weights between loop calls, or re-gather them every loop.

Trains the same Hyperloop on 2 ranks with ``parallel.engine=fsdp`` and each setting of
``parallel.fsdp_reshard_middle``, and prints tokens/s (mean over the logged steps after the first
quarter) and the ratio. Losses must be identical: the setting changes communication, not math.

    python benchmarks/fsdp_middle_reshard.py [--steps 40] [--loops 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(reshard: bool, steps: int, loops: int, root: Path) -> tuple[float, list[float]]:
    run_dir = root / f"reshard-{reshard}"
    subprocess.run(
        [sys.executable, "-m", "hyperloop_dist.cli", "train", "parallel.engine=fsdp",
         f"parallel.fsdp_reshard_middle={str(reshard).lower()}", f"model.loops={loops}", "model.hidden_size=256",
         "model.middle_layers=4", "data.loader=windows", f"train.steps={steps}", "train.log_interval=1",
         f"train.run_dir={run_dir}", "logging.wandb_mode=disabled"],
        check=True, capture_output=True, text=True,
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(r["tokens_per_s"] for r in rows[steps // 4:]), [r["loss"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--loops", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        kept, kept_losses = run(False, args.steps, args.loops, Path(tmp))
        regathered, regathered_losses = run(True, args.steps, args.loops, Path(tmp))
    print(f"FSDP2, 2 ranks, hyperloop hidden 256, middle 4 layers x {args.loops} loops, {args.steps} steps")
    print("middle block between loops       | tokens/s")
    print("---------------------------------+---------")
    print(f"kept gathered (default)          | {kept:,.0f}")
    print(f"re-gathered every loop (reshard) | {regathered:,.0f}")
    print(f"kept / re-gathered: {kept / regathered:.2f}x; losses identical: {kept_losses == regathered_losses}")


if __name__ == "__main__":
    main()
