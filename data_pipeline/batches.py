"""Where the trainer's micro-batches come from: the streaming pipeline or random pre-tokenized windows."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from hyperloop_dist.config import Config
from hyperloop_dist.data.sources import listed_sources
from hyperloop_dist.data.stream import StreamLoader
from hyperloop_dist.data.token_windows import WindowSampler, load_tokens


class Batches(Protocol):
    windows_per_step: int

    def next(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any] | None: ...

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class StreamBatches:
    """Micro-batches from the streaming pipeline, in order; resumable through ``state_dict``."""

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, state: dict[str, Any] | None) -> None:
        t = cfg.train
        self.windows_per_step = t.micro_batch_size * t.grad_accum * dp_size
        self.loader = StreamLoader(listed_sources(cfg, state), cfg.data.tokenizer, cfg.model.seq_length,
                                   t.micro_batch_size, dp_rank, dp_size, cfg.data.workers, t.seed, state)

    def next(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def stats(self) -> dict[str, int]:
        return self.loader.stats()

    def close(self) -> None:
        self.loader.close()


class WindowBatches:
    """Seeded random windows of a pre-tokenized token stream, indexed by step (stateless): the tokenized
    training split of data.dir, or a Megatron indexed dataset (``data.pretokenized``)."""

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int) -> None:
        t = cfg.train
        self.dp_rank = dp_rank
        if cfg.data.pretokenized:
            from hyperloop_dist.data.pretokenize import load_pretokenized

            tokens = load_pretokenized(cfg.data.pretokenized)
        else:
            tokens = load_tokens(Path(cfg.data.dir) / "tokens", "train")
        self.sampler = WindowSampler(tokens, cfg.model.seq_length, t.micro_batch_size, t.grad_accum, dp_size, t.seed)
        self.windows_per_step = self.sampler.windows_per_step

    def next(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.batch(step, micro, self.dp_rank)

    def state_dict(self) -> None:
        return None

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


def make_batches(cfg: Config, dp_rank: int, dp_size: int, state: dict[str, Any] | None = None) -> Batches:
    if cfg.data.loader == "stream":
        return StreamBatches(cfg, dp_rank, dp_size, state)
    return WindowBatches(cfg, dp_rank, dp_size)
