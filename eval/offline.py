"""``hyperloop eval CKPT``: held-out loss, the per-loop curve, loss vs loop count and lm-eval tasks on a
release, a run or checkpoint directory, or any format registered in ``loading.py``. One process."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hyperloop_dist.config import Config, load_config
from hyperloop_dist.evaluation.heldout import (
    heldout_documents,
    heldout_nll,
    heldout_windows,
    reference_token_nll,
)
from hyperloop_dist.evaluation.loading import EvalError, LoadedModel, load_for_eval
from hyperloop_dist.model.hyper_connections import LOOPED_KINDS


@dataclass
class OfflineResult:
    source: str
    heldout_loss: float
    heldout_tokens: int
    trained_loops: int
    loss_by_loops: dict[int, float] = field(default_factory=dict)  # K -> held-out loss after K loops
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[tuple[str, str]] = field(default_factory=list)  # rows about the source (INT4: bf16 loss, sizes)

    def rows(self) -> list[tuple[str, str]]:
        rows = [("model", self.source), *self.notes,
                ("held-out loss", f"{self.heldout_loss:.4f} (ppl {math.exp(min(self.heldout_loss, 50)):.1f}, "
                                  f"{self.heldout_tokens:,} tokens)")]
        for k, loss in self.loss_by_loops.items():
            mark = " (as trained)" if k == self.trained_loops else ""
            rows.append((f"loops={k}{mark}", f"{loss:.4f}"))
        from hyperloop_dist.evaluation.harness import format_scores

        return rows + format_scores(self.tasks)


def eval_config(path: Path, config_args: list[str], loaded: LoadedModel) -> Config:
    """The data side of the evaluation: the checkpoint's own recipe when it has one, else the given
    recipe / overrides (default tiny-cpu); the model side is the loaded model's."""
    recipe, overrides = (config_args[0], config_args[1:]) if config_args and "=" not in config_args[0] \
        else (None, config_args)
    if recipe is None:
        own = [p / "config.yaml" for p in (path, *sorted((path / "checkpoints").glob("step_*"))[-1:])]
        recipe = next((str(p) for p in own if p.is_file()), None)
    cfg = load_config(recipe, overrides)
    return dataclasses.replace(cfg, model=loaded.cfg)


def evaluate_checkpoint(path: str | Path, config_args: list[str] | None = None, *, windows: int | None = None,
                        loops: list[int] | None = None, tasks: list[str] | None = None, limit: int | None = None,
                        task_dir: str | Path | None = None, batch_size: int = 8) -> OfflineResult:
    path = Path(path)
    loaded = load_for_eval(path)
    cfg = eval_config(path, config_args or [], loaded)
    m = loaded.cfg
    from hyperloop_dist.data.corpus import CorpusError

    try:
        data = heldout_windows(cfg, windows or cfg.eval.windows, tokenizer=loaded.tokenizer_path)
    except CorpusError as exc:
        raise EvalError(f"no held-out text: {exc}; name the data after the checkpoint, e.g. "
                        f"`hyperloop eval {path} data.corpus=dir data.dir=DIR`") from None
    total, count = heldout_nll(reference_token_nll(loaded.model), data, batch_size)
    result = OfflineResult(loaded.source, float(total.sum()) / count, count, m.loops, notes=loaded.notes)
    if m.looped and hasattr(loaded.model, "middle"):
        from hyperloop_dist.evaluation.loops import loop_nll, reference_parts

        wanted = sorted(set(loops or range(1, m.loops + 1)) | {m.loops})
        if wanted[0] < 1:
            raise EvalError(f"--loops {wanted[0]}: loop counts must be >= 1")
        curve, _ = heldout_nll(loop_nll(reference_parts(loaded.model), wanted[-1]), data, batch_size)
        result.loss_by_loops = {k: float(curve[k - 1]) / count for k in wanted}
    elif loops:
        raise EvalError(f"--loops: model kind {m.kind!r} has no loop; it applies to {', '.join(LOOPED_KINDS)}")
    if tasks:
        result.tasks = run_lm_eval(loaded, cfg, tasks, limit, task_dir, batch_size)
    return result


def run_lm_eval(loaded: LoadedModel, cfg: Config, tasks: list[str], limit: int | None,
                task_dir: str | Path | None, batch_size: int) -> dict[str, dict[str, float]]:
    from hyperloop_dist.evaluation.harness import run_tasks
    from hyperloop_dist.evaluation.lm_eval_model import HyperloopLM
    from hyperloop_dist.evaluation.local_tasks import LOCAL_TASKS, build_task_dir

    lm = HyperloopLM.from_logits(loaded.model, loaded.tokenizer, loaded.cfg.seq_length, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(task_dir or tmp)
        if any(t in LOCAL_TASKS for t in tasks):
            build_task_dir(list(heldout_documents(cfg)), where, seed=cfg.train.seed)
        return run_tasks(lm, tasks, where, limit) or {}


def write_results(result: OfflineResult, out: str | Path) -> None:
    Path(out).write_text(json.dumps(dataclasses.asdict(result), indent=1) + "\n")


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    bar = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([bar, *(f"{k:<{width}} | {v}" for k, v in rows), bar])


def summary(result: OfflineResult) -> str:
    return format_table(result.rows())

