"""``hyperloop scaling fit | predict RUNS...``: a scaling-law study of finished runs, with bootstrap intervals.

Each run gives one point: N its non-embedding parameter count (``model/params.py``), D the tokens it
trained on, C = D x its training FLOPs per token (every loop counted), L its held-out loss: the last logged
``heldout_loss`` / ``eval/loss`` when the run evaluated, else the mean training loss over the last 10% of
logged steps, which the output then says.

The law (``scaling_law.py``) is fitted per kind (``separate``) or jointly, the kinds sharing E, B and β
(``joint``; ``joint-own-alpha`` gives each kind its own α too). The equal-loss ratios compare every kind
with ``hyperloop`` at the largest Hyperloop run of the fit. docs/scaling.md has the method and its limits.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hyperloop_dist.cluster import scaling_law as sl
from hyperloop_dist.config import ConfigError, ModelConfig, load_config
from hyperloop_dist.model.params import ParamReport, report

HELDOUT_KEYS = ("heldout_loss", "eval/loss", "eval/heldout_loss")
LAWS = ("joint", "joint-own-alpha", "separate")
REFERENCE_KIND = "hyperloop"
_NEAR_BEST = 0.01  # starts ending within 1% of the best objective count as "also best"


@dataclass
class RunPoint:
    run_dir: Path
    kind: str
    hidden_size: int
    params: int
    tokens: float
    flops_per_token: float
    loss: float
    heldout: bool

    def as_json(self) -> dict:
        return {"run_dir": str(self.run_dir), "kind": self.kind, "hidden_size": self.hidden_size,
                "params": self.params, "tokens": self.tokens, "flops_per_token": self.flops_per_token,
                "loss": self.loss, "heldout": self.heldout}


def read_run(run_dir: str | Path) -> RunPoint:
    run = Path(run_dir)
    config, metrics = run / "config.yaml", run / "metrics.jsonl"
    if not config.is_file() or not metrics.is_file():
        raise ConfigError(f"{run}: not a finished run directory (needs config.yaml and metrics.jsonl)")
    cfg = load_config(config)
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]  # (evaluation rows carry eval/* keys instead)
    if not steps:
        raise ConfigError(f"{metrics}: no logged training steps")
    held = [r[k] for r in rows for k in HELDOUT_KEYS if k in r]
    if held:
        loss, heldout = float(held[-1]), True
    else:
        tail = steps[-max(1, len(steps) // 10):]
        loss, heldout = float(np.mean([r["loss"] for r in tail])), False
    last = steps[-1]
    tokens = float(last.get("tokens", last["step"] * cfg.train.micro_batch_size * cfg.train.grad_accum
                                * cfg.data_parallel_size * cfg.model.seq_length))
    rep = _report(cfg.model)
    return RunPoint(run, cfg.model.kind, cfg.model.hidden_size, rep.non_embedding, tokens,
                    rep.train_flops_per_token, loss, heldout)


_REPORTS: dict[str, ParamReport] = {}


def _report(model: ModelConfig) -> ParamReport:
    """``report`` once per distinct model (a sweep repeats each size at every token budget)."""
    key = repr(model)
    if key not in _REPORTS:
        _REPORTS[key] = report(model)
    return _REPORTS[key]


def collect_runs(paths: list[str | Path]) -> tuple[list[RunPoint], list[str]]:
    """The finished runs among ``paths``, and one line per path skipped (not a run, or nothing logged yet):
    a sweep's ``OUT/*/*`` may hold other folders."""
    points, skipped = [], []
    for path in map(Path, paths):
        if not path.exists():
            raise ConfigError(f"{path}: no such run directory (a shell pattern that matched nothing?)")
        if not (path / "config.yaml").is_file():
            skipped.append(f"{path}: not a run directory (no config.yaml)")
            continue
        try:
            points.append(read_run(path))
        except ConfigError as exc:
            skipped.append(f"{path}: unfinished ({exc})")
    if not points:
        raise ConfigError(f"no finished runs among the {len(paths)} paths given: " + "; ".join(skipped[:3]))
    return points, skipped


