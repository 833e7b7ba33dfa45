"""``hyperloop train`` as a function (the CLI and sweep array elements call it), and recipe loading from
the command line's ``[RECIPE] [section.field=value ...]``."""

from __future__ import annotations

import sys

from hyperloop_dist.config import Config, load_config
from hyperloop_dist.data.stream import DataError


def split_recipe(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def load_items(items: list[str], layout: bool = False) -> Config:
    """The recipe and overrides, validated; with ``layout``, also against the engine's rules (what runs or
    plans a layout: the engines package imports the model code, which the other commands do without)."""
    recipe, overrides = split_recipe(items)
    cfg = load_config(recipe, overrides)
    if layout:
        from hyperloop_dist.train import engines

        engines.validate(cfg)
    return cfg


def train(items: list[str]) -> int:
    """``hyperloop train [RECIPE] [overrides]``: launch the ranks (or join torchrun / srun's); exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from hyperloop_dist.data.token_windows import prepare_corpus
    from hyperloop_dist.parallel.launch import first_failure, inside_launcher, launch
    from hyperloop_dist.train.hang import HANG_EXIT
    from hyperloop_dist.train.signals import REQUEUE_EXIT
    from hyperloop_dist.train.trainer import run_training

    cfg = load_items(items, layout=True)
    if not inside_launcher():
        try:
            prepare_corpus(cfg)
        except DataError as exc:  # a failure of the run (exit 1), found before any process starts
            print(f"hyperloop: training failed before start: DataError: {exc}", file=sys.stderr)
            return 1
    try:
        results = launch(cfg, run_training, cfg)
    except ChildFailedError as exc:  # the ranks' tracebacks are above; end with the one line that matters
        rank, exitcode, reason = first_failure(exc)
        print(f"hyperloop: training failed (first failure: rank {rank}, exit code {exitcode}): {reason}",
              file=sys.stderr)
        # The hang watchdog asked for a requeue (train.requeue_on_hang): pass its status on.
        return HANG_EXIT if any(f.exitcode == HANG_EXIT for f in exc.failures.values()) else 1
    # Stopped early by SIGUSR1/SIGTERM after a checkpoint: the status the sbatch template requeues on.
    return REQUEUE_EXIT if any(getattr(r, "stopped_by", None) for r in results) else 0
