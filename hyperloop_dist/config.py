"""Typed run configuration: dataclasses loaded from YAML recipes, validated at load.

The dataclass defaults *are* the ``tiny-cpu`` recipe (``hyperloop train`` with no recipe runs it).
A recipe file sets any subset of fields; ``section.field=value`` overrides after the recipe are parsed
as YAML scalars and validated the same way. Every error names the field, the value and what is allowed.

:func:`validate` holds the rules every engine shares; each engine's own (``parallel.engine`` and its
settings) are in :mod:`hyperloop_dist.train.engines`, whose ``validate`` runs both and is what the commands
that run or plan a layout call.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hyperloop_dist.data.remote import reads_remote
from hyperloop_dist.model.hyper_connections import HC_KINDS, HC_RES_MODES, KINDS, LOOPED_KINDS


class ConfigError(ValueError):
    """A recipe or override names an unknown field or holds an invalid value."""


ATTENTION_BACKENDS = ("auto", "local", "sdpa", "te")
COMPILE_MODES = ("none", "hc", "blocks")  # model.compile (docs/performance.md)
FUSIONS = ("adamw", "grad_norm", "rope", "swiglu")  # train.fusions (docs/performance.md)
# Model fields that choose kernels, not weights: a checkpoint resumes under any value of them.
RUNTIME_MODEL_FIELDS = ("attention_backend", "compile")


@dataclass
class HCConfig:
    streams: int = 4
    # H_res form (the paper's Table 6 rows): diagonal (sigmoid gates per stream), sinkhorn (dense doubly
    # stochastic, mHC's), identity (H_res = I, no parameters). None = each kind's paper form: diagonal for
    # hyperloop, sinkhorn for mhc.
    res: str | None = None
    sinkhorn_iters: int = 20
    per_loop_params: bool = True  # separate HC weights for each loop iteration (hyperloop)
    alpha_init: float = 0.01

    def res_for(self, kind: str) -> str:
        return self.res or ("sinkhorn" if kind == "mhc" else "diagonal")


@dataclass
class ModelConfig:
    kind: str = "hyperloop"
    hidden_size: int = 128
    num_heads: int = 4
    num_query_groups: int | None = None  # GQA; None = multi-head attention
    ffn_hidden_size: int | None = None  # None = 8/3 * hidden rounded up to a multiple of 64 (SwiGLU)
    begin_layers: int = 1
    middle_layers: int = 2
    end_layers: int = 1
    loops: int = 3
    vocab_size: int = 2048
    seq_length: int = 128
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    loop_embedding: bool = True  # learned per-loop vector added to the middle block's output
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Core attention kernel (same weights and math): auto = te where Transformer Engine imports on a GPU,
    # sdpa (torch scaled_dot_product_attention) on other GPUs, local (Megatron's unfused one) on CPU.
    attention_backend: str = "auto"
    # torch.compile: none; hc = each hyper-connection as one compiled pure function (one graph for every
    # loop); blocks = also each Transformer layer's norms, core attention and MLP.
    compile: str = "none"
    hc: HCConfig = field(default_factory=HCConfig)

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return -(-int(8 * self.hidden_size / 3) // 64) * 64

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_heads

    @property
    def effective_depth(self) -> int:
        return self.begin_layers + self.loops * self.middle_layers + self.end_layers

    @property
    def looped(self) -> bool:
        """The middle block's weights are applied ``loops`` times (hyperloop, looped)."""
        return self.kind in LOOPED_KINDS

    @property
    def has_hc(self) -> bool:
        """The residual stream is widened into ``hc.streams`` streams (hyperloop, mhc)."""
        return self.kind in HC_KINDS

    @property
    def passes(self) -> int:
        """Passes through the built middle block per forward."""
        return self.loops if self.looped else 1

    @property
    def middle_layers_built(self) -> int:
        """Distinct middle layers: the shared block, or the unrolled depth of the baselines."""
        return self.middle_layers if self.looped else self.loops * self.middle_layers

    @property
    def unique_layers(self) -> int:
        return self.begin_layers + self.middle_layers_built + self.end_layers

    def as_kind(self, kind: str) -> ModelConfig:
        """The same network at matched effective depth, as another kind (for baselines)."""
        return dataclasses.replace(self, kind=kind, hc=dataclasses.replace(self.hc))


