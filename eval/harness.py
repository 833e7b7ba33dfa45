"""Run lm-eval tasks against a :class:`~hyperloop_dist.evaluation.lm_eval_model.HyperloopLM`.

Local tasks (``local_tasks.py``) are read from a task directory built from held-out text. lm-eval's own
tasks (hellaswag, arc_easy, piqa, lambada_openai, wikitext, ...) are selectable by name; indexing them
costs seconds, so the built-in index is only loaded when such a task is asked for. A built-in task whose
dataset cannot be fetched (no hub access here) stops with a message naming the task and the dataset,
instead of a stack trace.

Items too long for the model's window are scored as lm-eval's HF model scores them (see ``lm_eval_model``);
the number whose continuation had to be cut shows as ``long_items`` beside the task's metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hyperloop_dist.evaluation.loading import EvalError
from hyperloop_dist.evaluation.local_tasks import LOCAL_TASKS

LONG_ITEMS = "long_items"  # items per task whose continuation was cut to the window, beside lm-eval's metrics


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)


def task_manager(tasks: list[str], task_dir: str | Path | None):
    """A TaskManager over the local task directory, with lm-eval's built-in tasks only when needed."""
    from lm_eval.tasks import TaskManager

    builtin = [t for t in tasks if t not in LOCAL_TASKS]
    manager = TaskManager(include_path=str(task_dir) if task_dir else None, include_defaults=bool(builtin))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        local = ", ".join(LOCAL_TASKS)
        raise EvalError(f"unknown lm-eval task(s) {', '.join(unknown)}; local tasks: {local}; "
                        "built-in ones are lm-eval's names (e.g. hellaswag, arc_easy, piqa, lambada_openai)")
    return manager


def load_tasks(tasks: list[str], manager: Any) -> list[Any]:
    """Task objects, one name at a time, so that a dataset that cannot be fetched is named."""
    loaded = []
    for name in tasks:
        try:
            loaded.extend(manager.load([name])["tasks"].values())
        except (ConnectionError, OSError) as exc:
            offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
            raise EvalError(
                f"lm-eval task {name}: dataset not available offline ({str(exc).splitlines()[0][:200]}). "
                + ("HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set. " if offline else "")
                + "Run it where the Hugging Face hub is reachable or its dataset is in HF_DATASETS_CACHE, "
                f"or use the local tasks ({', '.join(LOCAL_TASKS)})"
            ) from None
    return loaded


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def run_tasks(lm: Any, tasks: list[str], task_dir: str | Path | None, limit: int | None = None
              ) -> dict[str, dict[str, float]] | None:
    """Scores ``{task: {metric: value}}`` on the evaluator's rank 0 (``None`` on the other ranks)."""
    from lm_eval import simple_evaluate

    _quiet_lm_eval()
    manager = task_manager(tasks, task_dir)
    objects = load_tasks(tasks, manager)
    # simple_evaluate reseeds the global RNGs: keep a training run's streams as they were
    with _global_rng_kept():
        # it also indexes lm-eval's built-in tasks itself (seconds) unless handed a TaskManager
        results = simple_evaluate(model=lm, tasks=objects, task_manager=manager, limit=limit, log_samples=False,
                                  bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0)
    # every rank takes part (a gather over the data-parallel group); rank 0's own config counts only its share
    long_items = lm.long_item_counts() if hasattr(lm, "long_item_counts") else None
    if results is None:
        return None
    if long_items is not None:
        results.setdefault("config", {})[LONG_ITEMS] = long_items
    return scores(results)


def scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` section as ``{task: {metric: value}}`` (filter suffixes and stderrs dropped),
    plus ``long_items`` for the tasks that had some (from the config our model adds to lm-eval's results, so
    a ``hyperloop-lm-eval --output_path`` JSON gives the same table)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, comma, _ = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            out.setdefault(task, {})[metric] = float(value)
    for task, count in (results.get("config", {}).get(LONG_ITEMS) or {}).items():
        out.setdefault(task, {})[LONG_ITEMS] = float(count)
    return out


def format_scores(table: dict[str, dict[str, float]]) -> list[tuple[str, str]]:
    def cell(metric: str, value: float) -> str:
        return f"{metric} {int(value)}" if metric == LONG_ITEMS else f"{metric} {value:.4f}"

    return [(task, ", ".join(cell(k, v) for k, v in metrics.items())) for task, metrics in table.items()]
