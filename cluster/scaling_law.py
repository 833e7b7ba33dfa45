"""The scaling law L(N, D) = E + A·N^-α + B·D^-β, fitted as Chinchilla's Approach 3 (Hoffmann et al., 2022).

In log space, ``log L = LSE(e, a - α log N, b - β log D)`` with ``E = exp(e)``, ``A = exp(a)``,
``B = exp(b)``, and the Huber loss (δ = 1e-3) of the log residuals summed over runs. ``log N`` and
``log D`` are centred on their means while fitting (``a`` and ``α`` are otherwise nearly collinear) and
the results mapped back.

Every fit here is a batch of independent problems solved together: rows of ``weights`` (how often each
run counts: 1 for the fit itself, bootstrap counts for a resample) times starting points. The solver is a
projected Levenberg-Marquardt on the IRLS form of the Huber loss, all rows at once in numpy, so a
bootstrap of hundreds of refits costs about as much as one fit.

Several kinds share one problem through ``index``: a ``[kinds, 5]`` map from each kind's slots
(e, a, α, b, β) to columns of the parameter vector. Separate fits give every kind its own five columns;
the joint fit shares e, b and β (the same data and tokens) and, unless asked otherwise, α.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

HUBER_DELTA = 1e-3  # Chinchilla's, on log-loss residuals
SLOTS = ("E", "A", "alpha", "B", "beta")
# Bounds in the fitted (log, centred) coordinates: E >= exp(-10) ~ 5e-5 (reported as "E -> 0" when hit),
# exponents in [0, 2.5] (Chinchilla's start grid spans [0, 2]).
EXPONENT_MAX = 2.5
_E_MIN, _LOG_MAX = -10.0, 60.0


@dataclass(frozen=True)
class Layout:
    """Which parameter column each kind's (e, a, α, b, β) reads; ``names`` labels the columns."""

    index: np.ndarray  # [kinds, 5] int
    names: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.names)


def separate_layout() -> Layout:
    return Layout(np.array([[0, 1, 2, 3, 4]]), ("e", "a", "alpha", "b", "beta"))


def joint_layout(kinds: int, own_alpha: bool) -> Layout:
    """Shared e, b, β (and α unless ``own_alpha``); one a (and α) per kind."""
    names = ["e", "b", "beta"] + (["alpha"] if not own_alpha else [])
    a0 = len(names)
    names += [f"a{k}" for k in range(kinds)]
    if own_alpha:
        names += [f"alpha{k}" for k in range(kinds)]
    index = [[0, a0 + k, a0 + kinds + k if own_alpha else 3, 1, 2] for k in range(kinds)]
    return Layout(np.array(index), tuple(names))


@dataclass
class Data:
    """Runs in fitting coordinates: centred log N and log D, log L, and each run's kind (0..kinds-1)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    kind: np.ndarray
    x0: float
    y0: float

    @classmethod
    def of(cls, n: np.ndarray, d: np.ndarray, loss: np.ndarray, kind: np.ndarray) -> Data:
        ln, ld = np.log(np.asarray(n, float)), np.log(np.asarray(d, float))
        x0, y0 = float(ln.mean()), float(ld.mean())
        return cls(ln - x0, ld - y0, np.log(np.asarray(loss, float)), np.asarray(kind, int), x0, y0)


def bounds(layout: Layout, data: Data) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.full(layout.size, -_LOG_MAX), np.full(layout.size, _LOG_MAX)
    for slot, col in np.ndenumerate(layout.index):
        if slot[1] == 0:
            lo[col], hi[col] = _E_MIN, float(data.z.max())
        elif slot[1] in (2, 4):
            lo[col], hi[col] = 0.0, EXPONENT_MAX
    return lo, hi


def _terms(theta: np.ndarray, layout: Layout, x: np.ndarray, y: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """``[rows, points, 3]``: e, a - α x, b - β y for each point under each row's parameters."""
    p = theta[:, layout.index][:, kind]  # [rows, points, 5]
    return np.stack([p[..., 0], p[..., 1] - p[..., 2] * x, p[..., 3] - p[..., 4] * y], axis=-1)


