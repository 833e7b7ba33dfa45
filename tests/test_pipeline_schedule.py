"""The circular pipeline's task orders: complete, deadlock-free, and 1F1B's in-flight bound."""

from __future__ import annotations

import pytest

from hyperloop_dist.parallel.pipeline_schedule import (
    Task,
    build,
    consumer_of,
    forward_order,
    in_flight_bound,
    in_flight_microbatches,
    max_in_flight,
    producer_of,
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
