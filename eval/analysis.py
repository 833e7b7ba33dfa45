"""``hyperloop analyze``: the Hyperloop paper's section 4.4 analyses of a trained model, on held-out windows.

The analyses run on the plain-PyTorch twin (:class:`~hyperloop_dist.model.reference.ReferenceModel`, what a
release or a run directory loads as) with an explicit loop over its layers, so every intermediate state is
at hand. Any model kind works; the cross-loop table applies to the looped kinds only.

**Effective layers.** The unrolled depth ``D = B + L * M + E``: the begin block's layers, the middle
block's layers once per loop, the end block's layers (``transformer`` and ``mhc`` have ``D`` distinct
layers). Effective layer ``k`` is the k-th layer executed.

**The outer residual stream** ``r_k [tokens, d]`` after effective layer ``k`` is the one-stream state the
model would hand on if it stopped there:

* ``transformer``, and the begin / end blocks of every kind: the layer's output.
* ``looped``, middle layer ``j`` of loop ``l``: ``h_j + e_l``, with ``h_j`` the layer's output inside the
  loop and ``e_l`` the loop embedding (what the loop adds at its end; zero when the model has none). At the
  loop's last layer this is the next loop's input.
* ``hyperloop``, middle layer ``j`` of loop ``l``: the paper's *early merge*. The intra-loop stream ``h_j``
  is written into the ``n`` parallel streams as the loop's own hyper-connection writes at the loop's end,
  ``Y' = H_res Y + H_post (h_j + e_l)`` (the gates as read at the loop's start), then collapsed by the mean
  over the streams. At the loop's last layer ``Y'`` is the model's real state after the loop.
* ``mhc``: the ``n``-stream state after the layer's MLP hyper-connection, collapsed by the mean.

The last effective layer's stream is thus exactly what the model's final norm and head read.

**Table 8: cross-loop similarity** (looped kinds). For middle layer ``j``, with ``h_j^(l)[t]`` its output
at token ``t`` in loop ``l`` (the intra-loop stream, before any merge)::

    C_j = mean over tokens t and loop pairs l = 0 .. L-2 of cos(h_j^(l)[t], h_j^(l+1)[t])

and the table's figure is the mean of ``C_j`` over the ``M`` middle layers.

**Figure 3: residual-stream similarity.** ``S[a, b] = mean over tokens t of cos(r_a[t], r_b[t])`` for every
pair of effective layers: a ``D x D`` matrix with 1 on the diagonal.

**Figure 4: logit lens.** ``head(final_norm(r_k))`` at every effective layer ``k``: the mean cross-entropy
against the next token, the mean entropy of the predicted distribution (nats), and the argmax accuracy. At
the last layer these are the model's own held-out loss and accuracy.

Means over tokens run over every position of every held-out window, summed in float64.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from hyperloop_dist.config import ModelConfig
from hyperloop_dist.evaluation.heldout import heldout_windows
from hyperloop_dist.evaluation.loading import EvalError, LoadedModel, load_for_eval
from hyperloop_dist.evaluation.offline import eval_config, format_table
from hyperloop_dist.model.hyper_connections import (
    HyperConnection,
    collapse_streams,
    expand_streams,
)
from hyperloop_dist.model.reference import ReferenceModel, rope_tables

FIGURE_HEATMAP = "cosine_heatmap.png"
FIGURE_LENS = "logit_lens.png"
RESULTS = "analysis.json"


@dataclass
class Trace:
    """One forward pass, kept layer by layer (sequence-first ``[s, b, d]`` tensors)."""

    residuals: list[torch.Tensor]  # the outer residual stream after each effective layer (D entries)
    middle: list[list[torch.Tensor]]  # [loop][middle layer] outputs inside the loop (looped kinds; else [])


def layer_names(cfg: ModelConfig) -> list[str]:
    """Names of the ``D`` effective layers in execution order: ``B0``, ``L1.M0``, ``E0`` (unlooped: 0..)."""
    if not cfg.looped:
        return [str(i) for i in range(cfg.effective_depth)]
    return ([f"B{i}" for i in range(cfg.begin_layers)]
            + [f"L{i}.M{j}" for i in range(cfg.loops) for j in range(cfg.middle_layers)]
            + [f"E{i}" for i in range(cfg.end_layers)])


def loop_ends(cfg: ModelConfig) -> list[int]:
    """Effective-layer indices where a loop ends (looped kinds): where the lens reads the real loop output."""
    return [cfg.begin_layers + (i + 1) * cfg.middle_layers - 1 for i in range(cfg.loops)] if cfg.looped else []


@torch.no_grad()
def trace(model: ReferenceModel, tokens: torch.Tensor) -> Trace:
    """Run ``model`` on tokens ``[b, s]`` one layer at a time; see the module docstring for what is kept."""
    cfg = model.cfg
    x = model.embedding.word_embeddings(tokens).transpose(0, 1)
    angles = rope_tables(tokens.shape[1], cfg.hidden_size // cfg.num_heads, cfg.rope_base, x.device)
    layers = [layer for blk in model.blocks() for layer in blk.layers]
    out = Trace([], [])
    if cfg.kind == "mhc":
        # Two hyper-connections per layer (attention, then MLP branch); the residual is the collapsed state.
        state = expand_streams(x, cfg.hc.streams)
        for i, layer in enumerate(layers):
            state = model.hc[2 * i](state, lambda h, layer=layer: layer.attention_branch(h, angles))
            state = model.hc[2 * i + 1](state, layer.mlp_branch)
            out.residuals.append(collapse_streams(state))
        return out
    if not cfg.looped:
        for layer in layers:
            x = layer(x, angles)
            out.residuals.append(x)
        return out
    for layer in [] if model.begin is None else model.begin.layers:
        x = layer(x, angles)
        out.residuals.append(x)
    x = _trace_loops(model, x, angles, out)
    for layer in [] if model.end is None else model.end.layers:
        x = layer(x, angles)
        out.residuals.append(x)
    return out


def _trace_loops(model: ReferenceModel, x: torch.Tensor, angles: torch.Tensor, out: Trace) -> torch.Tensor:
    """The looped middle block; appends to ``out`` and returns the end block's input."""
    cfg = model.cfg
    hyperloop = cfg.has_hc  # (this runs for the looped kinds only)
    state = expand_streams(x, cfg.hc.streams) if hyperloop else None
    for loop in range(cfg.loops):
        e = None if model.loop_embedding is None else model.loop_embedding[loop].to(x.dtype)
        if hyperloop:
            h, h_post, h_res = model.hc[loop % len(model.hc)].read(state)
        else:
            h = x
        outputs = []
        for layer in model.middle.layers:
            h = layer(h, angles)
            outputs.append(h)
            if hyperloop:  # early merge: the loop's own write, as if the loop ended after this layer
                merged = HyperConnection.write(state, h, h_post, h_res, e)
                out.residuals.append(collapse_streams(merged))
            else:
                out.residuals.append(h if e is None else h + e)
        out.middle.append(outputs)
        if hyperloop:
            state = merged  # after the last layer the early merge is the real write
        else:
            x = out.residuals[-1]
    return collapse_streams(state) if hyperloop else x


