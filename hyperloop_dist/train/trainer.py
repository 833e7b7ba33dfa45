"""The training loop of one rank: Megatron DDP + Megatron optimizer around the model, step by step."""

from __future__ import annotations

import contextlib
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from hyperloop_dist.checkpoint import training_state
from hyperloop_dist.checkpoint.store import find_resumable, publish, staging_dir
from hyperloop_dist.config import Config, dump_config
from hyperloop_dist.data.batches import Batches, make_batches
from hyperloop_dist.data.token_windows import prepare_corpus
from hyperloop_dist.model.hyperloop import HyperloopModel, Stage, build_model
from hyperloop_dist.parallel import cpu_shim
from hyperloop_dist.parallel.distributed import (
    RankInfo,
    init_distributed,
    reap_children,
    shutdown_distributed,
)
from hyperloop_dist.parallel.pipeline import CircularPipeline
from hyperloop_dist.train import hang
from hyperloop_dist.train.metrics import MetricsLogger, window_mean
from hyperloop_dist.train.nonfinite import BadStepTracker, MicroLosses, TrainingDiverged, all_finite, poison
from hyperloop_dist.train.signals import StopRequest

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from hyperloop_dist.evaluation.periodic import PeriodicEval


@dataclass
class TrainResult:
    final_step: int
    losses: list[float]
    tokens_per_s: float
    stopped_by: str | None = None  # a scheduler signal ended the run early, after a checkpoint


