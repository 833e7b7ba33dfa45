"""``hyperloop scaling fit RUNS...``: L(N, D) = E + A·N^-α + B·D^-β per model kind, from finished runs.

N is a run's non-embedding parameter count (``model/params.py``), D the tokens it trained on, L its
held-out loss: the last logged ``heldout_loss`` (or ``eval/loss``) when the run evaluated, else the mean
training loss over the last 10% of logged steps, which the output then says.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hyperloop_dist.config import ConfigError, load_config
from hyperloop_dist.model.params import report

HELDOUT_KEYS = ("heldout_loss", "eval/loss", "eval/heldout_loss")


@dataclass
class RunPoint:
    run_dir: Path
    kind: str
    params: int
    tokens: float
    loss: float
    heldout: bool


@dataclass
class Fit:
    kind: str
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    points: int
    rmse: float

    def predict(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A * np.power(n, -self.alpha) + self.B * np.power(d, -self.beta)


def read_run(run_dir: str | Path) -> RunPoint:
    run = Path(run_dir)
    config, metrics = run / "config.yaml", run / "metrics.jsonl"
    if not config.is_file() or not metrics.is_file():
        raise ConfigError(f"{run}: not a finished run directory (needs config.yaml and metrics.jsonl)")
    cfg = load_config(config)
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        raise ConfigError(f"{metrics}: no logged steps")
    held = [r[k] for r in rows for k in HELDOUT_KEYS if k in r]
    if held:
        loss, heldout = float(held[-1]), True
    else:
        tail = rows[-max(1, len(rows) // 10):]
        loss, heldout = float(np.mean([r["loss"] for r in tail])), False
    tokens = float(rows[-1].get("tokens", rows[-1]["step"] * cfg.train.micro_batch_size * cfg.train.grad_accum
                                * cfg.data_parallel_size * cfg.model.seq_length))
    return RunPoint(run, cfg.model.kind, report(cfg.model).non_embedding, tokens, loss, heldout)


def fit_law(points: list[RunPoint]) -> Fit:
    """Least squares in loss with positive E, A, B and exponents in (0, 2) (scipy's bounded curve_fit)."""
    from scipy.optimize import curve_fit

    kind = points[0].kind
    if len(points) < 5:
        raise ConfigError(f"{kind}: {len(points)} runs; fitting E, A, alpha, B, beta needs at least 5 "
                          "(a grid over both sizes and tokens)")
    n = np.array([p.params for p in points], dtype=float)
    d = np.array([p.tokens for p in points], dtype=float)
    y = np.array([p.loss for p in points], dtype=float)
    # Scale N and D to O(1) for the optimizer; A and B are rescaled back below.
    n0, d0 = float(np.median(n)), float(np.median(d))

    def law(x: np.ndarray, e: float, a: float, alpha: float, b: float, beta: float) -> np.ndarray:
        return e + a * np.power(x[0], -alpha) + b * np.power(x[1], -beta)

    spread = max(float(y.max() - y.min()), 1e-3)
    p0 = (max(float(y.min()) - spread, 1e-3), spread, 0.3, spread, 0.3)
    bounds = ([0.0, 0.0, 0.0, 0.0, 0.0], [float(y.min()), np.inf, 2.0, np.inf, 2.0])
    (e, a, alpha, b, beta), _ = curve_fit(law, np.vstack([n / n0, d / d0]), y, p0=p0, bounds=bounds,
                                         maxfev=20000)
    fit = Fit(kind, e, a * n0**alpha, alpha, b * d0**beta, beta, len(points), 0.0)
    fit.rmse = math.sqrt(float(np.mean((fit.predict(n, d) - y) ** 2)))
    return fit


def fit_runs(run_dirs: list[str | Path]) -> tuple[list[RunPoint], list[Fit]]:
    points = [read_run(r) for r in run_dirs]
    kinds = sorted({p.kind for p in points}, key=lambda k: (k != "hyperloop", k))
    return points, [fit_law([p for p in points if p.kind == k]) for k in kinds]


def format_fits(points: list[RunPoint], fits: list[Fit]) -> str:
    lines = ["kind        | runs | E      | A          | alpha  | B          | beta   | rmse"]
    lines.append("-" * len(lines[0]))
    for f in fits:
        lines.append(f"{f.kind:<11} | {f.points:>4} | {f.E:.4f} | {f.A:10.4g} | {f.alpha:.4f} | {f.B:10.4g} | "
                     f"{f.beta:.4f} | {f.rmse:.4f}")
    if not all(p.heldout for p in points):
        lines.append("note: some runs logged no held-out loss; their training loss (last 10% of steps) was used")
    return "\n".join(lines)


def plot_fits(points: list[RunPoint], fits: list[Fit], png: str | Path) -> Path:
    """Loss against non-embedding parameters, one colour per kind: the runs as points, the fitted law at
    each run's token count as a line (Hyperloop and the baselines side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, f in enumerate(fits):
        mine = [p for p in points if p.kind == f.kind]
        colour = f"C{i}"
        ax.scatter([p.params for p in mine], [p.loss for p in mine], color=colour, s=18)
        for d in sorted({p.tokens for p in mine}):
            ns = np.geomspace(min(p.params for p in mine), max(p.params for p in mine), 50)
            label = f"{f.kind}: α={f.alpha:.2f}, β={f.beta:.2f}" if d == max(p.tokens for p in mine) else None
            ax.plot(ns, f.predict(ns, d), color=colour, alpha=0.8, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("loss")
    ax.set_title("L(N, D) = E + A·N^-α + B·D^-β (one line per token budget D)")
    ax.legend()
    fig.tight_layout()
    out = Path(png)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
