"""Non-finite losses: skip the update, count it, and stop with a diagnostic after too many in a row.

Every rank takes the same decision (a flag all-reduced over the world), so a NaN on one pipeline stage or
data-parallel rank skips the optimizer step everywhere. ``HYPERLOOP_INJECT_NAN_STEPS=5,6@1`` poisons the first
micro-batch's loss of those (1-based) steps, on every rank or on the rank after ``@``: the fault-injection
hook the tests use.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hyperloop_dist.parallel import cpu_shim
from hyperloop_dist.train.hang import injected
from hyperloop_dist.train.signals import StopRequest


class TrainingDiverged(RuntimeError):
    """Raised on every rank after ``train.max_bad_steps`` consecutive non-finite steps."""


def poison(loss: torch.Tensor, step: int, micro: int) -> torch.Tensor:
    """``loss`` times NaN on an injected step's first micro-batch (``step`` is 0-based here)."""
    if micro != 0 or not os.environ.get("HYPERLOOP_INJECT_NAN_STEPS"):
        return loss
    rank = dist.get_rank() if dist.is_initialized() else 0
    return loss * float("nan") if injected("HYPERLOOP_INJECT_NAN_STEPS", step + 1, rank) else loss


class MicroLosses:
    """One step's micro-batch losses, kept on the device: the host waits once per step, not per micro-batch."""

    def __init__(self) -> None:
        self._values: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        self._values.append(loss.detach().float().reshape(()))

    def total(self) -> torch.Tensor:
        return torch.stack(self._values).sum() if self._values else torch.zeros((), device=cpu_shim.device())

    def non_finite(self) -> list[int]:
        """Indices of the micro-batches whose loss was NaN/Inf on this rank."""
        if not self._values:
            return []
        return torch.nonzero(~torch.isfinite(torch.stack(self._values))).flatten().tolist()


def all_finite(local: torch.Tensor | float, stop: StopRequest | None = None) -> bool:
    """True on every rank iff ``local`` is finite on every rank.

    With ``stop``, the same all-reduce also settles whether any rank got a stop signal (``stop.everywhere``):
    a step pays for one tiny collective, not two. The flags live on the compute device, which NCCL needs.
    """
    device = cpu_shim.device()
    bad = ~torch.isfinite(torch.as_tensor(local, dtype=torch.float32, device=device)).reshape(1)
    signalled = torch.tensor([stop is not None and stop.signum is not None], device=device)
    flags = torch.cat([bad, signalled]).to(torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    any_bad, any_signalled = flags.tolist()
    if stop is not None and any_signalled:
        stop.everywhere = True
    return not any_bad


@dataclass
class BadStepTracker:
    limit: int
    skipped: int = 0
    in_a_row: int = 0
    recent_good: deque = field(default_factory=lambda: deque(maxlen=5))
    bad: list[tuple[int, list[int]]] = field(default_factory=list)

    def record(self, step: int, loss: float, grad_norm: float, bad_micro: list[int]) -> bool:
        """Account for 1-based ``step``; True when the run must stop."""
        if math.isfinite(loss):
            self.in_a_row = 0
            self.recent_good.append((step, loss, grad_norm))
            return False
        self.skipped += 1
        self.in_a_row += 1
        self.bad.append((step, bad_micro))
        return self.in_a_row >= self.limit

    def diagnostic(self) -> str:
        recent = self.bad[-self.in_a_row:]
        lines = [f"{self.in_a_row} consecutive steps with a non-finite loss (train.max_bad_steps={self.limit}); "
                 "their updates were skipped, the model is the last good state"]
        for step, micro in recent:
            where = f"micro-batch(es) {micro} on rank 0" if micro else "another rank / pipeline stage"
            lines.append(f"  step {step}: non-finite loss in {where}")
        if self.recent_good:
            lines.append("  last good steps (step, loss, grad norm): "
                         + ", ".join(f"({s}, {loss:.4f}, {g:.3f})" for s, loss, g in self.recent_good))
        lines.append("  look for a too-high optim.lr, bad data at those steps, or bf16 overflow; resuming "
                     "continues after the bad batches")
        return "\n".join(lines)
