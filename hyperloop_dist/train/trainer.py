"""The training loop of one rank, the same for every engine (:mod:`hyperloop_dist.train.engines`)."""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from hyperloop_dist.config import Config, dump_config
from hyperloop_dist.data.batches import Batches, make_batches
from hyperloop_dist.data.token_windows import prepare_corpus
from hyperloop_dist.parallel.distributed import (
    RankInfo,
    agree,
    gather,
    init_distributed,
    reap_children,
    shutdown_distributed,
)
from hyperloop_dist.train import checkpointing, engines, hang
from hyperloop_dist.train.metrics import MetricsLogger, window_mean
from hyperloop_dist.train.nonfinite import BadStepTracker, TrainingDiverged
from hyperloop_dist.train.signals import StopRequest

if TYPE_CHECKING:
    from hyperloop_dist.evaluation.periodic import PeriodicEval


@dataclass
class TrainResult:
    final_step: int
    losses: list[float]
    tokens_per_s: float
    stopped_by: str | None = None  # a scheduler signal ended the run early, after a checkpoint


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


def _train(cfg: Config, info: RankInfo) -> TrainResult:
    run_dir = Path(cfg.train.run_dir)
    say = print if info.is_main else (lambda *a, **k: None)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        prepare_corpus(cfg, log=say)  # a no-op when `hyperloop train` prepared it before launching
        hang.archive_reports(run_dir)
    attempt = agree(uuid.uuid4().hex if info.is_main else None)  # tells this start's hang reports apart
    _start_watchdog(cfg, run_dir, info, str(attempt))
    engine = engines.build(cfg, info)
    windows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * info.dp_size
    start_step, data_state = checkpointing.resume(cfg, engine, info, windows_per_step, say)
    data = make_batches(cfg, info.dp_rank, info.dp_size, data_state)
    try:
        return _Run(cfg, info, engine, data, start_step, say).loop()
    finally:
        data.close()  # the trainer owns the loader's workers, on every exit path