@dataclass
class Analysis:
    """The figures of one model over a set of windows (JSON through :func:`dataclasses.asdict`)."""

    source: str
    kind: str
    layout: str  # B/MxL/E
    layers: list[str]
    loop_ends: list[int]
    windows: int
    tokens: int
    windows_sha256: str  # to tell whether compared runs saw the same token windows
    cosine: list[list[float]]  # Figure 3: D x D
    cross_entropy: list[float]  # Figure 4, per effective layer
    entropy: list[float]
    accuracy: list[float]
    middle_cosine: list[float] | None = None  # Table 8: C_j per middle layer (looped kinds)
    middle_cosine_mean: float | None = None
    loss: float = field(init=False)  # the model's own held-out loss: the lens at the last layer

    def __post_init__(self) -> None:
        self.loss = self.cross_entropy[-1]


class _Sums:
    """Float64 running sums over batches of tokens."""

    def __init__(self, depth: int, middle: int) -> None:
        self.cos = torch.zeros(depth, depth, dtype=torch.float64)
        self.ce, self.ent, self.correct = (torch.zeros(depth, dtype=torch.float64) for _ in range(3))
        self.middle = torch.zeros(middle, dtype=torch.float64)
        self.middle_count = 0
        self.tokens = 0

    def add(self, model: ReferenceModel, t: Trace, labels: torch.Tensor) -> None:
        labels = labels.transpose(0, 1).flatten().to(t.residuals[0].device)  # sequence-first, as the trace
        unit = torch.stack([F.normalize(r.float().flatten(0, 1), dim=-1) for r in t.residuals])  # [D, T, d]
        # Summing per-token cosines over tokens = one [D, T*d] @ [T*d, D] product of unit vectors.
        flat = unit.flatten(1)
        self.cos += (flat @ flat.T).double().cpu()
        del unit, flat
        for k, r in enumerate(t.residuals):
            logp = F.log_softmax(F.linear(model.final_norm(r), model.head_weight).float().flatten(0, 1), dim=-1)
            self.ce[k] += F.nll_loss(logp, labels, reduction="sum").double().cpu()
            self.ent[k] += -(logp.exp() * logp).sum().double().cpu()
            self.correct[k] += (logp.argmax(-1) == labels).sum().double().cpu()
        for a, b in zip(t.middle, t.middle[1:], strict=False):
            for j, (u, v) in enumerate(zip(a, b, strict=True)):
                self.middle[j] += F.cosine_similarity(u.float(), v.float(), dim=-1).sum().double().cpu()
        self.middle_count += max(len(t.middle) - 1, 0) * labels.numel()
        self.tokens += labels.numel()


