"""Loop-aware (circular) pipeline parallelism for the looped middle block.

Each pipeline rank holds a contiguous slice of the middle block once. A micro-batch enters on the first
stage (embedding, begin block), crosses the ring of slices once per loop pass and leaves on the last
stage (end block, head, loss). The loop boundary (hyper-connection read / write, loop embedding) runs on
the first stage, which keeps the n-stream residual of every micro-batch in flight: only the d-wide block
input/output crosses stages, n times less traffic than shipping the stream state. The ``transformer``
kind runs the same schedule with one pass over its unrolled middle block (plain pipeline parallelism).

Schedule: micro-batches go in groups of P (the pipeline size), and inside a group, pass by pass: the shape
of Megatron's interleaved schedule, whose L virtual chunks per rank here share one module. All forward
work runs before all backward work (GPipe order), so a rank keeps the activations of all its tasks of
the step. Sends never block and every rank works through its tasks in one global order
(group, pass, micro-batch), so a receive always waits on a task that precedes it: no deadlock.

Bubble (idle fraction per rank), m micro-batches, P stages, L passes, equal per-stage work:
circular ``(P - 1) / (m L + P - 1)`` against ``(P - 1) / (m + P - 1)`` for a plain pipeline over the
unrolled depth (1F1B has the same bubble as GPipe; it only bounds memory). ``benchmarks/pipeline_bubble.py``
measures both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hyperloop_dist.model.hyper_connections import num_passes
from hyperloop_dist.model.hyperloop import HyperloopModel


def bubble_fraction(stages: int, microbatches: int, passes: int) -> float:
    """Idealized idle fraction of a rank (equal work per stage and pass, free communication)."""
    return (stages - 1) / (microbatches * passes + stages - 1)


@dataclass
class _Task:
    kind: str  # "F": a pass through this rank's slice, "B0": the final boundary, "H": end block + loss
    loop: int
    micro: int
    remote_input: torch.Tensor | None = None  # leaf received from another stage
    remote_source: int | None = None
    carry_inputs: tuple[torch.Tensor, ...] = ()  # leaves of the local loop-boundary state
    output: torch.Tensor | None = None
    output_target: int | None = None  # rank the output went to (its gradient comes back from there)
    carry_output: tuple[torch.Tensor, ...] = ()


@dataclass
class PipelineStats:
    wait_s: float = 0.0  # time blocked in receives (idle)
    total_s: float = 0.0
    losses: list[float] = field(default_factory=list)

    @property
    def idle_fraction(self) -> float:
        return self.wait_s / self.total_s if self.total_s else 0.0


class CircularPipeline:
    """Runs forward and backward of one optimizer step's micro-batches on this pipeline rank."""

    def __init__(self, model: HyperloopModel, micro_batch_size: int) -> None:
        from megatron.core import parallel_state as ps

        self.model = model
        cfg = model.cfg
        self.size = ps.get_pipeline_model_parallel_world_size()
        self.rank = ps.get_pipeline_model_parallel_rank()
        self.next_rank = ps.get_pipeline_model_parallel_next_rank()
        self.prev_rank = ps.get_pipeline_model_parallel_prev_rank()
        self.first_rank = ps.get_pipeline_model_parallel_first_rank()
        self.last_rank = ps.get_pipeline_model_parallel_last_rank()
        self.group = ps.get_pipeline_model_parallel_group()
        self.first, self.last = self.rank == 0, self.rank == self.size - 1
        self.passes = num_passes(cfg.kind, cfg.loops)
        self.shape = (cfg.seq_length, micro_batch_size, cfg.hidden_size)
        self.dtype = model.config.params_dtype
        self._sends: list[dist.Work] = []
        self.stats = PipelineStats()

    # ------------------------------------------------------------------ communication

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.detach().contiguous()
        self._sends.append((dist.isend(tensor, dst), tensor))

    def _recv(self, src: int) -> torch.Tensor:
        buf = torch.empty(self.shape, dtype=self.dtype, device=self._device())
        start = time.perf_counter()
        dist.recv(buf, src)
        self.stats.wait_s += time.perf_counter() - start
        return buf

    # ------------------------------------------------------------------ schedule

    def order(self, micro_batches: int) -> list[tuple[str, int, int]]:
        """This rank's tasks in the global (group, pass, micro-batch) order."""
        tasks = []
        for group_start in range(0, micro_batches, self.size):
            group = range(group_start, min(group_start + self.size, micro_batches))
            for loop in range(self.passes + 1):
                for k in group:
                    if loop < self.passes:
                        tasks.append(("F", loop, k))
                    elif self.first:
                        tasks.append(("B0", loop, k))
                    elif self.last:
                        tasks.append(("H", loop, k))
        return tasks

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Forward + backward of all ``batches`` (micro-batches); returns their mean loss on every stage.

        Gradients accumulate into the model's parameters, scaled as ``mean over micro-batches``.
        """
        start = time.perf_counter()
        self.stats = PipelineStats()
        m = len(batches)
        carries: dict[int, tuple[torch.Tensor, ...]] = {}
        done: list[_Task] = []
        losses: list[torch.Tensor] = []
        for kind, loop, k in self.order(m):
            task = _Task(kind, loop, k)
            if kind == "H":
                x = self._leaf_from(task, self.first_rank)
                loss = self.model.finish(x, batches[k][1].to(x.device)).mean()
                losses.append(loss.detach())
                task.output = loss / m
            elif kind == "B0" or self.first:
                if loop == 0:
                    y = self.model.embed(batches[k][0].to(self._device()))
                else:
                    y = self._leaf_from(task, self.last_rank)
                task.carry_inputs = tuple(t.detach().requires_grad_() for t in carries.pop(k, ()))
                carry, x = self.model.boundary(loop, task.carry_inputs or None, y)
                task.carry_output = carry or ()
                if carry:
                    carries[k] = carry
                if kind == "B0":
                    task.output, task.output_target = x, self.last_rank
                else:
                    task.output, task.output_target = self.model.run_middle(x), self._forward_target()
            else:
                x = self._leaf_from(task, self.prev_rank)
                task.output, task.output_target = self.model.run_middle(x), self._forward_target()
            if task.output_target is not None:
                self._send(task.output, task.output_target)
            done.append(task)

        carry_grads: dict[int, tuple[torch.Tensor | None, ...]] = {}
        for task in reversed(done):
            outputs, grads = [task.output], [None]
            if task.kind == "H":
                grads[0] = torch.ones_like(task.output)
            else:
                grads[0] = self._recv(task.output_target)
            if task.carry_output:
                outputs.extend(task.carry_output)
                grads.extend(carry_grads.pop(task.micro, (None,) * len(task.carry_output)))
            pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None and o.requires_grad]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            if task.carry_inputs:
                carry_grads[task.micro] = tuple(t.grad for t in task.carry_inputs)
            if task.remote_input is not None:
                grad = task.remote_input.grad
                self._send(grad if grad is not None else torch.zeros_like(task.remote_input), task.remote_source)

        for work, _ in self._sends:
            work.wait()
        self._sends.clear()
        mean = torch.stack(losses).mean() if losses else torch.zeros((), dtype=torch.float32)
        dist.broadcast(mean, self.last_rank, group=self.group)
        self.stats.total_s = time.perf_counter() - start
        return float(mean)

    def token_nll(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward only, one micro-batch: per-token loss ``[b, s]`` on every stage (for evaluation).

        The same route as :meth:`step` (ring once per pass, loop boundary on the first stage, loss on the
        last), one micro-batch at a time with blocking sends; the last stage broadcasts the loss.
        """
        device = self._device()
        shape = (tokens.shape[1], tokens.shape[0], self.model.cfg.hidden_size)

        def recv(src: int) -> torch.Tensor:
            buf = torch.empty(shape, dtype=self.dtype, device=device)
            dist.recv(buf, src)
            return buf

        with torch.no_grad():
            y, carry = (self.model.embed(tokens.to(device)) if self.first else None), None
            for loop in range(self.passes + 1):
                if self.first:
                    carry, x = self.model.boundary(loop, carry, y)
                if loop == self.passes:
                    break
                x = x if self.first else recv(self.prev_rank)
                dist.send(self.model.run_middle(x).contiguous(), self._forward_target())
                if self.first:
                    y = recv(self.last_rank)
            if self.first:
                dist.send(x.contiguous(), self.last_rank)
            if self.last:
                loss = self.model.finish(recv(self.first_rank), labels.to(device)).float()
            else:
                loss = torch.empty(labels.shape, dtype=torch.float32, device=device)
        dist.broadcast(loss, self.last_rank, group=self.group)
        return loss

    def _forward_target(self) -> int:
        # The last slice hands its output back to the first stage: the loop boundary.
        return self.first_rank if self.last else self.next_rank

    def _leaf_from(self, task: _Task, src: int) -> torch.Tensor:
        task.remote_input = self._recv(src).requires_grad_()
        task.remote_source = src
        return task.remote_input

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device
