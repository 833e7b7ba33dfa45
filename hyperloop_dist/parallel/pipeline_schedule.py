"""Task order of the circular pipeline on every rank: GPipe, or 1F1B with a bounded number in flight.

One micro-batch ``k`` is a chain of tasks round the ring of ``P`` stages, ``L`` passes:

    F(0,k)@0 -> F(0,k)@1 -> ... -> F(0,k)@P-1 -> F(1,k)@0 -> ... -> F(L-1,k)@P-1 -> B0(k)@0 -> H(k)@P-1

``F(l,k)`` runs this rank's slice of the middle block for pass ``l`` (on the first stage after the loop
boundary of pass ``l``, and for ``l = 0`` the embedding), ``B0(k)`` is the final loop boundary, ``H(k)``
the end block and the loss. Its backward is the same chain reversed. Every rank computes every rank's
order (it is a pure function of ``P, L, m``), and from the orders the synchronous rounds
(:func:`rounds`) in which :class:`~hyperloop_dist.parallel.pipeline.CircularPipeline` runs them: each
message travels in one batch of the round that produced it, which its sender and its receiver both post
(no tags, which NCCL does not have, and no send waiting ahead of a receive).

Forward tasks on a rank always run in Megatron's interleaved order: micro-batches in groups of ``P``,
inside a group pass by pass (the ``L`` passes play the ``L`` virtual chunks, here sharing one module).

* ``gpipe``: every forward, then every backward in reverse. A rank holds ``m·L`` slice activations
  (``m`` = micro-batches of the step): memory grows with ``grad_accum``.
* ``1f1b``: a greedy list schedule on unit-time tasks. A rank runs a ready backward when it has one, else
  its next forward if fewer than ``W_r`` forwards are in flight (run, backward not yet run). Derivation:
  a rank's first backward waits for micro-batch 0 to finish its whole chain; in the interleaved order a
  rank has by then started the ``L·P`` forwards of the first group, plus the ones it runs while the
  chain travels back (two per stage still ahead of it, as in Megatron's warm-up):

      W_r = L·P + 2·(P - 1 - r) + 1  (slice activations; plus the one B0 / H task on the first / last stage)

  which is Megatron's interleaved warm-up ``(L-1)·P + 2·(P-1-r)`` plus the ``P`` forwards a ring pass
  adds, plus the one forward of the steady state. In micro-batches (``L`` slices each) that is about
  ``P + 2P/L``: independent of ``m``. Preferring ready backwards already keeps the greedy order under
  the cap (the measured peak, :func:`max_in_flight`, stays below ``W_r`` and stops growing once
  ``m >= 2P``; ``tests/test_pipeline_schedule.py`` checks both), so the cap is a guarantee that never
  delays work.

The bubble is the same for both orders (1F1B only bounds memory).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

SCHEDULES = ("1f1b", "gpipe")


@dataclass(frozen=True)
class Task:
    """One unit of work on one rank. ``kind``: "F" (a pass through the rank's slice), "B0" (final loop
    boundary, first stage), "H" (end block + loss, last stage); ``backward`` for its backward."""

    kind: str
    loop: int
    micro: int
    backward: bool = False

    @property
    def forward(self) -> Task:
        return Task(self.kind, self.loop, self.micro)


@dataclass(frozen=True)
class Message:
    """What travels between ranks: the output of ``producer`` (forward) or its gradient (backward)."""

    producer: Task  # a forward task
    grad: bool


def forward_order(stages: int, rank: int, passes: int, micro_batches: int) -> list[Task]:
    """This rank's forward tasks in the global (group of P, pass, micro-batch) order."""
    tasks = []
    for group_start in range(0, micro_batches, stages):
        group = range(group_start, min(group_start + stages, micro_batches))
        for loop in range(passes + 1):
            for k in group:
                if loop < passes:
                    tasks.append(Task("F", loop, k))
                elif rank == 0:
                    tasks.append(Task("B0", loop, k))
                elif rank == stages - 1:
                    tasks.append(Task("H", loop, k))
    return tasks


