"""``hyperloop plan``: per-GPU memory and step time of every TP x PP x DP x engine layout of a recipe.

Memory per rank = model state + activations, in bytes (all formulas below; docs/slurm.md restates them):

* **Model state** per parameter this rank holds (its TP shard of its pipeline stage's layers), from each
  engine's memory model (``state_bytes_per_param`` / ``gathered_bytes`` in hyperloop_dist/train/engines/):
  megatron fp32: 4 param + 4 grad + 8 Adam (Adam / DP with the distributed optimizer);
  megatron bf16: 2 param + 4 fp32 grad + 4 fp32 master + 8 Adam (master and Adam / DP with distopt);
  fsdp: (param + grad + Adam [+ fp32 master]) / DP, plus the largest unit gathered (the looped middle block);
  deepspeed ZeRO-1/2/3: fp32 master + Adam (12 bytes) / DP, and from stage 2 the gradients, from stage 3 the
  weights too (then plus the largest unit gathered).
* **Activations** per micro-batch of ``T = b·s`` tokens, per Transformer layer pass: what autograd keeps
  for backward in our layers, counted with saved-tensor hooks on the Megatron layer (element size e = 2
  in bf16, 4 in fp32): ``e·T·(7.5h + (3h + 3·kv + 5·ffn)/tp) + e·T·heads·s/tp``. Replicated over TP: the
  two RMSNorms' input, normalized input and output. Split over TP: the fused QKV output (kept alive by
  the V view), q and k after RoPE, the attention context, SwiGLU's fc1 output, silu, product and copy.
  The last term is the unfused attention's softmax (CPU / local spec); flash attention (GPU) keeps no
  s x s matrix, only a per-head log-sum-exp, and the term is dropped.
  Each hyper-connection application keeps ``e·T·(2n + 1)·h`` (the stream state, its RMS-normalized copy,
  the branch). The head keeps ``e·T·3h + 4·T·V/tp`` (its norm and the fp32 softmax of the cross-entropy)
  and, at the end of the forward pass, the logits and their exponentials (``2·4·T·V/tp``) at once.
  Passes: a looped model runs the middle block L times; with ``train.recompute=loop`` only each pass's
  input ``e·T·h`` is kept and one pass's layers are recomputed at a time.
  Pipeline: a stage holds ``in_flight`` micro-batches' activations (``parallel/pipeline_schedule.py``).
  Under 1F1B (``parallel.pp_schedule``, the default) that is ``min(m, W_r / L)`` with the schedule's cap
  ``W_r = L·P + 2(P-1-r) + 1`` slices on stage r (one slice = one pass through the stage's layers; +1 on the
  first and last stage for the final boundary / head task), about
  ``P + 2P/L`` micro-batches whatever ``grad_accum`` is; under GPipe all ``m = grad_accum``.
  ``benchmarks/memory.py`` and ``benchmarks/pipeline_memory.py`` measure it.

Step time = FLOPs per GPU / (peak FLOP/s x MFU) x (1 + pipeline bubble) x (1 + TP overhead) + the DP
gradient reduction not hidden behind compute. The FLOPs per token come from ``model/params.py``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from hyperloop_dist.config import Config, ConfigError, ModelConfig
from hyperloop_dist.model.params import report
from hyperloop_dist.model.reference import ReferenceModel
from hyperloop_dist.parallel.pipeline_schedule import in_flight_microbatches
from hyperloop_dist.train import engines

GIB = 2**30
# Per token and layer, in units of hidden_size, kept whole on every TP rank (without sequence parallel):
# each RMSNorm's input, normalized input and output (2 x 3), plus small per-token tensors (~1.5).
REPLICATED_PER_LAYER = 7.5


@dataclass
class Hardware:
    gpus: int
    gpu_mem_bytes: float
    gpus_per_node: int = 8
    peak_flops: float = 989e12  # H100 SXM dense bf16
    mfu: float = 0.40  # model FLOPs utilization assumed for the compute term
    inter_node_bw: float = 25e9  # bytes/s per GPU for DP gradient reduction across nodes
    intra_node_bw: float = 200e9
    flash_attention: bool = True  # GPU kernels keep no s x s attention matrix
    reserve_bytes: float = 3 * GIB  # CUDA context, NCCL buffers, allocator fragmentation


@dataclass
class ParamSplit:
    """Parameters of one layer and of the pieces outside the layers, split by how TP shards them."""
    layer_sharded: int  # 2-D weights of one Transformer layer (split over TP)
    layer_replicated: int  # norms
    embedding: int  # vocab x hidden (split over TP)
    head: int  # untied output layer (split over TP), 0 when tied
    hc_total: int  # hyper-connections + loop embedding (replicated; first stage)
    final_norm: int


def param_split(m: ModelConfig) -> ParamSplit:
    with torch.device("meta"):
        model = ReferenceModel(m)
    layer = model.middle.layers[0]
    loop_emb = model.loop_embedding.numel() if model.loop_embedding is not None else 0
    return ParamSplit(
        layer_sharded=sum(p.numel() for p in layer.parameters() if p.dim() == 2),
        layer_replicated=sum(p.numel() for p in layer.parameters() if p.dim() != 2),
        embedding=model.embedding.word_embeddings.weight.numel(),
        head=model.output_layer.weight.numel() if model.output_layer is not None else 0,
        hc_total=sum(p.numel() for p in model.hc.parameters()) + loop_emb,
        final_norm=model.final_norm.weight.numel(),
    )


# Every way an engine may run, by the label the table shows (each engine's ``plan_variants``).
VARIANTS: dict[str, tuple[type[engines.Engine], engines.PlanVariant]] = {
    v.label: (e, v) for e in engines.ENGINES.values() for v in e.plan_variants}


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    engine: str  # a label of VARIANTS: megatron, megatron+distopt, fsdp, deepspeed-z1 ...
    recompute: str  # none | loop
    micro_batch: int
    grad_accum: int

    @property
    def parallel_settings(self) -> dict[str, object]:
        """The ``parallel.*`` values of this layout (every engine's own settings at their neutral values)."""
        engine, variant = VARIANTS[self.engine]
        neutral = {k: v for e in engines.ENGINES.values() for k, v in e.settings.items()}
        return {"engine": engine.name, "tp": self.tp, "pp": self.pp, **neutral, **variant.overrides}

    @property
    def overrides(self) -> str:
        engine, variant = VARIANTS[self.engine]
        own = {"engine": engine.name, "tp": self.tp, "pp": self.pp, **variant.overrides}
        values = " ".join(f"parallel.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in own.items())
        return (f"{values} train.recompute={self.recompute} train.micro_batch_size={self.micro_batch} "
                f"train.grad_accum={self.grad_accum}")


@dataclass
class Estimate:
    layout: Layout
    params_per_rank: int
    state_bytes: float
    activation_bytes: float
    total_bytes: float
    step_s: float
    tokens_per_s: float
    fits: bool


def stage_layers(m: ModelConfig, pp: int, stage: int) -> tuple[int, int]:
    """(distinct layers held, layer passes run per micro-batch) on one pipeline stage."""
    middle = m.middle_layers_built
    held = middle // pp + (m.begin_layers if stage == 0 else 0) + (m.end_layers if stage == pp - 1 else 0)
    passes = (middle // pp) * m.passes
    passes += (m.begin_layers if stage == 0 else 0) + (m.end_layers if stage == pp - 1 else 0)
    return held, passes


def params_on_stage(split: ParamSplit, m: ModelConfig, tp: int, pp: int, stage: int) -> int:
    held, _ = stage_layers(m, pp, stage)
    n = held * (split.layer_sharded // tp + split.layer_replicated)
    if m.kind == "mhc":  # one hyper-connection per sub-layer, held with its layer (under PP too)
        n += split.hc_total * held // m.unique_layers
    elif stage == 0:
        n += split.hc_total
    if stage == 0:
        n += split.embedding // tp
    if stage == pp - 1:
        n += split.final_norm + (split.head // tp if split.head else (split.embedding // tp if pp > 1 else 0))
    return n


def activation_bytes(m: ModelConfig, tp: int, pp: int, stage: int, micro_batch: int, in_flight: float,
                     elem: int, recompute: str, flash: bool) -> float:
    """Activations one rank keeps at its peak (see the module docstring)."""
    tokens = micro_batch * m.seq_length
    h, kv = m.hidden_size, m.query_groups * (m.hidden_size // m.num_heads)
    per_layer = elem * tokens * (REPLICATED_PER_LAYER * h + (3 * h + 3 * kv + 5 * m.ffn_size) / tp)
    if not flash:
        per_layer += elem * tokens * m.num_heads * m.seq_length / tp
    held, passes = stage_layers(m, pp, stage)
    middle_here = m.middle_layers_built // pp
    ends_here = passes - middle_here * m.passes
    if recompute == "loop" and m.looped:
        kept = ends_here * per_layer + m.loops * elem * tokens * h  # pass inputs (checkpoints)
        transient = middle_here * per_layer  # one pass recomputed during backward
    else:
        kept, transient = passes * per_layer, 0.0
    # mhc: one hyper-connection around each attention and each MLP sub-layer
    hc_apps = {"hyperloop": m.loops if stage == 0 else 0, "mhc": 2 * passes}.get(m.kind, 0)
    kept += hc_apps * elem * tokens * (2 * m.hc.streams + 1) * h
    if stage == pp - 1:
        kept += elem * tokens * 3 * h + 4 * tokens * m.vocab_size / tp
        transient = max(transient, 2 * 4 * tokens * m.vocab_size / tp)
    return in_flight * kept + transient


def state_bytes(n_params: int, label: str, bf16: bool, dp: int, largest_unit: int) -> float:
    """Model state of a rank, from its engine's memory model (``Engine.state_bytes_per_param``)."""
    engine, variant = VARIANTS[label]
    return n_params * engine.state_bytes_per_param(variant, bf16, dp) + engine.gathered_bytes(variant, largest_unit,
                                                                                               bf16)


def estimate(cfg: Config, layout: Layout, hw: Hardware, split: ParamSplit | None = None,
             flops_per_token: float | None = None) -> Estimate:
    m = cfg.model
    split = split or param_split(m)
    flops_per_token = flops_per_token or report(m).train_flops_per_token
    bf16 = cfg.train.precision == "bf16"
    elem = 2 if bf16 else 4
    worst_total, worst = -1.0, (0, 0.0, 0.0)
    largest_unit = (m.middle_layers if m.looped else 1) * (split.layer_sharded + split.layer_replicated)
    for stage in range(layout.pp):
        n = params_on_stage(split, m, layout.tp, layout.pp, stage)
        state = state_bytes(n, layout.engine, bf16, layout.dp, largest_unit)
        in_flight = in_flight_microbatches(cfg.parallel.pp_schedule, layout.pp, stage, m.passes,
                                           layout.grad_accum)
        act = activation_bytes(m, layout.tp, layout.pp, stage, layout.micro_batch, in_flight, elem,
                               layout.recompute, hw.flash_attention)
        if state + act > worst_total:
            worst_total, worst = state + act, (n, state, act)
    n, state, act = worst
    tokens_step = layout.micro_batch * layout.grad_accum * layout.dp * m.seq_length
    flops = flops_per_token * tokens_step
    if layout.recompute == "loop":
        flops *= 4 / 3  # the middle block's forward runs twice
    compute = flops / hw.gpus / (hw.peak_flops * hw.mfu)
    bubble = (layout.pp - 1) / (layout.grad_accum * m.passes) if layout.pp > 1 else 0.0
    tp_overhead = 0.04 * (layout.tp - 1) if layout.tp <= hw.gpus_per_node else 0.5 * layout.tp
    grad_bytes = n * 4 * 2 * (layout.dp - 1) / max(layout.dp, 1)
    bw = hw.inter_node_bw if hw.gpus > hw.gpus_per_node else hw.intra_node_bw
    dp_time = 0.0 if layout.dp == 1 else grad_bytes / bw * 0.3  # ~70% overlapped with the backward pass
    step = compute * (1 + bubble) * (1 + tp_overhead) + dp_time
    total = worst_total + hw.reserve_bytes
    return Estimate(layout, n, state, act, total, step, tokens_step / step, total <= hw.gpu_mem_bytes)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: Config, hw: Hardware, global_batch: int) -> list[Layout]:
    """Every layout the config validation accepts for ``hw.gpus`` ranks at the same global batch."""
    out = []
    for tp in [t for t in _divisors(hw.gpus_per_node) if hw.gpus % t == 0]:
        for pp in _divisors(hw.gpus // tp):
            dp = hw.gpus // (tp * pp)
            if global_batch % dp:
                continue
            for engine in VARIANTS:
                for recompute in ("none", "loop") if cfg.model.looped else ("none",):
                    per_dp = global_batch // dp
                    for mb in (8, 4, 2, 1):
                        if per_dp % mb:
                            continue
                        layout = Layout(tp, pp, dp, engine, recompute, mb, per_dp // mb)
                        if _valid(cfg, layout, hw):
                            out.append(layout)
    return out


def _valid(cfg: Config, layout: Layout, hw: Hardware) -> bool:
    nodes = max(1, hw.gpus // hw.gpus_per_node)
    trial = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, **layout.parallel_settings, nnodes=nodes, nproc_per_node=hw.gpus // nodes))
    try:
        engines.validate(trial)
    except ConfigError:
        return False
    return True


def plan(cfg: Config, hw: Hardware) -> list[Estimate]:
    """All valid layouts at the recipe's global batch: fitting ones first, fastest first."""
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data_parallel_size
    split, flops = param_split(cfg.model), report(cfg.model).train_flops_per_token
    estimates = [estimate(cfg, lay, hw, split, flops) for lay in candidate_layouts(cfg, hw, global_batch)]
    # Per (tp, pp, engine, recompute) keep the largest micro-batch that fits (fewer, larger matmuls).
    best: dict[tuple, Estimate] = {}
    for e in estimates:
        lay = e.layout
        key = (lay.tp, lay.pp, lay.engine, lay.recompute)
        cur = best.get(key)
        if cur is None or (e.fits, e.fits and lay.micro_batch, -e.total_bytes) > (
                cur.fits, cur.fits and cur.layout.micro_batch, -cur.total_bytes):
            best[key] = e
    return sorted(best.values(), key=lambda e: (not e.fits, e.step_s if e.fits else e.total_bytes))


def parse_mem(text: str) -> float:
    match = re.fullmatch(r"\s*([\d.]+)\s*([GMT]i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"--gpu-mem={text!r}: expected a size like 80GB, 141GB or 40GiB")
    unit = (match.group(2) or "GB").upper().rstrip("B")
    scale = {"G": 1e9, "GI": GIB, "M": 1e6, "MI": 2**20, "T": 1e12, "TI": 2**40}[unit]
    return float(match.group(1)) * scale


def format_plan(cfg: Config, hw: Hardware, estimates: list[Estimate], top: int = 12) -> str:
    m = cfg.model
    r = report(m)
    gb = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data_parallel_size
    lines = [
        f"{m.kind}: {r.total / 1e6:,.1f}M parameters, {r.train_flops_per_token / 1e9:.2f} GFLOP/token (train), "
        f"global batch {gb} x {m.seq_length} tokens, {cfg.train.precision}",
        f"{hw.gpus} GPUs ({hw.gpus_per_node}/node) x {hw.gpu_mem_bytes / 1e9:.0f} GB; assumed "
        f"{hw.peak_flops / 1e12:.0f} TFLOP/s peak at {hw.mfu:.0%} MFU, "
        f"{'flash' if hw.flash_attention else 'unfused'} attention, {hw.reserve_bytes / GIB:.0f} GiB reserved",
    ]
    header = ("tp", "pp", "dp", "engine", "recompute", "mb x acc", "params/GPU", "state GiB", "act GiB",
              "total GiB", "fits", "step s", "tok/s")
    rows = [header]
    for e in estimates[:top]:
        lay = e.layout
        rows.append((str(lay.tp), str(lay.pp), str(lay.dp), lay.engine, lay.recompute,
                     f"{lay.micro_batch} x {lay.grad_accum}", f"{e.params_per_rank / 1e6:,.1f}M",
                     f"{e.state_bytes / GIB:.1f}", f"{e.activation_bytes / GIB:.1f}", f"{e.total_bytes / GIB:.1f}",
                     "yes" if e.fits else "no", f"{e.step_s:.2f}", f"{e.tokens_per_s / 1e3:,.0f}k"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    table.insert(1, "-+-".join("-" * w for w in widths))
    fitting = [e for e in estimates if e.fits]
    tail = (f"best: {fitting[0].layout.overrides}" if fitting else
            "nothing fits: more GPUs, a smaller micro-batch or train.recompute=loop")
    shown = f"{min(top, len(estimates))} of {len(estimates)} layouts shown"
    return "\n".join([*lines, *table, shown, tail])

