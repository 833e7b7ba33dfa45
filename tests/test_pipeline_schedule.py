"""The circular pipeline's task orders: complete, deadlock-free, and 1F1B's in-flight bound."""

from __future__ import annotations

from collections import deque

import pytest

from hyperloop_dist.parallel.pipeline_schedule import (
    Message,
    Round,
    Task,
    build,
    consumer_of,
    forward_order,
    in_flight_bound,
    in_flight_microbatches,
    max_in_flight,
    messages,
    needed_by,
    producer_of,
    rounds,
    sent_by,
)

SHAPES = [(2, 1, 8), (2, 3, 8), (2, 3, 5), (3, 2, 7), (4, 3, 16), (8, 2, 16)]  # (P, L, m)


def _needs(task: Task, rank: int, stages: int, passes: int) -> tuple[Task, int] | None:
    """The task on another rank whose message ``task`` waits for."""
    if task.backward:
        consumer = consumer_of(task.forward, rank, stages, passes)
        return consumer and (Task(*_key(consumer[0]), True), consumer[1])
    return producer_of(task, rank, stages, passes)


def _key(task: Task) -> tuple[str, int, int]:
    return task.kind, task.loop, task.micro


def _execute(orders: tuple[tuple[Task, ...], ...], stages: int, passes: int) -> None:
    """Run every rank's order with blocking receives: a task waits until its sender ran the task it needs."""
    done: set[tuple[Task, int]] = set()
    position = [0] * stages
    progress = True
    while progress:
        progress = False
        for r in range(stages):
            while position[r] < len(orders[r]):
                task = orders[r][position[r]]
                need = _needs(task, r, stages, passes)
                if need is not None and need not in done:
                    break
                done.add((task, r))
                position[r] += 1
                progress = True
    stuck = [(r, orders[r][position[r]]) for r in range(stages) if position[r] < len(orders[r])]
    assert not stuck, f"deadlock, each rank blocked on: {stuck}"


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize(("stages", "passes", "micro"), SHAPES)
def test_every_task_once_and_no_deadlock(schedule: str, stages: int, passes: int, micro: int) -> None:
    orders = build(schedule, stages, passes, micro)
    for r, order in enumerate(orders):
        forward = forward_order(stages, r, passes, micro)
        assert [t for t in order if not t.backward] == forward  # Megatron's interleaved forward order
        assert sorted(_key(t) for t in order if t.backward) == sorted(map(_key, forward))
    _execute(orders, stages, passes)


@pytest.mark.parametrize(("stages", "passes", "micro"), SHAPES)
def test_1f1b_in_flight_is_bounded_independently_of_grad_accum(stages: int, passes: int, micro: int) -> None:
    small, large = build("1f1b", stages, passes, micro), build("1f1b", stages, passes, 4 * micro)
    for r in range(stages):
        # strictly below: the cap was never reached, so it never delayed a forward
        assert max_in_flight(large[r]) < in_flight_bound(stages, r, passes)
        if micro >= 2 * stages:  # past the first groups the peak no longer grows
            assert max_in_flight(large[r]) == max_in_flight(small[r])
        gpipe = build("gpipe", stages, passes, 4 * micro)[r]
        assert max_in_flight(gpipe) == len(gpipe) // 2  # all of the step's forwards
    assert in_flight_microbatches("1f1b", stages, 0, passes, 4 * micro) <= stages + 2 * stages / passes + 1e-9
    assert in_flight_microbatches("gpipe", stages, 0, passes, micro) == micro




# ---------------------------------------------------------------------------- NCCL's stream model
# Under NCCL a send may wait until its receive runs (assumed always here: a message bigger than
# NCCL_BUFFSIZE), and a stream runs its operations one after another.