def producer_of(task: Task, rank: int, stages: int, passes: int) -> tuple[Task, int] | None:
    """(forward task, its rank) whose output is ``task``'s (forward) input from another stage, or None."""
    if task.kind == "H":
        return Task("B0", passes, task.micro), 0
    if task.kind == "B0":
        return Task("F", passes - 1, task.micro), stages - 1
    if rank > 0:
        return Task("F", task.loop, task.micro), rank - 1
    if task.loop > 0:
        return Task("F", task.loop - 1, task.micro), stages - 1
    return None


def consumer_of(task: Task, rank: int, stages: int, passes: int) -> tuple[Task, int] | None:
    """(forward task, its rank) that takes ``task``'s output as input; None for the loss."""
    if task.kind == "H":
        return None
    if task.kind == "B0":
        return Task("H", passes, task.micro), stages - 1
    if rank < stages - 1:
        return Task("F", task.loop, task.micro), rank + 1
    if task.loop + 1 < passes:
        return Task("F", task.loop + 1, task.micro), 0
    return Task("B0", passes, task.micro), 0


def in_flight_bound(stages: int, rank: int, passes: int) -> int:
    """1F1B's cap on forwards in flight on ``rank`` (slices, plus one B0/H on the first/last stage)."""
    return passes * stages + 2 * (stages - 1 - rank) + 1 + (rank in (0, stages - 1))


def in_flight_microbatches(schedule: str, stages: int, rank: int, passes: int, micro_batches: int) -> float:
    """Micro-batches' worth of activations ``rank`` holds at its peak (the planner's multiplier).

    GPipe: all ``m``. 1F1B: :func:`in_flight_bound` slices over the ``L`` slices of one micro-batch (the
    B0 / H task counted as one more slice), never more than ``m``.
    """
    if stages == 1:
        return 1.0
    if schedule == "gpipe":
        return float(micro_batches)
    return min(float(micro_batches), in_flight_bound(stages, rank, passes) / passes)


@lru_cache(maxsize=64)
def build(schedule: str, stages: int, passes: int, micro_batches: int) -> tuple[tuple[Task, ...], ...]:
    """Every rank's task order (forward and backward) for one optimizer step."""
    if schedule == "gpipe":
        orders = []
        for r in range(stages):
            fwd = forward_order(stages, r, passes, micro_batches)
            orders.append(tuple(fwd + [_backward(t) for t in reversed(fwd)]))
        return tuple(orders)
    if schedule != "1f1b":
        raise ValueError(f"pipeline schedule {schedule!r}: must be one of {', '.join(SCHEDULES)}")
    return _one_f_one_b(stages, passes, micro_batches)


def _one_f_one_b(stages: int, passes: int, micro_batches: int) -> tuple[tuple[Task, ...], ...]:
    fwd = [forward_order(stages, r, passes, micro_batches) for r in range(stages)]
    done: dict[tuple[Task, int], int] = {}  # (task, rank) -> slot it ran in
    orders: list[list[Task]] = [[] for _ in range(stages)]
    next_fwd = [0] * stages
    ready_bwd: list[list[Task]] = [[] for _ in range(stages)]  # forwards run, backward not yet
    total = sum(2 * len(f) for f in fwd)
    slot = 0
    while sum(map(len, orders)) < total:
        ran = []
        for r in range(stages):
            task = _pick(r, stages, passes, slot, fwd[r], next_fwd[r], ready_bwd[r], done)
            if task is None:
                continue
            if task.backward:
                ready_bwd[r].remove(task.forward)
            else:
                next_fwd[r] += 1
                ready_bwd[r].append(task)
            orders[r].append(task)
            ran.append((task, r))
        for item in ran:
            done[item] = slot
        slot += 1
        if slot > 4 * total + 16:  # cannot happen for a valid bound; fail loudly rather than spin
            raise RuntimeError(f"1F1B schedule made no progress (P={stages}, L={passes}, m={micro_batches})")
    return tuple(tuple(o) for o in orders)


def _pick(r: int, stages: int, passes: int, slot: int, fwd: list[Task], nxt: int, in_flight: list[Task],
          done: dict[tuple[Task, int], int]) -> Task | None:
    def finished(task: Task, rank: int) -> bool:
        return done.get((task, rank), slot) < slot

    for task in sorted(in_flight, key=lambda t: (t.micro, -t.loop)):
        consumer = consumer_of(task, r, stages, passes)
        if consumer is None or finished(_backward(consumer[0]), consumer[1]):
            return _backward(task)
    if nxt < len(fwd) and len(in_flight) < in_flight_bound(stages, r, passes):
        task = fwd[nxt]
        producer = producer_of(task, r, stages, passes)
        if producer is None or finished(*producer):
            return task
    return None