def build_training(cfg: Config) -> tuple[DistributedDataParallel, MegatronOptimizer, OptimizerParamScheduler]:
    """(DDP-wrapped model, optimizer, LR scheduler) for this rank."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if cfg.train.precision == "bf16" and not cpu_shim.cuda_available():
        raise SystemExit("train.precision=bf16 needs a GPU; use train.precision=fp32 on CPU")
    from megatron.core import parallel_state

    stage = Stage(rank=parallel_state.get_pipeline_model_parallel_rank(), size=cfg.parallel.pp)
    model = build_model(cfg.model, tp=cfg.parallel.tp, stage=stage, precision=cfg.train.precision,
                        recompute=cfg.train.recompute == "loop", seed=cfg.train.seed,
                        sequence_parallel=cfg.parallel.sequence_parallel)
    distopt = cfg.parallel.distributed_optimizer
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
                                               use_distributed_optimizer=distopt)
    with cpu_shim.device_mode():
        ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    o = cfg.optim
    bf16 = cfg.train.precision == "bf16"
    opt_config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
        adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.grad_clip, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, use_distributed_optimizer=distopt,
    )
    with cpu_shim.device_mode():
        optimizer = get_megatron_optimizer(opt_config, [ddp])
    decay_style = {"cosine": "cosine", "linear": "linear", "constant": "constant"}[o.schedule]
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(cfg.train.steps, o.warmup_steps + 1), lr_decay_style=decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=cfg.train.steps, wd_incr_style="constant",
    )
    return ddp, optimizer, scheduler


def unwrap(ddp: DistributedDataParallel) -> HyperloopModel:
    return ddp.module


def train_step(cfg: Config, ddp: DistributedDataParallel, optimizer: MegatronOptimizer, data: Batches,
               step: int, info: RankInfo, pipeline: CircularPipeline | None = None,
               stop: StopRequest | None = None) -> tuple[float, float, list[int]]:
    """One optimizer step over ``grad_accum`` micro-batches.

    Returns (DP-mean loss, grad norm, this rank's non-finite micro-batches). A non-finite loss on any rank
    skips the update on every rank and returns NaN for both figures. ``stop`` learns in the same collective
    whether any rank was signalled.
    """
    from megatron.core.distributed import finalize_model_grads

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    batches = [data.next(step, micro) for micro in range(cfg.train.grad_accum)]
    device = cpu_shim.device()
    losses = MicroLosses()
    if pipeline is not None:
        losses.add(torch.tensor(pipeline.step(batches), device=device))
    else:
        for micro, (tokens, labels) in enumerate(batches):
            # Megatron DDP reduces a bucket once every parameter in it reported all its gradient events of
            # the last micro-batch (a looped weight reports once per recomputed loop): no_sync before that.
            last = micro == len(batches) - 1
            with contextlib.nullcontext() if last else ddp.no_sync():
                loss = ddp(tokens.to(device), labels=labels.to(device)).mean() / cfg.train.grad_accum
                loss = poison(loss, step, micro)
                loss.backward()
            losses.add(loss)
    hang.beat("backward")
    total = losses.total()
    with cpu_shim.device_mode():
        finalize_model_grads([ddp])
        if not all_finite(total, stop):
            return math.nan, math.nan, [] if pipeline is not None else losses.non_finite()
        _, grad_norm, _ = optimizer.step()
    if info.dp_size > 1:
        dist.all_reduce(total, group=_dp_group())
        total /= info.dp_size
    return float(total), float(grad_norm if grad_norm is not None else math.nan), []


def _dp_group() -> dist.ProcessGroup:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


@record  # the launcher then reports each failed rank's exception, not only its exit code
def run_training(cfg: Config) -> TrainResult:
    """Entry point of every rank (called by the launcher)."""
    info = init_distributed(cfg)
    try:
        return _train(cfg, info)
    finally:
        hang.stop()
        shutdown_distributed()
        reap_children()  # a loader worker left behind would block this process's exit forever


@dataclass
class Engine:
    """What one rank trains with, whatever ``parallel.engine`` is: the model (unwrapped), its optimizer and
    LR scheduler, the circular pipeline under PP, and ``step(data, index, stop)`` -> (loss, grad norm,
    this rank's non-finite micro-batches)."""

    model: torch.nn.Module
    optimizer: object
    scheduler: object
    step: Callable[[Batches, int, StopRequest | None], tuple[float, float, list[int]]]
    pipeline: CircularPipeline | None = None


def build_engine(cfg: Config, info: RankInfo) -> Engine:
    engine = cfg.parallel.engine
    if engine == "fsdp":
        from hyperloop_dist.parallel.fsdp import build_fsdp_training, fsdp_step

        model, optimizer, scheduler = build_fsdp_training(cfg)  # FSDP2 shards the model in place: no wrapper

        def step(data: Batches, index: int, stop: StopRequest | None) -> tuple[float, float, list[int]]:
            return fsdp_step(cfg, model, optimizer, [data.next(index, m) for m in range(cfg.train.grad_accum)],
                             index, stop)

        return Engine(model, optimizer, scheduler, step)
    if engine == "deepspeed":
        from hyperloop_dist.parallel.zero import build_deepspeed_training, deepspeed_step

        # The DeepSpeed engine is called like the model and checkpoints itself.
        model, optimizer, scheduler = build_deepspeed_training(cfg)

        def step(data: Batches, index: int, stop: StopRequest | None) -> tuple[float, float, list[int]]:
            loss, grad_norm = deepspeed_step(model, [data.next(index, m) for m in range(cfg.train.grad_accum)])
            if not all_finite(loss, stop):  # DeepSpeed applied that update inside engine.step(): stop now
                raise TrainingDiverged(f"step {index + 1}: non-finite loss under the deepspeed engine, which "
                                       "cannot skip an update; resume from the last checkpoint")
            return loss, grad_norm, []

        return Engine(model, optimizer, scheduler, step)
    ddp, optimizer, scheduler = build_training(cfg)
    pipeline = (CircularPipeline(unwrap(ddp), cfg.train.micro_batch_size, cfg.parallel.pp_schedule)
                if cfg.parallel.pp > 1 else None)

    def step(data: Batches, index: int, stop: StopRequest | None) -> tuple[float, float, list[int]]:
        return train_step(cfg, ddp, optimizer, data, index, info, pipeline, stop)

    return Engine(unwrap(ddp), optimizer, scheduler, step, pipeline)


def _train(cfg: Config, info: RankInfo) -> TrainResult:
    run_dir = Path(cfg.train.run_dir)
    say = print if info.is_main else (lambda *a, **k: None)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        prepare_corpus(cfg, log=say)  # a no-op when `hyperloop train` prepared it before launching
        hang.archive_reports(run_dir)
    attempt = _agree(uuid.uuid4().hex if info.is_main else None)  # tells this start's hang reports apart
    _start_watchdog(cfg, run_dir, info, str(attempt))
    engine = build_engine(cfg, info)
    model, optimizer, scheduler = engine.model, engine.optimizer, engine.scheduler
    windows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * info.dp_size
    start_step, data_state = 0, None
    resume_from = _agree(find_resumable(run_dir, log=say) if info.is_main else None)
    if resume_from is not None:
        start_step = training_state.load(resume_from, cfg, model, optimizer, scheduler, windows_per_step)
        data_state = training_state.load_data_state(resume_from, info.dp_rank)
        say(f"resumed from {resume_from} at step {start_step}")
    data = make_batches(cfg, info.dp_rank, info.dp_size, data_state)
    try:
        return _loop(cfg, info, engine, data, start_step, windows_per_step, say)
    finally:
        data.close()  # the trainer owns the loader's workers, on every exit path


def _loop(cfg: Config, info: RankInfo, engine: Engine, data: Batches, start_step: int, windows_per_step: int,
          say: Callable[..., object]) -> TrainResult:
    run_dir = Path(cfg.train.run_dir)
    model, optimizer, scheduler = engine.model, engine.optimizer, engine.scheduler
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: full sizes
    where = "" if cfg.parallel.tp == cfg.parallel.pp == 1 else " on rank 0 (its TP shard of pipeline stage 0)"
    say(f"{cfg.model.kind}: {n_params:,} parameters{where} | {info.world_size} ranks (tp={cfg.parallel.tp}, "
        f"pp={cfg.parallel.pp}, dp={info.dp_size}) | "
        f"{windows_per_step * cfg.model.seq_length:,} tokens/step | data {cfg.data.loader} loader | run dir {run_dir}")

    pipeline = engine.pipeline
    logger = MetricsLogger(cfg, run_dir, info.is_main, cfg.train.steps)
    evaluator = _evaluator(cfg, model, pipeline, info, say)
    tokens_per_step = windows_per_step * cfg.model.seq_length
    losses: list[float] = []
    tracker = BadStepTracker(cfg.train.max_bad_steps)
    tick, t_start, tokens_seen = time.perf_counter(), time.perf_counter(), 0
    step = start_step
    stop, stopped_by = StopRequest().install(), None
    beating = _BeatOnFetch(data)
    try:
        for step in range(start_step, cfg.train.steps):
            hang.section("step", step + 1)
            hang.inject_faults(step + 1, info.rank)
            loss, grad_norm, bad_micro = engine.step(beating, step, stop)
            scheduler.step(increment=1)  # a skipped step still consumed its data and its place in the schedule
            tokens_seen += tokens_per_step
            done = step + 1
            if tracker.record(done, loss, grad_norm, bad_micro):
                say(tracker.diagnostic())
                _save(cfg, run_dir, done, model, optimizer, scheduler, info, data)
                raise TrainingDiverged(f"stopped at step {done}: {tracker.in_a_row} consecutive steps with a "
                                       "non-finite loss (diagnostic above; last good state saved)")
            if not math.isfinite(loss):
                say(f"step {done}: non-finite loss, update skipped ({tracker.in_a_row}/{cfg.train.max_bad_steps} "
                    "in a row)")
            else:
                losses.append(loss)
            if done % cfg.train.log_interval == 0 or done == cfg.train.steps:
                now = time.perf_counter()
                steps_in_window = (done - start_step) % cfg.train.log_interval or cfg.train.log_interval
                record = {"step": done, "loss": loss if math.isfinite(loss) else None,
                          "lr": optimizer.param_groups[0]["lr"],
                          "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                          "skipped_steps": tracker.skipped,
                          "tokens_per_s": steps_in_window * tokens_per_step / max(now - tick, 1e-9),
                          "tokens": done * tokens_per_step,
                          **{f"data/{k}": v for k, v in data.stats().items()}}
                tick = now
                logger.log(record)
                logger.progress(record)
            if evaluator.due(done):
                hang.section("eval", done)
                record = evaluator.run(done)
                if record:
                    logger.log(record)
                    say(evaluator.progress_line(record))
            periodic = cfg.train.save_interval and done % cfg.train.save_interval == 0
            if periodic and done != cfg.train.steps:
                _save(cfg, run_dir, done, model, optimizer, scheduler, info, data)
            if done != cfg.train.steps and stop.everywhere:
                stopped_by = stop.name
                say(f"{stopped_by}: stopping after step {done}; saving a checkpoint to resume from")
                if not periodic:
                    _save(cfg, run_dir, done, model, optimizer, scheduler, info, data)
                break
        final = cfg.train.steps
        if step + 1 == final and final > start_step:
            _save(cfg, run_dir, final, model, optimizer, scheduler, info, data)
    finally:
        stop.uninstall()
        logger.close()
    elapsed = time.perf_counter() - t_start
    tps = tokens_seen / max(elapsed, 1e-9)
    stragglers = hang.straggler_rows(_gather(hang.median_compute_s()))
    if losses:
        n = min(100, max(1, len(losses) // 3))
        stats = data.stats()
        skipped = sum(v for k, v in stats.items() if k not in ("documents", "tokens", "split_documents"))
        logger.summary([
            ("model", f"{cfg.model.kind} ({n_params:,} params)"),
            *([("data (rank 0)", f"{stats['documents']:,} documents, {stats['tokens']:,} tokens read, "
                                 f"{skipped:,} bad records skipped")] if stats else []),
            ("steps", f"{start_step} -> {step + 1}" + (f" of {cfg.train.steps}, stopped by {stopped_by}"
                                                      if stopped_by else "")),
            (f"loss, first {n} steps (mean)", f"{window_mean(losses, True, n):.4f}"),
            (f"loss, last {n} steps (mean)", f"{window_mean(losses, False, n):.4f}"),
            ("tokens/s", f"{tps:,.0f}"),
            *stragglers,
            *([("skipped steps (non-finite loss)", str(tracker.skipped))] if tracker.skipped else []),
            *evaluator.summary_rows(),
            ("params + optimizer state, rank 0", f"{state_bytes(model, optimizer) / 2**20:.2f} MiB"),
            ("wall time", f"{elapsed:.1f} s"),
            ("run dir", str(run_dir)),
        ])
    else:
        say(f"nothing to do: {run_dir} already holds a checkpoint at step {start_step} >= train.steps")
    return TrainResult(final_step=step + 1 if stopped_by else cfg.train.steps, losses=losses, tokens_per_s=tps,
                       stopped_by=stopped_by)


def _evaluator(cfg: Config, model: torch.nn.Module, pipeline: CircularPipeline | None, info: RankInfo,
               say: Callable[..., object]) -> PeriodicEval:
    """The eval hook gets the model and a forward callable (tokens, labels) -> per-token loss, no engine."""
    from megatron.core import parallel_state

    from hyperloop_dist.evaluation.periodic import PeriodicEval

    forward = pipeline.token_nll if pipeline is not None else (lambda tokens, labels: model(tokens, labels=labels))
    return PeriodicEval(cfg, model, forward, dp_rank=info.dp_rank, dp_size=info.dp_size,
                        group=parallel_state.get_data_parallel_group(), is_main=info.is_main,
                        pipelined=pipeline is not None, log=say)


def state_bytes(model: torch.nn.Module, optimizer: object) -> int:
    """Bytes of parameters and optimizer state this rank holds (its shards, for sharded engines)."""
    from hyperloop_dist.checkpoint.training_state import torch_optimizers

    def local(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        # ZeRO-3 keeps a rank's shard in ds_tensor (and the whole tensor only while gathered or persistent).
        shard = t.ds_tensor.numel() * t.ds_tensor.element_size() if hasattr(t, "ds_tensor") else 0
        return t.numel() * t.element_size() + shard

    total = sum(local(p) for p in model.parameters())
    if type(optimizer).__module__.startswith("deepspeed."):
        # DeepSpeed's ZeRO optimizers step fp32 copies of this rank's partition: they are extra state.
        total += sum(local(p) for opt in torch_optimizers(optimizer) for g in opt.param_groups for p in g["params"])
    for opt in torch_optimizers(optimizer):
        total += sum(local(v) for state in opt.state.values() for v in state.values()
                     if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total


def _agree(value: object) -> object:
    """Rank 0's value on every rank (checkpoint discovery hashes files once, not once per rank)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: object) -> list[object]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _start_watchdog(cfg: Config, run_dir: Path, info: RankInfo, attempt: str) -> None:
    t = cfg.train
    requeue = t.requeue_on_hang if t.requeue_on_hang is not None else "SLURM_JOB_ID" in os.environ
    allowances = hang.Allowances(setup_s=t.hang_setup_timeout_s, step_s=t.hang_timeout_s or None,
                                 checkpoint_s=t.hang_checkpoint_timeout_s)
    watchdog = hang.HangWatchdog(run_dir, info.rank, info.world_size, attempt, allowances, requeue=requeue)
    watchdog.start(watch=t.hang_timeout_s != 0)


class _BeatOnFetch:
    """The step's data source, telling the watchdog when each micro-batch arrived (a rank that never gets
    there is the one the others wait for)."""

    def __init__(self, data: Batches) -> None:
        self.data = data

    def next(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.data.next(step, micro)
        hang.beat("data")
        return batch

    def __getattr__(self, name: str) -> object:
        return getattr(self.data, name)


def _save(cfg: Config, run_dir: Path, step: int, model: HyperloopModel, optimizer: MegatronOptimizer,
          scheduler: OptimizerParamScheduler, info: RankInfo, data: Batches) -> None:
    hang.section("checkpoint", step)
    if info.is_main:
        tmp = staging_dir(run_dir, step)
        if cfg.parallel.engine == "megatron":
            (tmp / "dist").mkdir()  # dist_checkpointing writes into an existing directory
    tmp = _agree(tmp if info.is_main else None)
    training_state.write(tmp, cfg, step, model, optimizer, scheduler, data.windows_per_step, info.dp_rank,
                         data.state_dict())
    dist.barrier()
    if info.is_main:
        print(f"saved checkpoint {publish(tmp, cfg.train.keep_last)}", flush=True)
    dist.barrier()
