"""Rank-0 run logging: ``metrics.jsonl`` always, wandb (offline unless configured), progress lines."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from hyperloop_dist.config import Config


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class MetricsLogger:
    """Writes one JSON object per logged step; a no-op on ranks other than 0."""

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool, total_steps: int) -> None:
        self.enabled, self.total_steps = enabled, total_steps
        self.start = time.perf_counter()
        self.history: list[dict[str, Any]] = []
        self._wandb = None
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)
        log = cfg.logging
        if log.wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            mode = log.wandb_mode if log.wandb_project else "offline"
            self._wandb = wandb.init(
                project=log.wandb_project or "hyperloop_dist", entity=log.wandb_entity, mode=mode,
                dir=os.environ.get("WANDB_DIR", str(run_dir)), config=cfg.to_dict(), name=run_dir.name,
                reinit="finish_previous",
            )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.history.append(record)
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def progress(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = record["step"]
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(step, 1) * (self.total_steps - step)
        loss, gnorm = record["loss"], record["grad_norm"]  # None: a skipped (non-finite) step
        line = (f"step {step:>6}/{self.total_steps} | loss {'skipped' if loss is None else f'{loss:.4f}'} | "
                f"lr {record['lr']:.2e} | gnorm {'-' if gnorm is None else f'{gnorm:.3f}'} | "
                f"{record['tokens_per_s'] / 1e3:.1f}k tok/s | "
                f"elapsed {_fmt_duration(elapsed)} | eta {_fmt_duration(eta)}")
        print(line, file=sys.stdout, flush=True)

    def summary(self, rows: list[tuple[str, str]]) -> None:
        if not self.enabled:
            return
        width = max(len(k) for k, _ in rows)
        bar = "-" * (width + 3 + max(len(v) for _, v in rows))
        print(bar)
        for key, value in rows:
            print(f"{key:<{width}} | {value}")
        print(bar, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def window_mean(values: list[float], first: bool, n: int) -> float:
    chunk = values[:n] if first else values[-n:]
    return sum(chunk) / len(chunk) if chunk else math.nan