def _backward(task: Task) -> Task:
    return Task(task.kind, task.loop, task.micro, True)


def sent_by(task: Task, rank: int, stages: int, passes: int) -> tuple[Message, int] | None:
    """(message, destination rank) that ``task`` sends when it has run, or None."""
    if task.backward:
        source = producer_of(task.forward, rank, stages, passes)
        return None if source is None else (Message(source[0], grad=True), source[1])
    target = consumer_of(task, rank, stages, passes)
    return None if target is None else (Message(task, grad=False), target[1])


def needed_by(task: Task, rank: int, stages: int, passes: int) -> tuple[Message, int] | None:
    """(message, source rank) that ``task`` needs from another stage before it runs, or None."""
    if task.backward:
        consumer = consumer_of(task.forward, rank, stages, passes)
        return None if consumer is None else (Message(task.forward, grad=True), consumer[1])
    source = producer_of(task, rank, stages, passes)
    return None if source is None else (Message(source[0], grad=False), source[1])


def messages(order: tuple[Task, ...], rank: int, stages: int, passes: int) -> Iterator[tuple[Message, int]]:
    """The messages ``rank`` sends, in the order it sends them, with their destination."""
    for task in order:
        sent = sent_by(task, rank, stages, passes)
        if sent is not None:
            yield sent


@dataclass(frozen=True)
class Round:
    """One rank's share of a round: the task it runs (if any), then one batch of point-to-point operations:
    what it sent this round and what its neighbours sent it this round."""

    task: Task | None
    sends: tuple[tuple[Message, int], ...]  # (message, destination rank)
    recvs: tuple[tuple[Message, int], ...]  # (message, source rank)


@lru_cache(maxsize=64)
def rounds(schedule: str, stages: int, passes: int, micro_batches: int) -> tuple[tuple[Round, ...], ...]:
    """Every rank's order (:func:`build`) cut into synchronous rounds, the form the pipeline runs.

    In round ``t`` each rank runs its next task if the message it needs arrived in an earlier round; then
    every message produced in round ``t`` travels in round ``t``'s batch, whose receives its destination
    posts in its own round-``t`` batch. A rank's batches hold exactly the partners of its neighbours'
    batches of the same round, so the exchanges complete even if a send waits for its receive (NCCL with a
    message over its buffer size); rounds in which a rank neither runs nor receives are skipped.
    """
    orders = build(schedule, stages, passes, micro_batches)
    position = [0] * stages
    arrived: set[tuple[Message, int]] = set()  # (message, destination): producers' tasks repeat across ranks
    plan: list[list[Round]] = [[] for _ in range(stages)]
    while any(position[r] < len(orders[r]) for r in range(stages)):
        ran: list[Task | None] = []
        for r in range(stages):
            task = orders[r][position[r]] if position[r] < len(orders[r]) else None
            need = task and needed_by(task, r, stages, passes)
            ran.append(task if task is not None and (need is None or (need[0], r) in arrived) else None)
            position[r] += ran[r] is not None
        if not any(ran):
            raise RuntimeError(f"pipeline order cannot progress (schedule {schedule}, P={stages}, L={passes}, "
                               f"m={micro_batches}), stuck at {position}")
        sent = [task and sent_by(task, r, stages, passes) for r, task in enumerate(ran)]
        for r in range(stages):
            recvs = tuple((item[0], src) for src, item in enumerate(sent) if item and item[1] == r)
            if ran[r] is not None or recvs:
                plan[r].append(Round(ran[r], (sent[r],) if sent[r] else (), recvs))
        arrived.update(item for item in sent if item)
    return tuple(tuple(p) for p in plan)


def max_in_flight(order: tuple[Task, ...]) -> int:
    """Most forwards whose backward had not yet run, over the order (the activations a rank holds)."""
    live = peak = 0
    for task in order:
        live += -1 if task.backward else 1
        peak = max(peak, live)
    return peak