def log_predict(theta: np.ndarray, layout: Layout, x: np.ndarray, y: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """log L for parameter rows ``theta [rows, P]`` at centred points: ``[rows, points]``."""
    t = _terms(theta, layout, x, y, kind)
    m = t.max(-1)
    return m + np.log(np.exp(t - m[..., None]).sum(-1))


def _objective(theta: np.ndarray, layout: Layout, data: Data, weights: np.ndarray, delta: float):
    """Huber objective per row, and its gradient and IRLS Gauss-Newton matrix."""
    t = _terms(theta, layout, data.x, data.y, data.kind)
    m = t.max(-1, keepdims=True)
    ex = np.exp(t - m)
    soft = ex / ex.sum(-1, keepdims=True)
    r = (m[..., 0] + np.log(ex.sum(-1))) - data.z
    absr = np.abs(r)
    f = (weights * np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta))).sum(-1)
    dslot = np.stack([soft[..., 0], soft[..., 1], -soft[..., 1] * data.x, soft[..., 2], -soft[..., 2] * data.y], -1)
    onehot = np.zeros((len(data.z), 5, layout.size))
    cols = layout.index[data.kind]  # [points, 5]
    onehot[np.arange(len(data.z))[:, None], np.arange(5)[None, :], cols] = 1.0
    jac = np.matmul(dslot.transpose(1, 0, 2), onehot).transpose(1, 0, 2)  # [rows, points, P]
    psi = np.clip(r, -delta, delta)
    grad = np.matmul((weights * psi)[:, None, :], jac)[:, 0]
    irls = weights * np.minimum(1.0, delta / np.maximum(absr, 1e-300))
    hess = np.matmul(jac.transpose(0, 2, 1) * irls[:, None, :], jac)
    return f, grad, hess


def _value(theta: np.ndarray, layout: Layout, data: Data, weights: np.ndarray, delta: float) -> np.ndarray:
    r = log_predict(theta, layout, data.x, data.y, data.kind) - data.z
    absr = np.abs(r)
    return (weights * np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta))).sum(-1)