@dataclass
class ParallelConfig:
    engine: str = "megatron"
    nproc_per_node: int = 2
    nnodes: int = 1
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"  # circular pipeline order: 1f1b (bounded activations) or gpipe (all forwards first)
    sequence_parallel: bool = False  # with tp > 1: activations between layers split along the sequence over TP
    distributed_optimizer: bool = False  # shard optimizer state over data-parallel ranks (ZeRO-1)
    overlap_grad_reduce: bool = False  # start DP gradient reduction per bucket during the backward pass
    fsdp_shard: str = "full"  # engine fsdp: full (over all ranks) or hybrid (within a node, replicated across)
    fsdp_reshard_middle: bool = False  # engine fsdp: free the looped middle block's weights between loops
    zero_stage: int = 1  # engine deepspeed: 1 optimizer state, 2 + gradients, 3 + parameters sharded
    offload_optimizer: bool = False  # engine deepspeed: optimizer state and step on the CPU (ZeRO-Offload)
    backend: str = "auto"  # auto = nccl with CUDA, gloo without
    timeout_s: int = 600


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class SourceConfig:
    path: str = ""  # a file, a directory or a glob (local or fsspec)
    format: str = "auto"  # auto (from the extension), jsonl, parquet, text
    text_field: str = "text"
    weight: float = 1.0  # mixture weight
    storage_options: dict[str, Any] = field(default_factory=dict)  # remote paths: passed to the fsspec filesystem


@dataclass
class DataConfig:
    corpus: str = "english"  # english | shakespeare (obtained on first use), dir (*.txt in data.dir), sources
    dir: str = "data/english"  # text files (*.txt) of the corpus
    tokenizer: str = "data/english/tokenizer.model"
    heldout_fraction: float = 0.02
    sources: list[SourceConfig] = field(default_factory=list)  # corpus=sources: the training mixture
    loader: str = "stream"  # stream: the streaming pipeline; windows: random windows of pre-tokenized files
    workers: int = 1  # loader worker processes per rank (0 = tokenize in the training process)
    pretokenized: str | None = None  # Megatron .bin/.idx prefix (`hyperloop data pretokenize`) for loader=windows
    retry_s: float = 120.0  # remote sources: seconds a read retries transient failures (outages, throttling)


@dataclass
class TrainConfig:
    steps: int = 300
    micro_batch_size: int = 8
    grad_accum: int = 1
    seed: int = 1234
    precision: str = "fp32"
    run_dir: str = "runs/tiny-cpu"
    log_interval: int = 10
    save_interval: int = 0  # 0 = only at the end
    keep_last: int = 2
    threads_per_rank: int = 1
    recompute: str = "none"  # "loop": keep activations per loop pass only (memory flat in model.loops)
    max_bad_steps: int = 3  # a non-finite loss skips the update; this many in a row stop the run (checkpointed)
    # Hang watchdog (docs/faults.md): seconds without progress before every rank dumps its stacks to
    # run_dir/hang/ and the job ends. Steps: None = max(120, 10 x the median step time after warm-up); 0 = off.
    hang_timeout_s: float | None = None
    hang_setup_timeout_s: float = 1800.0  # start-up to the first measured steps (build, resume, compile)
    hang_checkpoint_timeout_s: float = 900.0  # one checkpoint save or one periodic evaluation
    requeue_on_hang: bool | None = None  # None = on under SLURM: the sbatch script requeues a hung job
    # Torch-only fusions (docs/performance.md), each the same training as without it: adamw (torch's fused
    # AdamW), grad_norm (norm and clip by torch._foreach_*, no host sync per parameter), rope (cos/sin once
    # per sequence length), swiglu (Megatron's bias_activation_fusion).
    fusions: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    interval: int = 100  # steps between held-out evaluations during training (also at the end); 0 = off
    windows: int = 64  # held-out windows of seq_length tokens per evaluation, split over data-parallel ranks
    batch_size: int = 8  # windows per forward pass
    per_loop: bool = True  # looped kinds: also the held-out loss read out after every loop (logit lens)
    tasks: list[str] = field(default_factory=list)  # lm-eval tasks run at each evaluation (docs/eval.md)
    task_limit: int | None = None  # documents per lm-eval task (None = all)
    heldout_sources: list[SourceConfig] = field(default_factory=list)  # data.corpus=sources: held-out text


