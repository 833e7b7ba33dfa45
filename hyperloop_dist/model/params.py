"""Parameter and FLOP accounting for a recipe and its baselines at matched effective depth.

Counts come from the real module tree (the reference model built on the meta device, so a 7B recipe
costs no memory); its parameter set equals the Megatron model's (tested).

The paper's convention (Table 1, and our recipe names) counts the untied LM head and leaves out the input
embedding: a lookup table costs no compute, the head is a matmul over every token. With tied embeddings
the one matrix is the head, so it is counted once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyperloop_dist.config import ModelConfig
from hyperloop_dist.model.hyper_connections import KINDS, num_hyper_connections
from hyperloop_dist.model.reference import ReferenceModel

PAPER_LABEL = "params (paper: + head, - input embedding)"


@dataclass
class ParamReport:
    kind: str
    total: int
    embedding: int
    hc: int
    unique_layers: int
    effective_depth: int
    train_flops_per_token: float
    tied: bool = False

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def paper(self) -> int:
        """The paper's count: the LM head in, the input embedding out (tied: the shared matrix once)."""
        return self.total if self.tied else self.total - self.embedding


def report(cfg: ModelConfig) -> ParamReport:
    with torch.device("meta"):
        model = ReferenceModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embedding.word_embeddings.weight.numel()
    hc = sum(p.numel() for p in model.hc.parameters())
    if model.loop_embedding is not None:
        hc += model.loop_embedding.numel()  # counted with the HC overhead: it exists only for looping
    layer = sum(p.numel() for p in model.middle.layers[0].parameters() if p.dim() == 2)
    hc_proj = model.hc[0].proj.weight.numel() if len(model.hc) else 0
    flops = train_flops_per_token(cfg, layer, hc_proj)
    return ParamReport(cfg.kind, total, embedding, hc, cfg.unique_layers, cfg.effective_depth, flops,
                       cfg.tie_embeddings)


def train_flops_per_token(cfg: ModelConfig, layer_matmul_params: int, hc_proj_params: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), every matmul a token goes through.

    Forward, per token: 2 x (matmul weights used, loop repeats included: effective depth x one layer's
    matmul weights + the LM head + one HC projection per HC application) + attention at the run's sequence
    length (QK^T and AV, 2 x 2 x seq x hidden per layer, full square as FlopCounterMode counts it, not
    halved for the causal mask) + the Sinkhorn H_res stream mix where there is one (2 n^2 d per HC
    application). Backward is twice the forward (gradients of inputs and of weights). Element-wise work
    (norms, gates, the diagonal H_res, softmax) and the embedding lookup are not counted; nor is a flash
    kernel's recomputation of the scores in backward.
    """
    # Every HC module runs once per token (mhc: two per layer), except shared hyperloop HCs, one per loop.
    hc_applications = cfg.loops if cfg.kind == "hyperloop" else num_hyper_connections(
        cfg.kind, cfg.loops, cfg.effective_depth, cfg.hc.per_loop_params)
    matmul = cfg.effective_depth * layer_matmul_params + cfg.vocab_size * cfg.hidden_size \
        + hc_applications * hc_proj_params
    attention = 2 * 2 * cfg.effective_depth * cfg.seq_length * cfg.hidden_size
    mix = hc_applications * 2 * cfg.hc.streams**2 * cfg.hidden_size if cfg.hc.res_for(cfg.kind) == "sinkhorn" else 0
    return 3 * (2 * matmul + attention + mix)


def compare_kinds(cfg: ModelConfig) -> list[ParamReport]:
    """The recipe's kind first, then every other kind at the same effective depth."""
    order = [cfg.kind] + [k for k in KINDS if k != cfg.kind]
    return [report(cfg.as_kind(kind)) for kind in order]


def format_table(reports: list[ParamReport]) -> str:
    """One row per kind; the paper-convention count comes first so it reads against Table 1."""
    base = next(r for r in reports if r.kind == "transformer")
    header = ("kind", PAPER_LABEL, "total", "non-emb", "HC params", "HC %", "unique/eff. layers",
              "train GFLOP/tok", "params vs transformer (paper)")
    rows = [header]
    for r in reports:
        rows.append((
            r.kind, f"{r.paper / 1e6:,.1f}M", f"{r.total / 1e6:,.1f}M", f"{r.non_embedding / 1e6:,.1f}M",
            f"{r.hc:,}", f"{100 * r.hc / r.total:.3f}%", f"{r.unique_layers}/{r.effective_depth}",
            f"{r.train_flops_per_token / 1e9:.3f}", f"{r.paper / base.paper:.3f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