def minimize(theta: np.ndarray, layout: Layout, data: Data, weights: np.ndarray, delta: float = HUBER_DELTA,
             iters: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Projected Levenberg-Marquardt from every row of ``theta`` (its own ``weights`` row): (theta, objective).

    A parameter on a bound whose gradient points outward is held there for that step; every step is
    accepted only where it lowers that row's objective.
    """
    lo, hi = bounds(layout, data)
    theta = np.clip(np.array(theta, float), lo, hi)
    f = _value(theta, layout, data, weights, delta)
    lam = np.full(len(theta), 1e-3)
    active = np.arange(len(theta))  # rows still moving; a row stops when its damping says no step helps
    eye = np.eye(layout.size)
    for _ in range(iters):
        if not len(active):
            break
        th, w = theta[active], weights[active]
        f_a, grad, hess = _objective(th, layout, data, w, delta)
        held = ((th <= lo) & (grad > 0)) | ((th >= hi) & (grad < 0))
        g = np.where(held, 0.0, grad)
        free = (~held)[:, :, None] & (~held)[:, None, :]
        h = np.where(free, hess, 0.0) + held[:, :, None] * eye
        diag = np.diagonal(h, axis1=1, axis2=2)
        damped = h + (lam[active][:, None] * (diag + 1e-12))[:, :, None] * eye
        trial = np.clip(th + np.linalg.solve(damped, -g[..., None])[..., 0], lo, hi)
        f_trial = _value(trial, layout, data, w, delta)
        better = f_trial < f_a
        lam[active] = np.where(better, np.maximum(lam[active] / 3, 1e-9), lam[active] * 4)
        gain = np.where(better, f_a - f_trial, 0.0)
        theta[active] = np.where(better[:, None], trial, th)
        f[active] = np.where(better, f_trial, f_a)
        done = (lam[active] > 1e10) | (better & (gain <= 1e-12 * np.maximum(f_a, 1e-30)))
        active = active[~done]
    return theta, f


def start_grid(layout: Layout, data: Data) -> np.ndarray:
    """Starting points in fitted coordinates: E a fraction of the smallest loss, each power term a fraction
    of it at the centre of the runs, exponents from 0.1 to 1 (the same a and α for every kind)."""
    lmin = float(np.exp(data.z.min()))
    es = np.log(lmin * np.array([0.2, 0.5, 0.8]))
    terms = np.log(lmin * np.array([0.05, 0.15, 0.4, 1.0]))
    exps = np.array([0.1, 0.3, 0.6, 1.0])
    rows = []
    for e, a, alpha, b, beta in itertools.product(es, terms, exps, terms, exps):
        theta = np.zeros(layout.size)
        for k in range(len(layout.index)):
            theta[layout.index[k]] = (e, a, alpha, b, beta)
        rows.append(theta)
    return np.array(rows)


def natural(theta: np.ndarray, layout: Layout, data: Data) -> np.ndarray:
    """``[rows, kinds, 5]``: E, A, α, B, β in the law's own units (N and D uncentred)."""
    p = theta[:, layout.index]
    return np.stack([np.exp(p[..., 0]), np.exp(p[..., 1] + p[..., 2] * data.x0), p[..., 2],
                     np.exp(p[..., 3] + p[..., 4] * data.y0), p[..., 4]], -1)


def predict(theta: np.ndarray, layout: Layout, data: Data, kind: int, n: np.ndarray | float,
            d: np.ndarray | float) -> np.ndarray:
    """Loss ``[rows, points]`` for one kind at uncentred N and D."""
    n, d = np.atleast_1d(np.asarray(n, float)), np.atleast_1d(np.asarray(d, float))
    n, d = np.broadcast_arrays(n, d)
    x, y = np.log(n) - data.x0, np.log(d) - data.y0
    return np.exp(log_predict(theta, layout, x, y, np.full(len(x), kind)))


def params_at_loss(theta: np.ndarray, layout: Layout, data: Data, kind: int, loss: np.ndarray,
                   d: float) -> np.ndarray:
    """N at which ``kind`` reaches ``loss [rows]`` with D tokens (inf where its law never gets there)."""
    nat = natural(theta, layout, data)[:, kind]
    e, a, alpha, b, beta = nat.T
    rest = loss - e - b * d ** -beta
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        n = np.exp((np.log(a) - np.log(rest)) / alpha)
    return np.where((rest > 0) & (alpha > 0) & np.isfinite(n), n, np.inf)


@dataclass
class FitResult:
    theta: np.ndarray  # [P] the best fit
    objective: float
    finals: np.ndarray  # [starts, P] where every start ended
    final_objectives: np.ndarray
    boot: np.ndarray  # [draws, P] best refit of each bootstrap resample
    layout: Layout
    data: Data


def fit(data: Data, layout: Layout, groups: list[np.ndarray], draws: int = 200, starts: int = 4,
        seed: int | list[int] = 0, delta: float = HUBER_DELTA) -> FitResult:
    """Best fit from the whole start grid, then ``draws`` bootstrap refits.

    Each resample draws, within every group (a kind's runs), as many runs as the group has, with
    replacement; each is refitted from the ``starts`` best distinct optima of the full fit and keeps its best.
    """
    n = len(data.z)
    grid = start_grid(layout, data)
    finals, objs = minimize(grid, layout, data, np.ones((len(grid), n)), delta)
    order = np.argsort(objs)
    best = finals[order[0]]
    seeds = [best]
    for i in order[1:]:
        if len(seeds) >= starts:
            break
        if all(np.abs(finals[i] - s).max() > 1e-3 for s in seeds):
            seeds.append(finals[i])
    while len(seeds) < starts:  # fewer distinct optima than starts: the best grid points fill in
        seeds.append(grid[np.argsort(_value(grid, layout, data, np.ones((len(grid), n)), delta))[len(seeds)]])
    boot = np.empty((0, layout.size))
    if draws:
        rng = np.random.default_rng(seed)
        counts = np.zeros((draws, n))
        for g in groups:
            counts[:, g] = rng.multinomial(len(g), np.full(len(g), 1 / len(g)), size=draws)
        s = len(seeds)
        theta0 = np.tile(np.array(seeds), (draws, 1))
        refit, fo = minimize(theta0, layout, data, np.repeat(counts, s, axis=0), delta)
        pick = fo.reshape(draws, s).argmin(1)
        boot = refit.reshape(draws, s, -1)[np.arange(draws), pick]
    return FitResult(best, float(objs[order[0]]), finals, objs, boot, layout, data)


def interval(values: np.ndarray, level: float = 0.90) -> tuple[float, float]:
    """Percentile interval of bootstrap values (inf where the resamples run off to infinity)."""
    if not len(values):
        return math.nan, math.nan  # no bootstrap asked for
    tail = (1 - level) / 2
    lo, hi = np.quantile(values, [tail, 1 - tail], method="inverted_cdf")
    return float(lo), float(hi)
