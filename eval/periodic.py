"""The training loop's evaluation hook: held-out loss, the per-loop curve and lm-eval tasks.

The trainer hands over the model and a forward callable ``(tokens, labels) -> per-token NLL [b, s]``
(the engine's own forward, or the pipeline's forward-only pass), nothing else of the engine. Every rank
calls :meth:`PeriodicEval.run`; the held-out figures are reduced over data-parallel ranks and identical on
all ranks; rank 0 logs them.

What runs where: the held-out loss under every engine and layout; the per-loop curve needs the whole model
on one pipeline stage (pp = 1), as do lm-eval tasks (their requests are split over data-parallel ranks).
Under pipeline parallelism these two are skipped with a note; run ``hyperloop eval`` on the checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hyperloop_dist.config import Config
from hyperloop_dist.evaluation.heldout import (
    HeldoutError,
    TokenNll,
    heldout_documents,
    heldout_nll,
    heldout_windows,
)
from hyperloop_dist.train.hang import inject_eval_error


class PeriodicEval:
    def __init__(self, cfg: Config, model: torch.nn.Module, token_nll: TokenNll, *, dp_rank: int, dp_size: int,
                 group: dist.ProcessGroup | None, is_main: bool, pipelined: bool,
                 log: Callable[[str], object] = print) -> None:
        self.cfg, self.model, self.token_nll = cfg, model, token_nll
        self.dp_rank, self.dp_size, self.group = dp_rank, dp_size, group
        self.is_main, self.pipelined, self.log = is_main, pipelined, log
        self.device = next(model.parameters()).device
        self.windows: torch.Tensor | None = None
        self.disabled = False
        self.last: dict[str, Any] = {}
        self.per_loop = cfg.eval.per_loop and cfg.model.looped and not pipelined
        self.tasks = list(cfg.eval.tasks) if not pipelined else []
        if pipelined and (cfg.eval.tasks or (cfg.eval.per_loop and cfg.model.looped)):
            log("eval: per-loop curve and lm-eval tasks need pp=1; under the pipeline only the held-out loss "
                "runs (use `hyperloop eval` on the checkpoint for the rest)")

    def due(self, step: int) -> bool:
        every = self.cfg.eval.interval
        return bool(every) and not self.disabled and (step % every == 0 or step == self.cfg.train.steps)

    def _windows(self) -> torch.Tensor | None:
        if self.windows is None and not self.disabled:
            try:
                self.windows = heldout_windows(self.cfg, self.cfg.eval.windows)
            except HeldoutError as exc:
                self.log(f"eval: skipped: {exc}")
                self.disabled = True
        return self.windows

    def run(self, step: int) -> dict[str, Any]:
        """Evaluate on every rank; returns the record rank 0 logs (``eval/...`` keys)."""
        windows = self._windows()
        if windows is None:
            return {}
        start = time.perf_counter()
        e = self.cfg.eval
        was_training = self.model.training
        self.model.eval()
        try:
            inject_eval_error(step, dist.get_rank() if dist.is_initialized() else 0)
            reduce = {"dp_rank": self.dp_rank, "dp_size": self.dp_size, "group": self.group, "device": self.device}
            total, count = heldout_nll(self.token_nll, windows, e.batch_size, **reduce)
            loss = float(total.sum()) / count
            record: dict[str, Any] = {"step": step, "eval/loss": loss,
                                      "eval/ppl": math.exp(min(loss, 50.0)),
                                      "eval/tokens": count}
            if self.per_loop:
                from hyperloop_dist.evaluation.loops import loop_nll, megatron_parts

                def curve(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
                    # Through the model's own forward, so sharded parameters are gathered as in training.
                    return self.model(tokens, labels=labels,
                                      pieces=lambda model, t, y: loop_nll(megatron_parts(model))(t, y))

                totals, _ = heldout_nll(curve, windows, e.batch_size, **reduce)
                for k, value in enumerate(totals.tolist(), start=1):
                    record[f"eval/loop_{k}/loss"] = value / count
            if self.tasks:
                record.update(self._tasks(step))
        finally:
            self.model.train(was_training)
        record["eval/seconds"] = time.perf_counter() - start
        self.last = record
        return record

    def _tasks(self, step: int) -> dict[str, float]:
        from hyperloop_dist.data.tokenizer import load_tokenizer
        from hyperloop_dist.evaluation.harness import run_tasks
        from hyperloop_dist.evaluation.lm_eval_model import HyperloopLM
        from hyperloop_dist.evaluation.local_tasks import build_task_dir

        task_dir = Path(self.cfg.train.run_dir) / "eval_tasks"
        if self.is_main and not (task_dir / "hyperloop_next_line.yaml").is_file():
            build_task_dir(list(heldout_documents(self.cfg)), task_dir, seed=self.cfg.train.seed)
        dist.barrier()
        model = self.model

        def logits(tokens: torch.Tensor) -> torch.Tensor:
            return model(tokens.to(self.device))

        lm = HyperloopLM.from_logits(logits, load_tokenizer(self.cfg.data.tokenizer), self.cfg.model.seq_length,
                                     batch_size=self.cfg.eval.batch_size, rank=self.dp_rank,
                                     world_size=self.dp_size, group=self.group, device=self.device)
        table = run_tasks(lm, self.tasks, task_dir, self.cfg.eval.task_limit) or {}
        return {f"eval/{task}/{metric}": value for task, metrics in table.items() for metric, value in metrics.items()}

    def progress_line(self, record: dict[str, Any]) -> str:
        curve = [v for k, v in record.items() if k.startswith("eval/loop_")]
        loops = f" | per loop {' '.join(f'{v:.3f}' for v in curve)}" if curve else ""
        tasks = [f"{k[5:]} {v:.3f}" for k, v in record.items()
                 if k.count("/") == 2 and not k.startswith("eval/loop_")]
        return (f"eval  step {record['step']:>6} | held-out loss {record['eval/loss']:.4f} | ppl "
                f"{record['eval/ppl']:.1f}{loops}{' | ' + ', '.join(tasks) if tasks else ''} | "
                f"{record['eval/seconds']:.1f} s")

    def summary_rows(self) -> list[tuple[str, str]]:
        r = self.last
        if not r:
            return []
        rows = [(f"held-out loss, step {r['step']}", f"{r['eval/loss']:.4f} (ppl {r['eval/ppl']:.1f}, "
                                                     f"{r['eval/tokens']:,} tokens)")]
        curve = [v for k, v in r.items() if k.startswith("eval/loop_")]
        if curve:
            rows.append(("held-out loss after loop 1..L", " ".join(f"{v:.4f}" for v in curve)))
        for key, value in r.items():
            if key.count("/") == 2 and not key.startswith("eval/loop_"):
                rows.append((key[5:], f"{value:.4f}"))
        return rows
