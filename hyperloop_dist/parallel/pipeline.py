"""Loop-aware (circular) pipeline parallelism for the looped middle block.

Each pipeline rank holds a contiguous slice of the middle block once. A micro-batch enters on the first
stage (embedding, begin block), crosses the ring of slices once per loop pass and leaves on the last
stage (end block, head, loss). The loop boundary (hyper-connection read / write, loop embedding) runs on
the first stage, which keeps the n-stream residual of every micro-batch in flight: only the d-wide block
input/output crosses stages, n times less traffic than shipping the stream state. The ``transformer``
kind runs the same schedule with one pass over its unrolled middle block (plain pipeline parallelism);
``mhc`` too, but its residual is the n-stream state, so that is what crosses stages. Under sequence
parallelism a stage sends its TP rank's sequence shard. A tied head keeps a copy of the embedding on the
last stage (``parallel/tied_embedding.py``).

Schedule (``parallel.pp_schedule``, ``parallel/pipeline_schedule.py``): forwards run in Megatron's
interleaved order (micro-batches in groups of P, inside a group pass by pass: the L virtual chunks per rank
here share one module). ``1f1b`` (default) interleaves each backward as soon as it is ready, which caps
the forwards in flight on a rank at about ``L·P + 2(P-1-r)`` slices (about P micro-batches) whatever
``grad_accum`` is; ``gpipe`` runs every forward before any backward and so holds all ``m·L``.

Every rank computes every rank's order and runs it in synchronous rounds (``pipeline_schedule.rounds``):
a rank runs a task, then posts one ``batch_isend_irecv`` with what it produced and what its neighbours
produced for it in the same round (as Megatron's ``_batched_p2p_ops`` pairs its sends and receives), so
each send meets its receive in batches of the same round on both sides: no deadlock, and no tags needed.
Posting each send on its own when it is ready, as this pipeline first did, can hang under NCCL: a send
may hold its stream until the peer's matching receive runs, and two stages that each post a send to the
other before their receive from it (PP=2's ring, or activations one way and gradients the other in 1F1B)
each wait behind a send the other cannot take yet, once a message outgrows NCCL's buffer (one activation
of a 2560-wide model at 2048 tokens is 10 MB in bf16). ``tests/test_pipeline_schedule.py`` replays every
schedule against that model.

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
from hyperloop_dist.parallel.pipeline_schedule import Message, Round, Task, needed_by, rounds


def bubble_fraction(stages: int, microbatches: int, passes: int) -> float:
    """Idealized idle fraction of a rank (equal work per stage and pass, free communication)."""
    return (stages - 1) / (microbatches * passes + stages - 1)


@dataclass
class _Live:
    """A forward task's tensors until its backward runs."""
    output: torch.Tensor  # the loss (H) or what went to the next stage
    remote_input: torch.Tensor | None = None  # leaf received from another stage
    carry_inputs: tuple[torch.Tensor, ...] = ()  # leaves of the local loop-boundary state
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

    def __init__(self, model: HyperloopModel, micro_batch_size: int, schedule: str = "1f1b") -> None:
        from megatron.core import parallel_state as ps

        self.model = model
        cfg = model.cfg
        self.schedule = schedule
        self.size = ps.get_pipeline_model_parallel_world_size()
        self.rank = ps.get_pipeline_model_parallel_rank()
        self.group = ps.get_pipeline_model_parallel_group()
        self.ranks = dist.get_process_group_ranks(self.group)  # pipeline rank -> global rank
        self.next_rank = self.ranks[(self.rank + 1) % self.size]
        self.prev_rank = self.ranks[(self.rank - 1) % self.size]
        self.first_rank, self.last_rank = self.ranks[0], self.ranks[-1]
        self.first, self.last = self.rank == 0, self.rank == self.size - 1
        self.passes = num_passes(cfg.kind, cfg.loops)
        self.shape = (self._length(cfg.seq_length), micro_batch_size, *self._width())
        self.dtype = model.config.params_dtype
        self._outgoing: list[torch.Tensor] = []  # this round's output, for the round's planned send
        self._inbox: dict[Message, torch.Tensor] = {}
        self.stats = PipelineStats()

    # ------------------------------------------------------------------ communication

    def _send(self, tensor: torch.Tensor) -> None:
        """Queue a task's output: it leaves in this round's batch, to the rank the round plans."""
        self._outgoing.append(tensor.detach().contiguous())

    def _exchange(self, round_: Round) -> None:
        """This round's batch: the queued output to its planned destination and the round's receives, which
        land in the inbox (time blocked counted in :attr:`stats`)."""
        assert len(self._outgoing) == len(round_.sends), "pipeline round sent other than planned"
        buffers = {msg: torch.empty(self.shape, dtype=self.dtype, device=self._device()) for msg, _ in round_.recvs}
        ops = [dist.P2POp(dist.isend, tensor, self.ranks[dst], self.group)
               for tensor, (_, dst) in zip(self._outgoing, round_.sends, strict=True)]
        ops += [dist.P2POp(dist.irecv, buffers[msg], self.ranks[src], self.group) for msg, src in round_.recvs]
        self._outgoing.clear()
        if not ops:
            return
        start = time.perf_counter()
        for work in dist.batch_isend_irecv(ops):  # one work per operation, or one for the batch (NCCL)
            work.wait()
        self.stats.wait_s += time.perf_counter() - start
        self._inbox.update(buffers)

    def _recv(self, src: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Blocking receive from global rank ``src`` (evaluation's one-micro-batch route)."""
        buf = torch.empty(shape, dtype=self.dtype, device=self._device())
        dist.recv(buf, src, group=self.group)
        return buf

    # ------------------------------------------------------------------ schedule

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Forward + backward of all ``batches`` (micro-batches); returns their mean loss on every stage.

        Gradients accumulate into the model's parameters, scaled as ``mean over micro-batches``; those of
        the shared middle block gather all L passes of every micro-batch before the caller's DP reduction.
        """
        start = time.perf_counter()
        self.stats = PipelineStats()
        m = len(batches)
        carries: dict[int, tuple[torch.Tensor, ...]] = {}
        carry_grads: dict[int, tuple[torch.Tensor | None, ...]] = {}
        live: dict[Task, _Live] = {}
        losses: list[torch.Tensor] = []
        for round_ in rounds(self.schedule, self.size, self.passes, m)[self.rank]:
            task = round_.task
            if task is not None and task.backward:
                self._backward(task, live.pop(task.forward), carry_grads)
            elif task is not None:
                live[task] = self._forward(task, batches, carries, losses)
            self._exchange(round_)
        assert not live and not self._inbox, "pipeline schedule left work behind"

        mean = torch.stack(losses).mean() if losses else torch.zeros((), dtype=torch.float32)
        dist.broadcast(mean, self.last_rank, group=self.group)
        self.stats.total_s = time.perf_counter() - start
        return float(mean)

    def _forward(self, task: Task, batches: list[tuple[torch.Tensor, torch.Tensor]],
                 carries: dict[int, tuple[torch.Tensor, ...]], losses: list[torch.Tensor]) -> _Live:
        k = task.micro
        need = needed_by(task, self.rank, self.size, self.passes)
        remote = None if need is None else self._inbox.pop(need[0]).requires_grad_()
        if task.kind == "H":
            loss = self.model.finish(remote, batches[k][1].to(remote.device)).mean()
            losses.append(loss.detach())
            return _Live(loss / len(batches), remote)
        if self.first:
            y = self.model.embed(batches[k][0].to(self._device())) if remote is None else remote
            carry_inputs = tuple(t.detach().requires_grad_() for t in carries.pop(k, ()))
            carry, x = self.model.boundary(task.loop, carry_inputs or None, y)
            if carry:
                carries[k] = carry
            live = _Live(x if task.kind == "B0" else self.model.run_middle(x), remote, carry_inputs, carry or ())
        else:
            live = _Live(self.model.run_middle(remote), remote)
        self._send(live.output)
        return live

    def _backward(self, task: Task, live: _Live, carry_grads: dict[int, tuple[torch.Tensor | None, ...]]) -> None:
        k = task.micro
        outputs = [live.output]
        if task.kind == "H":
            grads: list[torch.Tensor | None] = [torch.ones_like(live.output)]
        else:
            grads = [self._inbox.pop(needed_by(task, self.rank, self.size, self.passes)[0])]
        if live.carry_output:
            outputs.extend(live.carry_output)
            grads.extend(carry_grads.pop(k, (None,) * len(live.carry_output)))
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if live.carry_inputs:
            carry_grads[k] = tuple(t.grad for t in live.carry_inputs)
        if live.remote_input is not None:
            grad = live.remote_input.grad
            self._send(grad if grad is not None else torch.zeros_like(live.remote_input))

    def token_nll(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward only, one micro-batch: per-token loss ``[b, s]`` on every stage (for evaluation).

        The same route as :meth:`step` (ring once per pass, loop boundary on the first stage, loss on the
        last), one micro-batch at a time with blocking sends; the last stage broadcasts the loss.
        """
        device = self._device()
        shape = (self._length(tokens.shape[1]), tokens.shape[0], *self._width())

        with torch.no_grad():
            y, carry = (self.model.embed(tokens.to(device)) if self.first else None), None
            for loop in range(self.passes + 1):
                if self.first:
                    carry, x = self.model.boundary(loop, carry, y)
                if loop == self.passes:
                    break
                x = x if self.first else self._recv(self.prev_rank, shape)
                dist.send(self.model.run_middle(x).contiguous(), self._forward_target(), group=self.group)
                if self.first:
                    y = self._recv(self.last_rank, shape)
            if self.first:
                dist.send(x.contiguous(), self.last_rank, group=self.group)
            if self.last:
                loss = self.model.finish(self._recv(self.first_rank, shape), labels.to(device)).float()
            else:
                loss = torch.empty(labels.shape, dtype=torch.float32, device=device)
        dist.broadcast(loss, self.last_rank, group=self.group)
        return loss

    def _forward_target(self) -> int:
        # The last slice hands its output back to the first stage: the loop boundary.
        return self.first_rank if self.last else self.next_rank

    def _length(self, seq: int) -> int:
        # Under sequence parallelism a stage sends its TP rank's share of the sequence.
        config = self.model.config
        return seq // config.tensor_model_parallel_size if config.sequence_parallel else seq

    def _width(self) -> tuple[int, ...]:
        # mHC wraps every sub-layer, so its n-stream state crosses stages; the other kinds send d wide.
        cfg = self.model.cfg
        return (cfg.hc.streams, cfg.hidden_size) if cfg.kind == "mhc" else (cfg.hidden_size,)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device