def _deadlocks_in_rounds(plan: tuple[tuple[Round, ...], ...]) -> list[tuple]:
    """CircularPipeline's batches (one per round with traffic) on one stream per rank (a batch uses the
    pipeline group's communicator): a batch starts when the rank's previous one has finished, and each of
    its operations completes when it meets its partner in the peer's running batch. Returns what each
    stuck rank waits on ([] when every batch completes)."""
    posts = [deque([*((("send", dst, m) for m, dst in rd.sends)), *(("recv", src, m) for m, src in rd.recvs)]
                   for rd in rank_plan if rd.sends or rd.recvs) for rank_plan in plan]
    progress = True
    while progress:
        progress = False
        for r, queue in enumerate(posts):
            for op in list(queue[0]) if queue else []:
                kind, peer, message = op
                mate = ("recv" if kind == "send" else "send", r, message)
                if posts[peer] and mate in posts[peer][0]:
                    queue[0].remove(op)
                    posts[peer][0].remove(mate)
            while queue and not queue[0]:
                queue.popleft()
                progress = True
    return [(r, queue[0]) for r, queue in enumerate(posts) if queue]


def _deadlocks_posted_alone(orders: tuple[tuple[Task, ...], ...], stages: int, passes: int) -> list[tuple]:
    """The pipeline's first way: each send posted alone as soon as it was produced (the rank goes on), each
    receive alone when a task needed it (the rank waits), a channel read in its sender's order; NCCL runs
    one stream per pair of ranks, for both directions."""
    streams: dict[tuple[int, int], deque] = {}
    pending = [deque(orders[r]) for r in range(stages)]
    channels = {(src, dst): deque(m for m, d in messages(orders[src], src, stages, passes) if d == dst)
                for src in range(stages) for dst in range(stages) if src != dst}
    inbox: list[set[Message]] = [set() for _ in range(stages)]
    waiting: list[tuple | None] = [None] * stages
    progress = True
    while progress:
        progress = False
        for r in range(stages):
            while waiting[r] is None and pending[r]:
                task = pending[r][0]
                need = needed_by(task, r, stages, passes)
                if need is not None and need[0] not in inbox[r]:  # receive the channel's next message
                    waiting[r] = ("recv", need[1], channels[need[1], r].popleft())
                    streams.setdefault((r, need[1]), deque()).append(waiting[r])
                    continue
                if need is not None:
                    inbox[r].remove(need[0])
                pending[r].popleft()
                sent = sent_by(task, r, stages, passes)
                if sent is not None:
                    streams.setdefault((r, sent[1]), deque()).append(("send", sent[1], sent[0]))
                progress = True
        for (r, peer), stream in streams.items():
            back = streams.get((peer, r))
            while stream and back and back[0] == ("recv" if stream[0][0] == "send" else "send", r, stream[0][2]):
                for rank, op in ((r, stream.popleft()), (peer, back.popleft())):
                    if op[0] == "recv":
                        inbox[rank].add(op[2])
                        waiting[rank] = None
                progress = True
    return [(pair, s[0]) for pair, s in streams.items() if s]


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize(("stages", "passes", "micro"), SHAPES)
def test_rounds_run_every_order_and_cannot_deadlock_nccl_streams(schedule: str, stages: int, passes: int,
                                                                micro: int) -> None:
    orders, plan = build(schedule, stages, passes, micro), rounds(schedule, stages, passes, micro)
    for r in range(stages):
        assert tuple(rd.task for rd in plan[r] if rd.task is not None) == orders[r]
        assert [m for rd in plan[r] for m in rd.sends] == list(messages(orders[r], r, stages, passes))
        inbox: set[tuple[Message, int]] = set()
        for rd in plan[r]:  # a task's input arrived in an earlier round, from the rank that makes it
            need = rd.task and needed_by(rd.task, r, stages, passes)
            if need:
                inbox.remove(need)
            inbox.update(rd.recvs)
        assert not inbox
    assert sorted(map(str, (m for p in plan for rd in p for m, _ in rd.sends))) == sorted(
        map(str, (m for p in plan for rd in p for m, _ in rd.recvs)))
    assert not _deadlocks_in_rounds(plan)


def test_the_stream_model_catches_sends_posted_alone() -> None:
    """The model is not vacuous: posting each send alone deadlocks PP=2's ring (both stages queue a send
    to the other ahead of their receive from it), and the rounds plan of the same order does not."""
    assert _deadlocks_posted_alone(build("1f1b", 2, 3, 8), 2, 3)
    assert not _deadlocks_in_rounds(rounds("1f1b", 2, 3, 8))
