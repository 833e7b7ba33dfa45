"""Peak memory of real training steps on one CPU rank, for the planner's check (tests/test_plan.py).

Run as ``python tests/measure_peak_memory.py OVERRIDE...`` with ``MALLOC_MMAP_THRESHOLD_`` set, so that
every large tensor is its own mapping and the resident set follows live tensor memory. Prints one JSON
line: the growth of the peak resident set (VmHWM) over the resident set before the model was built.
"""

from __future__ import annotations

import json
import sys

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class RandomBatches:
    def __init__(self, vocab: int, micro_batch: int, seq: int) -> None:
        self.vocab, self.shape = vocab, (micro_batch, seq)

    def next(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(step * 1000 + micro)
        tokens = torch.randint(0, self.vocab, (self.shape[0], self.shape[1] + 1), generator=g)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def main(overrides: list[str]) -> None:
    from hyperloop_dist.config import load_config
    from hyperloop_dist.parallel.distributed import init_distributed, shutdown_distributed
    from hyperloop_dist.train.trainer import build_training, train_step

    cfg = load_config(None, ["parallel.nproc_per_node=1", *overrides])
    info = init_distributed(cfg)
    try:
        base = _status_kib("VmRSS")
        ddp, optimizer, _ = build_training(cfg)
        data = RandomBatches(cfg.model.vocab_size, cfg.train.micro_batch_size, cfg.model.seq_length)
        for step in range(2):  # the second step has Adam state allocated
            train_step(cfg, ddp, optimizer, data, step, info)
        peak = _status_kib("VmHWM")
    finally:
        shutdown_distributed()
    print(json.dumps({"peak_growth_bytes": (peak - base) * 1024}))


if __name__ == "__main__":
    main(sys.argv[1:])