def analyze_model(model: ReferenceModel, windows: torch.Tensor, source: str = "model", batch_size: int = 8,
                  device: str | torch.device = "cpu", progress: Callable[[str], None] | None = None
                  ) -> Analysis:
    """Table 8, Figure 3 and Figure 4 of ``model`` on ``windows [m, seq + 1]`` (inputs and next tokens)."""
    cfg = model.cfg
    model = model.to(device).eval()
    names = layer_names(cfg)
    sums = _Sums(len(names), cfg.middle_layers if cfg.looped else 0)
    batches = math.ceil(len(windows) / batch_size)
    for i in range(batches):
        rows = windows[i * batch_size:(i + 1) * batch_size]
        t = trace(model, rows[:, :-1].to(device))
        assert len(t.residuals) == len(names), (len(t.residuals), len(names))
        sums.add(model, t, rows[:, 1:])
        if progress is not None:
            progress(f"analyze  {source}: batch {i + 1}/{batches} ({sums.tokens:,} tokens)")
    n = sums.tokens
    middle = (sums.middle / sums.middle_count).tolist() if cfg.looped and sums.middle_count else None
    return Analysis(
        source=source, kind=cfg.kind,
        layout=f"{cfg.begin_layers}/{cfg.middle_layers}x{cfg.loops}/{cfg.end_layers}",
        layers=names, loop_ends=loop_ends(cfg),
        windows=len(windows), tokens=n, windows_sha256=hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
        cosine=(sums.cos / n).tolist(), cross_entropy=(sums.ce / n).tolist(), entropy=(sums.ent / n).tolist(),
        accuracy=(sums.correct / n).tolist(), middle_cosine=middle,
        middle_cosine_mean=None if middle is None else sum(middle) / len(middle),
    )


def load_for_analysis(path: str | Path, overrides: list[str], windows: int | None
                      ) -> tuple[LoadedModel, torch.Tensor]:
    """A release or run directory as a ReferenceModel, and its held-out windows (the run's own data)."""
    from hyperloop_dist.data.corpus import CorpusError

    path = Path(path)
    loaded = load_for_eval(path)
    if not isinstance(loaded.model, ReferenceModel):
        raise EvalError(f"{path}: {loaded.source} does not load as a plain-PyTorch model with its layers; "
                        "analyze a release (hyperloop export --release) or a run / checkpoint directory")
    cfg = eval_config(path, overrides, loaded)
    try:
        data = heldout_windows(cfg, windows or cfg.eval.windows, tokenizer=loaded.tokenizer_path)
    except CorpusError as exc:
        raise EvalError(f"no held-out text: {exc}; name the data after the model, e.g. "
                        f"`hyperloop analyze {path} data.corpus=dir data.dir=DIR`") from None
    return loaded, data


def analyze(paths: list[str | Path], overrides: list[str] | None = None, *, windows: int | None = None,
            batch_size: int = 8, device: str = "cpu", out: str | Path | None = None,
            progress: Callable[[str], None] | None = print) -> tuple[list[Analysis], Path]:
    """Analyze each model in ``paths`` on its held-out windows; write the PNGs and JSON to ``out``
    (default ``<first path>/analysis``). Returns the analyses and the output directory."""
    if not paths:
        raise EvalError("analyze: name at least one release or run directory")
    results = []
    for path in paths:
        loaded, data = load_for_analysis(path, list(overrides or []), windows)
        results.append(analyze_model(loaded.model, data, str(path), batch_size, device, progress))
    where = Path(out) if out is not None else Path(paths[0]) / "analysis"
    write_outputs(results, where)
    return results, where


def write_outputs(results: list[Analysis], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps({"runs": [asdict(r) for r in results]}, indent=1) + "\n")
    plot_heatmaps(results, out / FIGURE_HEATMAP)
    plot_logit_lens(results, out / FIGURE_LENS)