@dataclass
class LoggingConfig:
    wandb_project: str | None = None  # None = offline run under run_dir/wandb
    wandb_mode: str = "offline"
    wandb_entity: str | None = None


@dataclass
class ExportConfig:
    """``hyperloop export --int4`` / ``--quantize``: quantization of the blocks' Linear weights."""

    method: str = "rtn"  # rtn | gptq
    group_size: int = 128  # input columns per scale; must divide every quantized layer's input width
    quantize_embedding: bool = False  # also the token embedding (and so a tied head); default kept in bf16
    quantize_head: bool = False  # also an untied LM head
    calibration_batches: int = 16  # GPTQ: training micro-batches from the data pipeline
    gptq_dampening: float = 0.01  # GPTQ: fraction of the mean Hessian diagonal added to it
    heldout_windows: int = 64  # held-out windows for the bf16 vs INT4 loss report
    format: str = "compressed-tensors"  # compressed-tensors (pack-quantized W4A16) | gguf (Q4_0 container)


# `hyperloop export --quantize SCHEME`: llm-compressor recipes (hyperloop_dist/export/llm_compressor.py).
QUANT_SCHEMES = ("W4A16", "W4A16-RTN", "W4A16-AWQ", "W8A8-INT8", "W8A8-FP8", "FP8-dynamic")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def world_size(self) -> int:
        return self.parallel.nproc_per_node * self.parallel.nnodes

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.parallel.tp * self.parallel.pp)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def _check_type(path: str, value: Any, annotation: Any) -> Any:
    """Coerce/validate a YAML value against a field annotation; raise ConfigError naming the field."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _check_type(path, value, inner[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is Any:  # free-form mappings handed to a library (a source's storage_options)
        return value
    else:  # pragma: no cover - all fields are scalars or sections
        raise TypeError(f"unsupported annotation {annotation} for {path}")
    raise ConfigError(f"{path}={value!r}: expected {annotation.__name__}, got {type(value).__name__}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known fields: {', '.join(names)}"
            raise ConfigError(f"unknown field '{path}'{hint}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, f"{path}.")
        elif typing.get_origin(annotation) is list:
            if not isinstance(value, list):
                raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
            (item,) = typing.get_args(annotation)
            if dataclasses.is_dataclass(item):
                kwargs[key] = [_build(item, v, f"{path}[{i}].") for i, v in enumerate(value)]
            else:
                kwargs[key] = [_check_type(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
        elif typing.get_origin(annotation) is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
            _, item = typing.get_args(annotation)
            kwargs[key] = {str(k): _check_type(f"{path}.{k}", v, item) for k, v in value.items()}
        else:
            kwargs[key] = _check_type(path, value, annotation)
    return cls(**kwargs)


def build_section(cls: type, data: Any, prefix: str = "") -> Any:
    """Build and type-check any config-style dataclass (e.g. a cluster profile) from a YAML mapping."""
    return _build(cls, data, prefix)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.steps=50", "model.kind=mhc"]`` -> nested dict (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or "." not in key:
            raise ConfigError(f"override {item!r}: expected section.field=value, e.g. train.steps=50")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a recipe (None = the embedded tiny-cpu default), apply overrides, validate."""
    tree: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} does not exist; recipes live in recipes/*.yaml")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {exc}") from exc
        tree = loaded or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"recipe {str(path)!r}: expected a mapping of sections at the top level")
    tree = _merge(tree, parse_overrides(overrides or []))
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- validation


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _one_of(path: str, value: Any, allowed: tuple) -> None:
    _require(value in allowed, f"{path}={value!r}: must be one of {', '.join(map(repr, allowed))}")


def _positive(path: str, value: float, zero_ok: bool = False) -> None:
    ok = value >= 0 if zero_ok else value > 0
    _require(ok, f"{path}={value!r}: must be {'>= 0' if zero_ok else '> 0'}")


def validate(cfg: Config) -> None:
    m, p, o, d, t = cfg.model, cfg.parallel, cfg.optim, cfg.data, cfg.train
    _one_of("model.kind", m.kind, KINDS)
    _one_of("model.attention_backend", m.attention_backend, ATTENTION_BACKENDS)
    _one_of("model.compile", m.compile, COMPILE_MODES)
    for name in ("hidden_size", "num_heads", "middle_layers", "loops", "vocab_size", "seq_length"):
        _positive(f"model.{name}", getattr(m, name))
    _positive("model.begin_layers", m.begin_layers, zero_ok=True)
    _positive("model.end_layers", m.end_layers, zero_ok=True)
    _require(m.hidden_size % m.num_heads == 0,
             f"model.hidden_size={m.hidden_size}: must be divisible by model.num_heads={m.num_heads}")
    _require((m.hidden_size // m.num_heads) % 2 == 0,
             f"model.hidden_size/model.num_heads={m.hidden_size // m.num_heads}: RoPE needs an even head size")
    if m.num_query_groups is not None:
        _positive("model.num_query_groups", m.num_query_groups)
        _require(m.num_heads % m.num_query_groups == 0,
                 f"model.num_query_groups={m.num_query_groups}: must divide model.num_heads={m.num_heads}")
    if m.ffn_hidden_size is not None:
        _positive("model.ffn_hidden_size", m.ffn_hidden_size)
    _positive("model.hc.streams", m.hc.streams)
    _positive("model.hc.sinkhorn_iters", m.hc.sinkhorn_iters)
    if m.hc.res is not None:
        _one_of("model.hc.res", m.hc.res, HC_RES_MODES)
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.init_std", m.init_std)

    _one_of("parallel.backend", p.backend, ("auto", "gloo", "nccl"))
    for name in ("nproc_per_node", "nnodes", "tp", "pp", "timeout_s"):
        _positive(f"parallel.{name}", getattr(p, name))
    if p.tp > 1:
        for name, value in (("model.num_heads", m.num_heads), ("model.num_query_groups", m.query_groups),
                            ("model.ffn_hidden_size", m.ffn_size), ("model.vocab_size", m.vocab_size)):
            _require(value % p.tp == 0, f"parallel.tp={p.tp}: must divide {name}={value}")
    _require(cfg.world_size % (p.tp * p.pp) == 0,
             f"parallel.nproc_per_node*parallel.nnodes={cfg.world_size}: must be divisible by tp*pp={p.tp * p.pp}")

    _positive("optim.lr", o.lr)
    _positive("optim.min_lr", o.min_lr, zero_ok=True)
    _require(o.min_lr <= o.lr, f"optim.min_lr={o.min_lr}: must be <= optim.lr={o.lr}")
    _positive("optim.warmup_steps", o.warmup_steps, zero_ok=True)
    _one_of("optim.schedule", o.schedule, ("cosine", "linear", "constant"))
    _positive("optim.weight_decay", o.weight_decay, zero_ok=True)
    for name in ("beta1", "beta2"):
        value = getattr(o, name)
        _require(0 <= value < 1, f"optim.{name}={value}: must be in [0, 1)")
    _positive("optim.grad_clip", o.grad_clip, zero_ok=True)

    _one_of("data.corpus", d.corpus, ("english", "shakespeare", "dir", "sources"))
    _one_of("data.loader", d.loader, ("stream", "windows"))
    _positive("data.workers", d.workers, zero_ok=True)
    _positive("data.retry_s", d.retry_s, zero_ok=True)
    _require(d.corpus != "sources" or d.sources, "data.sources: data.corpus=sources needs at least one source")
    _require(d.corpus != "sources" or d.loader == "stream" or d.pretokenized,
             "data.loader='windows' with data.corpus=sources reads data.pretokenized (write it with "
             "`hyperloop data pretokenize`); set it, or use data.loader=stream")
    for i, src in enumerate(d.sources):
        _require(src.path != "", f"data.sources[{i}].path: must name a file, directory or glob")
        _one_of(f"data.sources[{i}].format", src.format, ("auto", "jsonl", "parquet", "text"))
        _positive(f"data.sources[{i}].weight", src.weight)
    _require(0 < d.heldout_fraction < 0.5, f"data.heldout_fraction={d.heldout_fraction}: must be in (0, 0.5)")

    for name in ("steps", "micro_batch_size", "grad_accum", "log_interval", "keep_last", "threads_per_rank",
                 "max_bad_steps"):
        _positive(f"train.{name}", getattr(t, name))
    _positive("train.save_interval", t.save_interval, zero_ok=True)
    _one_of("train.precision", t.precision, ("fp32", "bf16"))
    _one_of("train.recompute", t.recompute, ("none", "loop"))
    for i, name in enumerate(t.fusions):
        _one_of(f"train.fusions[{i}]", name, FUSIONS)
    _require(len(set(t.fusions)) == len(t.fusions), f"train.fusions={t.fusions}: names one fusion twice")
    _require(t.run_dir != "", "train.run_dir: must name a directory")
    if t.hang_timeout_s is not None:
        _positive("train.hang_timeout_s", t.hang_timeout_s, zero_ok=True)
    _hang_allows_data_retries(cfg)
    _positive("train.hang_setup_timeout_s", t.hang_setup_timeout_s)
    _positive("train.hang_checkpoint_timeout_s", t.hang_checkpoint_timeout_s)
    _one_of("logging.wandb_mode", cfg.logging.wandb_mode, ("offline", "online", "disabled"))
    _validate_eval(cfg)
    validate_export(cfg.export, cfg.model)


def _hang_allows_data_retries(cfg: Config) -> None:
    """An outage of a remote source that the pipeline is still retrying must not be reported as a hang."""
    t, retry_s = cfg.train, cfg.data.retry_s
    if not reads_remote(cfg):
        return
    for name, value in (("hang_timeout_s", t.hang_timeout_s), ("hang_setup_timeout_s", t.hang_setup_timeout_s)):
        _require(not value or value > retry_s,
                 f"train.{name}={value}: must be more than data.retry_s={retry_s} with remote data sources, or "
                 "a network outage still being retried would be reported as a hang; raise it, or lower "
                 "data.retry_s")


def _validate_eval(cfg: Config) -> None:
    e = cfg.eval
    _positive("eval.interval", e.interval, zero_ok=True)
    for name in ("windows", "batch_size"):
        _positive(f"eval.{name}", getattr(e, name))
    if e.task_limit is not None:
        _positive("eval.task_limit", e.task_limit)
    for i, src in enumerate(e.heldout_sources):
        _require(src.path != "", f"eval.heldout_sources[{i}].path: must name a file, directory or glob")
        _one_of(f"eval.heldout_sources[{i}].format", src.format, ("auto", "jsonl", "parquet", "text"))


def validate_export(e: ExportConfig, m: ModelConfig) -> None:
    _one_of("export.method", e.method, ("rtn", "gptq"))
    _one_of("export.format", e.format, ("compressed-tensors", "gguf"))
    for name in ("group_size", "calibration_batches", "heldout_windows"):
        _positive(f"export.{name}", getattr(e, name))
    _require(0 <= e.gptq_dampening < 1, f"export.gptq_dampening={e.gptq_dampening}: must be in [0, 1)")
    _require(not (e.quantize_head and m.tie_embeddings),
             "export.quantize_head=true with model.tie_embeddings=true: the head is the embedding; "
             "set export.quantize_embedding=true instead")
