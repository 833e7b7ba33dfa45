"""What every training engine provides (:class:`Engine`), and the parts engines share.

An engine owns everything that depends on how the model is wrapped and sharded: building model, optimizer
and LR schedule from the recipe and the process groups; one optimizer step; the forward pass periodic
evaluation calls; its part of a checkpoint (the model and optimizer shards, in its own sub-directory of
the step directory); the full model for releases; its recipe rules; and its memory model for
``hyperloop plan``. The trainer, the checkpoint store, release export and the planner only call these.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from hyperloop_dist.config import Config, ConfigError
from hyperloop_dist.parallel import cpu_shim
from hyperloop_dist.parallel.distributed import RankInfo
from hyperloop_dist.train import hang
from hyperloop_dist.train.nonfinite import MicroLosses, poison

if TYPE_CHECKING:
    from hyperloop_dist.train.signals import StopRequest

Batch = tuple[torch.Tensor, torch.Tensor]  # (tokens, labels) of one micro-batch
TokenNll = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens, labels) -> per-token loss


@dataclass
class StepResult:
    """One optimizer step, as every engine reports it. A non-finite loss on any rank skips the update on
    every rank: ``loss`` and ``grad_norm`` are then NaN and ``bad_micro`` lists this rank's non-finite
    micro-batches (empty where the engine cannot tell them apart)."""

    loss: float
    grad_norm: float
    bad_micro: list[int]

    @classmethod
    def skipped(cls, bad_micro: list[int]) -> StepResult:
        return cls(math.nan, math.nan, bad_micro)


@dataclass(frozen=True)
class PlanVariant:
    """One way ``hyperloop plan`` may run an engine: a label for its table and the recipe overrides."""

    label: str
    overrides: dict[str, Any]


class Engine:
    """Base of the engines in :mod:`hyperloop_dist.train.engines` (one module each, one registry line).

    Subclasses set the class attributes and implement the methods that raise ``NotImplementedError``.
    """

    name: ClassVar[str]
    checkpoint_dir: ClassVar[str]  # its part of a step directory: ``<step>/<checkpoint_dir>/``
    supports_tp: ClassVar[bool] = False
    supports_pp: ClassVar[bool] = False
    # ParallelConfig fields only this engine reads, with the value that means "unused" for the others.
    settings: ClassVar[dict[str, Any]] = {}
    plan_variants: ClassVar[tuple[PlanVariant, ...]] = ()
    supports_fusions: ClassVar[bool] = False  # train.fusions patches Megatron's optimizer and layers

    model: torch.nn.Module  # unwrapped: what evaluation and parameter counts see
    optimizer: Any
    scheduler: Any
    pipelined: bool = False  # evaluation runs through the pipeline (held-out loss only)

    def __init__(self, cfg: Config, info: RankInfo) -> None:
        self.cfg, self.info = cfg, info

    # ---------------------------------------------------------------- recipe rules and memory model

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Recipe rules of this engine beyond the shared ones (raise ConfigError naming the field)."""

    @classmethod
    def state_bytes_per_param(cls, variant: PlanVariant, bf16: bool, dp: int) -> float:
        """Model-state bytes per parameter a rank holds (weights, gradients, master copy, Adam moments)."""
        raise NotImplementedError

    @classmethod
    def gathered_bytes(cls, variant: PlanVariant, largest_unit: int, bf16: bool) -> float:
        """Bytes of parameters gathered at once on top of the rank's shards (sharded engines)."""
        return 0.0

    # ---------------------------------------------------------------- training

    def step(self, batches: list[Batch], index: int, stop: StopRequest | None) -> StepResult:
        raise NotImplementedError

    def forward_for_eval(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token loss of a batch, every rank calling it together (sharded weights are gathered)."""
        return self.model(tokens, labels=labels)

    def local_state_bytes(self) -> int:
        """Bytes of parameters and optimizer state this rank holds (its shards, for sharded engines)."""
        total = sum(tensor_bytes(p) for p in self.model.parameters())
        for opt in torch_optimizers(self.optimizer):
            total += sum(tensor_bytes(v) for state in opt.state.values() for v in state.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0)
        return total

    def optimizer_step(self) -> int:
        """Adam's step count (every parameter shares one)."""
        for opt in torch_optimizers(self.optimizer):
            for state in opt.state.values():
                if "step" in state:
                    return int(state["step"])
        return 0

    # ---------------------------------------------------------------- checkpoints

    def save(self, step_dir: Path) -> None:
        """Every rank: write this engine's part of a checkpoint under ``step_dir/<checkpoint_dir>/``."""
        raise NotImplementedError

    def load(self, step_dir: Path, saved_layout: dict[str, int], layout: dict[str, int],
             optimizer_step: int) -> None:
        """Every rank: restore model and optimizer from ``step_dir`` (saved under ``saved_layout``)."""
        raise NotImplementedError

    @classmethod
    def full_state_dict(cls, step_dir: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The checkpoint's whole model (Megatron parameter names, TP = 1), read in one process into the
        state of ``model`` (built at TP = 1) or returned whole. Needs a one-rank world."""
        raise NotImplementedError


# ---------------------------------------------------------------------------- shared by the engines


def accumulate(batches: list[Batch], index: int, loss_of: TokenNll,
               backward: Callable[[torch.Tensor], object] = torch.Tensor.backward,
               no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> MicroLosses:
    """Forward and backward over a step's micro-batches, each loss scaled by 1 / their number.

    ``no_sync`` wraps every micro-batch but the last, so data-parallel gradients are reduced once, after
    the last one. The losses stay on the device (one host sync per step, in
    :func:`~hyperloop_dist.train.nonfinite.all_finite` over their total).
    """
    device = cpu_shim.device()
    losses = MicroLosses()
    for micro, (tokens, labels) in enumerate(batches):
        last = micro == len(batches) - 1
        with contextlib.nullcontext() if last else no_sync():
            loss = loss_of(tokens.to(device), labels.to(device)).mean() / len(batches)
            loss = poison(loss, index, micro)
            backward(loss)
        losses.add(loss)
    hang.beat("backward")
    return losses


def torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a wrapper (Megatron's chained / distributed optimizer, DeepSpeed's ZeRO
    optimizer), or the optimizer itself."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    found: list[torch.optim.Optimizer] = []
    for inner in getattr(optimizer, "chained_optimizers", None) or [getattr(optimizer, "optimizer", None)]:
        if inner is not None and inner is not optimizer:
            found.extend(torch_optimizers(inner))
    return found


def restore_adam_step(optimizer: Any, step: int) -> None:
    """Set Adam's step count (formats that do not carry it, such as Megatron's ``dp_reshardable``)."""
    for opt in torch_optimizers(optimizer):
        for state in opt.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(step), dtype=state["step"].dtype)


def prepare_adam_state_for_loading(optimizer: Any) -> None:
    """Give a fresh torch Adam its full state (moments and ``step``) before a loader builds its template:
    without ``step`` in the template the checkpoint's step is not read and Adam silently restarts its bias
    correction (``docs/megatron_cpu.md``, item 5b)."""
    for opt in torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state[p]
                state.setdefault("exp_avg", torch.zeros_like(p.data))
                state.setdefault("exp_avg_sq", torch.zeros_like(p.data))
                state.setdefault("step", torch.zeros((), dtype=torch.float32))


def tensor_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    # ZeRO-3 keeps a rank's shard in ds_tensor (and the whole tensor only while gathered or persistent).
    shard = t.ds_tensor.numel() * t.ds_tensor.element_size() if hasattr(t, "ds_tensor") else 0
    return t.numel() * t.element_size() + shard


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)