class _Run:
    """One rank's steps from ``start_step``: step, log, evaluate, checkpoint, stop on a signal, summarize."""

    def __init__(self, cfg: Config, info: RankInfo, engine: engines.Engine, data: Batches, start_step: int,
                 say: Callable[..., object]) -> None:
        self.cfg, self.info, self.engine, self.data, self.say = cfg, info, engine, data, say
        self.start_step = self.step = start_step
        self.tokens_per_step = data.windows_per_step * cfg.model.seq_length
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.model.parameters())  # ZeRO-3: full
        self.logger = MetricsLogger(cfg, Path(cfg.train.run_dir), info.is_main, cfg.train.steps)
        self.evaluator = _evaluator(cfg, engine, info, say)
        self.tracker = BadStepTracker(cfg.train.max_bad_steps)
        self.losses: list[float] = []
        self.stop, self.stopped_by = StopRequest(), None
        self.tick = self.t_start = time.perf_counter()

    def loop(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        p = cfg.parallel
        where = "" if p.tp == p.pp == 1 else " on rank 0 (its TP shard of pipeline stage 0)"
        self.say(f"{cfg.model.kind}: {self.n_params:,} parameters{where} | {self.info.world_size} ranks "
                 f"({p.engine} engine, tp={p.tp}, pp={p.pp}, dp={self.info.dp_size}) | {self.tokens_per_step:,} "
                 f"tokens/step | data {cfg.data.loader} loader | run dir {t.run_dir}")
        self.stop.install()
        try:
            for index in range(self.start_step, t.steps):
                hang.section("step", index + 1)
                hang.inject_faults(index + 1, self.info.rank)
                result = self.engine.step(self._batches(index), index, self.stop)
                self.engine.scheduler.step(increment=1)  # a skipped step still used its data and schedule slot
                self.step = index + 1
                self._record(result)
                if self._after_step():
                    break
            if self.step == t.steps and t.steps > self.start_step:
                self._save()
        finally:
            self.stop.uninstall()
            self.logger.close()
        return self._finish()

    def _batches(self, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = []
        for micro in range(self.cfg.train.grad_accum):
            batches.append(self.data.next(index, micro))
            hang.beat("data")  # a rank that never gets its data is the one the others wait for
        return batches

    def _record(self, result: engines.StepResult) -> None:
        done, t = self.step, self.cfg.train
        if self.tracker.record(done, result.loss, result.grad_norm, result.bad_micro):
            self.say(self.tracker.diagnostic())
            self._save()
            raise TrainingDiverged(f"stopped at step {done}: {self.tracker.in_a_row} consecutive steps with a "
                                   "non-finite loss (diagnostic above; last good state saved)")
        finite = math.isfinite(result.loss)
        if finite:
            self.losses.append(result.loss)
        else:
            self.say(f"step {done}: non-finite loss, update skipped ({self.tracker.in_a_row}/{t.max_bad_steps} "
                     "in a row)")
        if done % t.log_interval == 0 or done == t.steps:
            now = time.perf_counter()
            steps_in_window = (done - self.start_step) % t.log_interval or t.log_interval
            row = {"step": done, "loss": result.loss if finite else None,
                   "lr": self.engine.optimizer.param_groups[0]["lr"],
                   "grad_norm": result.grad_norm if math.isfinite(result.grad_norm) else None,
                   "skipped_steps": self.tracker.skipped,
                   "tokens_per_s": steps_in_window * self.tokens_per_step / max(now - self.tick, 1e-9),
                   "tokens": done * self.tokens_per_step,
                   **{f"data/{k}": v for k, v in self.data.stats().items()}}
            self.tick = now
            self.logger.log(row)
            self.logger.progress(row)

    def _after_step(self) -> bool:
        """Periodic evaluation and checkpoint; True when a scheduler signal ends the run here."""
        done, t = self.step, self.cfg.train
        if self.evaluator.due(done):
            hang.section("eval", done)
            row = self.evaluator.run(done)
            if row:
                self.logger.log(row)
                self.say(self.evaluator.progress_line(row))
        periodic = bool(t.save_interval) and done % t.save_interval == 0 and done != t.steps
        if periodic:
            self._save()
        if done != t.steps and self.stop.everywhere:
            self.stopped_by = self.stop.name
            self.say(f"{self.stopped_by}: stopping after step {done}; saving a checkpoint to resume from")
            if not periodic:
                self._save()
            return True
        return False

    def _save(self) -> None:
        checkpointing.save(self.cfg, self.step, self.engine, self.info, self.data)

    def _finish(self) -> TrainResult:
        elapsed = time.perf_counter() - self.t_start
        tps = (self.step - self.start_step) * self.tokens_per_step / max(elapsed, 1e-9)
        stragglers = hang.straggler_rows(gather(hang.median_compute_s()))
        if self.losses:
            self.logger.summary(self._summary_rows(tps, elapsed, stragglers))
        else:
            self.say(f"nothing to do: {self.cfg.train.run_dir} already holds a checkpoint at step "
                     f"{self.start_step} >= train.steps")
        final = self.step if self.stopped_by else self.cfg.train.steps
        return TrainResult(final_step=final, losses=self.losses, tokens_per_s=tps, stopped_by=self.stopped_by)

    def _summary_rows(self, tps: float, elapsed: float, stragglers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        n = min(100, max(1, len(self.losses) // 3))
        stats = self.data.stats()
        skipped = sum(v for k, v in stats.items() if k not in ("documents", "tokens", "split_documents"))
        stopped = f" of {self.cfg.train.steps}, stopped by {self.stopped_by}" if self.stopped_by else ""
        return [
            ("model", f"{self.cfg.model.kind} ({self.n_params:,} params)"),
            *([("data (rank 0)", f"{stats['documents']:,} documents, {stats['tokens']:,} tokens read, "
                                 f"{skipped:,} bad records skipped")] if stats else []),
            ("steps", f"{self.start_step} -> {self.step}{stopped}"),
            (f"loss, first {n} steps (mean)", f"{window_mean(self.losses, True, n):.4f}"),
            (f"loss, last {n} steps (mean)", f"{window_mean(self.losses, False, n):.4f}"),
            ("tokens/s", f"{tps:,.0f}"),
            *stragglers,
            *([("skipped steps (non-finite loss)", str(self.tracker.skipped))] if self.tracker.skipped else []),
            *self.evaluator.summary_rows(),
            ("params + optimizer state, rank 0", f"{self.engine.local_state_bytes() / 2**20:.2f} MiB"),
            ("wall time", f"{elapsed:.1f} s"),
            ("run dir", self.cfg.train.run_dir),
        ]


def _evaluator(cfg: Config, engine: engines.Engine, info: RankInfo, say: Callable[..., object]) -> PeriodicEval:
    """The eval hook gets the model and the engine's forward (tokens, labels) -> per-token loss."""
    from megatron.core import parallel_state

    from hyperloop_dist.evaluation.periodic import PeriodicEval

    return PeriodicEval(cfg, engine.model, engine.forward_for_eval, dp_rank=info.dp_rank, dp_size=info.dp_size,
                        group=parallel_state.get_data_parallel_group(), is_main=info.is_main,
                        pipelined=engine.pipelined, log=say)


def _min_step_allowance(cfg: Config) -> float:
    """The automatic step allowance's floor: over the data pipeline's retries of a remote source, so an
    outage ends as the pipeline's error naming the source rather than as a hang."""
    from hyperloop_dist.data.remote import RETRY_MARGIN_S, reads_remote

    floor = hang.MIN_STEP_TIMEOUT_S
    return max(floor, cfg.data.retry_s + RETRY_MARGIN_S) if reads_remote(cfg) else floor


def _start_watchdog(cfg: Config, run_dir: Path, info: RankInfo, attempt: str) -> None:
    t = cfg.train
    requeue = t.requeue_on_hang if t.requeue_on_hang is not None else "SLURM_JOB_ID" in os.environ
    allowances = hang.Allowances(setup_s=t.hang_setup_timeout_s, step_s=t.hang_timeout_s or None,
                                 checkpoint_s=t.hang_checkpoint_timeout_s, min_step_s=_min_step_allowance(cfg))
    watchdog = hang.HangWatchdog(run_dir, info.rank, info.world_size, attempt, allowances, requeue=requeue,
                                 what=f"{cfg.parallel.engine} engine")
    watchdog.start(watch=t.hang_timeout_s != 0)