def kinds_of(points: list[RunPoint]) -> list[str]:
    return sorted({p.kind for p in points}, key=lambda k: (k != REFERENCE_KIND, k))


@dataclass
class Component:
    """One fitted problem: all kinds (joint) or one (separate)."""

    kinds: list[str]
    result: sl.FitResult

    def at(self, kind: str, n: np.ndarray | float, d: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """(fit, bootstrap draws) of the loss of ``kind`` at N, D: ``[points]`` and ``[draws, points]``."""
        r, k = self.result, self.kinds.index(kind)
        return (sl.predict(r.theta[None], r.layout, r.data, k, n, d)[0],
                sl.predict(r.boot, r.layout, r.data, k, n, d))

    def params_at_loss(self, kind: str, best: float, boot: np.ndarray, d: float) -> tuple[float, np.ndarray]:
        r, k = self.result, self.kinds.index(kind)
        return (float(sl.params_at_loss(r.theta[None], r.layout, r.data, k, np.array([best]), d)[0]),
                sl.params_at_loss(r.boot, r.layout, r.data, k, boot, d))


@dataclass
class Study:
    points: list[RunPoint]
    law: str
    components: list[Component]
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def kinds(self) -> list[str]:
        return [k for c in self.components for k in c.kinds]

    def component(self, kind: str) -> Component:
        for c in self.components:
            if kind in c.kinds:
                return c
        raise ConfigError(f"--kind {kind}: no runs of that kind in the fit (kinds: {', '.join(self.kinds)})")

    def predict(self, kind: str, n: float, d: float) -> tuple[float, tuple[float, float]]:
        best, boot = self.component(kind).at(kind, n, d)
        return float(best[0]), sl.interval(boot[:, 0])

    def parameters(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """E, A, α, B, β of one kind: the fit ``[5]`` and the bootstrap draws ``[draws, 5]``."""
        c = self.component(kind)
        r, k = c.result, c.kinds.index(kind)
        return sl.natural(r.theta[None], r.layout, r.data)[0, k], sl.natural(r.boot, r.layout, r.data)[:, k]

    def flops_per_token(self, kind: str, n: np.ndarray | float) -> np.ndarray:
        """FLOPs per token of ``kind`` at N: a power law through its runs' (N, FLOPs/token), for sizes
        between and beyond the runs (the ratios' other kind, the pictures' curves)."""
        mine = {(p.params, p.flops_per_token) for p in self.points if p.kind == kind}
        ln, lf = np.log([m[0] for m in mine]), np.log([m[1] for m in mine])
        slope = np.polyfit(ln, lf, 1)[0] if len(mine) > 1 else 1.0
        return np.exp(lf.mean() + slope * (np.log(n) - ln.mean()))

    def reference_run(self) -> RunPoint | None:
        refs = [p for p in self.points if p.kind == REFERENCE_KIND]
        return max(refs, key=lambda p: (p.params, p.tokens)) if refs else None

    def ratios(self) -> dict[str, dict]:
        """Every other kind over ``hyperloop``: the parameters, and training FLOPs, it needs for the
        Hyperloop's fitted loss at the largest Hyperloop run (same tokens)."""
        ref = self.reference_run()
        if ref is None:
            return {}
        loss, loss_boot = self.component(REFERENCE_KIND).at(REFERENCE_KIND, ref.params, ref.tokens)
        ref_flops = float(self.flops_per_token(REFERENCE_KIND, ref.params))
        out = {}
        for kind in self.kinds:
            if kind == REFERENCE_KIND:
                continue
            n, n_boot = self.component(kind).params_at_loss(kind, float(loss[0]), loss_boot[:, 0], ref.tokens)
            with np.errstate(invalid="ignore"):
                flops, flops_boot = (self.flops_per_token(kind, x) / ref_flops for x in (n, n_boot))
            sizes = [p.params for p in self.points if p.kind == kind]
            out[f"{kind}/{REFERENCE_KIND}"] = {
                "params_at_equal_loss": _finite(n / ref.params), "ci90": _pair(sl.interval(n_boot / ref.params)),
                "flops_at_equal_loss": _finite(flops), "flops_ci90": _pair(sl.interval(flops_boot)),
                "loss": float(loss[0]), "at_params": ref.params, "at_tokens": ref.tokens, "other_params": _finite(n),
                "within_other_runs": bool(min(sizes) <= n <= max(sizes)),
                "unreachable_draws": int(np.isinf(n_boot).sum()),
            }
        return out

    def fits_json(self) -> dict[str, dict]:
        out = {}
        for kind in self.kinds:
            best, boot = self.parameters(kind)
            mine = [p for p in self.points if p.kind == kind]
            pred = self.component(kind).at(kind, [p.params for p in mine], [p.tokens for p in mine])[0]
            rmse = math.sqrt(float(np.mean((pred - np.array([p.loss for p in mine])) ** 2)))
            entry = {name: float(v) for name, v in zip(sl.SLOTS, best, strict=True)}
            entry.update(rmse=rmse, runs=len(mine),
                         ci90={name: _pair(sl.interval(boot[:, i])) for i, name in enumerate(sl.SLOTS)})
            out[kind] = entry
        return out

    def as_json(self, draws: int, starts: int, seed: int) -> dict:
        shared = {"joint": ["E", "B", "beta", "alpha"], "joint-own-alpha": ["E", "B", "beta"], "separate": []}
        return {"law": self.law, "shared": shared[self.law] if len(self.kinds) > 1 else [],
                "settings": {"bootstrap_draws": draws, "starts": starts, "seed": seed, "huber_delta": sl.HUBER_DELTA,
                             "grid_starts": len(self.components[0].result.finals)},
                "fits": self.fits_json(), "ratios": self.ratios(), "warnings": self.warnings,
                "runs": [p.as_json() for p in self.points], "skipped": self.skipped}


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None  # JSON has no infinity: null means "never reaches that loss"


def _pair(pair: tuple[float, float]) -> list[float | None]:
    return [_finite(pair[0]), _finite(pair[1])]


def fit_study(points: list[RunPoint], law: str = "joint", draws: int = 200, starts: int = 4, seed: int = 0,
              skipped: list[str] | None = None) -> Study:
    if law not in LAWS:
        raise ConfigError(f"--law {law!r}: one of {', '.join(LAWS)}")
    if draws < 0 or starts < 1:
        raise ConfigError(f"--bootstrap {draws} / --starts {starts}: need >= 0 draws and >= 1 start")
    kinds = kinds_of(points)
    groups = [kinds] if law != "separate" and len(kinds) > 1 else [[k] for k in kinds]
    components = []
    for i, group in enumerate(groups):
        mine = [p for p in points if p.kind in group]
        layout = sl.separate_layout() if len(group) == 1 else sl.joint_layout(len(group), law == "joint-own-alpha")
        _check_enough(mine, group, layout)
        kind_index = np.array([group.index(p.kind) for p in mine])
        data = sl.Data.of([p.params for p in mine], [p.tokens for p in mine], [p.loss for p in mine], kind_index)
        # (separate fits draw independent resamples: the same seed would repeat one pattern in every kind)
        result = sl.fit(data, layout, [np.flatnonzero(kind_index == k) for k in range(len(group))], draws, starts,
                        [seed, i])
        components.append(Component(group, result))
    study = Study(points, law if len(kinds) > 1 else "separate", components, skipped=list(skipped or []))
    study.warnings = _diagnose(study)
    return study


def _check_enough(points: list[RunPoint], kinds: list[str], layout: sl.Layout) -> None:
    what = "/".join(kinds)
    if len(points) < layout.size + 1:
        raise ConfigError(f"{what}: {len(points)} runs for {layout.size} free parameters; the fit needs at least "
                          f"{layout.size + 1} (a grid over sizes and token budgets; --law joint shares E, B, β and α "
                          "between kinds and needs the fewest)")
    for kind in kinds:
        if len({p.params for p in points if p.kind == kind}) < 2:
            raise ConfigError(f"{kind}: all its runs have one size; A and α need at least 2 model sizes")
    if len({p.tokens for p in points}) < 2:
        raise ConfigError(f"{what}: all runs saw the same number of tokens; B and β need at least 2 token budgets")


def _diagnose(study: Study) -> list[str]:
    """What the numbers do not show: parameters on a bound, starts that end apart, intervals that miss."""
    out = []
    for c in study.components:
        r = c.result
        lo, hi = sl.bounds(r.layout, r.data)
        label = _column_labels(c)
        for col, value in enumerate(r.theta):
            if value <= lo[col] + 1e-6 or value >= hi[col] - 1e-6:
                side = "lower" if value <= lo[col] + 1e-6 else "upper"
                shown = "E -> 0" if label[col] == "E" else f"{label[col]} = {_natural_col(c, col):.4g}"
                out.append(f"{shown} is on its {side} bound: the runs do not determine it")
        near = r.final_objectives <= r.objective * (1 + _NEAR_BEST) + 1e-15
        nat = sl.natural(r.finals[near], r.layout, r.data)  # [near, kinds, 5]
        spread = []
        for col, name in enumerate(label):  # shared parameters once
            kind, slot = map(int, np.argwhere(r.layout.index == col)[0])
            v = nat[:, kind, slot]
            wide = v.max() - v.min() > (0.02 if slot in (2, 4) else 0.05 * max(abs(v.max()), 1e-12))
            if wide:
                spread.append(f"{name} {v.min():.4g}..{v.max():.4g}")
        if spread:
            who = f"{c.kinds[0]}: " if len(c.kinds) == 1 and len(study.components) > 1 else ""
            out.append(f"{who}starts disagree: {int(near.sum())} of {len(near)} starts end within {_NEAR_BEST:.0%} of the "
                       f"best objective with {', '.join(spread)}: the runs do not pin these down")
    checked = set()
    for kind in study.kinds:
        best, boot = study.parameters(kind)
        c = study.component(kind)
        for i, name in enumerate(sl.SLOTS):
            column = (id(c), int(c.result.layout.index[c.kinds.index(kind), i]))
            if len(boot) and column not in checked:  # a shared parameter once
                checked.add(column)
                a, b = sl.interval(boot[:, i])
                if not a <= best[i] <= b:
                    who = kind if len(c.kinds) == 1 or name in ("A",) or (name == "alpha" and study.law != "joint") \
                        else "shared"
                    out.append(f"{who}: {name} = {best[i]:.4g} lies outside its bootstrap interval [{a:.4g}, {b:.4g}] "
                               "(a skewed or multi-modal bootstrap: read the interval with care)")
    if not all(p.heldout for p in study.points):
        out.append("some runs logged no held-out loss; their training loss (last 10% of steps) was used")
    return list(dict.fromkeys(out))


def _column_labels(c: Component) -> list[str]:
    labels = []
    for name in c.result.layout.names:
        base = re.sub(r"\d+$", "", name)
        slot = {"e": "E", "a": "A", "b": "B"}.get(base, base)
        labels.append(slot + (f" ({c.kinds[int(name[len(base):])]})" if name != base else ""))
    return labels


def _natural_col(c: Component, col: int) -> float:
    kind, slot = map(int, np.argwhere(c.result.layout.index == col)[0])
    return float(sl.natural(c.result.theta[None], c.result.layout, c.result.data)[0, kind, slot])


def format_study(study: Study) -> str:
    fits = study.fits_json()
    shared = {"joint": "E, B, beta and alpha shared", "joint-own-alpha": "E, B and beta shared",
              "separate": "one fit per kind"}[study.law]
    rows = [("kind", "runs", *sl.SLOTS, "rmse")]
    for kind, f in fits.items():
        drawn = len(study.components[0].result.boot) > 0
        rows.append((kind, str(f["runs"]), *(f"{f[n]:.4g}" + (f" [{_num(f['ci90'][n][0])}, {_num(f['ci90'][n][1])}]"
                                                               if drawn else "") for n in sl.SLOTS), f"{f['rmse']:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    draws = len(study.components[0].result.boot)
    intervals = f"90% intervals from {draws} bootstrap resamples in brackets" if draws else "no intervals (--bootstrap 0)"
    lines = [f"law: {study.law} ({shared}); {intervals}", table[0],
             "-+-".join("-" * w for w in widths), *table[1:]]
    for name, r in study.ratios().items():
        lines.append(f"{name} at equal loss {r['loss']:.4f} (N {r['at_params']:,}, D {r['at_tokens']:,.0f}): "
                     f"{_num(r['params_at_equal_loss'])}x parameters{_ci(r['ci90'], draws)}, "
                     f"{_num(r['flops_at_equal_loss'])}x training FLOPs{_ci(r['flops_ci90'], draws)}"
                     + ("" if r["within_other_runs"] else f" [extrapolated beyond the {name.split('/')[0]} runs]"))
    lines += [f"warning: {w}" for w in study.warnings]
    if study.skipped:
        lines.append(f"skipped {len(study.skipped)} paths: " + "; ".join(study.skipped))
    return "\n".join(lines)


def _ci(pair: list[float | None], draws: int) -> str:
    return f" (90% CI {_num(pair[0])}–{_num(pair[1])})" if draws else ""


def _num(x: float | None) -> str:
    return "inf" if x is None else f"{x:.3g}"


def parse_count(text: str) -> float:
    """``12.5M``, ``3e8``, ``2B``, ``500K`` -> a number (parameters or tokens)."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([kKmMbBtT]?)\s*", text)
    if not match:
        raise ConfigError(f"{text!r}: expected a number such as 12.5M, 3e8 or 2B")
    return float(match[1]) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match[2].lower()]


@dataclass
class Holdout:
    point: RunPoint
    predicted: float
    ci90: tuple[float, float]

    @property
    def error(self) -> float:
        return self.predicted / self.point.loss - 1


def holdout_largest(points: list[RunPoint], law: str, draws: int, starts: int, seed: int) -> tuple[Study, list[Holdout]]:
    """Fit without each kind's runs at its largest size, then predict those runs."""
    largest = {k: max(p.params for p in points if p.kind == k) for k in kinds_of(points)}
    held = [p for p in points if p.params == largest[p.kind]]
    study = fit_study([p for p in points if p.params != largest[p.kind]], law, draws, starts, seed)
    return study, [Holdout(p, *study.predict(p.kind, p.params, p.tokens)) for p in held]


def format_holdout(rows: list[Holdout]) -> str:
    lines = ["kind        | params       | tokens        | loss   | predicted | 90% CI          | error"]
    lines.append("-" * len(lines[0]))
    for h in rows:
        p = h.point
        lines.append(f"{p.kind:<11} | {p.params:>12,} | {p.tokens:>13,.0f} | {p.loss:.4f} | {h.predicted:9.4f} | "
                     f"{h.ci90[0]:.4f}–{h.ci90[1]:.4f} | {100 * h.error:+.2f}%")
    errors = [abs(h.error) for h in rows]
    inside = sum(h.ci90[0] <= h.point.loss <= h.ci90[1] for h in rows)
    lines.append(f"held out {len(rows)} runs (each kind's largest size): mean |error| {100 * np.mean(errors):.2f}%, "
                 f"max {100 * max(errors):.2f}%, {inside} of {len(rows)} inside their 90% interval")
    return "\n".join(lines)