def _label(r: Analysis) -> str:
    return f"{r.kind} {r.layout}  ({Path(r.source).name})"


def plot_heatmaps(results: list[Analysis], png: Path) -> None:
    """Figure 3: one residual-stream cosine heatmap per model, side by side, on a shared colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.6), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        im = ax.imshow(r.cosine, vmin=-1 if min(map(min, r.cosine)) < 0 else 0, vmax=1, cmap="viridis")
        step = max(1, len(r.layers) // 16)  # keep deep models' tick labels readable
        ticks = list(range(0, len(r.layers), step))
        ax.set_xticks(ticks, [r.layers[i] for i in ticks], rotation=90, fontsize=7)
        ax.set_yticks(ticks, [r.layers[i] for i in ticks], fontsize=7)
        ax.set_title(_label(r), fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("cosine similarity of the residual stream between effective layers")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_logit_lens(results: list[Analysis], png: Path) -> None:
    """Figure 4: cross-entropy, entropy and argmax accuracy of the logit lens, one line per model;
    markers at loop ends (where a looped model's lens reads a real loop output)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("cross_entropy", "cross-entropy (nats)"), ("entropy", "entropy (nats)"),
              ("accuracy", "argmax accuracy"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for r in results:
            ys = getattr(r, key)
            xs = list(range(1, len(ys) + 1))
            (line,) = ax.plot(xs, ys, marker=".", label=_label(r))
            ends = [k for k in r.loop_ends if k < len(ys)]
            ax.plot([k + 1 for k in ends], [ys[k] for k in ends], "o", mfc="none", ms=9,
                    color=line.get_color())
        if len({tuple(r.layers) for r in results}) == 1:  # one layout: name the layers (B0, L1.M0, ...)
            names = results[0].layers
            step = max(1, len(names) // 16)
            ax.set_xticks(range(1, len(names) + 1, step), names[::step], rotation=90, fontsize=7)
        ax.set_xlabel("effective layer")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("logit lens (final norm + head on the residual stream; circles: loop ends)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def tables(results: list[Analysis]) -> str:
    """Table 8, the logit lens per effective layer and a summary, side by side for several models."""
    parts = []
    looped = [r for r in results if r.middle_cosine is not None]
    if looped:
        width = max(len(r.middle_cosine) for r in looped)
        head = ["model", *(f"M{j}" for j in range(width)), "mean"]
        rows = [[_label(r), *(f"{c:.3f}" for c in r.middle_cosine), *[""] * (width - len(r.middle_cosine)),
                 f"{r.middle_cosine_mean:.3f}"] for r in looped]
        parts.append("Table 8: mean cosine similarity of each middle layer's output, loop l vs loop l+1\n"
                     + _grid(head, rows))
    depth = max(len(r.layers) for r in results)
    head = ["layer"] + [f"{i}: {key}" for i in range(len(results)) for key in ("CE", "entropy", "acc")]
    rows = []
    for k in range(depth):
        row = [" / ".join(dict.fromkeys(r.layers[k] for r in results if k < len(r.layers)))]
        for r in results:
            if k < len(r.layers):
                end = "*" if k in r.loop_ends else ""
                row += [f"{r.cross_entropy[k]:.4f}{end}", f"{r.entropy[k]:.4f}", f"{r.accuracy[k]:.4f}"]
            else:
                row += ["", "", ""]
        rows.append(row)
    legend = "\n".join(f"  {i}: {_label(r)}" for i, r in enumerate(results))
    parts.append(f"Figure 4: logit lens per effective layer (* = a loop end)\n{legend}\n{_grid(head, rows)}")
    summary = []
    for i, r in enumerate(results):
        off = [r.cosine[a][b] for a in range(len(r.layers)) for b in range(len(r.layers)) if a != b]
        summary += [(f"{i}: model", _label(r)),
                    (f"{i}: held-out", f"{r.windows} windows, {r.tokens:,} tokens, loss {r.loss:.4f} "
                                       f"(ppl {math.exp(min(r.loss, 50)):.1f})"),
                    (f"{i}: residual cosine", f"mean off-diagonal {sum(off) / max(len(off), 1):.3f}")]
    if len({r.windows_sha256 for r in results}) > 1:
        summary.append(("note", "the models saw different token windows (other data or tokenizer)"))
    parts.append(format_table(summary))
    return "\n\n".join(parts)


def _grid(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: " | ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), "-+-".join("-" * w for w in widths), *(line(r) for r in rows)])
