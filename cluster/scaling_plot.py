"""``--png``: the study's picture. Loss against N and against training compute C, every kind side by side,
the runs as points, the fitted law at each token budget as a line with its 90% bootstrap band, and the
equal-loss ratios in the legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hyperloop_dist.cluster.scaling import Study

_MARKERS = "osD^v<>p*h"


def plot_study(study: Study, png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (by_n, by_c) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    budgets = sorted({p.tokens for p in study.points})
    n_all = [p.params for p in study.points]
    for i, kind in enumerate(study.kinds):
        colour, mine = f"C{i}", [p for p in study.points if p.kind == kind]
        best, _ = study.parameters(kind)
        label = f"{kind} (α={best[2]:.2f}, β={best[4]:.2f})"
        ns = np.geomspace(min(n_all) / 1.3, max(n_all) * 1.3, 60)
        fpt = study.flops_per_token(kind, ns)
        for j, d in enumerate(b for b in budgets if any(p.tokens == b for p in mine)):
            line, boot = study.component(kind).at(kind, ns, d)
            lo, hi = (np.quantile(boot, q, axis=0) for q in (0.05, 0.95)) if len(boot) else (line, line)
            for ax, x in ((by_n, ns), (by_c, fpt * d)):
                ax.plot(x, line, color=colour, lw=1.2, label=label if j == 0 and ax is by_n else None)
                ax.fill_between(x, lo, hi, color=colour, alpha=0.12, lw=0)
        for p in mine:
            marker = _MARKERS[budgets.index(p.tokens) % len(_MARKERS)]
            by_n.scatter(p.params, p.loss, color=colour, marker=marker, s=22, zorder=3)
            by_c.scatter(p.flops_per_token * p.tokens, p.loss, color=colour, marker=marker, s=22, zorder=3)
    handles, _ = by_n.get_legend_handles_labels()
    for name, r in study.ratios().items():
        handles.append(Line2D([], [], ls="none", label=(
            f"{name} at equal loss: {_x(r['params_at_equal_loss'])} params "
            f"[{_x(r['ci90'][0])}–{_x(r['ci90'][1])}], {_x(r['flops_at_equal_loss'])} FLOPs "
            f"[{_x(r['flops_ci90'][0])}–{_x(r['flops_ci90'][1])}]")))
    handles += [Line2D([], [], ls="none", marker=_MARKERS[j % len(_MARKERS)], color="grey", label=f"D = {d:.3g} tokens")
                for j, d in enumerate(budgets)]
    by_n.legend(handles=handles, fontsize=7, loc="upper right")
    for ax, xlabel in ((by_n, "non-embedding parameters N"), (by_c, "training compute C = FLOPs/token × D")):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both", lw=0.4)
    by_n.set_ylabel("held-out loss")
    fig.suptitle(f"L = E + A·N^-α + B·D^-β, {study.law} fit ({len(study.points)} runs); one curve per token budget, "
                 f"bands: 90% bootstrap ({len(study.components[0].result.boot)} draws)", fontsize=9)
    fig.tight_layout()
    out = Path(png)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _x(value: float | None) -> str:
    return "∞" if value is None else f"{value:.2f}×"
